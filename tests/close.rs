//! The close of sales on the bets file: `lottery close` and
//! `server.close_at` land while agencies upload at full speed, and every
//! bet acknowledged is stored and drawn, nothing else; a second close, or
//! a close of a drawn round, is refused; the close survives a restart; each
//! agency learns what happened (exit 4 when its file was not all counted,
//! 0 when it was); the design's agency gets its refusal and its winners.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lottery::store::file::{load_record, save_close};
use lottery::store::ClosedRound;
use lottery::tools::gen_data::GenOptions;

fn run(args: &[&str]) -> std::process::Output {
    lottery().args(args).output().unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The value of `key` in a contract log line (`… | key: value | …`).
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(" | ")
        .find_map(|f| f.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// The line containing `needle` the process logged already (before the
/// line a helper waited for), or the next one.
fn seen_or_wait(proc: &Proc, needle: &str) -> String {
    match proc.lines().into_iter().find(|l| l.contains(needle)) {
        Some(line) => line,
        None => proc.wait_for(needle),
    }
}

/// Waits until the server has answered `batches` batches with success.
fn wait_for_batches(server: &Server, batches: usize) {
    let seen = AtomicUsize::new(0);
    server
        .proc
        .wait_until(&format!("the {batches}th stored batch"), PATIENCE, |line| {
            line.contains("action: apuesta_recibida | result: success")
                && seen.fetch_add(1, Ordering::SeqCst) + 1 >= batches
        });
}

/// What an agency ended with: its exit code, the bets the central
/// acknowledged and stored for it (from its `cierre` line; its whole file
/// when it exited 0) and its winners.
struct Ended {
    code: i32,
    stored: usize,
}

/// Waits for agency `id`'s exit and checks what it says: exit 4 with
/// acknowledged = stored < the file's bets, or exit 0 with all stored.
fn ended(agency: &Proc, id: u32, in_file: usize) -> Ended {
    let status = agency.wait_exit(upload_limit(in_file as u64));
    let code = status.code().unwrap();
    let output = agency.output();
    match code {
        4 => {
            let line = output
                .lines()
                .find(|l| l.contains("action: cierre | result: success"))
                .unwrap_or_else(|| panic!("agency {id}: no cierre line:\n{output}"));
            let acknowledged: usize = field(line, "acknowledged").parse().unwrap();
            let stored: usize = field(line, "stored").parse().unwrap();
            let bets_in_file: usize = field(line, "bets_in_file").parse().unwrap();
            assert_eq!(acknowledged, stored, "agency {id}: {line}");
            assert_eq!(bets_in_file, in_file, "agency {id}: {line}");
            assert!(stored < in_file, "agency {id}: {line}");
            let message = agency.stderr();
            assert!(
                message.contains(&format!(
                    "sales closed before all of {} was stored: the draw counted {stored} of its \
                     {in_file} bets",
                    agency_data(&output)
                )),
                "agency {id}: {message}"
            );
            assert!(
                output.contains("action: consulta_ganadores | result: success"),
                "agency {id}:\n{output}"
            );
            Ended { code, stored }
        }
        0 => Ended {
            code,
            stored: in_file,
        },
        other => panic!("agency {id} exited {other}:\n{output}\n{}", agency.stderr()),
    }
}

/// The data file an agency's config line names.
fn agency_data(output: &str) -> String {
    let line = output
        .lines()
        .find(|l| l.contains("action: config"))
        .expect("a config line");
    field(line, "data_file").to_string()
}

/// Checks, per agency, that the bets file holds exactly the first
/// `stored[a]` rows of its data file, that the draw record counted exactly
/// those (with the state each agency had at the close), and that each
/// agency's winners are those among them.
fn check_round(
    work: &Path,
    data: &Path,
    agencies: u32,
    stored: &BTreeMap<u32, usize>,
    finished: &[u32],
    winners_of: impl Fn(u32) -> Option<Vec<String>>,
) {
    let expected = expected(data, agencies, 7574);
    let rows = common::stored(&work.join("bets.csv"));
    let draw = load_record(&work.join("bets.draw.toml"))
        .unwrap()
        .expect("a draw record");
    let closed = draw.closed.as_ref().expect("the record says sales closed");
    for agency in 1..=agencies {
        let n = stored[&agency];
        let want = &expected.rows[&agency][..n];
        let got = rows.get(&agency).map_or(&[][..], Vec::as_slice);
        assert_eq!(got.len(), n, "agency {agency}: rows stored");
        assert!(
            got == want,
            "agency {agency}: the rows stored are not its first {n}"
        );
        assert_eq!(
            draw.receipt_of(agency).count,
            n as u64,
            "agency {agency}: bets drawn"
        );
        assert_eq!(
            closed.finished.contains(&agency),
            finished.contains(&agency),
            "agency {agency}: finished or closed"
        );
        let won: Vec<String> = want
            .iter()
            .filter(|r| r[5] == "7574")
            .map(|r| r[3].clone())
            .collect();
        assert_eq!(draw.winners_of(agency), won.as_slice(), "agency {agency}");
        if let Some(told) = winners_of(agency) {
            assert_eq!(told, won, "agency {agency}: the winners it was told");
        }
    }
}

#[test]
fn a_close_under_full_speed_uploads_draws_exactly_what_was_acknowledged() {
    let agencies = 3;
    let per_agency = 60_000;
    let data = gen_data(GenOptions {
        agencies,
        bets_per_agency: per_agency,
        seed: 23,
        winner_share: 0.01,
        ..GenOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), agencies, 7574);
    let address = server.address();
    let procs: Vec<Proc> = (1..=agencies)
        .map(|a| {
            start_agency(
                a,
                &address,
                &data_file(data.path(), a),
                &work.path().join(format!("w{a}.txt")),
            )
        })
        .collect();
    // Every agency is uploading, a window of batches each in flight.
    wait_for_batches(&server, 30);
    let close = run(&[
        "close",
        "--address",
        &address,
        "--reason",
        "agency 3's machine is gone",
    ]);
    assert!(close.status.success(), "{close:?}");
    assert!(
        stdout(&close).starts_with("sales closed at "),
        "{}",
        stdout(&close)
    );
    assert!(
        stdout(&close).contains(" by operator (agency 3's machine is gone)"),
        "{}",
        stdout(&close)
    );
    let line = server
        .proc
        .wait_for("action: cierre | result: success | by: operator");
    assert!(
        line.contains("reason: agency 3's machine is gone"),
        "{line}"
    );
    server.proc.wait_for("action: sorteo | result: success");

    let mut stored = BTreeMap::new();
    let mut closed_short = 0;
    for (i, agency) in procs.iter().enumerate() {
        let id = i as u32 + 1;
        let end = ended(agency, id, per_agency as usize);
        closed_short += usize::from(end.code == 4);
        stored.insert(id, end.stored);
    }
    assert!(
        closed_short > 0,
        "the close landed after every upload: {stored:?}"
    );
    check_round(work.path(), data.path(), agencies, &stored, &[], |a| {
        Some(read_winners(&work.path().join(format!("w{a}.txt"))))
    });

    // Once: no second draw, no second close.
    let again = run(&["close", "--address", &address, "--reason", "again"]);
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    assert!(
        stderr(&again).contains("BETTING_CLOSED")
            && stderr(&again).contains("a second close is refused"),
        "{}",
        stderr(&again)
    );
    let status = stdout(&run(&["status", "--address", &address]));
    assert!(
        status.contains("sales closed at ")
            && status.contains("by operator (agency 3's machine is gone)"),
        "{status}"
    );
    assert!(status.contains("draw done"), "{status}");
    let verify = lottery()
        .args(["verify"])
        .env("SERVER_STORAGE", work.path().join("bets.csv"))
        .env("SERVER_AGENCIES", agencies.to_string())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
    assert!(
        stdout(&verify).contains("  closed  "),
        "{}",
        stdout(&verify)
    );
    let output = server.proc.output();
    assert_eq!(
        output.matches("action: sorteo | result: success").count(),
        1
    );
    assert_eq!(
        output.matches("action: cierre | result: success").count(),
        1
    );
}

#[test]
fn an_agency_whose_file_was_all_stored_exits_0_and_the_record_says_who_finished() {
    let data = gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: 2_000,
        seed: 5,
        winner_share: 0.01,
        ..GenOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 2, 7574);
    let address = server.address();
    // Agency 1 uploads everything and waits for the draw; agency 2 never
    // comes.
    let one = start_agency(
        1,
        &address,
        &data_file(data.path(), 1),
        &work.path().join("w1.txt"),
    );
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");
    let close = run(&["close", "--address", &address, "--reason", "agency 2 gone"]);
    assert!(close.status.success(), "{close:?}");
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    // Agency 2 comes back after the draw: told, winners over none, exit 4.
    let two = start_agency(
        2,
        &address,
        &data_file(data.path(), 2),
        &work.path().join("w2.txt"),
    );
    let end = ended(&two, 2, 2_000);
    assert_eq!((end.code, end.stored), (4, 0));
    // Its announcement asked for its winners and finished nothing: the
    // live view says what the record says.
    let status = run(&["status", "--address", &address]);
    assert!(status.status.success(), "{status:?}");
    let view = stdout(&status);
    assert!(
        view.contains("     2           0  closed")
            && view.contains("1 of 2 agencies finished; draw done"),
        "{view}"
    );
    assert!(
        !server
            .proc
            .output()
            .contains("action: agencia_finalizada | result: success | agency: 2"),
        "{}",
        server.proc.output()
    );
    let stored = BTreeMap::from([(1, 2_000), (2, 0)]);
    check_round(work.path(), data.path(), 2, &stored, &[1], |a| {
        Some(read_winners(&work.path().join(format!("w{a}.txt"))))
    });
    let record = std::fs::read_to_string(work.path().join("bets.draw.toml")).unwrap();
    assert!(record.contains("[close]\nby = \"operator\""), "{record}");
    assert!(record.contains("state = \"finished\""), "{record}");
    assert!(record.contains("state = \"closed\""), "{record}");
    let verify = || {
        lottery()
            .args(["verify"])
            .env("SERVER_STORAGE", work.path().join("bets.csv"))
            .env("SERVER_AGENCIES", "2")
            .output()
            .unwrap()
    };
    let agrees = verify();
    assert!(agrees.status.success(), "{agrees:?}");
    let report = stdout(&agrees);
    assert!(
        report.contains("by operator (agency 2 gone)")
            && report.contains("  finished  ")
            && report.contains("  closed  "),
        "{report}"
    );
    // A record whose close was edited is caught.
    std::fs::write(
        work.path().join("bets.draw.toml"),
        record.replace(
            "reason = \"agency 2 gone\"",
            "reason = \"every agency finished\"",
        ),
    )
    .unwrap();
    let differs = verify();
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    assert!(
        stdout(&differs).contains("differs: close: the record says sales closed at "),
        "{}",
        stdout(&differs)
    );
}

#[test]
fn closing_a_drawn_round_is_refused() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, ana_bets(10, |i| 7570 + i, "\n")).unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 1, 7574);
    let address = server.address();
    let one = start_agency(1, &address, &data, &work.path().join("w1.txt"));
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    let close = run(&["close", "--address", &address, "--reason", "too late"]);
    assert_eq!(close.status.code(), Some(1), "{close:?}");
    assert!(
        stderr(&close).contains("BETTING_CLOSED: the round is drawn already"),
        "{}",
        stderr(&close)
    );
    // A close needs a reason.
    let empty = run(&["close", "--address", &address, "--reason", " "]);
    assert_eq!(empty.status.code(), Some(1), "{empty:?}");
    assert!(
        stderr(&empty).contains("REASON is empty"),
        "{}",
        stderr(&empty)
    );
}

