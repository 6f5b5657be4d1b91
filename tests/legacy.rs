//! Legacy peers on either side: an agency of the design's that sends frames
//! larger than the contract's 8 KiB (accepted only with `server.max_frame`),
//! a central that speaks only the reference protocol (our agency falls back
//! to it), a central that answers nothing (our agency gives up in time), and
//! the still-waiting frames only agencies that said `HELLO` receive.

mod common;

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{
    agency_command, data_file, expected, lottery, read_winners, stored, Proc, Raw, Row, Server,
    PATIENCE, STEP,
};

/// The size of the frames the reference agency sends at batch size 72 on
/// the real data: 40 bytes over the contract's limit.
const LEGACY_FRAME: usize = 8232;

/// A batch of agency 1 exactly `LEGACY_FRAME` bytes long as a frame, as the
/// reference agency writes it, and the rows it must be stored as.
fn legacy_batch() -> (String, Vec<Row>) {
    let bets = 72;
    let row = |i: usize, first: &str| -> Row {
        [
            "1".into(),
            first.into(),
            format!("Apellido{i}"),
            format!("{}", 30_000_000 + i),
            "1990-05-17".into(),
            if i % 9 == 0 { "7574" } else { "1234" }.into(),
        ]
    };
    let build = |rows: &[Row]| {
        let mut payload = format!("BATCH_SIZE:{}", rows.len());
        for (i, r) in rows.iter().enumerate() {
            payload.push_str(&format!(
                r"|BET_{}:NOMBRE:{}\|APELLIDO:{}\|DOCUMENTO:{}\|NACIMIENTO:{}\|NUMERO:{}\|AGENCY_ID:{}",
                i + 1,
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                r[0]
            ));
        }
        payload.push('\n');
        payload
    };
    let mut rows: Vec<Row> = (0..bets).map(|i| row(i, "Nombre")).collect();
    // Lengthen the first names until the frame is exactly the legacy size.
    let mut short = LEGACY_FRAME - 4 - build(&rows).len();
    for (i, r) in rows.iter_mut().enumerate() {
        let add = short.min(40);
        *r = row(i, &format!("Nombre{}", "x".repeat(add)));
        short -= add;
    }
    assert_eq!(short, 0, "72 bets can reach the legacy frame size");
    let payload = build(&rows);
    assert_eq!(payload.len() + 4, LEGACY_FRAME);
    (payload, rows)
}

fn start_server(dir: &std::path::Path, max_frame: Option<usize>) -> Server {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", dir.join("bets.csv"));
    if let Some(max) = max_frame {
        cmd.arg("--max-frame").arg(max.to_string());
    }
    Server::spawn(cmd)
}

#[test]
fn a_legacy_frame_is_refused_by_default_saying_which_setting_lets_it_in_and_the_connection_goes_on()
{
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), None);
    let (payload, _) = legacy_batch();
    let mut stream = Raw::connect(&server.address());
    stream.send(payload.as_bytes());
    let advice = "frame of 8232 bytes exceeds the 8192-byte limit; to accept larger \
                  frames from legacy agencies, raise server.max_frame (SERVER_MAX_FRAME)";
    assert_eq!(
        stream.recv().as_deref(),
        Some(format!("STATUS:ERROR|CODE:FRAME_TOO_LARGE|MESSAGE:{advice}\n").as_str())
    );
    let line = server.proc.wait_for("code: FRAME_TOO_LARGE");
    assert!(
        line.contains("WARN")
            && line.contains("action: apuesta_recibida | result: fail | cantidad: 72 | agency: 1")
            && line.contains(advice),
        "{line}"
    );
    // The connection goes on: the agency's announcement is served, and with
    // nothing stored, the draw gives it no winners.
    stream.send(b"ACTION:FINISH_BETTING|AGENCY_ID:1\n");
    assert_eq!(stream.recv().as_deref(), Some("STATUS:SUCCESS|WINNERS:\n"));
    let bets = std::fs::read_to_string(dir.path().join("bets.csv")).unwrap_or_default();
    assert_eq!(bets, "", "nothing of the refused batch is stored");
}

