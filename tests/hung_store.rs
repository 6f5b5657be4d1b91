//! The central whatever its storage is doing: a store whose draw tally and
//! close never complete must not hold `server::run` past its deadlines, and
//! a store that takes its time must not make a connection spin or blame
//! its peer for the wait.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{self, BoxFuture, FutureExt};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use common::raw::write_frame;
use lottery::config::ServerConfig;
use lottery::logging::ContractFormat;
use lottery::model::Bets;
use lottery::server;
use lottery::store::{
    ClosedRound, Draw, Durability, Opened, Options, Sequence, Storage, StorageError, Store, Stored,
    Tally,
};

/// A store stuck in storage: the tally and the close never complete (as a
/// writer thread stuck in a syscall would leave them).
#[derive(Debug)]
struct Hung;

impl Store for Hung {
    fn describe(&self) -> String {
        "a hung store".into()
    }
    fn submit<'a>(
        &'a self,
        _bets: &Bets,
        _skip: usize,
        _sequence: &Sequence,
        _receipt: lottery::receipt::Receipt,
    ) -> BoxFuture<'a, Result<Stored, StorageError>> {
        future::pending().boxed()
    }
    fn tally(&self, _winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
        future::pending().boxed()
    }
    fn recompute(
        &self,
        _winning_number: u16,
    ) -> BoxFuture<'_, Result<lottery::receipt::Recomputed, StorageError>> {
        future::pending().boxed()
    }
    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
        future::ready(Ok(None)).boxed()
    }
    fn save_draw<'a>(&'a self, _draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
        future::pending().boxed()
    }
    fn close_sales<'a>(
        &'a self,
        _close: &'a ClosedRound,
    ) -> BoxFuture<'a, Result<(ClosedRound, bool), StorageError>> {
        future::pending().boxed()
    }
    fn load_close(&self) -> BoxFuture<'_, Result<Option<ClosedRound>, StorageError>> {
        future::ready(Ok(None)).boxed()
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        future::pending().boxed()
    }
}

/// Log lines in the contract's format, collected in memory; every write
/// wakes whoever waits for a line.
#[derive(Clone, Default)]
struct Lines(Arc<(Mutex<Vec<u8>>, Notify)>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(buf);
        self.0 .1.notify_waiters();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8(self.0 .0.lock().unwrap().clone()).unwrap()
    }

    /// Waits (at most 30 s) for a line containing `needle`.
    async fn wait_for(&self, needle: &str) {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                // Registered before the check, so no write slips between.
                let written = self.0 .1.notified();
                if self.text().contains(needle) {
                    return;
                }
                written.await;
            }
        })
        .await;
        assert!(found.is_ok(), "no {needle:?} in:\n{}", self.text());
    }
}

// Single-threaded, so the thread-local subscriber sees every task's events.
#[tokio::test(flavor = "current_thread")]
async fn hung_store_does_not_hold_shutdown() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .event_format(ContractFormat)
        .with_writer({
            let lines = lines.clone();
            move || lines.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let config = ServerConfig {
        port: 0,
        agencies: 1,
        shutdown_grace: 1,
        ..ServerConfig::default()
    };
    let listener = server::bind_addr("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let opened = Opened {
        store: Arc::new(Hung),
        stored: BTreeMap::new(),
    };
    let running = tokio::spawn({
        let token = token.clone();
        async move { server::run_with_store(listener, &config, opened, token).await }
    });

    // The only agency finishes: the draw starts, and its tally hangs.
    let mut waiting = TcpStream::connect(addr).await.unwrap();
    write_frame(&mut waiting, "ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    lines
        .wait_for("action: agencia_finalizada | result: success | agency: 1")
        .await;

    let stopping = Instant::now();
    token.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(8), running)
        .await
        .unwrap_or_else(|_| panic!("server::run still running:\n{}", lines.text()));
    outcome.unwrap().unwrap();
    // Grace (1 s) plus the store's close deadline, with room for a slow
    // machine.
    assert!(stopping.elapsed() < Duration::from_secs(6));

    let text = lines.text();
    assert!(
        text.contains("action: close_bets_file | result: fail | reason: "),
        "{text}"
    );
    // The waiting agency was let go, without winners.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?} {rest:?}");
}

/// The real bets file, whose acknowledgements wait until the test opens
/// the gate: batches stay in flight as long as the test likes.
#[derive(Debug)]
struct Gated {
    inner: Arc<dyn Store>,
    gate: tokio::sync::watch::Receiver<bool>,
}

impl Store for Gated {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn submit<'a>(
        &'a self,
        bets: &Bets,
        skip: usize,
        sequence: &Sequence,
        receipt: lottery::receipt::Receipt,
    ) -> BoxFuture<'a, Result<Stored, StorageError>> {
        let queued = self.inner.submit(bets, skip, sequence, receipt);
        let mut gate = self.gate.clone();
        async move {
            let stored = queued.await?;
            Ok(async move {
                let outcome = stored.await;
                let _ = gate.wait_for(|open| *open).await;
                outcome
            }
            .boxed())
        }
        .boxed()
    }
    fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
        self.inner.tally(winning_number)
    }
    fn recompute(
        &self,
        winning_number: u16,
    ) -> BoxFuture<'_, Result<lottery::receipt::Recomputed, StorageError>> {
        self.inner.recompute(winning_number)
    }
    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
        self.inner.load_draw()
    }
    fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
        self.inner.save_draw(draw)
    }
    fn close_sales<'a>(
        &'a self,
        close: &'a ClosedRound,
    ) -> BoxFuture<'a, Result<(ClosedRound, bool), StorageError>> {
        self.inner.close_sales(close)
    }
    fn load_close(&self) -> BoxFuture<'_, Result<Option<ClosedRound>, StorageError>> {
        self.inner.load_close()
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}

