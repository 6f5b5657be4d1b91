//! SIGTERM in the middle of work: both programs close every resource, log
//! each, and exit 0, and nothing acknowledged is lost.

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const BET: &str = r"NOMBRE:Ana\|APELLIDO:Perez\|DOCUMENTO:30904465\|NACIMIENTO:1999-03-17\|NUMERO:7574\|AGENCY_ID:1";

fn index_of(lines: &[String], needle: &str) -> usize {
    lines
        .iter()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{}", lines.join("\n")))
}

#[test]
fn server_sigterm_mid_upload_keeps_acknowledged_bets_and_exits_0() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 2, 7574);

    // Agency 1 is mid-upload: one batch acknowledged, connection open.
    let mut uploading = Raw::connect(&server.address());
    uploading.send(format!("BATCH_SIZE:1|BET_1:{BET}\n"));
    assert_eq!(
        uploading.recv().unwrap(),
        "STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:1\n"
    );
    // Agency 2 finished and waits for a draw that will not come.
    let mut waiting = Raw::connect(&server.address());
    waiting.send("ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 2");

    server.proc.signal(Signal::SIGTERM);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");

    // Both connections were closed, without winners for the waiting one.
    assert_eq!(uploading.recv(), None);
    assert_eq!(waiting.recv(), None);

    let lines = server.proc.lines();
    let signal = index_of(&lines, "action: signal | result: success | signal: SIGTERM");
    let listener = index_of(&lines, "action: close_listener | result: success");
    let conn1 = index_of(
        &lines,
        "action: close_connection | result: success | peer: 127.0.0.1:",
    );
    let file = index_of(&lines, "action: close_bets_file | result: success");
    let done = index_of(&lines, "action: shutdown | result: success");
    assert!(signal < listener && listener < conn1 && conn1 < file && file < done);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("action: close_connection") && l.contains("reason: shutdown"))
            .count(),
        2
    );
    assert_eq!(done, lines.len() - 1);
    assert!(!server.proc.output().contains("action: sorteo"));

    assert_eq!(
        std::fs::read_to_string(&storage).unwrap(),
        "1,Ana,Perez,30904465,1999-03-17,7574\n"
    );
}

/// The server's workers hold their log lines until they run out of work
/// (`logging::flush_when_idle`): an idle central's line must still reach
/// stdout at once, and every held line by the time it exits, in order.
#[test]
fn server_batch_lines_reach_stdout_while_idle_and_all_of_them_by_exit() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 2, 7574);
    let mut agency = Raw::connect(&server.address());
    agency.send(format!("BATCH_SIZE:1|BET_1:{BET}\n"));
    assert_eq!(
        agency.recv().unwrap(),
        "STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:1\n"
    );
    // Nothing else to do: the line is out while the connection stays open.
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success | cantidad: 1");

    // A burst, so that lines are held while the workers are busy.
    const BURST: usize = 300;
    for _ in 0..BURST {
        agency.send(format!("BATCH_SIZE:1|BET_1:{BET}\n"));
    }
    for n in 2..=BURST + 1 {
        assert_eq!(
            agency.recv().unwrap(),
            format!("STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:{n}\n")
        );
    }
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let lines = server.proc.lines();
    let batches: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("action: apuesta_recibida | result: success"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(batches.len(), BURST + 1, "{}", lines.join("\n"));
    // Every batch line before the signal's, the shutdown line last.
    let signal = index_of(&lines, "action: signal | result: success | signal: SIGTERM");
    assert!(batches.iter().all(|&i| i < signal));
    let done = index_of(&lines, "action: shutdown | result: success");
    assert_eq!(done, lines.len() - 1);
}

#[test]
fn server_sigint_when_idle_exits_0() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 5, 7574);
    server.proc.signal(Signal::SIGINT);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let out = server.proc.output();
    assert!(out.contains("action: signal | result: success | signal: SIGINT"));
    assert!(out
        .trim_end()
        .ends_with("action: shutdown | result: success"));
}