#[test]
fn a_legacy_frame_is_stored_exactly_when_max_frame_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), Some(9000));
    let (payload, rows) = legacy_batch();
    let mut stream = Raw::connect(&server.address());
    stream.send(payload.as_bytes());
    let ack = stream.recv().unwrap();
    assert!(
        ack.starts_with("STATUS:SUCCESS|MESSAGE:stored 72 bets"),
        "{ack}"
    );
    stream.send(b"ACTION:FINISH_BETTING|AGENCY_ID:1\n");
    let winners: Vec<&str> = rows
        .iter()
        .filter(|r| r[5] == "7574")
        .map(|r| r[3].as_str())
        .collect();
    assert_eq!(
        stream.recv().unwrap(),
        format!("STATUS:SUCCESS|WINNERS:{}\n", winners.join(","))
    );
    assert_eq!(stored(&dir.path().join("bets.csv"))[&1], rows);
}

/// Writes `bets` bets for agency `agency` into `dir`, every seventh one a
/// winner of 7574.
fn write_data(dir: &Path, agency: u32, bets: u32) {
    let mut text = String::new();
    for i in 0..bets {
        let number = if i % 7 == 3 { 7574 } else { i % 7000 };
        let document = agency * 1_000_000 + i;
        text.push_str(&format!(
            "Nombre {i},Apellido {agency},{document},1980-01-{:02},{number}\n",
            i % 28 + 1
        ));
    }
    std::fs::write(data_file(dir, agency), text).unwrap();
}

/// Splits a payload (without its `\n`) at its unescaped `|`, dropping one
/// level of `\` escapes: written here from the contract's text, not from
/// the project's parser, so the two can disagree.
fn fields(payload: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = payload.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.last_mut().unwrap().extend(chars.next()),
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

fn pairs(payload: &str) -> BTreeMap<String, String> {
    fields(payload.trim_end_matches('\n'))
        .into_iter()
        .filter_map(|f| {
            f.split_once(':')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// What a fake reference central saw.
#[derive(Default)]
struct Seen {
    /// Stored rows per agency, in arrival order.
    rows: BTreeMap<u32, Vec<Row>>,
    /// Every frame's keys that this central does not know (`FIRST`, …) and
    /// every `ACTION` it ignored (`HELLO`, `BETTING_FINISHED`, …).
    ignored: Vec<String>,
    /// Agencies waiting for the draw, with their connections.
    waiting: Vec<(u32, Raw)>,
}

/// A central that behaves as the design's reference central does, as the
/// contract describes it: it answers each batch `STATUS:SUCCESS|MESSAGE:…`
/// and `ACTION:FINISH_BETTING` (the only spelling it knows) with the
/// agency's winners once `agencies` have finished, and silently ignores
/// every other message, `HELLO` included. Written for this test.
fn fake_reference_central(agencies: u32) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = shared.clone();
            std::thread::spawn(move || serve_reference(stream, agencies, &seen));
        }
    });
    (address, seen)
}

fn serve_reference(stream: TcpStream, agencies: u32, seen: &Mutex<Seen>) {
    let mut stream = Raw::new(stream);
    while let Some(payload) = stream.recv() {
        let keys = pairs(&payload);
        let mut seen = seen.lock().unwrap();
        if let Some(size) = keys.get("BATCH_SIZE") {
            let size: usize = size.parse().unwrap();
            for key in keys
                .keys()
                .filter(|k| *k != "BATCH_SIZE" && !k.starts_with("BET_"))
            {
                seen.ignored.push(key.clone());
            }
            for i in 1..=size {
                let bet = pairs(&keys[&format!("BET_{i}")]);
                let row: Row = [
                    bet["AGENCY_ID"].clone(),
                    bet["NOMBRE"].clone(),
                    bet["APELLIDO"].clone(),
                    bet["DOCUMENTO"].clone(),
                    bet["NACIMIENTO"].clone(),
                    bet["NUMERO"].clone(),
                ];
                seen.rows
                    .entry(row[0].parse().unwrap())
                    .or_default()
                    .push(row);
            }
            let reply = format!("STATUS:SUCCESS|MESSAGE:Batch de {size} apuestas procesado\n");
            stream.send(reply.as_bytes());
        } else if keys.get("ACTION").map(String::as_str) == Some("FINISH_BETTING") {
            let agency = keys["AGENCY_ID"].parse().unwrap();
            seen.waiting
                .push((agency, Raw::new(stream.stream.try_clone().unwrap())));
            if seen.waiting.len() == agencies as usize {
                let Seen { rows, waiting, .. } = &mut *seen;
                for (agency, stream) in waiting.iter_mut() {
                    let winners: Vec<&str> = rows[agency]
                        .iter()
                        .filter(|r| r[5] == "7574")
                        .map(|r| r[3].as_str())
                        .collect();
                    let reply = format!("STATUS:SUCCESS|WINNERS:{}\n", winners.join(","));
                    stream.send(reply.as_bytes());
                }
            }
        } else {
            seen.ignored
                .push(keys.get("ACTION").cloned().unwrap_or(payload));
        }
    }
}