/// CPU time this process has used, user and system.
fn cpu_time() -> Duration {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let (user, system) = (usage.user_time(), usage.system_time());
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Duration::from_micros(micros(user) + micros(system))
}

/// A peer stalled half-way through a frame while its earlier batch waits
/// at a slow store: once the frame's deadline has passed the connection
/// waits for the store, it does not spin on the clock (it used to, a core
/// at 100 % until the batch settled), and the peer is then cut for its
/// frame as it would have been without the store's wait.
#[tokio::test(flavor = "current_thread")]
async fn a_stalled_frame_beside_a_slow_store_does_not_spin() {
    let lines = Lines::default();
    let subscriber = tracing_subscriber::fmt()
        .event_format(ContractFormat)
        .with_writer({
            let lines = lines.clone();
            move || lines.clone()
        })
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let bets = dir.path().join("bets.csv");
    let opened = lottery::store::open(&Options {
        storage: Storage::File(bets.clone()),
        record: Some(dir.path().join("bets.draw.toml")),
        durability: Durability::NoSync,
        patience: Duration::from_secs(1),
    })
    .await
    .unwrap();
    let (open_gate, gate) = tokio::sync::watch::channel(false);
    let opened = Opened {
        store: Arc::new(Gated {
            inner: opened.store,
            gate,
        }),
        stored: opened.stored,
    };
    let config = ServerConfig {
        port: 0,
        agencies: 1,
        frame_timeout: 1,
        ..ServerConfig::default()
    };
    let listener = server::bind_addr("127.0.0.1:0".parse().unwrap(), 16).unwrap();
    let addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let running = tokio::spawn({
        let token = token.clone();
        async move { server::run_with_store(listener, &config, opened, token).await }
    });

    let bet = |doc: u32| {
        format!(
            r"BATCH_SIZE:1|BET_1:NOMBRE:Eva\|APELLIDO:Ruiz\|DOCUMENTO:{doc}\|NACIMIENTO:1990-01-01\|NUMERO:7574\|AGENCY_ID:1"
        ) + "\n"
    };
    let mut peer = TcpStream::connect(addr).await.unwrap();
    write_frame(&mut peer, bet(30_000_001)).await;
    // Half of the next frame, and then nothing.
    let next = common::raw::frame(bet(30_000_002).as_bytes());
    tokio::io::AsyncWriteExt::write_all(&mut peer, &next[..10])
        .await
        .unwrap();

    // The first batch is at the store, held there, past the frame's
    // deadline (1 s): what the connection does meanwhile is the subject,
    // so the test lets the time pass and counts the CPU it took.
    let before = cpu_time();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let spent = cpu_time() - before;
    assert!(
        spent < Duration::from_millis(200),
        "{spent:?} of CPU in 2.5 s of waiting for the store:\n{}",
        lines.text()
    );

    // The store answers: the batch is acknowledged, then the stalled frame
    // is refused, blamed on the peer as it should be.
    open_gate.send(true).unwrap();
    let stored = common::raw::read_frame(&mut peer).await;
    assert!(stored.contains("STORED:1"), "{stored}");
    let timeout = common::raw::read_frame(&mut peer).await;
    assert!(
        timeout.starts_with("STATUS:ERROR|CODE:TIMEOUT|MESSAGE:frame not completed in time (1s)"),
        "{timeout}"
    );
    assert_eq!(std::fs::read_to_string(&bets).unwrap().lines().count(), 1);
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