#[test]
fn the_design_agency_gets_its_refusal_and_then_its_winners() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 2, 7574);
    let address = server.address();
    // Agency 1, the design's way: one batch stored before the close.
    let mut one = Raw::connect(&address);
    let bet = |dni: &str, number: u32| {
        format!(
            "NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{dni}\\|NACIMIENTO:1999-03-17\\|\
             NUMERO:{number}\\|AGENCY_ID:1"
        )
    };
    one.send(format!(
        "BATCH_SIZE:2|BET_1:{}|BET_2:{}\n",
        bet("30904465", 7574),
        bet("30904466", 1)
    ));
    assert!(one.reply().starts_with("STATUS:SUCCESS|"));
    let close = run(&["close", "--address", &address, "--reason", "end of day"]);
    assert!(close.status.success(), "{close:?}");
    server.proc.wait_for("action: sorteo | result: success");
    one.send(format!("BATCH_SIZE:1|BET_1:{}\n", bet("30904467", 7574)));
    let refused = one.reply();
    assert!(
        refused.starts_with("STATUS:ERROR|CODE:BETTING_CLOSED|MESSAGE:sales closed at "),
        "{refused}"
    );
    one.send("ACTION:FINISH_BETTING|AGENCY_ID:1\n");
    assert_eq!(one.reply(), "STATUS:SUCCESS|WINNERS:30904465\n");
    let rows = common::stored(&work.path().join("bets.csv"));
    assert_eq!(rows[&1].len(), 2);
}