#[test]
fn against_a_reference_central_the_agency_falls_back_and_gets_its_winners() {
    let dir = tempfile::tempdir().unwrap();
    let agencies = 2;
    for agency in 1..=agencies {
        write_data(dir.path(), agency, 150 + 30 * agency);
    }
    let want = expected(dir.path(), agencies, 7574);
    let (address, seen) = fake_reference_central(agencies);
    let runs: Vec<(Proc, std::path::PathBuf)> = (1..=agencies)
        .map(|agency| {
            let out = dir.path().join(format!("winners-{agency}.txt"));
            let mut cmd = agency_command(agency, &address, &data_file(dir.path(), agency), &out);
            cmd.arg("--hello-timeout").arg("2");
            (Proc::spawn(cmd), out)
        })
        .collect();
    for (agency, (run, out)) in (1..=agencies).zip(&runs) {
        let status = run.wait_exit(PATIENCE);
        let log = run.output();
        assert_eq!(status.code(), Some(0), "{log}\n{}", run.stderr());
        assert_eq!(read_winners(out), want.winners[&agency]);
        let warns: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
        assert_eq!(warns.len(), 1, "{log}");
        assert!(
            warns[0].contains("action: protocol | result: success")
                && warns[0].contains("did not answer HELLO within 2s")
                && warns[0].contains("resuming is off"),
            "{}",
            warns[0]
        );
        assert!(!log.contains("result: fail"), "{log}");
        let winners = want.winners[&agency].len();
        assert!(
            log.contains(&format!(
                "action: consulta_ganadores | result: success | cant_ganadores: {winners}"
            )),
            "{log}"
        );
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.rows, want.rows, "every bet stored once, in order");
    // One HELLO per agency, then nothing the reference does not know: no
    // FIRST, no other spelling of the announcement.
    assert_eq!(seen.ignored, vec!["HELLO".to_string(); agencies as usize]);
}

#[test]
fn a_central_that_answers_nothing_makes_the_agency_give_up_saying_what_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path(), 1, 10);
    let address = silent_listener();
    let out = dir.path().join("winners.txt");
    let mut cmd = agency_command(1, &address, &data_file(dir.path(), 1), &out);
    cmd.args([
        "--hello-timeout",
        "2",
        "--reply-timeout",
        "1",
        "--reconnect-timeout",
        "1",
    ]);
    let run = Proc::spawn(cmd);
    let status = run.wait_exit(STEP);
    let all = format!("{}\n{}", run.output(), run.stderr());
    assert_eq!(status.code(), Some(1), "{all}");
    assert!(
        all.contains(
            "gave up after 1s without progress; last error: the central sent nothing for 1s \
             while waiting for a batch acknowledgement (speaking the reference protocol: it \
             had not answered HELLO either)"
        ),
        "{all}"
    );
    assert!(!out.exists(), "no winners reported");
}

/// A listener that accepts every connection and holds it open, never
/// writing a byte; returns its address.
fn silent_listener() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    address
}

