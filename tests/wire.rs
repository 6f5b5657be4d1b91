//! The central spoken to in raw bytes, as the design's reference agency
//! speaks: the exact frames the contract fixes, and what comes back.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::raw::{frame, read_frame, write_frame};
use common::PATIENCE;
use lottery::config::ServerConfig;
use lottery::server;

struct TestServer {
    addr: SocketAddr,
    storage: PathBuf,
    agencies: u32,
    token: CancellationToken,
    task: JoinHandle<()>,
    dir: std::sync::Arc<tempfile::TempDir>,
}

impl TestServer {
    async fn start(agencies: u32) -> TestServer {
        Self::start_in(std::sync::Arc::new(tempfile::tempdir().unwrap()), agencies).await
    }

    /// A server over the bets file and draw record in `dir`.
    async fn start_in(dir: std::sync::Arc<tempfile::TempDir>, agencies: u32) -> TestServer {
        Self::start_with(dir, agencies, |_| {}).await
    }

    /// A server whose configuration `adjust` changes first.
    async fn start_with(
        dir: std::sync::Arc<tempfile::TempDir>,
        agencies: u32,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let storage = dir.path().join("bets.csv");
        let mut config = ServerConfig {
            port: 0,
            listen_backlog: 16,
            agencies,
            storage: lottery::store::Storage::File(storage.clone()),
            winning_number: 7574,
            ..ServerConfig::default()
        };
        adjust(&mut config);
        let listener = server::bind_addr("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = listener.local_addr().unwrap();
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let token = token.clone();
            async move { server::run_on(listener, &config, token).await.unwrap() }
        });
        TestServer {
            addr,
            storage,
            agencies,
            token,
            task,
            dir,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// Stops this server and starts another over the same files.
    async fn restart(self) -> TestServer {
        let (dir, agencies) = (self.dir.clone(), self.agencies);
        self.stop().await;
        Self::start_in(dir, agencies).await
    }

    async fn stop(self) -> String {
        self.token.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .unwrap()
            .unwrap();
        std::fs::read_to_string(&self.storage).unwrap_or_default()
    }
}

const ANA: &str = r"NOMBRE:Ana\|APELLIDO:Perez\|DOCUMENTO:30904465\|NACIMIENTO:1999-03-17\|NUMERO:7574\|AGENCY_ID:3";
/// A name holding the protocol's own `|`, `:` and `\`, and a comma.
const TRICKY: &str = r"NOMBRE:Jo\\\|sé:\\\\x\|APELLIDO:Núñez, h\|DOCUMENTO:12\|NACIMIENTO:2000-02-29\|NUMERO:1\|AGENCY_ID:3";

#[tokio::test]
async fn reference_agency_bytes() {
    let server = TestServer::start(3).await;
    let mut agency = server.connect().await;

    write_frame(
        &mut agency,
        format!("BATCH_SIZE:2|BET_1:{ANA}|BET_2:{TRICKY}\n").as_bytes(),
    )
    .await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:stored 2 bets|STORED:2\n"
    );

    // The reference agency's spelling of "finished".
    write_frame(&mut agency, b"ACTION:FINISH_BETTING|AGENCY_ID:3\n").await;
    // Agencies 1 and 2 finish (the design's spelling) with no bets.
    // Nobody hears anything until all three have finished.
    let mut others = Vec::new();
    for id in [1, 2] {
        let mut other = server.connect().await;
        write_frame(
            &mut other,
            format!("ACTION:BETTING_FINISHED|AGENCY_ID:{id}\n").as_bytes(),
        )
        .await;
        others.push(other);
    }
    for other in &mut others {
        assert_eq!(read_frame(other).await, "STATUS:SUCCESS|WINNERS:\n");
    }
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|WINNERS:30904465\n"
    );

    let stored = server.stop().await;
    assert_eq!(
        stored,
        "3,Ana,Perez,30904465,1999-03-17,7574\n3,Jo|sé:\\x,\"Núñez, h\",12,2000-02-29,1\n"
    );
}

