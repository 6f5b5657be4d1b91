//! Agencies follow centrals: `agency.server_address` lists several, and an
//! agency uses one that answers, moves on when its connection fails, and
//! resumes where the central it lands on stands.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

const WINNING: u16 = 7574;

fn data(bets: u64) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies: 1,
        bets_per_agency: bets,
        seed: 13,
        winning_number: WINNING,
        winner_share: 0.01,
        tricky_share: 0.01,
        crlf: false,
    })
}

/// Waits for agency 1 to succeed, then checks that the bets file holds its
/// input exactly once, in order, and that its winners are the input's.
fn check_outcome(data: &Path, storage: &Path, winners: &Path, agency: &Proc, bets: u64) {
    let status = agency.wait_exit(upload_limit(bets));
    assert!(
        status.success(),
        "agency failed: {status}\n{}\n{}",
        agency.output(),
        agency.stderr()
    );
    assert!(
        !agency.output().contains("result: fail"),
        "the agency logged a failure:\n{}",
        agency.output()
    );
    let expected = expected(data, 1, WINNING);
    assert_eq!(
        stored(storage),
        expected.rows,
        "stored rows differ from the input"
    );
    assert!(!expected.winners[&1].is_empty(), "the data has winners");
    assert_eq!(read_winners(winners), expected.winners[&1]);
}

/// The index of the first log line containing every one of `needles`. A
/// field ends in ` |`, the line's last one too, so `server_address: A |`
/// never matches an address that merely starts with `A`.
fn line_with(log: &[String], needles: &[&str]) -> usize {
    log.iter()
        .position(|l| {
            let l = format!("{l} |");
            needles.iter().all(|n| l.contains(n))
        })
        .unwrap_or_else(|| panic!("no line with {needles:?} in:\n{}", log.join("\n")))
}

#[test]
fn an_agency_skips_a_central_that_is_down_and_uses_the_next() {
    const BETS: u64 = 2_000;
    let data = data(BETS);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 1, WINNING);
    let down = HeldPort::new();
    let list = format!("{},{}", down.address(), server.address());
    let winners = work.path().join("winners-1.txt");
    let agency = start_agency(1, &list, &data_file(data.path(), 1), &winners);

    check_outcome(data.path(), &storage, &winners, &agency, BETS);
    let log = agency.lines();
    // The config line shows the setting as given; the rest, each address
    // as it was dialled.
    line_with(
        &log,
        &["action: config", &format!("server_address: {list} |")],
    );
    let refused = line_with(
        &log,
        &[
            "action: connect | result: in_progress",
            &format!("server_address: {} |", down.address()),
            "Connection refused",
            &format!("next_address: {} |", server.address()),
        ],
    );
    let connected = line_with(
        &log,
        &[
            "action: connect | result: success",
            &format!("server_address: {} |", server.address()),
        ],
    );
    assert!(refused < connected, "{}", log.join("\n"));
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("action: connect | result: success"))
            .count(),
        1,
        "one connection, to the central that answers:\n{}",
        log.join("\n")
    );
}

