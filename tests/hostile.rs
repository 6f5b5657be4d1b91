//! Hostile and broken input against the real server, one test per case.
//!
//! Each test runs a server for two agencies. Agency 1 is honest (the real
//! `lottery agency` binary, uploading generated data); agency 2's connection
//! is driven by hand and misbehaves. Every case checks the error code sent
//! back, the server's `result: fail` line naming the peer, that nothing of the
//! bad input reached the bets file, and that the honest agency, running at
//! the same time, still gets exactly its winners.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use common::raw::frame;
use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

const WINNING: u16 = 7574;

/// A bet of agency 2, in the wire's escaped form, with a document that
/// marks it as coming from this file.
fn bet2(doc: &str, date: &str, number: &str) -> String {
    format!(
        r"NOMBRE:Eva\|APELLIDO:Ruiz\|DOCUMENTO:{doc}\|NACIMIENTO:{date}\|NUMERO:{number}\|AGENCY_ID:2"
    )
}

fn good2(doc: &str) -> String {
    bet2(doc, "1990-01-01", "7574")
}

/// What these tests ask of a hand-driven connection.
impl Raw {
    /// Sends and expects an error reply with `code`; returns the reply.
    fn expect_error(&mut self, payload: &[u8], code: &str) -> String {
        self.send(payload);
        let reply = self.recv().expect("a reply");
        assert!(
            reply.starts_with(&format!("STATUS:ERROR|CODE:{code}|MESSAGE:")),
            "expected {code}, got {reply:?}"
        );
        reply
    }

    /// The server has hung up on us.
    fn expect_closed(&mut self) {
        assert_eq!(self.recv(), None, "the connection should be closed");
    }

    /// Still served: a good batch of agency 2 is stored.
    fn expect_open(&mut self, doc: &str) {
        self.send(format!("BATCH_SIZE:1|BET_1:{}\n", good2(doc)).as_bytes());
        let reply = self.recv().expect("a reply");
        assert!(
            reply.starts_with("STATUS:SUCCESS|MESSAGE:stored 1 bets"),
            "{reply}"
        );
    }
}