#[test]
fn a_central_started_after_the_close_draws_and_one_started_after_the_draw_serves_it() {
    let work = tempfile::tempdir().unwrap();
    let bets = work.path().join("bets.csv");
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, ana_bets(50, |i| 7570 + i % 8, "\n")).unwrap();
    let data2 = work.path().join("agency-2.csv");
    std::fs::write(&data2, ana_bets(20, |i| 7574 + i % 2, "\n")).unwrap();
    // Agency 1 stores its file and waits; the central stops before any
    // draw.
    {
        let server = Server::start(&bets, 2, 7574);
        let one = start_agency(1, &server.address(), &data, &work.path().join("w1.txt"));
        server
            .proc
            .wait_for("action: agencia_finalizada | result: success | agency: 1");
        one.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(one.wait_exit(STEP).code(), Some(0));
        server.proc.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(server.proc.wait_exit(STEP).code(), Some(0));
    }
    // The close kept, as a central that stopped right after it leaves it.
    let close = lottery::close::SalesClose::now(lottery::close::ClosedBy::Operator, "storm");
    save_close(
        &ClosedRound {
            close: close.clone(),
            finished: [1].into(),
        },
        &work.path().join("bets.close.toml"),
    )
    .unwrap();
    let server = Server::start(&bets, 2, 7574);
    let line = seen_or_wait(&server.proc, "action: cierre | result: success");
    assert!(line.contains("state: closed_before_start"), "{line}");
    assert!(line.contains("reason: storm"), "{line}");
    seen_or_wait(&server.proc, "action: sorteo | result: success");
    let one = start_agency(1, &server.address(), &data, &work.path().join("w1.txt"));
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    let two = start_agency(2, &server.address(), &data2, &work.path().join("w2.txt"));
    assert_eq!(ended(&two, 2, 20).stored, 0);
    let draw = load_record(&work.path().join("bets.draw.toml"))
        .unwrap()
        .unwrap();
    let closed = draw.closed.clone().unwrap();
    assert_eq!((closed.close, closed.finished), (close, [1].into()));
    assert_eq!(
        (draw.receipt_of(1).count, draw.receipt_of(2).count),
        (50, 0)
    );
    let won: Vec<String> = (0..50u32)
        .filter(|i| 7570 + i % 8 == 7574)
        .map(|i| (10_000_000 + i).to_string())
        .collect();
    assert_eq!(read_winners(&work.path().join("w1.txt")), won);
    server.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.proc.wait_exit(STEP).code(), Some(0));
    // Started again: the draw is served, not run again.
    let server = Server::start(&bets, 2, 7574);
    seen_or_wait(&server.proc, "state: already_drawn");
    let two = start_agency(2, &server.address(), &data2, &work.path().join("w2.txt"));
    assert_eq!(ended(&two, 2, 20).stored, 0);
    assert!(!server.proc.output().contains("action: sorteo"));
    server.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(server.proc.wait_exit(STEP).code(), Some(0));
    // A new round keeps the close aside with the round: its sales are open.
    let kept = lottery()
        .args(["new-round"])
        .env("SERVER_STORAGE", &bets)
        .env("SERVER_AGENCIES", "2")
        .output()
        .unwrap();
    assert!(kept.status.success(), "{kept:?}");
    // It says where the close went, and so does the ledger of rounds.
    let said = String::from_utf8_lossy(&kept.stdout);
    assert!(said.contains(", its close of sales as "), "{said}");
    let ledger = std::fs::read_to_string(work.path().join("bets.rounds.toml")).unwrap();
    assert!(ledger.contains("kept_close = "), "{ledger}");
    assert!(!work.path().join("bets.close.toml").exists());
    let kept_close = std::fs::read_dir(work.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("bets.round-1-") && name.ends_with(".close.toml")
        })
        .count();
    assert_eq!(kept_close, 1);
    let server = Server::start(&bets, 1, 7574);
    // The same file in a new round: its kept seal is the old round's, and
    // the central held none of its bets when it began, so this round's
    // seal replaces it (no false exit 3).
    let old_seal = std::fs::read_to_string(work.path().join("agency-1.csv.seal")).unwrap();
    let one = start_agency(1, &server.address(), &data, &work.path().join("w1.txt"));
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    assert!(!server.proc.output().contains("action: cierre"));
    assert!(
        one.output()
            .contains("action: seal_file | result: success | state: new_round"),
        "{}",
        one.output()
    );
    let new_seal = std::fs::read_to_string(work.path().join("agency-1.csv.seal")).unwrap();
    assert_ne!(new_seal, old_seal);
}