#[test]
fn agency_sigterm_mid_upload_exits_0() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, ana_bets(1_000, |i| i % 10_000, "\n")).unwrap();

    // A stand-in central that acknowledges the first batch and then goes
    // quiet, holding the agency mid-upload.
    let central = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = central.local_addr().unwrap().to_string();
    let agency = start_agency(1, &address, &data, &work.path().join("winners.txt"));
    let (conn, _) = central.accept().unwrap();
    conn.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut conn = Raw::new(conn);
    assert_eq!(conn.recv().unwrap(), "ACTION:HELLO|AGENCY_ID:1\n");
    conn.send("STATUS:SUCCESS|MESSAGE:welcome|STORED:0\n");
    let first = conn.recv().unwrap();
    assert!(
        first.starts_with("BATCH_SIZE:70|FIRST:0|BET_1:NOMBRE:Ana\\|APELLIDO:Pérez\\|"),
        "{first}"
    );
    conn.send("STATUS:SUCCESS|MESSAGE:stored 70 bets|STORED:70\n");
    let second = conn.recv().unwrap();
    assert!(second.starts_with("BATCH_SIZE:70|FIRST:70|"), "{second}");

    agency.signal(Signal::SIGTERM);
    let status = agency.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status}");
    // Batches sent ahead (the agency keeps a window in flight) may still be
    // buffered; after them, the connection is closed.
    while let Some(frame) = conn.recv() {
        assert!(frame.starts_with("BATCH_SIZE:70|FIRST:"), "{frame}");
    }
    let lines = agency.lines();
    let signal = index_of(&lines, "action: signal | result: success | signal: SIGTERM");
    let socket = index_of(&lines, "action: close_connection | result: success");
    let file = index_of(&lines, "action: close_data_file | result: success");
    let done = index_of(&lines, "action: shutdown | result: success");
    assert!(signal < socket && socket < file && file < done);
    assert!(!agency.output().contains("consulta_ganadores"));
}

#[test]
fn agency_waits_in_progress_for_a_late_server() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,30904465,1999-03-17,7574\n").unwrap();
    // A port nothing listens on yet, held (not released) until the server
    // takes it, so no other process can be given it in between.
    let port = HeldPort::new();
    let winners = work.path().join("winners.txt");
    let agency = start_agency(1, &port.address(), &data, &winners);
    agency.wait_for("action: connect | result: in_progress");

    let mut cmd = lottery();
    cmd.arg("server")
        .args(["--port", &port.port.to_string(), "--agencies", "1"])
        .arg("--storage")
        .arg(work.path().join("bets.csv"));
    let server = Server::spawn(cmd);
    assert_eq!(server.port, port.port);
    let server = server.proc;
    assert!(agency.wait_exit(PATIENCE).success(), "{}", agency.output());
    assert_eq!(read_winners(&winners), ["30904465"]);
    assert!(!agency.output().contains("result: fail"));
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn server_sighup_shuts_down_like_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 5, 7574);
    server.proc.signal(Signal::SIGHUP);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let lines = server.proc.lines();
    let signal = index_of(&lines, "action: signal | result: success | signal: SIGHUP");
    let listener = index_of(&lines, "action: close_listener | result: success");
    let file = index_of(&lines, "action: close_bets_file | result: success");
    let done = index_of(&lines, "action: shutdown | result: success");
    assert!(signal < listener && listener < file && file < done);
    assert_eq!(done, lines.len() - 1);
    assert!(!server.proc.output().contains("result: fail"));
}

#[test]
fn agency_sighup_shuts_down_like_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,30904465,1999-03-17,7574\n").unwrap();
    // Nothing listens there: the agency waits, `in_progress`, for a central.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agency = start_agency(
        1,
        &format!("127.0.0.1:{port}"),
        &data,
        &work.path().join("winners.txt"),
    );
    agency.wait_for("action: connect | result: in_progress");
    agency.signal(Signal::SIGHUP);
    let status = agency.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let lines = agency.lines();
    let signal = index_of(&lines, "action: signal | result: success | signal: SIGHUP");
    let done = index_of(&lines, "action: shutdown | result: success");
    assert!(signal < done);
    assert!(!agency.output().contains("result: fail"));
}

/// The action of a log line (`action: x | …` gives `x`).
fn action_of(line: &str) -> &str {
    line.split(" | ")
        .find_map(|field| field.split("action: ").nth(1))
        .unwrap_or("")
}

#[test]
fn the_closing_lines_come_in_the_documented_order() {
    // docs/ARCHITECTURE.md's Shutdown section promises this order; a few runs, each with
    // an idle, an uploading and a waiting connection, so a race between
    // the steps would show.
    for _ in 0..3 {
        let work = tempfile::tempdir().unwrap();
        let server = Server::start(&work.path().join("bets.csv"), 2, 7574);
        let idle = TcpStream::connect(server.address()).unwrap();
        let mut uploading = Raw::connect(&server.address());
        uploading.send(format!("BATCH_SIZE:1|BET_1:{BET}\n"));
        assert!(uploading.recv().unwrap().starts_with("STATUS:SUCCESS"));
        let mut waiting = Raw::connect(&server.address());
        waiting.send("ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
        server
            .proc
            .wait_for("action: agencia_finalizada | result: success | agency: 2");

        server.proc.signal(Signal::SIGTERM);
        let status = server.proc.wait_exit(Duration::from_secs(10));
        assert!(status.success(), "exit status {status}");
        let lines = server.proc.lines();
        let closing: Vec<&str> = lines
            .iter()
            .map(|l| action_of(l))
            .skip_while(|&a| a != "signal")
            .collect();
        assert_eq!(
            closing,
            [
                "signal",
                "close_listener",
                "close_connection",
                "close_connection",
                "close_connection",
                "close_bets_file",
                "shutdown"
            ],
            "{}",
            lines.join("\n")
        );
        drop(idle);
    }
}