/// A server for two agencies with the honest agency 1 uploading.
struct Scenario {
    server: Server,
    honest: Proc,
    work: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Scenario {
    fn start() -> Scenario {
        Self::start_with(&[], &[])
    }

    /// With extra environment for the server and for the honest agency.
    fn start_with(server_env: &[(&str, String)], agency_env: &[(&str, String)]) -> Scenario {
        let data = gen_data(GenOptions {
            agencies: 1,
            bets_per_agency: 3_000,
            seed: 5,
            winning_number: WINNING,
            winner_share: 0.01,
            tricky_share: 0.02,
            crlf: false,
        });
        let work = tempfile::tempdir().unwrap();
        let server = start_server(work.path(), server_env);
        let mut cmd = agency_command(
            1,
            &server.address(),
            &data_file(data.path(), 1),
            &work.path().join("winners-1.txt"),
        );
        for (k, v) in agency_env {
            cmd.env(k, v);
        }
        let honest = Proc::spawn(cmd);
        Scenario {
            server,
            honest,
            work,
            data,
        }
    }

    fn address(&self) -> String {
        self.server.address()
    }

    fn connect(&self) -> Raw {
        Raw::connect(&self.address())
    }

    /// Waits for a server line that has every one of `needles`.
    fn log_line(&self, needles: &[&str]) -> String {
        self.server
            .proc
            .wait_until(&format!("containing all of {needles:?}"), STEP, |line| {
                needles.iter().all(|n| line.contains(n))
            })
    }

    /// The `result: fail` line for `raw`'s peer, with `code` (when given).
    fn fail_line(&self, raw: &Raw, code: Option<&str>) -> String {
        let peer = raw.peer();
        let code = code.map(|c| format!("code: {c}"));
        let mut needles = vec![peer.as_str(), "result: fail"];
        if let Some(c) = &code {
            needles.push(c);
        }
        self.log_line(&needles)
    }

    /// Agency 2 finishes on `raw`, everyone gets their winners, and the bets
    /// file holds exactly the honest agency's rows plus agency 2's `good`
    /// documents.
    fn finish(self, raw: &mut Raw, good: &[&str]) {
        raw.send(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
        let winners = raw.recv().expect("agency 2's winners");
        let contract = format!("STATUS:SUCCESS|WINNERS:{}", good.join(","));
        // A session opened by HELLO also gets its receipt and the seal.
        let sealed = |rest: &str| {
            let hex = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
            let rest = rest.strip_prefix(&format!("|STORED:{}|DIGEST:", good.len()));
            rest.and_then(|r| r.strip_suffix('\n'))
                .and_then(|r| r.split_once("|SEAL:"))
                .is_some_and(|(digest, seal)| hex(digest) && hex(seal))
        };
        assert!(
            winners == format!("{contract}\n")
                || winners.strip_prefix(&contract).is_some_and(sealed),
            "{winners}"
        );
        self.check(good);
    }

    fn check(self, good: &[&str]) {
        let status = self.honest.wait_exit(PATIENCE);
        assert!(
            status.success(),
            "honest agency: {status}\n{}\n{}",
            self.honest.output(),
            self.honest.stderr()
        );
        let expected = expected(self.data.path(), 1, WINNING);
        assert_eq!(
            read_winners(&self.work.path().join("winners-1.txt")),
            expected.winners[&1],
            "the honest agency's winners"
        );
        let stored = stored(&self.work.path().join("bets.csv"));
        assert_eq!(
            stored.get(&1),
            expected.rows.get(&1),
            "the honest agency's rows"
        );
        let docs: Vec<&str> = stored
            .get(&2)
            .map(|rows| rows.iter().map(|r| r[3].as_str()).collect())
            .unwrap_or_default();
        assert_eq!(docs, good, "agency 2's stored bets");
        assert_eq!(
            stored.len(),
            if good.is_empty() { 1 } else { 2 },
            "no other agency"
        );
        self.server.proc.signal(Signal::SIGTERM);
        assert!(self
            .server
            .proc
            .wait_exit(Duration::from_secs(10))
            .success());
    }
}

fn start_server(dir: &std::path::Path, env: &[(&str, String)]) -> Server {
    start_server_for(dir, 2, env)
}

fn start_server_for(dir: &std::path::Path, agencies: u32, env: &[(&str, String)]) -> Server {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", agencies.to_string())
        .env("SERVER_STORAGE", dir.join("bets.csv"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    Server::spawn(cmd)
}

/// One case of a bad message that is answered and leaves the connection open.
fn answered_and_kept(payload: &[u8], code: &str, reason: &str) {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    let reply = raw.expect_error(payload, code);
    assert!(reply.contains(reason), "{reply:?} should say {reason:?}");
    let line = sc.fail_line(&raw, Some(code));
    assert!(line.contains(reason), "{line}");
    raw.expect_open("20000001");
    sc.finish(&mut raw, &["20000001"]);
}

// --- Frames ------------------------------------------------------------------

/// A batch of agency 2 of `n` bets (documents `2100000i`), as one frame.
fn batch2(n: usize) -> Vec<u8> {
    let mut payload = format!("BATCH_SIZE:{n}");
    for i in 1..=n {
        payload.push_str(&format!(
            "|BET_{i}:{}",
            good2(&format!("{}", 2_100_000 + i))
        ));
    }
    payload.push('\n');
    frame(payload.as_bytes())
}

#[test]
fn an_oversize_batch_is_refused_and_the_connection_serves_what_follows() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    let oversize = batch2(100);
    assert!(oversize.len() > 8192);
    // The oversize batch and a valid one in one write: the central reads
    // past the first and stays in step for the second.
    let mut both = oversize.clone();
    let valid = format!("BATCH_SIZE:1|BET_1:{}\n", good2("20000001"));
    both.extend_from_slice(&frame(valid.as_bytes()));
    raw.send_bytes(&both);
    let refusal = format!(
        "STATUS:ERROR|CODE:FRAME_TOO_LARGE|MESSAGE:frame of {} bytes exceeds the 8192-byte \
         limit; to accept larger frames from legacy agencies, raise server.max_frame \
         (SERVER_MAX_FRAME)\n",
        oversize.len()
    );
    assert_eq!(raw.recv().as_deref(), Some(refusal.as_str()));
    let stored = raw.recv().expect("the valid batch's reply");
    assert!(
        stored.starts_with("STATUS:SUCCESS|MESSAGE:stored 1 bets"),
        "{stored}"
    );
    // Logged as the rejected batch it was, naming its size and agency.
    let line = sc.fail_line(&raw, Some("FRAME_TOO_LARGE"));
    assert!(
        line.contains("action: apuesta_recibida | result: fail | cantidad: 100 | agency: 2"),
        "{line}"
    );
    raw.expect_open("20000002");
    // The last batch refused, then the announcement: still served.
    raw.send_bytes(&oversize);
    assert_eq!(raw.recv().as_deref(), Some(refusal.as_str()));
    sc.finish(&mut raw, &["20000001", "20000002"]);
}

#[test]
fn a_header_past_what_is_read_past_is_refused_and_closed() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    raw.send_bytes(&(lottery::wire::MAX_SKIPPED_FRAME as u32).to_be_bytes());
    let reply = raw.recv().unwrap();
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:FRAME_TOO_LARGE|"),
        "{reply}"
    );
    raw.expect_closed();
    let line = sc.fail_line(&raw, None);
    assert!(line.contains("exceeds the 8192-byte limit"), "{line}");
    let mut next = sc.connect();
    sc.finish(&mut next, &[]);
}

#[test]
fn eof_inside_a_frame_is_logged() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    let payload = format!("BATCH_SIZE:1|BET_1:{}\n", good2("20000009"));
    let frame = frame(payload.as_bytes());
    raw.send_bytes(&frame[..frame.len() / 2]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    raw.expect_closed();
    let line = sc.fail_line(&raw, None);
    assert!(line.contains("connection closed inside a frame"), "{line}");
    let mut next = sc.connect();
    sc.finish(&mut next, &[]);
}

#[test]
fn payload_not_utf8() {
    answered_and_kept(
        b"BATCH_SIZE:1|BET_1:\xff\xfe\n",
        "MALFORMED_MESSAGE",
        "not valid UTF-8",
    );
}

#[test]
fn empty_payload() {
    answered_and_kept(b"", "MALFORMED_MESSAGE", "empty payload");
}

#[test]
fn missing_final_newline() {
    answered_and_kept(
        b"ACTION:BETTING_FINISHED|AGENCY_ID:2",
        "MALFORMED_MESSAGE",
        "does not end with",
    );
}

#[test]
fn dangling_escape() {
    let p = format!("BATCH_SIZE:1|BET_1:{}\\\n", good2("20000009"));
    // The final `\` escapes the newline: there is no terminator left.
    answered_and_kept(
        p.as_bytes(),
        "MALFORMED_MESSAGE",
        "payload does not end with",
    );
    // An escaped backslash and an escaped `|` before it change nothing: the
    // last `\` still escapes the newline.
    answered_and_kept(
        b"BATCH_SIZE:1|BET_1:NOMBRE:A\\\\\\|X:\\\n",
        "MALFORMED_MESSAGE",
        "payload does not end with",
    );
}

#[test]
fn unknown_escape() {
    let p = format!(
        "BATCH_SIZE:1|BET_1:{}\n",
        good2("20000009").replace("Eva", "E\\\\\\qva")
    );
    answered_and_kept(p.as_bytes(), "INVALID_BET", "BET_1: malformed bet");
    answered_and_kept(
        b"ACTION:BETTING\\_FINISHED|AGENCY_ID:2\n",
        "MALFORMED_MESSAGE",
        "unknown escape",
    );
}

#[test]
fn unknown_action_and_unknown_message() {
    answered_and_kept(
        b"ACTION:DANCE|AGENCY_ID:2\n",
        "UNKNOWN_MESSAGE",
        "ACTION:DANCE",
    );
    answered_and_kept(
        b"HELLO:WORLD\n",
        "UNKNOWN_MESSAGE",
        "neither BATCH_SIZE nor ACTION",
    );
}

#[test]
fn a_message_that_is_not_a_batch_is_logged_as_a_refused_request() {
    let work = tempfile::tempdir().unwrap();
    let server = start_server(work.path(), &[]);
    let mut raw = Raw::connect(&server.address());
    let peer = raw.peer();
    raw.expect_error(b"ACTION:NOPE\n", "UNKNOWN_MESSAGE");
    let line = server.proc.wait_for(&peer);
    assert!(
        line.ends_with(&format!(
            " WARN     action: request | result: fail | {peer} | code: UNKNOWN_MESSAGE | \
             reason: unknown message: ACTION:NOPE"
        )),
        "{line}"
    );
    // A batch that is refused is still a rejected batch, of the size it
    // says it has.
    let batch = format!("BATCH_SIZE:2|BET_1:{}\n", good2("20000001"));
    raw.expect_error(batch.as_bytes(), "MALFORMED_MESSAGE");
    let line = server.proc.wait_for(&peer);
    assert!(
        line.contains(&format!(
            " WARN     action: apuesta_recibida | result: fail | cantidad: 2 | {peer} | \
             code: MALFORMED_MESSAGE | reason: batch is inconsistent"
        )),
        "{line}"
    );
    // A size that is no number: the bets it holds.
    let batch = format!(
        "BATCH_SIZE:tres|BET_1:{}|BET_2:{}|BET_3:{}\n",
        good2("20000001"),
        good2("20000002"),
        good2("20000003")
    );
    raw.expect_error(batch.as_bytes(), "MALFORMED_MESSAGE");
    let line = server.proc.wait_for(&peer);
    assert!(
        line.contains(&format!(
            " WARN     action: apuesta_recibida | result: fail | cantidad: 3 | {peer} | \
             code: MALFORMED_MESSAGE | reason: bad value for BATCH_SIZE"
        )),
        "{line}"
    );
    // Neither closed the connection.
    raw.send(b"ACTION:PING\n");
    assert_eq!(raw.recv().unwrap(), "STATUS:SUCCESS|MESSAGE:pong\n");
    assert_eq!(
        server
            .proc
            .output()
            .matches("action: apuesta_recibida")
            .count(),
        2,
        "{}",
        server.proc.output()
    );
}

#[test]
fn batch_size_disagrees_with_the_bets() {
    let p = format!(
        "BATCH_SIZE:3|BET_1:{}|BET_2:{}\n",
        good2("20000008"),
        good2("20000009")
    );
    answered_and_kept(
        p.as_bytes(),
        "MALFORMED_MESSAGE",
        "BATCH_SIZE is 3 but 2 bets are present",
    );
}

#[test]
fn bet_numbers_with_gaps_or_repeats() {
    let p = format!(
        "BATCH_SIZE:2|BET_1:{}|BET_3:{}\n",
        good2("20000008"),
        good2("20000009")
    );
    answered_and_kept(
        p.as_bytes(),
        "MALFORMED_MESSAGE",
        "BET_3 is outside BATCH_SIZE 2",
    );
    let p = format!(
        "BATCH_SIZE:2|BET_1:{}|BET_1:{}\n",
        good2("20000008"),
        good2("20000009")
    );
    answered_and_kept(p.as_bytes(), "MALFORMED_MESSAGE", "BET_1 appears twice");
}

// --- Fields ------------------------------------------------------------------

/// A batch whose second bet is bad in one field: refused whole, naming the
/// bet and the field; the good first bet is not stored either.
fn bad_field(bet: String, reason: &str) {
    let p = format!("BATCH_SIZE:2|BET_1:{}|BET_2:{bet}\n", good2("20000007"));
    answered_and_kept(p.as_bytes(), "INVALID_BET", reason);
}

#[test]
fn impossible_dates() {
    bad_field(
        bet2("20000009", "2023-02-30", "1"),
        r#"BET_2: NACIMIENTO "2023-02-30": not a real calendar date"#,
    );
    bad_field(
        bet2("20000009", "1999-13-01", "1"),
        r#"BET_2: NACIMIENTO "1999-13-01": not a real calendar date"#,
    );
    bad_field(
        bet2("20000009", "17/03/1999", "1"),
        r#"BET_2: NACIMIENTO "17/03/1999": not a date of the form YYYY-MM-DD"#,
    );
}

#[test]
fn birthdate_in_the_future() {
    bad_field(
        bet2("20000009", "2999-01-01", "1"),
        r#"BET_2: NACIMIENTO "2999-01-01": in the future"#,
    );
}

#[test]
fn numbers_out_of_range_or_not_numeric() {
    bad_field(
        bet2("20000009", "1990-01-01", "10000"),
        r#"BET_2: NUMERO "10000": outside 0..=9999"#,
    );
    bad_field(
        bet2("20000009", "1990-01-01", "12a"),
        r#"BET_2: NUMERO "12a": not a whole number"#,
    );
    bad_field(
        bet2("20000009", "1990-01-01", "-1"),
        r#"BET_2: NUMERO "-1": not a whole number"#,
    );
}

#[test]
fn bad_documents() {
    bad_field(bet2("", "1990-01-01", "1"), r#"BET_2: DOCUMENTO "": empty"#);
    bad_field(
        bet2("12a45", "1990-01-01", "1"),
        "BET_2: DOCUMENTO \"12a45\": not all digits",
    );
    bad_field(
        bet2("12345678901", "1990-01-01", "1"),
        r#"BET_2: DOCUMENTO "12345678901": longer than 10 digits"#,
    );
}

#[test]
fn empty_or_over_long_names() {
    bad_field(
        good2("20000009").replace("NOMBRE:Eva", "NOMBRE:"),
        "BET_2: NOMBRE \"\": empty",
    );
    let long = "x".repeat(101);
    bad_field(
        good2("20000009").replace("APELLIDO:Ruiz", &format!("APELLIDO:{long}")),
        // The value is shown cut to its first 40 characters.
        &format!(
            "BET_2: APELLIDO \"{}…\": longer than 100 characters",
            &long[..40]
        ),
    );
}

#[test]
fn missing_field() {
    bad_field(
        good2("20000009").replace(r"\|NUMERO:7574", ""),
        "BET_2: NUMERO is missing",
    );
}

#[test]
fn unknown_agency_id() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    let bet = good2("20000009").replace("AGENCY_ID:2", "AGENCY_ID:9");
    let reply = raw.expect_error(
        format!("BATCH_SIZE:1|BET_1:{bet}\n").as_bytes(),
        "WRONG_AGENCY",
    );
    assert!(
        reply.contains("agency 9 is not one of the configured agencies 1..=2"),
        "{reply}"
    );
    sc.fail_line(&raw, Some("WRONG_AGENCY"));
    raw.expect_open("20000001");
    sc.finish(&mut raw, &["20000001"]);
}

#[test]
fn agency_id_differing_from_the_connection() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    raw.expect_open("20000001");
    // Agency 1's bet on agency 2's connection.
    let bet = good2("20000009").replace("AGENCY_ID:2", "AGENCY_ID:1");
    let reply = raw.expect_error(
        format!("BATCH_SIZE:1|BET_1:{bet}\n").as_bytes(),
        "WRONG_AGENCY",
    );
    assert!(
        reply.contains("this connection speaks for agency 2, not 1"),
        "{reply}"
    );
    sc.fail_line(&raw, Some("WRONG_AGENCY"));
    // Mixed agencies inside one batch.
    let p = format!("BATCH_SIZE:2|BET_1:{}|BET_2:{bet}\n", good2("20000008"));
    let reply = raw.expect_error(p.as_bytes(), "WRONG_AGENCY");
    assert!(
        reply.contains("BET_2: AGENCY_ID 1 differs from BET_1's 2"),
        "{reply}"
    );
    sc.finish(&mut raw, &["20000001"]);
}

