//! The admin listener from outside: plain HTTP/1.1 requests over a socket
//! (no client library between the test and the bytes), the metrics read
//! back from their text, and one round of a lottery watched through it,
//! shared by the file store's and the database's tests.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use super::raw::Raw;
use super::{agency_command, data_file, Proc, Server, PATIENCE, STEP};

/// A response: its status code, its headers (lower-case names) and body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `address`, with an `Authorization` header when given.
pub fn get(address: &str, path: &str, authorization: Option<&str>) -> Response {
    let mut stream = TcpStream::connect(address).expect("connect to the admin listener");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(value) = authorization {
        request.push_str(&format!("Authorization: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("a whole response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// The value of the sample `sample` (a name with its labels, as written:
/// `lottery_batches_total{outcome="stored"}`) in metrics text.
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|v| v.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

/// The admin listener's address, from the central's `admin` line (logged
/// before it listens for agencies, so already read by [`Server::spawn`]).
pub fn admin_address(server: &Server) -> String {
    let line = admin_line(server);
    line.split(" | ")
        .find_map(|f| f.strip_prefix("address: "))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim()
        .to_string()
}

/// The central's `admin` line.
pub fn admin_line(server: &Server) -> String {
    server
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: admin | result: success"))
        .unwrap_or_else(|| panic!("no admin line in:\n{}", server.proc.output()))
}

/// When a round is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Listening, nothing stored.
    Before,
    /// Agency 3 stored its one bet (after a refused batch of 2) and
    /// finished; agencies 1 and 2 have not started.
    During,
    /// Drawn; agency 3's raw connection still open.
    After,
}

/// Bets in each of agencies 1's and 2's files.
pub const BETS: u64 = 300;
/// Bets per batch they send: 15 batches each.
pub const PER_BATCH: u64 = 20;

/// A valid bet of agency 3 on the winning number.
const ANA: &str = r"NOMBRE:Ana\|APELLIDO:Perez\|DOCUMENTO:30904465\|NACIMIENTO:1999-03-17\|NUMERO:7574\|AGENCY_ID:3";

/// One round of three agencies through the central `cmd` starts (with
/// its admin listener on a free loopback port), calling `look` with the
/// admin address at each [`Stage`]: agency 3, by hand, sends a batch of
/// two bets that is refused (`INVALID_BET`), then one of one bet, and
/// finishes; then agencies 1 and 2 upload `data`'s files ([`BETS`] bets
/// each, [`PER_BATCH`] a batch) and the draw runs. Returns the central,
/// still running.
pub fn round(mut cmd: Command, data: &Path, mut look: impl FnMut(Stage, &str)) -> Server {
    cmd.env("SERVER_ADMIN_ADDRESS", "127.0.0.1:0")
        .env("SERVER_AGENCIES", "3");
    let server = Server::spawn(cmd);
    let admin = admin_address(&server);
    look(Stage::Before, &admin);

    let mut agency3 = Raw::connect(&server.address());
    let bad = ANA.replace("1999-03-17", "2023-02-30");
    agency3.send(format!("BATCH_SIZE:2|BET_1:{ANA}|BET_2:{bad}\n"));
    let reply = agency3.reply();
    assert!(reply.contains("CODE:INVALID_BET"), "{reply}");
    agency3.send(format!("BATCH_SIZE:1|BET_1:{ANA}\n"));
    let reply = agency3.reply();
    assert!(reply.starts_with("STATUS:SUCCESS"), "{reply}");
    agency3.send("ACTION:FINISH_BETTING|AGENCY_ID:3\n");
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 3");
    look(Stage::During, &admin);

    let out = tempfile::tempdir().unwrap();
    let agencies: Vec<_> = [1, 2]
        .iter()
        .map(|&id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let mut cmd = agency_command(id, &server.address(), &data_file(data, id), &winners);
            cmd.env("CLI_BATCH_MAXAMOUNT", PER_BATCH.to_string());
            Proc::spawn(cmd)
        })
        .collect();
    for agency in &agencies {
        let status = agency.wait_exit(PATIENCE);
        assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
    }
    let winners = agency3.reply();
    assert!(winners.contains("WINNERS:30904465"), "{winners}");
    server
        .proc
        .wait_for_within("action: sorteo | result: success", STEP);
    look(Stage::After, &admin);
    drop(agency3);
    server
}

/// What the run in [`round`] must have counted once drawn, on any store.
pub fn check_after(text: &str) {
    let batches = 2 * BETS.div_ceil(PER_BATCH) + 1;
    assert_eq!(
        metric(text, "lottery_bets_stored_total"),
        (2 * BETS + 1) as f64
    );
    assert_eq!(
        metric(text, "lottery_batches_total{outcome=\"stored\"}"),
        batches as f64
    );
    assert_eq!(
        metric(text, "lottery_batches_total{outcome=\"refused\"}"),
        1.0
    );
    assert_eq!(
        metric(text, "lottery_batches_total{outcome=\"already_stored\"}"),
        0.0
    );
    assert_eq!(
        metric(text, "lottery_bets_refused_total{code=\"INVALID_BET\"}"),
        2.0
    );
    // Every stored batch was acknowledged once, and committed in exactly
    // one group.
    assert_eq!(
        metric(text, "lottery_ack_latency_seconds_count"),
        batches as f64
    );
    assert_eq!(
        metric(text, "lottery_storage_group_batches_sum"),
        batches as f64
    );
    assert!(metric(text, "lottery_storage_commit_seconds_count") >= 1.0);
    assert_eq!(metric(text, "lottery_agencies"), 3.0);
    assert_eq!(metric(text, "lottery_agencies_finished"), 3.0);
    assert_eq!(metric(text, "lottery_draw_state{state=\"done\"}"), 1.0);
    assert_eq!(metric(text, "lottery_draw_state{state=\"waiting\"}"), 0.0);
    assert!(metric(text, "lottery_draw_timestamp_seconds") > 1.7e9);
    assert_eq!(metric(text, "lottery_auth_failures_total"), 0.0);
    assert_eq!(metric(text, "lottery_auth_lockouts_total"), 0.0);
}

/// Before anything is stored, and with agency 3 finished and waiting.
pub fn check_before_and_during(stage: Stage, text: &str) {
    match stage {
        Stage::Before => {
            assert_eq!(metric(text, "lottery_bets_stored_total"), 0.0);
            assert_eq!(metric(text, "lottery_connections_open"), 0.0);
            assert_eq!(metric(text, "lottery_draw_state{state=\"waiting\"}"), 1.0);
            assert_eq!(metric(text, "lottery_draw_timestamp_seconds"), 0.0);
        }
        Stage::During => {
            assert_eq!(metric(text, "lottery_bets_stored_total"), 1.0);
            assert_eq!(
                metric(text, "lottery_batches_total{outcome=\"refused\"}"),
                1.0
            );
            assert_eq!(metric(text, "lottery_connections_open"), 1.0);
            assert_eq!(metric(text, "lottery_sessions{state=\"finished\"}"), 1.0);
            assert_eq!(metric(text, "lottery_sessions{state=\"uploading\"}"), 0.0);
            assert_eq!(metric(text, "lottery_agencies_finished"), 1.0);
            assert_eq!(metric(text, "lottery_draw_state{state=\"waiting\"}"), 1.0);
        }
        Stage::After => check_after(text),
    }
}
