//! Nothing acknowledged is lost and nothing is stored twice, whatever
//! crashes: the server or the agencies SIGKILLed at seeded random moments,
//! connections cut between an acknowledgement and its reading, and a bets
//! file that stops being writable.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const WINNING: u16 = 7574;

fn data(agencies: u32, bets_per_agency: u64, seed: u64) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies,
        bets_per_agency,
        seed,
        winning_number: WINNING,
        winner_share: 0.005,
        tricky_share: 0.01,
        crlf: false,
    })
}

/// Waits for every agency to finish, then checks the bets file against the
/// input exactly and each agency's winners against the input's.
fn check_outcome(data: &Path, work: &Path, storage: &Path, agencies: &[Proc]) {
    let expected = expected(data, agencies.len() as u32, WINNING);
    // One limit for all the uploads, from the moment they are awaited.
    let bets = expected.rows.values().map(|r| r.len() as u64).sum();
    let deadline = Instant::now() + upload_limit(bets);
    for (i, agency) in agencies.iter().enumerate() {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {} failed: {status}\n{}\n{}",
            i + 1,
            agency.output(),
            agency.stderr()
        );
        assert!(
            !agency.output().contains("result: fail"),
            "agency {} logged a failure:\n{}",
            i + 1,
            agency.output()
        );
    }
    let stored = stored(storage);
    for (agency, rows) in &expected.rows {
        let got = stored.get(agency).map_or(0, Vec::len);
        assert_eq!(
            got,
            rows.len(),
            "agency {agency}: stored {got} of {} bets",
            rows.len()
        );
    }
    assert_eq!(stored, expected.rows, "stored rows differ from the input");
    for (agency, winners) in &expected.winners {
        let got = read_winners(&work.join(format!("winners-{agency}.txt")));
        assert_eq!(&got, winners, "agency {agency} winners");
    }
}

fn winners_file(work: &Path, id: u32) -> std::path::PathBuf {
    work.join(format!("winners-{id}.txt"))
}

/// Starts agencies 1 to `n` against `address`, on the data files in `data`,
/// writing their winners into `work`.
fn start_agencies(n: u32, address: &str, data: &Path, work: &Path) -> Vec<Proc> {
    (1..=n)
        .map(|id| start_agency(id, address, &data_file(data, id), &winners_file(work, id)))
        .collect()
}

#[test]
fn server_sigkilled_twenty_times_loses_and_duplicates_nothing() {
    const AGENCIES: u32 = 4;
    let data = data(AGENCIES, 25_000, 11);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let mut rng = ChaCha8Rng::seed_from_u64(20261126);

    let mut server = Server::start(&storage, AGENCIES, WINNING);
    // The agencies keep one address while the server restarts on new ports.
    let relay = Relay::start(&server.address());
    let agencies = start_agencies(AGENCIES, &relay.address, data.path(), work.path());

    let mut truncations = 0;
    for _cycle in 0..20 {
        // A seeded moment: after some number of batches this run.
        for _ in 0..rng.random_range(5..40) {
            server
                .proc
                .wait_for("action: apuesta_recibida | result: success");
        }
        server.proc.signal(Signal::SIGKILL);
        assert!(!server.proc.wait_exit(STEP).success());
        relay.point_at(None);
        server = Server::start(&storage, AGENCIES, WINNING);
        relay.point_at(Some(&server.address()));
        // Start-up logs the recovery before it listens, and `start` has
        // waited for the listening line.
        let log = server.proc.output();
        let recover = log
            .lines()
            .find(|l| l.contains("action: recover | result: success"))
            .unwrap_or_else(|| panic!("no recovery line in:\n{log}"));
        truncations += usize::from(!recover.contains("truncated_bytes: 0"));
    }
    check_outcome(data.path(), work.path(), &storage, &agencies);
    eprintln!("20 kills, {truncations} torn rows repaired");

    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let reconnects: usize = agencies
        .iter()
        .map(|a| {
            a.output()
                .matches("action: reconnect | result: in_progress")
                .count()
        })
        .sum();
    assert!(
        reconnects >= 20,
        "the agencies reconnected only {reconnects} times"
    );
}