// --- Order -------------------------------------------------------------------

#[test]
fn bets_after_finishing_and_a_second_announcement() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    raw.expect_open("20000001");
    raw.send(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
    assert_eq!(raw.recv().unwrap(), "STATUS:SUCCESS|WINNERS:20000001\n");
    let reply = raw.expect_error(
        format!("BATCH_SIZE:1|BET_1:{}\n", good2("20000002")).as_bytes(),
        "AGENCY_FINISHED",
    );
    assert!(
        reply.contains("agency 2 already finished betting"),
        "{reply}"
    );
    sc.fail_line(&raw, Some("AGENCY_FINISHED"));
    let reply = raw.expect_error(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n", "AGENCY_FINISHED");
    assert!(reply.contains("already announced"), "{reply}");
    sc.check(&["20000001"]);
}

#[test]
fn a_second_connection_for_a_connected_agency() {
    let sc = Scenario::start();
    let mut first = sc.connect();
    first.expect_open("20000001");
    // Without HELLO, a second connection cannot speak for the agency.
    let mut second = sc.connect();
    let reply = second.expect_error(
        format!("BATCH_SIZE:1|BET_1:{}\n", good2("20000002")).as_bytes(),
        "AGENCY_BUSY",
    );
    assert!(reply.contains("agency 2 is already connected"), "{reply}");
    sc.fail_line(&second, Some("AGENCY_BUSY"));
    second.send(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
    let reply = second.recv().expect("a reply");
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:AGENCY_BUSY|"),
        "{reply}"
    );
    // The first keeps working meanwhile.
    first.expect_open("20000003");
    // A HELLO is a new session of the agency: it takes over, learns the
    // final count, and the older connection is closed.
    let mut third = sc.connect();
    third.send(b"ACTION:HELLO|AGENCY_ID:2\n");
    let reply = third.recv().expect("a reply");
    assert!(
        reply.starts_with("STATUS:SUCCESS|MESSAGE:agency 2: resume from bet 2|STORED:2|DIGEST:"),
        "{reply}"
    );
    first.expect_closed();
    third.expect_open("20000004");
    sc.finish(&mut third, &["20000001", "20000003", "20000004"]);
}

#[test]
fn winners_asked_before_the_draw_wait_for_the_whole_draw() {
    let sc = Scenario::start();
    let mut raw = sc.connect();
    raw.expect_open("20000001");
    // Announce at once, while the honest agency is still uploading: the
    // answer comes only after its last bet, with nothing partial.
    raw.send(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n");
    assert_eq!(raw.recv().unwrap(), "STATUS:SUCCESS|WINNERS:20000001\n");
    let draw = sc.log_line(&["action: sorteo | result: success"]);
    assert!(
        draw.contains("bets: 3001"),
        "the draw saw every bet: {draw}"
    );
    sc.check(&["20000001"]);
}

// --- Limits ------------------------------------------------------------------

#[test]
fn connection_limit() {
    let sc = Scenario::start_with(&[("SERVER_MAX_CONNECTIONS", "2".into())], &[]);
    // Let the honest agency in first, so the two slots are it and us.
    sc.log_line(&["action: apuesta_recibida | result: success"]);
    let mut raw = sc.connect();
    raw.expect_open("20000001");
    let mut over = sc.connect();
    let reply = over.recv().expect("a refusal");
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:SERVER_BUSY|"),
        "{reply}"
    );
    over.expect_closed();
    sc.fail_line(&over, Some("SERVER_BUSY"));
    sc.finish(&mut raw, &["20000001"]);
}

#[test]
fn slow_sender_is_cut_after_the_frame_timeout() {
    let sc = Scenario::start_with(&[("SERVER_FRAME_TIMEOUT", "1".into())], &[]);
    let mut raw = sc.connect();
    raw.send_bytes(&[0, 0]); // half a header, then nothing
    let reply = raw.recv().expect("a timeout reply");
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:TIMEOUT|MESSAGE:frame not completed in time (1s)"),
        "{reply}"
    );
    raw.expect_closed();
    sc.fail_line(&raw, Some("TIMEOUT"));
    let mut next = sc.connect();
    sc.finish(&mut next, &[]);
}