#[tokio::test]
async fn rejected_batch_stores_nothing_and_says_which_bet() {
    let server = TestServer::start(3).await;
    let mut agency = server.connect().await;
    let bad = ANA.replace("1999-03-17", "2023-02-30");
    write_frame(
        &mut agency,
        format!("BATCH_SIZE:2|BET_1:{ANA}|BET_2:{bad}\n").as_bytes(),
    )
    .await;
    let reply = read_frame(&mut agency).await;
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:INVALID_BET|MESSAGE:BET_2: NACIMIENTO \"2023-02-30\""),
        "{reply}"
    );
    // The connection still works.
    write_frame(
        &mut agency,
        format!("BATCH_SIZE:1|BET_1:{ANA}\n").as_bytes(),
    )
    .await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:1\n"
    );
    assert_eq!(
        server.stop().await,
        "3,Ana,Perez,30904465,1999-03-17,7574\n"
    );
}

#[tokio::test]
async fn agency_id_is_fixed_per_connection_and_exclusive() {
    let server = TestServer::start(3).await;
    let mut first = server.connect().await;
    write_frame(&mut first, format!("BATCH_SIZE:1|BET_1:{ANA}\n").as_bytes()).await;
    assert!(read_frame(&mut first).await.starts_with("STATUS:SUCCESS"));

    let other = ANA.replace("AGENCY_ID:3", "AGENCY_ID:2");
    write_frame(
        &mut first,
        format!("BATCH_SIZE:1|BET_1:{other}\n").as_bytes(),
    )
    .await;
    let reply = read_frame(&mut first).await;
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:WRONG_AGENCY|"),
        "{reply}"
    );

    let mut second = server.connect().await;
    write_frame(
        &mut second,
        format!("BATCH_SIZE:1|BET_1:{ANA}\n").as_bytes(),
    )
    .await;
    let reply = read_frame(&mut second).await;
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:AGENCY_BUSY|"),
        "{reply}"
    );

    let unknown = ANA.replace("AGENCY_ID:3", "AGENCY_ID:9");
    write_frame(
        &mut second,
        format!("BATCH_SIZE:1|BET_1:{unknown}\n").as_bytes(),
    )
    .await;
    let reply = read_frame(&mut second).await;
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:WRONG_AGENCY|"),
        "{reply}"
    );

    assert_eq!(
        server.stop().await,
        "3,Ana,Perez,30904465,1999-03-17,7574\n"
    );
}

#[tokio::test]
async fn frames_split_byte_by_byte_and_many_in_one_write() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    let one = ANA.replace("AGENCY_ID:3", "AGENCY_ID:1");
    let payload = format!("BATCH_SIZE:1|BET_1:{one}\n");
    let frame = frame(payload.as_bytes());
    for b in &frame {
        agency.write_all(&[*b]).await.unwrap();
        agency.flush().await.unwrap();
    }
    assert!(read_frame(&mut agency).await.starts_with("STATUS:SUCCESS"));

    // Three batches in one write: three acknowledgements, in order.
    let burst: Vec<u8> = frame.iter().chain(&frame).chain(&frame).copied().collect();
    agency.write_all(&burst).await.unwrap();
    for stored in 2..=4 {
        assert_eq!(
            read_frame(&mut agency).await,
            format!("STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:{stored}\n")
        );
    }
    write_frame(&mut agency, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|WINNERS:30904465,30904465,30904465,30904465\n"
    );
    // After the draw, bets are closed.
    write_frame(&mut agency, payload.as_bytes()).await;
    assert!(read_frame(&mut agency)
        .await
        .starts_with("STATUS:ERROR|CODE:AGENCY_FINISHED|"));
    assert_eq!(server.stop().await.lines().count(), 4);
}

#[tokio::test]
async fn a_header_past_what_is_read_past_is_refused_before_the_payload() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    let len = (lottery::wire::MAX_SKIPPED_FRAME - 3) as u32;
    agency.write_all(&len.to_be_bytes()).await.unwrap();
    let reply = read_frame(&mut agency).await;
    assert!(
        reply.starts_with("STATUS:ERROR|CODE:FRAME_TOO_LARGE|"),
        "{reply}"
    );
    // Then the central hangs up.
    let mut rest = Vec::new();
    let n = tokio::time::timeout(PATIENCE, agency.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 0);
    assert_eq!(server.stop().await, "");
}