#[test]
fn agencies_sigkilled_and_restarted_resume_exactly() {
    const AGENCIES: u32 = 5;
    let data = data(AGENCIES, 20_000, 12);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let mut rng = ChaCha8Rng::seed_from_u64(7574);
    let server = Server::start(&storage, AGENCIES, WINNING);
    let command = |id: u32| {
        agency_command(
            id,
            &server.address(),
            &data_file(data.path(), id),
            &winners_file(work.path(), id),
        )
    };
    let mut agencies: Vec<Proc> = (1..=AGENCIES).map(|id| Proc::spawn(command(id))).collect();

    let mut kills = 0;
    while kills < 20 {
        for _ in 0..rng.random_range(5..30) {
            server
                .proc
                .wait_for("action: apuesta_recibida | result: success");
        }
        let victim = rng.random_range(0..AGENCIES as usize);
        if agencies[victim].try_signal(Signal::SIGKILL) {
            agencies[victim].wait_exit(PATIENCE);
            agencies[victim] = Proc::spawn(command(victim as u32 + 1));
            kills += 1;
        }
    }
    check_outcome(data.path(), work.path(), &storage, &agencies);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

/// Forwards agency connections to the central, and now and then swallows a
/// reply and cuts both sides: the central has done the work, the agency
/// never hears of it.
struct CuttingProxy {
    address: String,
    cuts: Arc<AtomicUsize>,
}

impl CuttingProxy {
    fn start(upstream: String, seed: u64, one_in: u32) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let cuts = Arc::new(AtomicUsize::new(0));
        let rng = Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed)));
        let counter = cuts.clone();
        std::thread::spawn(move || {
            for agency in listener.incoming() {
                let Ok(agency) = agency else { return };
                let Ok(central) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (rng, counter) = (rng.clone(), counter.clone());
                let (mut a_in, mut c_out) =
                    (agency.try_clone().unwrap(), central.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a_in, &mut c_out);
                    let _ = c_out.shutdown(Shutdown::Write);
                });
                std::thread::spawn(move || {
                    forward_replies(central, agency, &rng, &counter, one_in)
                });
            }
        });
        CuttingProxy { address, cuts }
    }
}