#[test]
fn idle_connection_is_closed_but_waiting_for_the_draw_is_not_idle() {
    let sc = Scenario::start_with(&[("SERVER_IDLE_TIMEOUT", "1".into())], &[]);
    let mut idle = sc.connect();
    idle.expect_open("20000001");
    let reply = idle.recv().expect("a timeout reply");
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:TIMEOUT|MESSAGE:idle for too long (1s)"),
        "{reply}"
    );
    idle.expect_closed();
    sc.log_line(&["action: idle_timeout | result: success", &idle.peer()]);
    // The honest agency has been waiting for the draw for over a second by
    // now, or is still uploading; either way it was not cut off.
    let mut next = sc.connect();
    sc.finish(&mut next, &["20000001"]);
}

#[test]
fn ten_thousand_junk_connections_during_an_honest_run() {
    const AGENCIES: u32 = 5;
    let data = gen_data(GenOptions {
        agencies: AGENCIES,
        bets_per_agency: 20_000,
        seed: 6,
        winning_number: WINNING,
        winner_share: 0.005,
        tricky_share: 0.01,
        crlf: false,
    });
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    // A central facing floods gets a deep accept queue (the default of 5
    // makes a fast connector wait out SYN retransmissions).
    let server = start_server_for(
        work.path(),
        AGENCIES,
        &[("SERVER_LISTEN_BACKLOG", "4096".into())],
    );
    let address = server.address();
    let junk = std::thread::spawn({
        let address = address.clone();
        move || {
            for i in 0..10_000u32 {
                let Ok(mut s) = TcpStream::connect(&address) else {
                    continue;
                };
                let _ = match i % 5 {
                    0 => s.write_all(&[0xff; 64]),               // an oversize header
                    1 => s.write_all(&[0, 0, 0x10, 0, b'B']),    // a frame cut short
                    2 => s.write_all(b"\0\0\0\x05hello"),        // no newline
                    3 => s.write_all(b"GET / HTTP/1.1\r\n\r\n"), // the wrong protocol
                    _ => Ok(()),                                 // nothing at all
                };
            }
        }
    });
    let agencies: Vec<Proc> = (1..=AGENCIES)
        .map(|id| {
            start_agency(
                id,
                &address,
                &data_file(data.path(), id),
                &work.path().join(format!("winners-{id}.txt")),
            )
        })
        .collect();
    junk.join().unwrap();
    let expected = expected(data.path(), AGENCIES, WINNING);
    for (i, agency) in agencies.iter().enumerate() {
        let id = i as u32 + 1;
        assert!(
            agency.wait_exit(PATIENCE).success(),
            "agency {id}: {}",
            agency.stderr()
        );
        assert_eq!(
            read_winners(&work.path().join(format!("winners-{id}.txt"))),
            expected.winners[&id]
        );
    }
    assert_eq!(stored(&storage), expected.rows);
    let peak_kib = peak_rss_kib(server.proc.pid);
    assert!(peak_kib < 128 * 1024, "server peak RSS {peak_kib} KiB");
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

// --- Authentication and TLS ---------------------------------------------------

/// Agency 1's secret in [`secrets_file`]: random, as `lottery secrets`
/// writes them (a weaker one is refused at start).
const SECRET_1: &str = "9c1e5a7f3b2d48e6a0f1c3b5d7e9a2c4b6d8f0e1a3c5e7f9b1d3f5a7c9e0b2d4";
/// Agency 2's.
const SECRET_2: &str = "4d2b8f6e1a3c5e7f9b0d2f4a6c8e1b3d5f7a9c0e2b4d6f8a1c3e5b7d9f0a2c4e";
/// The operator's.
const SECRET_OPERATOR: &str = "e7a1c3f5b9d2e4a6c8f0b1d3e5a7c9f2b4d6e8a0c2f4b6d8e1a3c5f7b9d0e2a4";

fn secrets_file(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("secrets.toml");
    std::fs::write(&path, format!("1 = \"{SECRET_1}\"\n2 = \"{SECRET_2}\"\n")).unwrap();
    path
}

/// A connection to the central at `port` from `source`, another loopback
/// address (127.0.0.0/8 is all loopback), as if from another host.
fn connect_from(source: &str, port: u16) -> Raw {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap()
    });
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let address = format!("127.0.0.1:{port}").parse().unwrap();
        socket.connect(address).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    Raw { stream }
}