#[tokio::test]
async fn long_winner_lists_continue_over_frames() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    // 1,500 winners of 8 digits do not fit in one 8 KiB frame.
    let mut sent = Vec::new();
    for chunk in 0..25 {
        let mut payload = String::from("BATCH_SIZE:60");
        for i in 1..=60 {
            let doc = 10_000_000 + chunk * 60 + i;
            sent.push(doc.to_string());
            payload.push_str(&format!(
                "|BET_{i}:NOMBRE:A\\|APELLIDO:B\\|DOCUMENTO:{doc}\\|NACIMIENTO:1999-03-17\\|NUMERO:7574\\|AGENCY_ID:1"
            ));
        }
        payload.push('\n');
        write_frame(&mut agency, payload.as_bytes()).await;
        assert!(read_frame(&mut agency).await.starts_with("STATUS:SUCCESS"));
    }
    write_frame(&mut agency, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    let mut got = Vec::new();
    let mut frames = 0;
    loop {
        let reply = read_frame(&mut agency).await;
        frames += 1;
        let list = reply
            .strip_prefix("STATUS:SUCCESS|WINNERS:")
            .unwrap_or_else(|| panic!("{reply}"));
        let (list, more) = match list.strip_suffix("|MORE:1\n") {
            Some(l) => (l, true),
            None => (list.strip_suffix('\n').unwrap(), false),
        };
        got.extend(list.split(',').map(str::to_string));
        if !more {
            break;
        }
    }
    assert!(frames > 1);
    assert_eq!(got, sent);
    server.stop().await;
}

fn bet(doc: u32, number: u16) -> String {
    format!(
        r"NOMBRE:Ana\|APELLIDO:Perez\|DOCUMENTO:{doc}\|NACIMIENTO:1999-03-17\|NUMERO:{number}\|AGENCY_ID:1"
    )
}

/// The receipt of agency 1 holding the bets `docs` of [`batch`], as the
/// central must answer it: `|STORED:n|DIGEST:…`.
fn receipt_keys(docs: std::ops::Range<u32>) -> String {
    let bets: Vec<lottery::model::Bet> = docs
        .map(|d| {
            let number = if d % 2 == 0 { "7574" } else { "1" };
            lottery::model::Bet::from_fields(
                "1",
                "Ana",
                "Perez",
                &d.to_string(),
                "1999-03-17",
                number,
            )
            .unwrap()
        })
        .collect();
    let r = lottery::receipt::Receipt::empty(1).after(bets.iter().map(|b| b.as_ref()));
    format!("|STORED:{}|DIGEST:{}", r.count, r.digest)
}

/// A batch of the bets `docs` (winning when the document is even), starting
/// at position `first` of the agency's file.
fn batch(first: u64, docs: std::ops::Range<u32>) -> String {
    let mut p = format!("BATCH_SIZE:{}|FIRST:{first}", docs.len());
    for (i, d) in docs.enumerate() {
        let number = if d % 2 == 0 { 7574 } else { 1 };
        p.push_str(&format!("|BET_{}:{}", i + 1, bet(d, number)));
    }
    p.push('\n');
    p
}