#[test]
fn an_agency_whose_central_dies_mid_upload_resumes_on_the_next_address() {
    const BETS: u64 = 20_000;
    let data = data(BETS);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 1, WINNING);
    // The first address dies after ~40 KB of the upload (a few full batches
    // of about 8 KB, out of over 500 KB); the second leads to the same
    // central directly, standing for another central on the same database.
    let upload = std::fs::metadata(data_file(data.path(), 1)).unwrap().len();
    assert!(upload > 500_000, "the upload is {upload} bytes");
    let dying = Relay::cutting_after(&server.address(), 40_000);
    let list = format!("{},{}", dying.address, server.address());
    let winners = work.path().join("winners-1.txt");
    let agency = start_agency(1, &list, &data_file(data.path(), 1), &winners);

    check_outcome(data.path(), &storage, &winners, &agency, BETS);
    let log = agency.lines();
    let first = line_with(
        &log,
        &[
            "action: connect | result: success",
            &format!("server_address: {} |", dying.address),
        ],
    );
    let lost = line_with(
        &log,
        &[
            "action: reconnect | result: in_progress",
            &format!("server_address: {} |", dying.address),
            &format!("next_address: {} |", server.address()),
        ],
    );
    let moved = line_with(
        &log,
        &[
            "action: connect | result: success",
            &format!("server_address: {} |", server.address()),
        ],
    );
    assert!(first < lost && lost < moved, "{}", log.join("\n"));

    // The dead central's connection ended with part of the file stored,
    // and the session on the next address stored the rest: it resumed
    // where the central stood, sending nothing twice.
    let central = server.proc.lines();
    let per_connection: Vec<u64> = central
        .iter()
        .filter(|l| l.contains("action: close_connection") && l.contains("agency: 1 |"))
        .map(|l| {
            l.split(" | ")
                .find_map(|f| f.strip_prefix("bets_stored: "))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count in {l:?}"))
        })
        .filter(|&n| n > 0)
        .collect();
    assert!(
        per_connection.len() == 2
            && per_connection[0] < BETS
            && per_connection.iter().sum::<u64>() == BETS,
        "bets stored by each connection: {per_connection:?}\n{}",
        central.join("\n")
    );

    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn a_central_that_refuses_as_busy_is_left_for_the_next() {
    const BETS: u64 = 1_000;
    let data = data(BETS);
    let work = tempfile::tempdir().unwrap();
    // Two centrals with their own bets files: the busy one must store
    // nothing, the other everything.
    let busy_storage = work.path().join("busy.csv");
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", &busy_storage)
        .env("SERVER_WINNING_NUMBER", WINNING.to_string())
        .env("SERVER_MAX_CONNECTIONS", "1");
    let busy = Server::spawn(cmd);
    // Take its one connection, and know it is taken: it answers a PING.
    let mut held = Raw::connect_within(&busy.address(), STEP);
    held.send("ACTION:PING\n");
    assert_eq!(held.reply(), "STATUS:SUCCESS|MESSAGE:pong\n");

    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 1, WINNING);
    let list = format!("{},{}", busy.address(), server.address());
    let winners = work.path().join("winners-1.txt");
    let agency = start_agency(1, &list, &data_file(data.path(), 1), &winners);

    check_outcome(data.path(), &storage, &winners, &agency, BETS);
    let log = agency.lines();
    let refused = line_with(
        &log,
        &[
            "result: in_progress",
            &format!("server_address: {} |", busy.address()),
            "SERVER_BUSY",
            &format!("next_address: {} |", server.address()),
        ],
    );
    let moved = line_with(
        &log,
        &[
            "action: connect | result: success",
            &format!("server_address: {} |", server.address()),
        ],
    );
    assert!(refused < moved, "{}", log.join("\n"));
    let kept = std::fs::read_to_string(&busy_storage).unwrap_or_default();
    assert_eq!(kept, "", "the busy central stored bets");
    drop(held);
}

/// With several centrals, one that accepts and then leaves `HELLO`
/// unanswered is hung, not the design's reference central (which cannot
/// share a database with others): the agency moves on and keeps resuming,
/// never sending a batch without `FIRST`.
#[test]
fn a_central_silent_on_hello_is_left_for_the_next_without_leaving_the_resumable_protocol() {
    const BETS: u64 = 1_000;
    let data = data(BETS);
    let work = tempfile::tempdir().unwrap();
    // Accepts, reads whatever comes, answers nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_address = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in silent.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || std::io::copy(&mut conn, &mut std::io::sink()));
        }
    });
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 1, WINNING);
    let list = format!("{silent_address},{}", server.address());
    let winners = work.path().join("winners-1.txt");
    let mut cmd = agency_command(1, &list, &data_file(data.path(), 1), &winners);
    cmd.env("CLI_HELLO_TIMEOUT", "2");
    let agency = Proc::spawn(cmd);

    check_outcome(data.path(), &storage, &winners, &agency, BETS);
    let log = agency.lines();
    line_with(
        &log,
        &[
            "result: in_progress",
            &format!("server_address: {silent_address} |"),
            "did not answer HELLO within 2s",
            &format!("next_address: {} |", server.address()),
        ],
    );
    assert!(
        !log.iter().any(|l| l.contains("action: protocol")),
        "the agency switched protocols:\n{}",
        log.join("\n")
    );
}

#[test]
fn with_every_central_down_the_agency_gives_up_after_its_timeout_over_all_of_them() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,30904465,1999-03-17,7574\n").unwrap();
    let (a, b) = (HeldPort::new(), HeldPort::new());
    let list = format!("{},{}", a.address(), b.address());
    let out = lottery()
        .arg("agency")
        .env("CLI_SERVER_ADDRESS", &list)
        .env("CLI_DATA_FILE", &data)
        .env("CLI_RECONNECT_TIMEOUT", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}\n{err}");
    assert!(
        err.starts_with(
            "lottery: error: gave up after 1s without progress; last error: cannot connect to "
        ) && err.ends_with(&format!("(every central was tried in turn: {list})\n")),
        "{err}"
    );
    // Both were tried, in turn, each time the other failed.
    for (tried, next) in [(&a, &b), (&b, &a)] {
        let line = format!("server_address: {} | attempt: ", tried.address());
        assert!(log.contains(&line), "{log}");
        assert!(
            log.contains(&format!("next_address: {}\n", next.address())),
            "{log}"
        );
    }
}