/// The sum of `key` over the server's `auth_failures` lines for `peer`
/// (an IP address, or "" for every one).
fn summed(server: &Server, peer: &str, key: &str) -> u64 {
    server
        .proc
        .lines()
        .iter()
        .filter(|l| l.contains("action: auth_failures") && l.contains(&format!("peer: {peer}")))
        .map(|l| {
            l.split(" | ")
                .find_map(|f| f.strip_prefix(key))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {key} in {l}"))
        })
        .sum()
}

#[test]
fn secrets_keep_out_whoever_lacks_them() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let sc = Scenario::start_with(
        &[("SERVER_SECRETS_FILE", secrets.display().to_string())],
        &[("CLI_SECRET", SECRET_1.into())],
    );
    // No HELLO: no bets, no announcement, no probe, and no answer of its
    // own for a malformed or unknown message either: UNAUTHENTICATED, and
    // the connection is closed.
    let batch = format!("BATCH_SIZE:1|BET_1:{}\n", good2("20000009"));
    let before_hello: [&[u8]; 7] = [
        batch.as_bytes(),
        b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n",
        b"ACTION:PING\n",
        b"ACTION:STATUS\n",
        b"ACTION:NOPE\n",
        b"NOCOLON\n",
        b"\xff\n",
    ];
    for payload in before_hello {
        let mut raw = sc.connect();
        let reply = raw.expect_error(payload, "UNAUTHENTICATED");
        assert!(
            reply.contains("requires HELLO with the agency's SECRET"),
            "{reply}"
        );
        raw.expect_closed();
    }
    // Logged in summary, per address: the first at once.
    let line = sc.log_line(&["action: auth_failures", "peer: 127.0.0.1 |"]);
    assert!(line.contains("WARN "), "{line}");
    assert!(line.contains("unauthenticated: 1"), "{line}");
    // A wrong secret, and another agency's secret.
    for secret in ["adivina", SECRET_1] {
        let mut raw = sc.connect();
        let reply = raw.expect_error(
            format!("ACTION:HELLO|AGENCY_ID:2|SECRET:{secret}\n").as_bytes(),
            "UNAUTHENTICATED",
        );
        assert!(
            reply.contains("wrong or missing SECRET for agency 2"),
            "{reply}"
        );
        raw.expect_closed();
    }
    // The right one (two strikes: not locked out yet).
    let mut raw = sc.connect();
    raw.send(format!("ACTION:HELLO|AGENCY_ID:2|SECRET:{SECRET_2}\n").as_bytes());
    assert!(raw.recv().unwrap().starts_with("STATUS:SUCCESS|"));
    raw.expect_open("20000001");
    sc.finish(&mut raw, &["20000001"]);
}

/// `lottery compose` for `agencies` agencies in `dir`: the compose file,
/// and the secrets it mounts, as an operator gets them.
fn compose_secrets(dir: &std::path::Path, agencies: u32) -> PathBuf {
    let out = lottery()
        .arg("compose")
        .args(["--agencies", &agencies.to_string()])
        .arg("--out")
        .arg(dir.join("compose.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    dir.join("secrets")
}

#[test]
fn a_stranger_can_neither_finish_an_agency_nor_read_its_winners() {
    // The documented setup: the central and its agencies with the secrets
    // `lottery compose` writes.
    let dir = tempfile::tempdir().unwrap();
    let secrets = compose_secrets(dir.path(), 2);
    let server = start_server(
        dir.path(),
        &[(
            "SERVER_SECRETS_FILE",
            secrets.join("central.toml").display().to_string(),
        )],
    );
    // What was seen: a stranger announces agency 1 finished, to learn its
    // winners and close its upload before it starts.
    for finished in ["BETTING_FINISHED", "FINISH_BETTING"] {
        let mut raw = Raw::connect(&server.address());
        let reply = raw.expect_error(
            format!("ACTION:{finished}|AGENCY_ID:1\n").as_bytes(),
            "UNAUTHENTICATED",
        );
        assert!(!reply.contains("WINNERS"), "{reply}");
        raw.expect_closed();
    }
    // Nothing of it counted: both agencies upload all their bets (no
    // AGENCY_FINISHED) and get exactly their own winners.
    let data = gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: 500,
        seed: 12,
        winning_number: WINNING,
        winner_share: 0.02,
        tricky_share: 0.0,
        crlf: false,
    });
    let agencies: Vec<Proc> = (1..=2)
        .map(|id| {
            let mut cmd = agency_command(
                id,
                &server.address(),
                &data_file(data.path(), id),
                &dir.path().join(format!("winners-{id}.txt")),
            );
            cmd.env(
                "CLI_SECRET_FILE",
                secrets.join(format!("agency-{id}.secret")),
            );
            Proc::spawn(cmd)
        })
        .collect();
    let expected = expected(data.path(), 2, WINNING);
    for (id, agency) in (1..=2).zip(&agencies) {
        let status = agency.wait_exit(PATIENCE);
        assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
        assert_eq!(
            read_winners(&dir.path().join(format!("winners-{id}.txt"))),
            expected.winners[&id]
        );
    }
    assert_eq!(stored(&dir.path().join("bets.csv")), expected.rows);
    assert!(!server.proc.output().contains("AGENCY_FINISHED"));
}

/// A wrong guess for agency 1 from `raw`, connected at `started`: its
/// reply, and how long it took since.
fn guess(mut raw: Raw, i: usize, started: std::time::Instant) -> (String, Duration) {
    raw.send(format!("ACTION:HELLO|AGENCY_ID:1|SECRET:guess-{i}\n").as_bytes());
    let reply = raw.recv().expect("every guess is answered");
    let took = started.elapsed();
    raw.expect_closed();
    (reply, took)
}

const WRONG: &str =
    "STATUS:ERROR|CODE:UNAUTHENTICATED|MESSAGE:wrong or missing SECRET for agency 1";