#[tokio::test]
async fn hello_reports_stored_bets_and_resent_batches_are_not_stored_twice() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    write_frame(&mut agency, b"ACTION:HELLO|AGENCY_ID:1\n").await;
    // The receipt of nothing stored: d_0 of agency 1 (docs/PROTOCOL.md).
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:agency 1: resume from bet 0|STORED:0\
         |DIGEST:a4f8a6c9efcdfd938efe4b6eb9df4586fa204c3388f43e13a5863024a1995cae\n"
    );
    write_frame(&mut agency, batch(0, 10..13).as_bytes()).await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:stored 3 bets|STORED:3\n"
    );
    // The same batch again (its acknowledgement was lost): acknowledged, not stored.
    write_frame(&mut agency, batch(0, 10..13).as_bytes()).await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:already stored 3 bets|STORED:3\n"
    );
    // Overlapping the stored bets: only the new tail is stored.
    write_frame(&mut agency, batch(1, 11..15).as_bytes()).await;
    assert_eq!(
        read_frame(&mut agency).await,
        "STATUS:SUCCESS|MESSAGE:stored 4 bets|STORED:5\n"
    );
    // A gap: refused, nothing stored.
    write_frame(&mut agency, batch(7, 17..18).as_bytes()).await;
    let reply = read_frame(&mut agency).await;
    assert!(reply.starts_with("STATUS:ERROR|CODE:OUT_OF_ORDER|MESSAGE:batch starts at bet 7 but agency 1 has 5 stored"), "{reply}");
    drop(agency);

    // A new connection (after a restart too) learns where to resume.
    let server = server.restart().await;
    let mut agency = server.connect().await;
    write_frame(&mut agency, b"ACTION:HELLO|AGENCY_ID:1\n").await;
    let resume = read_frame(&mut agency).await;
    assert!(
        resume.ends_with(&format!("{}\n", receipt_keys(10..15))),
        "{resume}"
    );
    let stored = server.stop().await;
    let docs: Vec<&str> = stored
        .lines()
        .map(|l| l.split(',').nth(3).unwrap())
        .collect();
    assert_eq!(docs, ["10", "11", "12", "13", "14"]);
}

#[tokio::test]
async fn the_winners_of_a_hello_session_carry_its_receipt_and_the_seal() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    hello(&mut agency).await;
    write_frame(&mut agency, batch(0, 10..13).as_bytes()).await;
    read_frame(&mut agency).await;
    write_frame(&mut agency, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    let winners = read_frame(&mut agency).await;
    let bets: Vec<lottery::model::Bet> = [("10", "7574"), ("11", "1"), ("12", "7574")]
        .iter()
        .map(|(d, n)| {
            lottery::model::Bet::from_fields("1", "Ana", "Perez", d, "1999-03-17", n).unwrap()
        })
        .collect();
    let receipt = lottery::receipt::Receipt::empty(1).after(bets.iter().map(|b| b.as_ref()));
    let seal = lottery::receipt::seal(7574, 1, &[(1, receipt)].into());
    assert_eq!(
        winners,
        format!(
            "STATUS:SUCCESS|WINNERS:10,12{}|SEAL:{seal}\n",
            receipt_keys(10..13)
        )
    );
    // The record holds the same seal and receipt.
    let record = std::fs::read_to_string(server.dir.path().join("bets.draw.toml")).unwrap();
    assert!(record.contains(&format!("seal = \"{seal}\"")), "{record}");
    assert!(
        record.contains(&format!("digest = \"{}\"", receipt.digest)),
        "{record}"
    );
    server.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_against_what_is_stored() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    let bad_date = batch(5, 15..16).replace("1999-03-17", "1999-02-30");
    // Everything in one write: the central reads ahead while earlier
    // batches are still at the writer, and must still answer each request
    // in order and count the batches in flight when placing the next.
    let requests = [
        batch(0, 10..13),
        batch(3, 13..15),
        batch(3, 13..15), // resent while the first copy may still be in flight
        bad_date,
        batch(7, 17..18), // a gap
        "ACTION:PING\n".to_string(),
        batch(5, 15..16),
    ];
    let mut burst = Vec::new();
    for payload in &requests {
        burst.extend_from_slice(&frame(payload.as_bytes()));
    }
    agency.write_all(&burst).await.unwrap();
    let mut replies = Vec::new();
    for _ in &requests {
        replies.push(read_frame(&mut agency).await);
    }
    assert_eq!(
        replies[0],
        "STATUS:SUCCESS|MESSAGE:stored 3 bets|STORED:3\n"
    );
    assert_eq!(
        replies[1],
        "STATUS:SUCCESS|MESSAGE:stored 2 bets|STORED:5\n"
    );
    assert_eq!(
        replies[2],
        "STATUS:SUCCESS|MESSAGE:already stored 2 bets|STORED:5\n"
    );
    assert!(
        replies[3].starts_with("STATUS:ERROR|CODE:INVALID_BET|MESSAGE:BET_1: NACIMIENTO"),
        "{}",
        replies[3]
    );
    assert!(
        replies[4].starts_with(
            "STATUS:ERROR|CODE:OUT_OF_ORDER|MESSAGE:batch starts at bet 7 but agency 1 has 5 stored"
        ),
        "{}",
        replies[4]
    );
    assert!(replies[5].contains("pong"), "{}", replies[5]);
    assert_eq!(
        replies[6],
        "STATUS:SUCCESS|MESSAGE:stored 1 bets|STORED:6\n"
    );
    drop(agency);
    let stored = server.stop().await;
    let docs: Vec<&str> = stored
        .lines()
        .map(|l| l.split(',').nth(3).unwrap())
        .collect();
    assert_eq!(docs, ["10", "11", "12", "13", "14", "15"]);
}

