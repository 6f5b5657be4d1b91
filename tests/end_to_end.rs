//! The real binary, end to end: a server and N agency processes over
//! loopback, checking each agency's winners, the exact stored rows, the log
//! lines, and a clean shutdown.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

/// Runs a whole lottery over the files in `data` and checks everything a
/// user depends on. Returns the winners count per agency.
fn run_lottery(data: &Path, agencies: u32, winning_number: u16) -> Vec<usize> {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, agencies, winning_number);
    assert!(server.proc.output().contains(&format!(
        "action: config | result: success | port: 0 | listen_backlog: 5 | logging_level: INFO | agencies: {agencies}"
    )));

    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let out = work.path().join(format!("winners-{id}.txt"));
            (
                id,
                out.clone(),
                start_agency(id, &server.address(), &data_file(data, id), &out),
            )
        })
        .collect();
    let expected = expected(data, agencies, winning_number);
    // Every agency is done once the last upload is: one limit for all.
    let limit = upload_limit(expected.rows.values().map(|r| r.len() as u64).sum());
    let deadline = std::time::Instant::now() + limit;

    let mut counts = Vec::new();
    for (id, out, agency) in &running {
        let status =
            agency.wait_exit(deadline.saturating_duration_since(std::time::Instant::now()));
        assert!(
            status.success(),
            "agency {id} failed: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        let want = &expected.winners[id];
        assert_eq!(&read_winners(out), want, "agency {id} winners");
        let log = agency.output();
        assert!(
            log.contains(&format!(
                "action: consulta_ganadores | result: success | cant_ganadores: {}",
                want.len()
            )),
            "{log}"
        );
        assert!(log.contains(&format!(
            "action: config | result: success | client_id: {id} |"
        )));
        assert!(
            !log.contains("result: fail"),
            "agency {id} logged a failure:\n{log}"
        );
        counts.push(want.len());
    }

    // Exactly the input rows, each agency's in its file order.
    assert_eq!(
        stored(&storage),
        expected.rows,
        "stored rows differ from the input"
    );

    server.proc.signal(Signal::SIGTERM);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "server exit: {status}");
    let log = server.proc.output();
    assert_eq!(
        log.matches("action: sorteo | result: success").count(),
        1,
        "{log}"
    );
    assert!(
        !log.contains("result: fail"),
        "server logged a failure:\n{log}"
    );
    assert!(log.contains("action: close_bets_file | result: success"));
    assert!(
        log.trim_end()
            .ends_with("action: shutdown | result: success"),
        "{log}"
    );
    counts
}

fn generated(agencies: u32, bets_per_agency: u64, crlf: bool) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies,
        bets_per_agency,
        seed: 42 + u64::from(agencies),
        winning_number: 7574,
        winner_share: 0.01,
        tricky_share: 0.02,
        crlf,
    })
}

#[test]
fn one_agency() {
    let data = generated(1, 3_000, false);
    let counts = run_lottery(data.path(), 1, 7574);
    assert!(counts[0] > 0);
}

#[test]
fn three_agencies_crlf() {
    let data = generated(3, 2_000, true);
    run_lottery(data.path(), 3, 7574);
}

#[test]
fn five_agencies() {
    let data = generated(5, 2_000, false);
    run_lottery(data.path(), 5, 7574);
}

#[test]
fn twenty_agencies() {
    let data = generated(20, 500, false);
    run_lottery(data.path(), 20, 7574);
}

#[test]
fn real_dataset_when_present() {
    let Some(dir) = real_data("real_dataset_when_present") else {
        return;
    };
    let counts = run_lottery(&dir, 5, 7574);
    assert_eq!(counts, [2, 3, 3, 2, 0]);
    let total: usize = expected(&dir, 5, 7574).rows.values().map(Vec::len).sum();
    assert_eq!(total, 78_697);
}

#[test]
fn a_central_restarted_on_a_drawn_round_announces_it() {
    let data = generated(2, 200, false);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let record = work.path().join("bets.draw.toml");

    // A whole tiny round: both agencies upload, the draw runs.
    let server = Server::start(&storage, 2, 7574);
    let agencies: Vec<_> = (1..=2)
        .map(|id| {
            let out = work.path().join(format!("winners-{id}.txt"));
            start_agency(id, &server.address(), &data_file(data.path(), id), &out)
        })
        .collect();
    for agency in &agencies {
        assert!(agency.wait_exit(PATIENCE).success(), "{}", agency.output());
    }
    server.proc.wait_for("action: sorteo | result: success");
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let first = server.proc.output();
    assert!(!first.contains("action: draw_record"), "{first}");

    // The same folder again: the central says the round is over.
    let drawn: toml::Table = toml::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let drawn_at = drawn["drawn_at"].as_str().unwrap();
    let seal = drawn["seal"].as_str().unwrap();
    let restarted = Server::start(&storage, 2, 7574);
    // Logged before the listen line, which `start` has waited for.
    let line = restarted
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: draw_record"))
        .unwrap_or_else(|| panic!("no draw_record line:\n{}", restarted.proc.output()));
    let want = format!(
        " WARN     action: draw_record | result: success | state: already_drawn | drawn_at: {drawn_at} | bets: 400 | winning_number: 7574 | record: {} | storage: {} | seal: {seal} | message: this round is already drawn: the central only serves its winners and refuses new bets; to start a new round, stop the central and run `lottery new-round` (it keeps this round's files, named by round and seal)",
        record.display(),
        storage.display()
    );
    assert!(line.ends_with(&want), "{line}\nwant ...{want}");
    // A drawn round is one where every agency finished: the operator's view
    // says so after a restart too.
    let status = lottery()
        .args(["status", "--address", &restarted.address()])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains("     1         200  finished\n     2         200  finished\n")
            && status.contains("2 of 2 agencies finished; draw done"),
        "{status}"
    );
    restarted.proc.signal(Signal::SIGTERM);
    let status = restarted.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    let log = restarted.proc.output();
    assert!(!log.contains("action: sorteo"), "{log}");
    assert!(!log.contains("result: fail"), "{log}");
}