#[test]
fn guessing_secrets_is_throttled_and_logged_in_summary() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let server = start_server(
        dir.path(),
        &[
            ("SERVER_SECRETS_FILE", secrets.display().to_string()),
            ("SERVER_AUTH_TIMEOUT", "1".into()),
        ],
    );
    // The first three wrong guesses from an address are answered at once.
    for i in 0..3 {
        let (reply, _) = guess(
            Raw::connect(&server.address()),
            i,
            std::time::Instant::now(),
        );
        assert_eq!(reply, format!("{WRONG}\n"));
    }
    // Then the address is throttled: each wrong guess is still answered
    // UNAUTHENTICATED, but only when its connection's time to authenticate
    // (1 s here) is up, so a guesser holds one of its address's few places
    // among the strangers for each guess.
    const THROTTLED: usize = 30;
    let guesses: Vec<_> = (0..THROTTLED)
        .map(|i| {
            let started = std::time::Instant::now();
            let raw = Raw::connect(&server.address());
            std::thread::spawn(move || guess(raw, 3 + i, started))
        })
        .collect();
    for handle in guesses {
        let (reply, took) = handle.join().unwrap();
        assert!(
            reply.starts_with(&format!(
                "{WRONG} (answered late: too many wrong secrets from 127.0.0.1)"
            )),
            "{reply}"
        );
        assert!(took >= Duration::from_secs(1), "answered after {took:?}");
    }
    // The right secret still gets in, from the same address, at once.
    let mut raw = Raw::connect(&server.address());
    raw.send(format!("ACTION:HELLO|AGENCY_ID:1|SECRET:{SECRET_1}\n").as_bytes());
    assert!(raw.recv().unwrap().starts_with("STATUS:SUCCESS|"));
    drop(raw);
    // The log: a few summary lines with counts, never one per attempt.
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let lines = server.proc.lines();
    let summaries = lines
        .iter()
        .filter(|l| l.contains("action: auth_failures"))
        .count();
    assert!(
        (1..=3).contains(&summaries),
        "one line per interval and one at shutdown: {lines:#?}"
    );
    assert_eq!(summed(&server, "127.0.0.1 ", "wrong_secret: "), 3);
    assert_eq!(
        summed(&server, "127.0.0.1 ", "throttled: "),
        THROTTLED as u64
    );
    let refusals = lines
        .iter()
        .filter(|l| l.contains("UNAUTHENTICATED") || l.contains("AUTH_THROTTLED"))
        .count();
    assert_eq!(refusals, 0, "no line per refused attempt");
    // Nor any other line per attempt (a closed connection, say): the
    // whole log of 33 attempts is a few lines.
    assert!(lines.len() < 20, "{}", server.proc.output());
}

#[test]
fn a_guesser_spread_over_many_addresses_is_slowed_too() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let server = start_server(
        dir.path(),
        &[
            ("SERVER_SECRETS_FILE", secrets.display().to_string()),
            ("SERVER_AUTH_TIMEOUT", "1".into()),
        ],
    );
    // Two guesses from each of ten addresses: none is throttled on its
    // own (that takes three), but twenty wrong secrets in all throttle
    // every address.
    for host in 2..12 {
        for i in 0..2 {
            let raw = connect_from(&format!("127.0.0.{host}"), server.port);
            let (reply, _) = guess(raw, i, std::time::Instant::now());
            assert_eq!(reply, format!("{WRONG}\n"), "127.0.0.{host}");
        }
    }
    let line = server.proc.wait_for("action: auth_throttle");
    assert!(line.contains("WARN "), "{line}");
    assert!(line.contains("scope: all_addresses"), "{line}");
    assert!(line.contains("throttled_for_secs: 10"), "{line}");
    // A first guess from yet other addresses is now answered late.
    let guesses: Vec<_> = (12..22)
        .map(|host| {
            let started = std::time::Instant::now();
            let raw = connect_from(&format!("127.0.0.{host}"), server.port);
            std::thread::spawn(move || guess(raw, 0, started))
        })
        .collect();
    for handle in guesses {
        let (reply, took) = handle.join().unwrap();
        assert!(reply.starts_with(WRONG), "{reply}");
        assert!(
            reply.ends_with("(answered late: too many wrong secrets from many addresses)\n"),
            "{reply}"
        );
        assert!(took >= Duration::from_secs(1), "answered after {took:?}");
    }
    // The right secret gets in at once, from anywhere.
    let mut raw = connect_from("127.0.0.22", server.port);
    raw.send(format!("ACTION:HELLO|AGENCY_ID:1|SECRET:{SECRET_1}\n").as_bytes());
    assert!(raw.recv().unwrap().starts_with("STATUS:SUCCESS|"));
    drop(raw);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(summed(&server, "", "wrong_secret: "), 20);
    assert_eq!(summed(&server, "", "throttled: "), 10);
}

#[test]
fn an_honest_agency_behind_a_throttled_address_gets_in_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let server = start_server_for(
        dir.path(),
        1,
        &[("SERVER_SECRETS_FILE", secrets.display().to_string())],
    );
    // Someone at the same address (a NAT, here loopback) guesses.
    for _ in 0..3 {
        let mut raw = Raw::connect(&server.address());
        raw.expect_error(
            b"ACTION:HELLO|AGENCY_ID:1|SECRET:adivina\n",
            "UNAUTHENTICATED",
        );
    }
    let data = dir.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,30904465,1999-03-17,7574\n").unwrap();
    let winners = dir.path().join("winners-1.txt");
    let mut cmd = agency_command(1, &server.address(), &data, &winners);
    cmd.env("CLI_SECRET", SECRET_1);
    let agency = Proc::spawn(cmd);
    // Its right secret is compared and let in: no lockout to wait out
    // (10 s), no reconnecting.
    let status = agency.wait_exit(Duration::from_secs(8));
    assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
    assert!(
        !agency.output().contains("action: reconnect"),
        "{}",
        agency.output()
    );
    assert_eq!(read_winners(&winners), ["30904465"]);
}

#[test]
fn a_weak_secret_is_refused_at_start_naming_the_agency() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!("1 = \"{SECRET_1}\"\n2 = \"dos-secreto\"\n"),
    )
    .unwrap();
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "2")
        .env("SERVER_STORAGE", dir.path().join("bets.csv"))
        .env("SERVER_SECRETS_FILE", &secrets);
    let server = Proc::spawn(cmd);
    assert_eq!(
        server.wait_exit(STEP).code(),
        Some(2),
        "{}",
        server.output()
    );
    let err = server.stderr();
    assert!(
        err.contains("server.secrets.2: the secret of agency 2 is too weak"),
        "{err}"
    );
    assert!(err.contains("at least 128 bits"), "{err}");
    assert!(
        !err.contains("dos-secreto"),
        "the secret is never shown: {err}"
    );
    assert!(!dir.path().join("bets.csv").exists(), "nothing was opened");
}