#[test]
fn close_at_closes_sales_by_itself_and_a_past_close_at_is_refused() {
    let past = lottery()
        .args(["server", "--close-at", "2020-01-01T00:00:00Z"])
        .env("SERVER_PORT", "0")
        .env(
            "SERVER_STORAGE",
            tempfile::tempdir().unwrap().path().join("b.csv"),
        )
        .output()
        .unwrap();
    assert_eq!(past.status.code(), Some(2), "{past:?}");
    assert!(
        stderr(&past).contains(
            "server.close_at (SERVER_CLOSE_AT, --close-at) is 2020-01-01T00:00:00Z, already past"
        ),
        "{}",
        stderr(&past)
    );
    let bad = lottery()
        .args(["server"])
        .env("SERVER_CLOSE_AT", "tomorrow at six")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(stderr(&bad).contains("SERVER_CLOSE_AT"), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("RFC 3339"), "{}", stderr(&bad));

    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, ana_bets(30, |i| 7570 + i % 8, "\n")).unwrap();
    let at = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "2")
        .env("SERVER_STORAGE", work.path().join("bets.csv"))
        .env("SERVER_CLOSE_AT", &at);
    let server = Server::spawn(cmd);
    let one = start_agency(1, &server.address(), &data, &work.path().join("w1.txt"));
    let line = server
        .proc
        .wait_for_within("action: cierre | result: success | by: close_at", PATIENCE);
    assert!(
        line.contains(&format!("reason: server.close_at = {at}")),
        "{line}"
    );
    server.proc.wait_for("action: sorteo | result: success");
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    assert_eq!(
        read_winners(&work.path().join("w1.txt")),
        ["10000004", "10000012", "10000020", "10000028"]
    );
}
