//! The central stops within its grace period whatever the storage is
//! doing: a store whose draw tally and close never complete must not hold
//! `server::run` past its deadlines.

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
use lottery::store::{Draw, Opened, Sequence, StorageError, Store, Stored, Tally};

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