#[test]
fn a_silent_stranger_has_only_the_auth_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let server = start_server(
        dir.path(),
        &[
            ("SERVER_SECRETS_FILE", secrets.display().to_string()),
            ("SERVER_AUTH_TIMEOUT", "1".into()),
        ],
    );
    // An agency that authenticated first...
    let mut agency = Raw::connect(&server.address());
    agency.send(format!("ACTION:HELLO|AGENCY_ID:2|SECRET:{SECRET_2}\n").as_bytes());
    assert!(agency.recv().unwrap().starts_with("STATUS:SUCCESS|"));
    // ... and a connection that never says HELLO: idle_timeout (120 s) is
    // for agencies, a stranger is closed after auth_timeout.
    let mut raw = Raw::connect(&server.address());
    let started = std::time::Instant::now();
    let reply = raw.recv().expect("a timeout reply");
    assert_eq!(
        reply,
        "STATUS:ERROR|CODE:TIMEOUT|MESSAGE:not authenticated in time (1s)\n"
    );
    raw.expect_closed();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    // The first of its address in full.
    let line = server.proc.wait_for("not authenticated in time");
    assert!(line.contains("code: TIMEOUT"), "{line}");
    // The agency, connected longer than that, is still served.
    agency.expect_open("20000001");
}

#[test]
fn strangers_from_a_few_addresses_cannot_shut_an_honest_agency_out() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = compose_secrets(dir.path(), 1);
    const MAX_CONNECTIONS: u64 = 64;
    let server = start_server_for(
        dir.path(),
        1,
        &[
            (
                "SERVER_SECRETS_FILE",
                secrets.join("central.toml").display().to_string(),
            ),
            ("SERVER_MAX_CONNECTIONS", MAX_CONNECTIONS.to_string()),
            ("SERVER_LISTEN_BACKLOG", "1024".into()),
            // No stranger times out during the test: they hold what they get.
            ("SERVER_AUTH_TIMEOUT", "600".into()),
        ],
    );
    // Silent connections: 200 from one address, 40 from each of two more.
    let mut strangers = Vec::new();
    for (host, count) in [("127.0.0.2", 200), ("127.0.0.3", 40), ("127.0.0.4", 40)] {
        for _ in 0..count {
            strangers.push(connect_from(host, server.port));
        }
    }
    let data = gen_data(GenOptions {
        agencies: 1,
        bets_per_agency: 500,
        seed: 21,
        winning_number: WINNING,
        winner_share: 0.02,
        tricky_share: 0.0,
        crlf: false,
    });
    let winners = dir.path().join("winners-1.txt");
    let mut cmd = agency_command(1, &server.address(), &data_file(data.path(), 1), &winners);
    cmd.env("CLI_SECRET_FILE", secrets.join("agency-1.secret"));
    let agency = Proc::spawn(cmd);
    // In at once, from another address: never SERVER_BUSY, never a retry.
    let status = agency.wait_exit(STEP);
    assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
    let said = format!("{}\n{}", agency.output(), agency.stderr());
    assert!(
        !said.contains("SERVER_BUSY") && !said.contains("action: reconnect"),
        "{said}"
    );
    let expected = expected(data.path(), 1, WINNING);
    assert_eq!(read_winners(&winners), expected.winners[&1]);
    assert_eq!(stored(&dir.path().join("bets.csv")), expected.rows);
    // Of 64 slots, 6 are kept for authenticated connections (one agency:
    // itself, its next session, 4 operators): 58 for strangers.
    let listen = server.proc.lines().join("\n");
    assert!(listen.contains("max_unauthenticated: 58"), "{listen}");
    assert!(
        listen.contains("max_unauthenticated_per_address: 32"),
        "{listen}"
    );
    // Whoever was turned away, or made room for a newcomer, is counted in
    // its address's summary: all but the 58 places, and the one the agency
    // took from the most crowded address.
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let refused: u64 = ["127.0.0.2 ", "127.0.0.3 ", "127.0.0.4 "]
        .iter()
        .map(|peer| summed(&server, peer, "refused: "))
        .sum();
    assert_eq!(
        refused,
        strangers.len() as u64 - 58 + 1,
        "{}",
        server.proc.output()
    );
    assert!(summed(&server, "127.0.0.2 ", "refused: ") >= 200 - 32);
    // Those over their address's cap were told why.
    let mut busy = 0;
    for mut raw in strangers {
        if let Some(reply) = raw.recv() {
            assert!(
                reply.starts_with("STATUS:ERROR|CODE:SERVER_BUSY|"),
                "{reply}"
            );
            busy += 1;
        }
    }
    assert!(busy >= 200 - 32, "{busy}");
}

#[test]
fn framing_errors_of_strangers_are_summarised_per_address() {
    let dir = tempfile::tempdir().unwrap();
    // Authentication off, as by default: every connection is a stranger
    // until it sends a valid request.
    let server = start_server_for(dir.path(), 1, &[]);
    const BAD: u64 = 150;
    for i in 0..BAD {
        let mut raw = Raw::connect(&server.address());
        match i % 3 {
            0 => raw.send_bytes(&[0xff; 4]),                 // a 4 GiB header
            1 => raw.send_bytes(&[0x16, 3, 1, 0, 0x2f, 1]),  // a TLS ClientHello
            _ => raw.send_bytes(&[0, 0, 0, 16, b'B', b'A']), // a frame cut short
        }
        raw.stream.shutdown(Shutdown::Write).unwrap();
        // Handled once the central hangs up.
        while raw.recv().is_some() {}
    }
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let lines = server.proc.lines();
    // The first in full, with its reason...
    let full: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("action: connection | result: fail"))
        .collect();
    assert_eq!(full.len(), 1, "{lines:#?}");
    assert!(
        full[0].contains("exceeds the 8192-byte limit"),
        "{}",
        full[0]
    );
    // ... the rest counted, in a line or two for the address.
    assert_eq!(summed(&server, "127.0.0.1 ", "bad_frames: "), BAD - 1);
    let summaries = lines
        .iter()
        .filter(|l| l.contains("action: auth_failures"))
        .count();
    assert!((1..=2).contains(&summaries), "{lines:#?}");
    assert!(lines.len() < 20, "{}", server.proc.output());
}