fn forward_replies(
    mut central: TcpStream,
    mut agency: TcpStream,
    rng: &Mutex<ChaCha8Rng>,
    cuts: &AtomicUsize,
    one_in: u32,
) {
    loop {
        let mut header = [0u8; 4];
        if central.read_exact(&mut header).is_err() {
            break;
        }
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        if central.read_exact(&mut payload).is_err() {
            break;
        }
        if rng.lock().unwrap().random_range(0..one_in) == 0 {
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if agency
            .write_all(&header)
            .and_then(|()| agency.write_all(&payload))
            .is_err()
        {
            break;
        }
    }
    let _ = agency.shutdown(Shutdown::Both);
    let _ = central.shutdown(Shutdown::Both);
}

#[test]
fn acknowledgements_lost_on_the_way_are_not_stored_twice() {
    const AGENCIES: u32 = 3;
    let data = data(AGENCIES, 10_000, 13);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, AGENCIES, WINNING);
    let proxy = CuttingProxy::start(server.address(), 99, 25);
    let agencies = start_agencies(AGENCIES, &proxy.address, data.path(), work.path());
    check_outcome(data.path(), work.path(), &storage, &agencies);
    let cuts = proxy.cuts.load(Ordering::SeqCst);
    assert!(cuts >= 10, "only {cuts} replies were cut");
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_bets_file_replaced_by_a_directory_fails_batches_until_it_is_back() {
    let data = data(1, 20_000, 14);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let aside = work.path().join("aside.csv");
    let server = Server::start(&storage, 1, WINNING);
    let agency = start_agency(
        1,
        &server.address(),
        &data_file(data.path(), 1),
        &winners_file(work.path(), 1),
    );
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    std::fs::rename(&storage, &aside).unwrap();
    std::fs::create_dir(&storage).unwrap();

    let failed = server
        .proc
        .wait_for("action: apuesta_recibida | result: fail");
    assert!(failed.contains("code: STORAGE_FAILED"), "{failed}");
    assert!(failed.contains("no longer the file"), "{failed}");
    server.proc.wait_for("action: store | result: fail");
    // The agency is told, keeps its bets, and tries again.
    agency.wait_for("action: reconnect | result: in_progress");
    std::fs::remove_dir(&storage).unwrap();
    std::fs::rename(&aside, &storage).unwrap();

    check_outcome(
        data.path(),
        work.path(),
        &storage,
        std::slice::from_ref(&agency),
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

/// The stored rows of `rows`, encoded as the central stores them.
fn encode(rows: &[Row]) -> Vec<u8> {
    let mut bets = lottery::model::Bets::new();
    for r in rows {
        bets.push_for(r[0].parse().unwrap(), &r[1], &r[2], &r[3], &r[4], &r[5])
            .unwrap();
    }
    let mut out = Vec::new();
    lottery::store::file::encode_rows(bets.iter(), &mut out);
    out
}

/// A bets file as a crash in the middle of a write leaves it: complete rows
/// of agencies 1 and 2 (in batches, interleaved), agency 3 with none, then
/// `torn` (the start of one more row). The real server must cut exactly
/// `torn`, keep every complete row, and the agencies must then complete the
/// upload exactly.
fn torn_row_is_cut_and_the_upload_completes(torn: impl Fn(&Expected) -> Vec<u8>) {
    const AGENCIES: u32 = 3;
    let data = data(AGENCIES, 3_000, 15);
    let expected = expected(data.path(), AGENCIES, WINNING);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let mut complete = Vec::new();
    for batch in 0..10 {
        for (agency, kept) in [(1u32, 1_000), (2, 457)] {
            let rows = &expected.rows[&agency][..kept];
            let per_batch = kept.div_ceil(10);
            let from = (batch * per_batch).min(kept);
            complete.extend(encode(&rows[from..(from + per_batch).min(kept)]));
        }
    }
    let torn = torn(&expected);
    assert!(!torn.is_empty() && !torn.ends_with(b"\n"));
    std::fs::write(&storage, [complete.as_slice(), &torn].concat()).unwrap();

    let server = Server::start(&storage, AGENCIES, WINNING);
    let recover = server
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: recover | result: success"))
        .expect("a recovery line before listening");
    let truncated: Vec<&str> = recover
        .split(" | ")
        .filter(|f| f.starts_with("truncated_bytes: "))
        .collect();
    assert_eq!(
        truncated,
        [format!("truncated_bytes: {}", torn.len())],
        "{recover}"
    );
    assert!(recover.contains("rows: 1457"), "{recover}");
    assert!(
        std::fs::read(&storage).unwrap() == complete,
        "the bets file is not exactly its complete rows after recovery"
    );

    let agencies = start_agencies(AGENCIES, &server.address(), data.path(), work.path());
    check_outcome(data.path(), work.path(), &storage, &agencies);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_half_written_last_row_is_cut_exactly_on_start() {
    torn_row_is_cut_and_the_upload_completes(|expected| {
        let next = encode(&expected.rows[&2][457..458]);
        next[..next.len() / 2].to_vec()
    });
}

#[test]
fn a_last_row_torn_inside_a_quoted_multiline_name_is_cut_exactly_on_start() {
    torn_row_is_cut_and_the_upload_completes(|_| b"3,\"Juan\nCar".to_vec());
}

/// While the central still opens its store (a large bets file being read
/// back; a database still starting), connecting must be refused. A port
/// that accepts and then never answers `HELLO` looks like the design's
/// reference central, and our agency would fall back to that protocol,
/// giving up resuming. A PostgreSQL URL to a port where nothing listens
/// keeps the store opening (it retries, saying so) for as long as the test
/// needs; no database is involved.
#[test]
fn the_port_is_bound_only_once_the_store_is_open() {
    let database = HeldPort::new();
    let port = HeldPort::new();
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", port.port.to_string())
        .env(
            "SERVER_STORAGE",
            format!("postgres://lottery@{}/lottery", database.address()),
        );
    let server = Proc::spawn(cmd);
    server.wait_for("action: database_connect | result: in_progress");
    let refused = TcpStream::connect(port.address()).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the port accepted connections while the store was still opening"
    );
    // Signalled while still opening: a clean exit, nothing to serve.
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(STEP).success(), "{}", server.output());
    let log = server.output();
    assert!(log.contains("action: shutdown | result: success"), "{log}");
}

/// One central at a time on a bets file: a second one given the same file
/// is refused before it touches it, and so is `lottery new-round` while the
/// central runs; once it is stopped, both may go on.
#[test]
fn a_bets_file_serves_one_central_and_new_round_waits_for_it_to_stop() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 2, 7574);
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "2")
        .env("SERVER_STORAGE", &storage);
    let second = Proc::spawn(cmd);
    // A second central that started would serve: killed at the limit.
    let status = second.wait_exit(Duration::from_secs(10));
    let said = second.stderr();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!(
            "bets file {}: a running central holds this file's lock: stop it, or give this \
             central a server.storage of its own",
            storage.display()
        )),
        "{said}"
    );
    let new_round = || {
        lottery()
            .arg("new-round")
            .arg("--storage")
            .arg(&storage)
            .arg("--agencies")
            .arg("2")
            .output()
            .unwrap()
    };
    let refused = new_round();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(
        said.contains(
            "a running central holds this file's lock: a new round starts with the \
                       central stopped"
        ),
        "{said}"
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let after = new_round();
    assert!(
        after.status.success(),
        "{}",
        String::from_utf8_lossy(&after.stderr)
    );
    let again = Server::start(&storage, 2, 7574);
    again.proc.signal(Signal::SIGTERM);
    assert!(again.proc.wait_exit(Duration::from_secs(10)).success());
}
