//! Legacy peers on either side: an agency of the design's that sends frames
//! larger than the contract's 8 KiB (accepted only with `server.max_frame`),
//! a central that speaks only the reference protocol (our agency falls back
//! to it), and a central that answers nothing (our agency gives up in time).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{lottery, stored, Row, Server, PATIENCE};

/// Writes one frame: the 4-byte big-endian length, then the payload.
fn send(stream: &mut TcpStream, payload: &[u8]) {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    stream.write_all(&frame).unwrap();
}

/// Reads one frame's payload; `None` once the peer has closed.
fn recv(stream: &mut TcpStream) -> Option<String> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut payload).ok()?;
    Some(String::from_utf8(payload).unwrap())
}

fn connect(address: &str) -> TcpStream {
    let stream = TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

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
fn a_legacy_frame_is_refused_by_default_saying_which_setting_lets_it_in() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), None);
    let (payload, _) = legacy_batch();
    let mut stream = connect(&server.address());
    send(&mut stream, payload.as_bytes());
    let advice = "frame of 8232 bytes exceeds the 8192-byte limit; to accept larger \
                  frames from legacy agencies, raise server.max_frame (SERVER_MAX_FRAME)";
    assert_eq!(
        recv(&mut stream).as_deref(),
        Some(format!("STATUS:ERROR|CODE:FRAME_TOO_LARGE|MESSAGE:{advice}\n").as_str())
    );
    assert_eq!(recv(&mut stream), None, "the connection is closed");
    let line = server.proc.wait_for("code: FRAME_TOO_LARGE");
    assert!(
        line.contains("WARN") && line.contains("result: fail") && line.contains(advice),
        "{line}"
    );
    let bets = std::fs::read_to_string(dir.path().join("bets.csv")).unwrap_or_default();
    assert_eq!(bets, "", "nothing of the refused batch is stored");
}

#[test]
fn a_legacy_frame_is_stored_exactly_when_max_frame_allows_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path(), Some(9000));
    let (payload, rows) = legacy_batch();
    let mut stream = connect(&server.address());
    send(&mut stream, payload.as_bytes());
    let ack = recv(&mut stream).unwrap();
    assert!(
        ack.starts_with("STATUS:SUCCESS|MESSAGE:stored 72 bets"),
        "{ack}"
    );
    send(&mut stream, b"ACTION:FINISH_BETTING|AGENCY_ID:1\n");
    let winners: Vec<&str> = rows
        .iter()
        .filter(|r| r[5] == "7574")
        .map(|r| r[3].as_str())
        .collect();
    assert_eq!(
        recv(&mut stream).unwrap(),
        format!("STATUS:SUCCESS|WINNERS:{}\n", winners.join(","))
    );
    assert_eq!(stored(&dir.path().join("bets.csv"))[&1], rows);
}