#[test]
fn operators_see_status_without_taking_over_an_agency() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        format!("1 = \"{SECRET_1}\"\n2 = \"{SECRET_2}\"\noperator = \"{SECRET_OPERATOR}\"\n"),
    )
    .unwrap();
    let env = [("SERVER_SECRETS_FILE", secrets.display().to_string())];
    let server = start_server(dir.path(), &env);
    // Agency 2 is connected and has stored a bet.
    let mut agency = Raw::connect(&server.address());
    agency.send(format!("ACTION:HELLO|AGENCY_ID:2|SECRET:{SECRET_2}\n").as_bytes());
    assert!(agency.recv().unwrap().starts_with("STATUS:SUCCESS|"));
    agency.expect_open("20000001");
    let tool = |args: &[&str], with_secret: bool| {
        let mut cmd = lottery();
        cmd.args(args).args(["--address", &server.address()]);
        if with_secret {
            cmd.env("SERVER_SECRETS_FILE", &secrets);
        }
        cmd.output().unwrap()
    };
    // `lottery status` opens an operator session with the operator's secret
    // from the central's secrets file.
    let status = tool(&["status"], true);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{status:?}");
    assert!(text.contains("     2           1  uploading\n"), "{text}");
    // ... and agency 2's session is untouched.
    agency.expect_open("20000002");
    // Without the secret it says what it needs.
    let refused = tool(&["status"], false);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("the central requires authentication"), "{err}");
    assert!(err.contains("operator"), "{err}");
    // `lottery health` needs no secret: an answer in protocol is an answer.
    for with_secret in [true, false] {
        let health = tool(&["health"], with_secret);
        assert!(health.status.success(), "{health:?}");
    }
    // An operator session may only look, and close sales.
    let mut op = Raw::connect(&server.address());
    op.send(format!("ACTION:HELLO|ROLE:OPERATOR|SECRET:{SECRET_OPERATOR}\n").as_bytes());
    assert_eq!(
        op.recv().unwrap(),
        "STATUS:SUCCESS|MESSAGE:operator session: PING, STATUS and CLOSE\n"
    );
    op.send(b"ACTION:PING\n");
    assert_eq!(op.recv().unwrap(), "STATUS:SUCCESS|MESSAGE:pong\n");
    let reply = op.expect_error(b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n", "UNAUTHENTICATED");
    assert!(reply.contains("only PING, STATUS and CLOSE"), "{reply}");
    op.expect_closed();
    agency.expect_open("20000003");
    // Closing sales is the operator's: not without its secret.
    let refused = tool(&["close", "--reason", "end of day"], false);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("requires the operator's secret to close sales"),
        "{err}"
    );
    // Nor from an agency's session: refused, and the connection closed.
    let reply = agency.expect_error(b"ACTION:CLOSE|REASON:mine\n", "UNAUTHENTICATED");
    assert!(reply.contains("CLOSE is an operator's"), "{reply}");
    agency.expect_closed();
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let stored = stored(&dir.path().join("bets.csv"));
    assert_eq!(stored[&2].len(), 3);
}

#[test]
fn an_agency_with_a_wrong_secret_stops_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = secrets_file(dir.path());
    let work = tempfile::tempdir().unwrap();
    let server = start_server(
        work.path(),
        &[("SERVER_SECRETS_FILE", secrets.display().to_string())],
    );
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,1,1999-03-17,5\n").unwrap();
    let mut cmd = agency_command(1, &server.address(), &data, &work.path().join("w.txt"));
    cmd.env("CLI_SECRET", "adivina");
    let agency = Proc::spawn(cmd);
    assert_eq!(agency.wait_exit(PATIENCE).code(), Some(1));
    assert!(
        agency
            .stderr()
            .contains("the central refused: UNAUTHENTICATED: wrong or missing SECRET for agency 1"),
        "{}",
        agency.stderr()
    );
    // ... and says what to set.
    assert!(
        agency
            .stderr()
            .contains("agency.secret_file: CLI_SECRET, CLI_SECRET_FILE"),
        "{}",
        agency.stderr()
    );
    // Refused at HELLO, the agency never got as far as a batch: the bets
    // file (made empty at start, for the central's lock) holds nothing.
    let bets = work.path().join("bets.csv");
    assert_eq!(
        std::fs::read_to_string(&bets).unwrap(),
        "",
        "a refused agency left bets"
    );
}

/// A CA, and a certificate for `localhost` signed by it, as PEM files.
fn certificates(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    (paths.0, paths.1, paths.2)
}

#[test]
fn tls_carries_the_run_and_nothing_crosses_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", &storage)
        .env("SERVER_TLS_CERT", &cert)
        .env("SERVER_TLS_KEY", &key);
    let proc = Proc::spawn(cmd);
    let listen = proc.wait_for("action: listen | result: success");
    assert!(listen.contains("tls: true"), "{listen}");
    let port: u16 = listen
        .split(" | ")
        .find_map(|f| f.strip_prefix("address: "))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap();

    // The agency goes through a recording relay, to see what crosses.
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    std::thread::spawn({
        let seen = seen.clone();
        move || {
            for client in relay.incoming() {
                let Ok(client) = client else { return };
                let upstream = TcpStream::connect(("127.0.0.1", port)).unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    let seen = seen.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            seen.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        }
    });

    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Secreta,Personaja,30904465,1999-03-17,7574\n").unwrap();
    let mut cmd = agency_command(1, &relay_addr, &data, &work.path().join("w.txt"));
    cmd.env("CLI_TLS_CA", &ca)
        .env("CLI_TLS_SERVER_NAME", "localhost");
    let agency = Proc::spawn(cmd);
    assert!(agency.wait_exit(PATIENCE).success(), "{}", agency.stderr());
    assert_eq!(read_winners(&work.path().join("w.txt")), ["30904465"]);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    for secret in ["Secreta", "Personaja", "30904465", "BATCH_SIZE"] {
        assert!(
            !seen.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} crossed in clear"
        );
    }

    // A plain-text client gets nowhere but is told, in plain text and in
    // the protocol, that the central speaks TLS; the server says why.
    let mut plain = Raw::connect(&format!("127.0.0.1:{port}"));
    plain.send(b"ACTION:HELLO|AGENCY_ID:1\n");
    let reply = plain.recv().expect("a plain-text answer");
    assert!(
        reply.starts_with(
            "STATUS:ERROR|CODE:TLS_REQUIRED|MESSAGE:this central speaks only TLS: \
             set agency.tls_ca (CLI_TLS_CA)"
        ),
        "{reply}"
    );
    assert_eq!(plain.recv(), None);
    let line = proc.wait_for(&plain.peer());
    assert!(
        line.contains("result: fail")
            && line.contains("code: TLS_REQUIRED")
            && line.contains("a plain-text client on this TLS central"),
        "{line}"
    );

    // An agency that does not trust the server's certificate stops.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = certificates(other.path());
    let mut cmd = agency_command(
        1,
        &format!("127.0.0.1:{port}"),
        &data,
        &work.path().join("w2.txt"),
    );
    cmd.env("CLI_TLS_CA", &other_ca)
        .env("CLI_TLS_SERVER_NAME", "localhost");
    let distrustful = Proc::spawn(cmd);
    assert_eq!(distrustful.wait_exit(PATIENCE).code(), Some(1));
    assert!(
        distrustful.stderr().contains("TLS handshake with"),
        "{}",
        distrustful.stderr()
    );

    proc.signal(Signal::SIGTERM);
    assert!(proc.wait_exit(Duration::from_secs(10)).success());
}