#[test]
fn a_bad_address_in_the_list_is_a_usage_error_naming_it() {
    let out = lottery()
        .arg("agency")
        .env("CLI_SERVER_ADDRESS", "central-1:12345,central-2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        "lottery: configuration error: invalid CLI_SERVER_ADDRESS = \"central-1:12345,central-2\": \
         \"central-2\" has no port (each address is host:port)\n"
    );
}

/// A batch refused with `STORAGE_FAILED` was not stored: the agency must
/// resume from the central's count (a new connection, HELLO) and send it
/// again, never announce that it finished right after it, which would let
/// the round be drawn without that batch. A central that refuses the
/// agency's last batch once shows it: a refusal of an earlier batch is
/// covered by the central refusing the next one as out of order.
#[test]
fn an_agency_whose_last_batch_failed_to_store_resumes_before_it_announces_the_end() {
    const BETS: u64 = 50;
    let data = data(BETS);
    let expected = expected(data.path(), 1, WINNING);
    let rows = expected.rows[&1].clone();
    let receipt_of = move |n: usize| {
        let mut receipt = lottery::receipt::Receipt::empty(1);
        for row in &rows[..n] {
            let texts = [&row[1], &row[2], &row[3], &row[4]].map(|t| t.as_bytes());
            receipt.push(texts, row[5].parse().unwrap());
        }
        receipt
    };
    let winners = expected.winners[&1].join(",");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    // What each connection said: `HELLO`, `BATCH first+count`, `FINISHED`.
    let central = std::thread::spawn(move || {
        let mut said: Vec<Vec<String>> = Vec::new();
        let mut held = 0usize;
        let mut refused_once = false;
        for conn in listener.incoming() {
            let mut conn = Raw::new(conn.unwrap());
            let mut this = Vec::new();
            let mut done = false;
            while let Some(payload) = conn.recv() {
                let fields: std::collections::HashMap<&str, &str> = payload
                    .trim_end()
                    .split('|')
                    .take_while(|f| !f.starts_with("BET_"))
                    .filter_map(|f| f.split_once(':'))
                    .collect();
                let reply = if payload.starts_with("ACTION:HELLO|") {
                    this.push("HELLO".to_string());
                    format!(
                        "STATUS:SUCCESS|MESSAGE:hi|STORED:{held}|DIGEST:{}\n",
                        receipt_of(held).digest
                    )
                } else if let Some(size) = fields.get("BATCH_SIZE") {
                    let size: usize = size.parse().unwrap();
                    let first: usize = fields["FIRST"].parse().unwrap();
                    this.push(format!("BATCH {first}+{size}"));
                    if first + size == BETS as usize && !refused_once {
                        refused_once = true;
                        "STATUS:ERROR|CODE:STORAGE_FAILED|MESSAGE:the database went away\n"
                            .to_string()
                    } else {
                        assert_eq!(first, held, "a batch out of order");
                        held += size;
                        format!("STATUS:SUCCESS|MESSAGE:stored|STORED:{held}\n")
                    }
                } else {
                    this.push("FINISHED".to_string());
                    done = true;
                    let digest = receipt_of(held).digest;
                    format!(
                        "STATUS:SUCCESS|WINNERS:{winners}|STORED:{held}|DIGEST:{digest}|SEAL:{digest}\n"
                    )
                };
                conn.send(&reply);
            }
            said.push(this);
            if done {
                return (said, held);
            }
        }
        unreachable!("the listener never ends")
    });
    let out = data.path().join("winners.txt");
    let mut cmd = agency_command(1, &address, &data_file(data.path(), 1), &out);
    cmd.env("CLI_BATCH_MAXAMOUNT", "20");
    let agency = Proc::spawn(cmd);
    let status = agency.wait_exit(PATIENCE);
    let (said, held) = central.join().unwrap();
    assert_eq!(
        said,
        vec![
            vec!["HELLO", "BATCH 0+20", "BATCH 20+20", "BATCH 40+10"],
            vec!["HELLO", "BATCH 40+10", "FINISHED"],
        ],
        "the agency announced the end over a batch that was not stored"
    );
    assert!(
        status.success(),
        "{status}\n{}\n{}",
        agency.output(),
        agency.stderr()
    );
    assert_eq!(held, BETS as usize);
    assert_eq!(read_winners(&out), expected.winners[&1]);
}