#[tokio::test]
async fn batches_in_flight_when_the_agency_hangs_up_are_counted() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    let mut burst = Vec::new();
    for k in 0..20u32 {
        let payload = batch(u64::from(k) * 3, 100 + k * 3..103 + k * 3);
        burst.extend_from_slice(&frame(payload.as_bytes()));
    }
    agency.write_all(&burst).await.unwrap();
    drop(agency); // gone, most likely before any acknowledgement

    // The next session must resume exactly after what the file holds: a
    // count short of it would make the agency store bets twice. Until the
    // old connection is wound up the agency is still held (AGENCY_BUSY).
    let resume = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut again = server.connect().await;
            write_frame(&mut again, b"ACTION:HELLO|AGENCY_ID:1\n").await;
            let reply = read_frame(&mut again).await;
            if !reply.contains("AGENCY_BUSY") {
                return reply;
            }
        }
    })
    .await
    .expect("the agency is released");
    let stored = server.stop().await.lines().count();
    // Usually all 60; fewer if the connection was reset before the central
    // read every frame, but never a count that differs from the file.
    assert!(stored > 0);
    let docs = 100..100 + stored as u32;
    assert!(
        resume.ends_with(&format!("{}\n", receipt_keys(docs))),
        "{resume}"
    );
}