#[test]
fn a_central_of_ours_slow_to_answer_hello_is_recognised_by_its_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("bets.csv"), 1, 7574);
    write_data(dir.path(), 1, 200);
    // In front of the central: the first connection is held and never
    // answered (as a central still starting up would leave it), every later
    // one is forwarded.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let upstream = server.address();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (i, client) in listener.incoming().enumerate() {
            let Ok(client) = client else { continue };
            if i == 0 {
                held.push(client);
                continue;
            }
            let central = TcpStream::connect(&upstream).unwrap();
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), central.try_clone().unwrap()),
                (central, client),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    let out = dir.path().join("winners-1.txt");
    let mut cmd = agency_command(1, &address, &data_file(dir.path(), 1), &out);
    cmd.args(["--hello-timeout", "2"]);
    let run = Proc::spawn(cmd);
    let status = run.wait_exit(PATIENCE);
    let log = run.output();
    assert_eq!(status.code(), Some(0), "{log}\n{}", run.stderr());
    let protocols: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN "))
        .filter_map(|l| l.split(" | ").find(|f| f.starts_with("protocol: ")))
        .collect();
    assert_eq!(
        protocols,
        ["protocol: reference", "protocol: resumable"],
        "{log}"
    );
    let want = expected(dir.path(), 1, 7574);
    assert_eq!(read_winners(&out), want.winners[&1]);
    assert_eq!(
        stored(&dir.path().join("bets.csv")),
        want.rows,
        "each bet once"
    );
}

#[test]
fn a_tls_handshake_that_never_completes_is_given_up_on_too() {
    let dir = tempfile::tempdir().unwrap();
    write_data(dir.path(), 1, 10);
    let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let address = silent_listener();
    let out = dir.path().join("winners.txt");
    let mut cmd = agency_command(1, &address, &data_file(dir.path(), 1), &out);
    cmd.env("CLI_TLS_CA", &ca_file)
        .env("CLI_TLS_SERVER_NAME", "localhost")
        .args(["--reply-timeout", "1", "--reconnect-timeout", "1"]);
    let run = Proc::spawn(cmd);
    let status = run.wait_exit(STEP);
    let all = format!("{}\n{}", run.output(), run.stderr());
    assert_eq!(status.code(), Some(1), "{all}");
    assert!(
        all.contains(
            "gave up after 1s without progress; last error: no progress for 1s while \
             connecting (TCP and TLS handshakes)"
        ),
        "{all}"
    );
}

#[test]
fn only_agencies_that_said_hello_are_told_the_central_is_still_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("bets.csv"), 3, 7574);
    let one_bet = |agency: u32, document: u32| {
        format!(
            "BATCH_SIZE:1|BET_1:NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{document}\\|\
             NACIMIENTO:1999-03-17\\|NUMERO:7574\\|AGENCY_ID:{agency}\n"
        )
    };
    // Agency 2 speaks as the design's agencies do: no HELLO.
    let mut legacy = Raw::connect(&server.address());
    legacy.send(one_bet(2, 22222222).as_bytes());
    assert!(legacy
        .recv()
        .unwrap()
        .starts_with("STATUS:SUCCESS|MESSAGE:stored 1 bets"));
    legacy.send(b"ACTION:FINISH_BETTING|AGENCY_ID:2\n");
    // Agency 1 is ours, with a reply deadline shorter than the wait.
    write_data(dir.path(), 1, 20);
    let out = dir.path().join("winners-1.txt");
    let mut cmd = agency_command(1, &server.address(), &data_file(dir.path(), 1), &out);
    cmd.args(["--reply-timeout", "1", "--log-level", "DEBUG"]);
    let ours = Proc::spawn(cmd);
    let waiting = ours.wait_for("action: waiting | result: in_progress");
    assert!(
        waiting.contains("message: waiting for the draw: 2 of 3 agencies finished"),
        "{waiting}"
    );
    // Agency 3 finishes: the draw.
    let mut last = Raw::connect(&server.address());
    last.send(one_bet(3, 33333333).as_bytes());
    assert!(last
        .recv()
        .unwrap()
        .starts_with("STATUS:SUCCESS|MESSAGE:stored 1 bets"));
    last.send(b"ACTION:BETTING_FINISHED|AGENCY_ID:3\n");
    assert_eq!(last.recv().unwrap(), "STATUS:SUCCESS|WINNERS:33333333\n");
    // Agency 2 waited as long as agency 1 and was sent nothing but its
    // winners, exactly as the contract says.
    assert_eq!(legacy.recv().unwrap(), "STATUS:SUCCESS|WINNERS:22222222\n");
    assert_eq!(
        ours.wait_exit(PATIENCE).code(),
        Some(0),
        "{}",
        ours.output()
    );
    let want = expected(dir.path(), 1, 7574);
    assert_eq!(read_winners(&out), want.winners[&1]);
}