#[tokio::test]
async fn a_restarted_server_answers_winners_from_the_draw_record() {
    let server = TestServer::start(2).await;
    let mut one = server.connect().await;
    write_frame(&mut one, batch(0, 10..14).as_bytes()).await;
    assert!(read_frame(&mut one).await.starts_with("STATUS:SUCCESS"));
    write_frame(&mut one, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    // A second announcement on the same connection is refused.
    write_frame(&mut one, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    let mut two = server.connect().await;
    write_frame(&mut two, b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n").await;
    assert_eq!(read_frame(&mut two).await, "STATUS:SUCCESS|WINNERS:\n");
    let first = read_frame(&mut one).await;
    let second = read_frame(&mut one).await;
    let mut replies = [first, second];
    replies.sort();
    assert!(
        replies[0].starts_with("STATUS:ERROR|CODE:AGENCY_FINISHED|"),
        "{replies:?}"
    );
    assert_eq!(replies[1], "STATUS:SUCCESS|WINNERS:10,12\n");
    drop((one, two));

    let record = std::fs::read_to_string(server.dir.path().join("bets.draw.toml")).unwrap();
    assert!(record.contains("winning_number = 7574"), "{record}");

    // After a restart: no agency needs to announce again for the draw to
    // stand, and it never runs twice.
    let server = server.restart().await;
    let mut again = server.connect().await;
    write_frame(&mut again, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    assert_eq!(
        read_frame(&mut again).await,
        "STATUS:SUCCESS|WINNERS:10,12\n"
    );
    // Bets after the draw are refused; a resent batch that is already stored
    // is still acknowledged.
    let mut late = server.connect().await;
    let late_bet = bet(99, 7574).replace("AGENCY_ID:1", "AGENCY_ID:2");
    write_frame(
        &mut late,
        format!("BATCH_SIZE:1|BET_1:{late_bet}\n").as_bytes(),
    )
    .await;
    assert!(read_frame(&mut late)
        .await
        .starts_with("STATUS:ERROR|CODE:AGENCY_FINISHED|"));
    write_frame(&mut again, batch(0, 10..14).as_bytes()).await;
    assert!(read_frame(&mut again)
        .await
        .starts_with("STATUS:SUCCESS|MESSAGE:already stored 4 bets"));
    assert_eq!(
        std::fs::read_to_string(server.dir.path().join("bets.draw.toml")).unwrap(),
        record
    );
    assert_eq!(server.stop().await.lines().count(), 4);
}

/// HELLO for agency 1 on `stream`; returns the reply.
async fn hello(stream: &mut TcpStream) -> String {
    write_frame(stream, b"ACTION:HELLO|AGENCY_ID:1\n").await;
    read_frame(stream).await
}

/// Reads until the central closes the connection; panics if it does not.
async fn closed(stream: &mut TcpStream) {
    tokio::time::timeout(PATIENCE, async {
        let mut sink = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the central closes the connection");
}

#[tokio::test]
async fn a_restarted_agency_takes_over_from_its_old_connection() {
    let server = TestServer::start(2).await;
    // The old session: stored a batch, announced it finished, waits.
    let mut old = server.connect().await;
    assert!(hello(&mut old)
        .await
        .ends_with(&format!("{}\n", receipt_keys(0..0))));
    write_frame(&mut old, batch(0, 10..13).as_bytes()).await;
    assert!(read_frame(&mut old).await.ends_with("|STORED:3\n"));
    write_frame(&mut old, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    // The agency restarts while the old connection still looks alive: the
    // new session wins, learns the final count, and the old one is closed.
    let mut new = server.connect().await;
    let reply = hello(&mut new).await;
    assert_eq!(
        reply,
        format!(
            "STATUS:SUCCESS|MESSAGE:agency 1: resume from bet 3{}\n",
            receipt_keys(10..13)
        )
    );
    closed(&mut old).await;
    // The new session speaks for the agency: a batch resent from the old
    // session is recognised, nothing is stored twice.
    write_frame(&mut new, batch(0, 10..13).as_bytes()).await;
    assert_eq!(
        read_frame(&mut new).await,
        "STATUS:SUCCESS|MESSAGE:already stored 3 bets|STORED:3\n"
    );
    let stored = server.stop().await;
    assert_eq!(stored.lines().count(), 3, "{stored}");
}

#[tokio::test]
async fn a_waiting_agency_that_hangs_up_frees_its_agency_at_once() {
    let server = TestServer::start(2).await;
    let mut waiting = server.connect().await;
    write_frame(&mut waiting, batch(0, 10..11).as_bytes()).await;
    assert!(read_frame(&mut waiting).await.ends_with("|STORED:1\n"));
    write_frame(&mut waiting, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    drop(waiting);
    // A client without HELLO (the reference agency) cannot take over; it
    // gets in as soon as the central sees the old socket close, long
    // before any idle timeout (120 s by default; the wait below is 30 s).
    let reply = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut again = server.connect().await;
            write_frame(&mut again, batch(1, 11..12).as_bytes()).await;
            let reply = read_frame(&mut again).await;
            if !reply.contains("AGENCY_BUSY") {
                return reply;
            }
        }
    })
    .await
    .expect("the agency is freed when its waiting connection closes");
    // Held by nobody, the agency is answered for itself: it finished.
    assert_eq!(
        reply,
        "STATUS:ERROR|CODE:AGENCY_FINISHED|MESSAGE:agency 1 already finished betting\n"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_never_reads_loses_its_slot() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let server = TestServer::start_with(dir, 1, |c| {
        c.max_connections = 1;
        c.frame_timeout = 1;
    })
    .await;
    // Pipelined PINGs, their pongs never read: the central's writes stall,
    // then its reads (our writes block). Within the write deadline the
    // central drops the peer, and our writes fail.
    let mut hog = server.connect().await;
    let ping = b"\0\0\0\x0cACTION:PING\n".repeat(20_000);
    tokio::time::timeout(PATIENCE, async {
        for _ in 0..10_000 {
            if hog.write_all(&ping).await.is_err() {
                return;
            }
        }
        panic!("the central kept reading a peer that never reads");
    })
    .await
    .expect("the central drops a peer that does not read its replies");
    // ...and its slot is free for an honest client (at once, or as soon as
    // the dropped connection's task has wound up).
    let pong = tokio::time::timeout(PATIENCE, async {
        loop {
            let mut honest = server.connect().await;
            write_frame(&mut honest, b"ACTION:PING\n").await;
            let reply = read_frame(&mut honest).await;
            if !reply.contains("SERVER_BUSY") {
                return reply;
            }
        }
    })
    .await
    .expect("the slot is freed");
    assert_eq!(pong, "STATUS:SUCCESS|MESSAGE:pong\n");
    server.stop().await;
}

#[tokio::test]
async fn after_a_storage_failure_a_connection_stores_nothing_without_first() {
    let server = TestServer::start(1).await;
    let mut agency = server.connect().await;
    // The reference agency's batches: no FIRST.
    let plain = |docs: std::ops::Range<u32>| batch(0, docs).replacen("|FIRST:0", "", 1);
    write_frame(&mut agency, plain(10..11).as_bytes()).await;
    assert!(read_frame(&mut agency).await.ends_with("|STORED:1\n"));
    // Storage fails under three batches in flight...
    let aside = server.storage.with_extension("aside");
    std::fs::rename(&server.storage, &aside).unwrap();
    std::fs::create_dir(&server.storage).unwrap();
    let mut burst = Vec::new();
    for docs in [11..12, 12..13, 13..14] {
        let p = plain(docs);
        burst.extend_from_slice(&frame(p.as_bytes()));
    }
    agency.write_all(&burst).await.unwrap();
    for _ in 0..3 {
        let reply = read_frame(&mut agency).await;
        assert!(
            reply.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED"),
            "{reply}"
        );
    }
    // ...and comes back: a later batch without FIRST on this connection
    // would land after the gap, so it is refused too.
    std::fs::remove_dir(&server.storage).unwrap();
    std::fs::rename(&aside, &server.storage).unwrap();
    write_frame(&mut agency, plain(14..15).as_bytes()).await;
    let reply = read_frame(&mut agency).await;
    assert!(reply.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|MESSAGE:an earlier batch of this connection was not stored"), "{reply}");
    // A batch that says where it starts is placed against what is stored.
    write_frame(&mut agency, batch(1, 11..12).as_bytes()).await;
    assert!(read_frame(&mut agency).await.ends_with("|STORED:2\n"));
    let stored = server.stop().await;
    let docs: Vec<&str> = stored
        .lines()
        .map(|l| l.split(',').nth(3).unwrap())
        .collect();
    assert_eq!(docs, ["10", "11"]);
}

#[tokio::test]
async fn a_draw_over_a_store_missing_acknowledged_bets_is_refused_and_retried() {
    let server = TestServer::start(2).await;
    let agency_two = |s: String| s.replace("AGENCY_ID:1", "AGENCY_ID:2");
    let (mut one, mut two) = (server.connect().await, server.connect().await);
    write_frame(&mut one, batch(0, 10..12).as_bytes()).await;
    assert!(read_frame(&mut one).await.ends_with("|STORED:2\n"));
    write_frame(&mut two, agency_two(batch(0, 20..21)).as_bytes()).await;
    assert!(read_frame(&mut two).await.ends_with("|STORED:1\n"));
    // The bets file is removed under the running central.
    let aside = server.storage.with_extension("aside");
    std::fs::rename(&server.storage, &aside).unwrap();
    write_frame(&mut one, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    write_frame(&mut two, b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n").await;
    // Both are told to try again later; nothing is recorded.
    for conn in [&mut one, &mut two] {
        let reply = read_frame(conn).await;
        assert!(
            reply.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|MESSAGE:the draw failed: the stored bets differ from what was acknowledged (agency 1: 0 in the store, 2 acknowledged, agency 2: 0 in the store, 1 acknowledged)"),
            "{reply}"
        );
    }
    assert!(!server.storage.with_extension("draw.toml").exists());
    // The operator puts the file back; the agencies announce again.
    std::fs::rename(&aside, &server.storage).unwrap();
    write_frame(&mut one, b"ACTION:BETTING_FINISHED|AGENCY_ID:1\n").await;
    write_frame(&mut two, b"ACTION:BETTING_FINISHED|AGENCY_ID:2\n").await;
    assert_eq!(read_frame(&mut one).await, "STATUS:SUCCESS|WINNERS:10\n");
    assert_eq!(read_frame(&mut two).await, "STATUS:SUCCESS|WINNERS:20\n");
    server.stop().await;
}
