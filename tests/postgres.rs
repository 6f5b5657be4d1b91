//! The PostgreSQL store against a real cluster (see `common::pg`): each
//! test starts its own throwaway cluster, or says that it skipped. What is
//! checked is what an operator and the agencies depend on: the rows of
//! `bets` (compared with the input files), each agency's winners, the
//! central's log lines and exit codes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{CommitRelay, Lose, PgCluster};
use common::*;
use lottery::receipt::Receipt;
use lottery::tools::gen_data::{generate, GenOptions};
use nix::sys::signal::Signal;

const WINNING: u16 = 7574;

fn generated(agencies: u32, bets_per_agency: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    generate(
        dir.path(),
        &GenOptions {
            agencies,
            bets_per_agency,
            seed: 1300 + u64::from(agencies),
            winning_number: WINNING,
            winner_share: 0.01,
            // Names with commas, quotes, `|`, `:`, `\` and accents.
            tricky_share: 0.05,
            crlf: false,
        },
    )
    .unwrap();
    dir
}

/// `lottery server` on port 0 storing into the database at `url`.
fn central_command(url: &str, agencies: u32) -> Command {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", agencies.to_string())
        .env("SERVER_STORAGE", url)
        .env("SERVER_WINNING_NUMBER", WINNING.to_string());
    cmd
}

fn central(url: &str, agencies: u32) -> Server {
    Server::spawn(central_command(url, agencies))
}

/// The table `bets`, grouped by agency in upload order, as the oracle's
/// rows (every column as text).
fn stored_rows(pg: &PgCluster, db: &str) -> BTreeMap<u32, Vec<Row>> {
    let mut out: BTreeMap<u32, Vec<Row>> = BTreeMap::new();
    for r in pg.query(
        db,
        "SELECT agency, first_name, last_name, document, birthdate, number \
         FROM bets ORDER BY agency, seq",
    ) {
        let row: Row = std::array::from_fn(|i| r[i].clone().expect("no NULL column"));
        out.entry(row[0].parse().unwrap()).or_default().push(row);
    }
    out
}

/// Each agency's count as the central keeps it for resuming.
fn agency_counts(pg: &PgCluster, db: &str) -> BTreeMap<u32, usize> {
    pg.query(db, "SELECT agency, stored FROM agencies ORDER BY agency")
        .into_iter()
        .map(|r| {
            (
                r[0].as_deref().unwrap().parse().unwrap(),
                r[1].as_deref().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

/// Each agency's receipt as the table `agencies` keeps it.
fn stored_receipts(pg: &PgCluster, db: &str) -> BTreeMap<u32, Receipt> {
    pg.query(
        db,
        "SELECT agency, stored, encode(digest, 'hex') FROM agencies ORDER BY agency",
    )
    .into_iter()
    .map(|r| {
        (
            r[0].as_deref().unwrap().parse().unwrap(),
            Receipt {
                count: r[1].as_deref().unwrap().parse().unwrap(),
                digest: r[2].as_deref().expect("a digest").parse().unwrap(),
            },
        )
    })
    .collect()
}

/// Says `HELLO` for `agency` to the central at `address` (one frame: its
/// length as a u32 BE, then the payload) and returns its answer's payload.
fn hello(address: &str, agency: u32) -> String {
    exchange(
        &mut connect(address),
        &format!("ACTION:HELLO|AGENCY_ID:{agency}\n"),
    )
}

fn connect(address: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream
}

/// Sends one frame holding `payload`.
fn send(stream: &mut std::net::TcpStream, payload: &str) {
    use std::io::Write;
    stream
        .write_all(&(payload.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(payload.as_bytes()).unwrap();
}

/// The next frame's payload.
fn receive(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).unwrap();
    String::from_utf8(body).unwrap()
}

/// Sends one frame holding `payload` and returns the next reply's payload
/// that is not a still-waiting frame.
fn exchange(stream: &mut std::net::TcpStream, payload: &str) -> String {
    send(stream, payload);
    loop {
        let body = receive(stream);
        if !body.starts_with("STATUS:WAITING") {
            return body;
        }
    }
}

/// Starts agencies `ids` against `address`, waits for each to exit 0 and
/// checks its winners against the oracle.
fn run_agencies(ids: &[u32], address: &str, data: &Path, expected: &Expected, limit: Duration) {
    let out = tempfile::tempdir().unwrap();
    let running: Vec<_> = ids
        .iter()
        .map(|&id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let agency = start_agency(id, address, &data_file(data, id), &winners);
            (id, winners, agency)
        })
        .collect();
    let deadline = Instant::now() + limit;
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id} failed: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(
            &read_winners(winners),
            &expected.winners[id],
            "agency {id} winners"
        );
    }
}

fn stop(server: &Server) -> String {
    server.proc.signal(Signal::SIGTERM);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    let log = server.proc.output();
    assert!(status.success(), "central exit {status}\n{log}");
    assert!(
        log.contains("action: close_database | result: success"),
        "{log}"
    );
    log
}

#[test]
fn five_agencies_store_every_bet_once_as_rows_and_get_their_exact_winners() {
    let Some((pg, url)) = cluster_with_db("five_agencies_store_every_bet_once_as_rows") else {
        return;
    };
    let data = generated(5, 1_500);
    let expected = expected(data.path(), 5, WINNING);
    let server = central(&url, 5);
    let log = server.proc.output();
    assert!(
        log.contains(&format!(
            "action: database_schema | result: success | storage: {url} | from_version: 0 | \
             version: {}",
            lottery::store::postgres::schema::MIGRATIONS.len()
        )),
        "{log}"
    );
    run_agencies(
        &[1, 2, 3, 4, 5],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(7_500),
    );
    server.proc.wait_for("action: sorteo | result: success");

    // Every input bet, once, in its agency's file order.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let counts: BTreeMap<u32, usize> = expected.rows.iter().map(|(a, r)| (*a, r.len())).collect();
    assert_eq!(agency_counts(&pg, "lottery"), counts);
    // The draw record, queryable.
    let winners = pg.query(
        "lottery",
        "SELECT agency, array_to_string(winners, ',') FROM draw_agencies ORDER BY agency",
    );
    for row in winners {
        let agency: u32 = row[0].as_deref().unwrap().parse().unwrap();
        assert_eq!(
            row[1].as_deref().unwrap(),
            expected.winners[&agency].join(","),
            "recorded winners of {agency}"
        );
    }

    let log = stop(&server);
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
    assert!(!log.contains("result: fail"), "{log}");
}

#[test]
fn a_restarted_central_resumes_from_the_table_and_serves_the_recorded_draw() {
    let Some((pg, url)) = cluster_with_db("a_restarted_central_resumes_from_the_table") else {
        return;
    };
    let data = generated(2, 800);
    let expected = expected(data.path(), 2, WINNING);
    let relay = Relay::start("");

    // Agency 1 uploads everything, then waits for the draw; the central
    // stops before agency 2 comes.
    let first = central(&url, 2);
    relay.point_at(Some(&first.address()));
    let out = tempfile::tempdir().unwrap();
    let waiting = start_agency(
        1,
        &relay.address,
        &data_file(data.path(), 1),
        &out.path().join("w1"),
    );
    first
        .proc
        .wait_for("action: agencia_finalizada | result: success");
    relay.point_at(None);
    let log = stop(&first);
    assert!(!log.contains("action: sorteo"), "{log}");
    drop(waiting);
    assert_eq!(stored_rows(&pg, "lottery")[&1], expected.rows[&1]);
    // The receipt kept with the rows is the digest of agency 1's file.
    assert_eq!(
        stored_receipts(&pg, "lottery"),
        BTreeMap::from([(1, file_receipt(&expected, 1))])
    );
    // Not drawn yet: nothing to verify, and no new round over its bets.
    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(1));
    assert!(
        out.starts_with("no draw record in the database's tables draw and draw_agencies: "),
        "{out}"
    );
    // Said once, and not as a mismatch.
    assert!(
        err.contains("the round is not drawn yet: there is no draw record to verify")
            && !err.contains("does not match"),
        "{err}"
    );
    let (code, _, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("round 1 is not drawn yet (no draw record) and table bets holds bets"),
        "{err}"
    );

    // A new central reads where agency 1 stands from the table.
    let second = central(&url, 2);
    let log = second.proc.output();
    assert!(
        log.contains(&format!(
            "action: recover | result: success | storage: {url} | rows: 800 | agencies: 1"
        )),
        "{log}"
    );
    // Its answer to HELLO is agency 1's receipt from the table: the count
    // and the digest of exactly its file.
    let receipt = file_receipt(&expected, 1);
    let reply = hello(&second.address(), 1);
    assert!(
        reply.ends_with(&format!("|STORED:800|DIGEST:{}\n", receipt.digest)),
        "{reply}"
    );
    relay.point_at(Some(&second.address()));
    // Agency 1 sends its file again: nothing of it is stored twice.
    run_agencies(
        &[1, 2],
        &relay.address,
        data.path(),
        &expected,
        upload_limit(1_600),
    );
    second.proc.wait_for("action: sorteo | result: success");
    // Agency 1's HELLO was answered with the receipt from the table, which
    // its file's prefix matched: it resumed at 800 and sent nothing again.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    assert_eq!(stored_receipts(&pg, "lottery"), receipts);
    // The draw record holds each agency's receipt and the seal over them.
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, bets, encode(digest, 'hex') FROM draw_agencies ORDER BY agency"
        ),
        receipts
            .iter()
            .map(|(a, r)| vec![
                Some(a.to_string()),
                Some(r.count.to_string()),
                Some(r.digest.to_string())
            ])
            .collect::<Vec<_>>()
    );
    let seal = lottery::receipt::seal(WINNING, 2, &receipts).to_string();
    assert_eq!(
        pg.query("lottery", "SELECT encode(seal, 'hex') FROM draw"),
        vec![vec![Some(seal.clone())]]
    );
    relay.point_at(None);
    stop(&second);

    // A third central finds the draw and only serves it.
    let third = central(&url, 2);
    let log = third.proc.output();
    assert!(
        log.contains("action: draw_record | result: success | state: already_drawn"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "record: tables draw and draw_agencies | storage: {url}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("action: verify | result: success | seal: {seal}")),
        "{log}"
    );
    relay.point_at(Some(&third.address()));
    run_agencies(&[2], &relay.address, data.path(), &expected, STEP);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    // An agency whose file is not what the table holds for it (another
    // round's data) stops at its HELLO with exit 3 and sends nothing.
    let other = generated(3, 800);
    let out = tempfile::tempdir().unwrap();
    let stale = start_agency(
        1,
        &relay.address,
        &data_file(other.path(), 1),
        &out.path().join("stale"),
    );
    assert_eq!(
        stale.wait_exit(PATIENCE).code(),
        Some(3),
        "{}\n{}",
        stale.output(),
        stale.stderr()
    );
    assert!(
        stale
            .stderr()
            .contains("the central holds 800 bets for agency 1 that are not the first 800 of "),
        "{}",
        stale.stderr()
    );
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let log = stop(&third);
    assert!(!log.contains("action: sorteo"), "{log}");
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM draw"),
        vec![vec![Some("1".to_string())]]
    );
}

#[test]
fn an_unreachable_database_at_start_is_retried_then_named_and_exits_1() {
    // Needs no cluster: a port that refuses connections.
    let held = HeldPort::new();
    let url = format!("postgres://lottery:hunter2@{}/bets", held.address());
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "2");
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let (log, stderr) = (central.output(), central.stderr());
    assert_eq!(status.code(), Some(1), "{log}\n{stderr}");
    let shown = "postgres://lottery:***@";
    assert!(
        log.contains(&format!(
            "action: database_connect | result: in_progress | storage: {shown}{}/bets | attempt: 1 | retry_in_ms: 200 | error: ",
            held.address()
        )),
        "{log}"
    );
    assert!(
        log.contains("action: database_connect | result: fail"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "action: exit | result: fail | error: database {}/bets: unreachable for 2 s (",
            held.address()
        )),
        "{log}"
    );
    assert!(log.contains("Connection refused"), "{log}");
    assert!(
        !format!("{log}{stderr}").contains("hunter2"),
        "{log}\n{stderr}"
    );
}

#[test]
fn the_database_restarted_mid_upload_loses_nothing_and_stores_nothing_twice() {
    let Some((mut pg, url)) = cluster_with_db("the_database_restarted_mid_upload") else {
        return;
    };
    let data = generated(5, 8_000);
    let expected = expected(data.path(), 5, WINNING);
    let server = central(&url, 5);
    let out = tempfile::tempdir().unwrap();
    let running: Vec<_> = (1..=5)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let mut cmd =
                agency_command(id, &server.address(), &data_file(data.path(), id), &winners);
            cmd.env("CLI_BATCH_MAXAMOUNT", "20");
            (id, winners, Proc::spawn(cmd))
        })
        .collect();
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    // An immediate shutdown, as a crash: open transactions are lost.
    pg.stop_with(Signal::SIGQUIT);
    server
        .proc
        .wait_for("action: apuesta_recibida | result: fail");
    pg.start_again();
    let deadline = Instant::now() + upload_limit(40_000) + Duration::from_secs(30);
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id}: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(&read_winners(winners), &expected.winners[id], "agency {id}");
    }
    server.proc.wait_for("action: sorteo | result: success");
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let log = stop(&server);
    assert!(log.contains("state: reconnected"), "{log}");
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
}

/// Batches of `agency` with documents `docs`.
fn batch(agency: u32, docs: impl IntoIterator<Item = u32>) -> lottery::model::Bets {
    let mut bets = lottery::model::Bets::new();
    for doc in docs {
        bets.push_fields(
            &agency.to_string(),
            "Ana",
            "Pérez",
            &doc.to_string(),
            "1999-03-17",
            "7574",
        )
        .unwrap();
    }
    bets
}

/// `prior` (or agency `agency`'s empty receipt) extended by `bets`: the
/// receipt the central hands the store with them.
fn after(
    prior: Option<lottery::receipt::Receipt>,
    agency: u32,
    bets: &lottery::model::Bets,
) -> lottery::receipt::Receipt {
    prior
        .unwrap_or_else(|| lottery::receipt::Receipt::empty(agency))
        .after(bets.iter())
}

/// A throwaway cluster with an empty database `lottery`, and the database's
/// URL; `None` (said visibly) where PostgreSQL is not installed.
fn cluster_with_db(test: &str) -> Option<(PgCluster, String)> {
    let pg = PgCluster::start_or_skip(test)?;
    let url = pg.create_db("lottery");
    Some((pg, url))
}

/// The store on `url`, opened as a central opens it.
async fn open_store(url: &str) -> lottery::store::postgres::PostgresStore {
    lottery::store::postgres::PostgresStore::open(
        &target(url),
        lottery::store::Durability::Sync,
        STEP,
    )
    .await
    .unwrap()
    .0
}

fn target(url: &str) -> lottery::store::PgTarget {
    match url.parse().unwrap() {
        lottery::store::Storage::Postgres(target) => *target,
        other => panic!("{other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn batches_waiting_together_are_stored_in_one_transaction() {
    use lottery::store::{postgres::PostgresStore, Durability, Sequence, Store};
    let Some(pg) =
        PgCluster::start_or_skip("batches_waiting_together_are_stored_in_one_transaction")
    else {
        return;
    };
    let url = pg.create_db("lottery");
    runtime().block_on(async {
        let (store, stored) = PostgresStore::open(&target(&url), Durability::Sync, STEP)
            .await
            .unwrap();
        assert!(stored.is_empty());
        // 200 connections' batches, all queued before any is answered.
        let mut pending = Vec::new();
        let mut receipts = std::collections::HashMap::new();
        for i in 0..200u32 {
            let agency = 1 + i % 5;
            let bets = batch(agency, i * 10..i * 10 + 10);
            let receipt = after(receipts.get(&agency).copied(), agency, &bets);
            receipts.insert(agency, receipt);
            pending.push(
                store
                    .submit(&bets, 0, &Sequence::new(), receipt)
                    .await
                    .unwrap(),
            );
        }
        for p in pending {
            p.await.unwrap();
        }
        store.close().await;
    });
    let rows = pg.query(
        "lottery",
        "SELECT count(*), count(DISTINCT xmin::text) FROM bets",
    );
    let (rows, transactions): (u32, u32) = (
        rows[0][0].as_deref().unwrap().parse().unwrap(),
        rows[0][1].as_deref().unwrap().parse().unwrap(),
    );
    assert_eq!(rows, 2_000);
    // Each row's xmin is the transaction that inserted it.
    assert!(
        transactions <= 20,
        "200 waiting batches took {transactions} transactions"
    );
    // Every agency's bets numbered 0.. in the order they were submitted.
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, min(seq), max(seq), count(*) FROM bets GROUP BY agency ORDER BY agency"
        )
        .len(),
        5
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT count(*) FROM bets WHERE agency = 1 AND seq = (document::int / 10) / 5 * 10 + document::int % 10"
        ),
        vec![vec![Some("400".to_string())]]
    );
}

#[test]
fn after_a_batch_is_lost_with_the_database_its_connection_stores_nothing_more() {
    use lottery::store::{Sequence, Store};
    let Some((mut pg, url)) = cluster_with_db("after_a_batch_is_lost_with_the_database") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    let (pipelined, other) = (Sequence::new(), Sequence::new());
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        let first = store
            .submit(&batch(1, 0..3), 0, &pipelined, acked)
            .await
            .unwrap();
        first.await.unwrap();
    });
    pg.stop();
    let err = rt.block_on(async {
        let receipt = after(Some(acked), 1, &batch(1, 3..6));
        let lost = store
            .submit(&batch(1, 3..6), 0, &pipelined, receipt)
            .await
            .unwrap();
        lost.await.unwrap_err()
    });
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("database 127.0.0.1:{}/lottery: ", pg.port)),
        "{shown}"
    );
    assert!(pipelined.is_broken());
    pg.start_again();
    rt.block_on(async {
        // Behind the gap: refused without being stored, database or not.
        let receipt = after(Some(acked), 1, &batch(1, 6..9));
        let behind = store
            .submit(&batch(1, 6..9), 0, &pipelined, receipt)
            .await
            .unwrap();
        let err = behind.await.unwrap_err().to_string();
        assert!(err.contains("earlier batch"), "{err}");
        // Another connection goes on, numbered after what was acknowledged.
        let receipt = after(Some(acked), 1, &batch(1, 9..12));
        let next = store
            .submit(&batch(1, 9..12), 0, &other, receipt)
            .await
            .unwrap();
        next.await.unwrap();
        store.close().await;
        let closed = store.submit(&batch(1, 12..13), 0, &other, receipt).await;
        assert!(closed.is_err(), "a closed store takes no batch");
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq) FROM bets"
        ),
        vec![vec![Some("0@0 1@1 2@2 9@3 10@4 11@5".to_string())]]
    );
    // The receipt committed is the acknowledged one: the three bets
    // acknowledged, then the other connection's three.
    let receipt = after(Some(acked), 1, &batch(1, 9..12));
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, stored, encode(digest, 'hex') FROM agencies"
        ),
        vec![vec![
            Some("1".to_string()),
            Some("6".to_string()),
            Some(receipt.digest.to_string())
        ]]
    );
}

/// How the database fails the writer's groups in flight.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// It stops: every group fails.
    Stops,
    /// The connection of the oldest group in flight is killed: the groups
    /// behind it go on, on their own connections.
    OneConnectionDies,
}

/// The writer keeps several groups in flight, each on its own connection:
/// when the database goes away under them, every batch acknowledged is
/// stored, and nothing is stored behind a batch that was not, whatever
/// group either was in.
#[test]
fn groups_in_flight_when_the_database_stops_leave_each_agency_an_acknowledged_prefix() {
    groups_in_flight_fail(Failure::Stops);
}

#[test]
fn groups_in_flight_behind_a_connection_killed_leave_each_agency_an_acknowledged_prefix() {
    groups_in_flight_fail(Failure::OneConnectionDies);
}

fn groups_in_flight_fail(failure: Failure) {
    use lottery::store::{Sequence, Store};
    let Some((mut pg, url)) = cluster_with_db(&format!("groups_in_flight_fail({failure:?})"))
    else {
        return;
    };
    // A runtime on this thread: while the test is outside `block_on` the
    // writer and its groups stand still, mid-way.
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    const AGENCIES: u32 = 3;
    const BATCHES: u32 = 100;
    let sequences: Vec<Sequence> = (0..AGENCIES).map(|_| Sequence::new()).collect();
    let mut receipts = std::collections::HashMap::new();
    let mut pending = Vec::new();
    rt.block_on(async {
        for i in 0..BATCHES {
            for agency in 1..=AGENCIES {
                let docs = i * 10..i * 10 + 10;
                let bets = batch(agency, docs.clone());
                let receipt = after(receipts.get(&agency).copied(), agency, &bets);
                receipts.insert(agency, receipt);
                let stored = store
                    .submit(&bets, 0, &sequences[agency as usize - 1], receipt)
                    .await
                    .unwrap();
                pending.push((agency, docs, receipt, stored));
            }
            if i % 10 == 9 {
                // The writer takes what waits as a group: many groups.
                tokio::task::yield_now().await;
            }
        }
        // Some are stored: the database fails with the rest in flight.
        pending[0].3.as_mut().await.unwrap();
    });
    match failure {
        Failure::Stops => pg.stop(),
        Failure::OneConnectionDies => {
            let killed = pg.query(
                "postgres",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = 'lottery' AND application_name = 'lottery' \
                 AND xact_start IS NOT NULL ORDER BY xact_start LIMIT 1",
            );
            assert_eq!(
                killed,
                vec![vec![Some("t".to_string())]],
                "no group in flight"
            );
        }
    }
    let outcomes: Vec<_> = rt.block_on(async {
        let mut outcomes = Vec::new();
        for (agency, docs, receipt, stored) in pending.drain(1..) {
            outcomes.push((agency, docs, receipt, stored.await.is_ok()));
        }
        outcomes
    });
    assert!(
        outcomes.iter().any(|o| !o.3),
        "the database stopped after every batch was stored: nothing was in flight"
    );
    // Per agency: the documents acknowledged, and the receipt after them.
    let mut acked: std::collections::BTreeMap<u32, (Vec<u32>, Option<lottery::receipt::Receipt>)> =
        (1..=AGENCIES).map(|a| (a, (Vec::new(), None))).collect();
    acked.get_mut(&1).unwrap().0.extend(0..10);
    acked.get_mut(&1).unwrap().1 = Some(after(None, 1, &batch(1, 0..10)));
    for (agency, docs, receipt, ok) in outcomes {
        let entry = acked.get_mut(&agency).unwrap();
        let behind_a_failure = entry.0.len() < entry.1.map_or(0, |r| r.count as usize);
        if ok {
            assert!(
                !behind_a_failure && entry.0.len() + 10 == receipt.count as usize,
                "agency {agency}: documents {docs:?} acknowledged behind a batch that was not"
            );
            entry.0.extend(docs);
            entry.1 = Some(receipt);
        } else {
            // Marks the failure: whatever comes later must fail too.
            entry.1 = Some(receipt);
        }
    }
    if matches!(failure, Failure::Stops) {
        pg.start_again();
    }
    // Each agency comes back (a new connection) with one more batch after
    // what it was acknowledged.
    rt.block_on(async {
        for agency in 1..=AGENCIES {
            let (docs, _) = &acked[&agency];
            let prior = (!docs.is_empty())
                .then(|| after(None, agency, &batch(agency, docs.iter().copied())));
            let bets = batch(agency, 5000..5003);
            let stored = store
                .submit(&bets, 0, &Sequence::new(), after(prior, agency, &bets))
                .await
                .unwrap();
            stored.await.unwrap();
        }
        store.close().await;
    });
    for agency in 1..=AGENCIES {
        let docs: Vec<u32> = acked[&agency].0.iter().copied().chain(5000..5003).collect();
        let expected = docs
            .iter()
            .enumerate()
            .map(|(seq, doc)| format!("{doc}@{seq}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            pg.query(
                "lottery",
                &format!(
                    "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
                     (SELECT stored FROM agencies WHERE agency = {agency}) \
                     FROM bets WHERE agency = {agency}"
                )
            ),
            vec![vec![Some(expected), Some(docs.len().to_string())]],
            "agency {agency}"
        );
    }
}

#[test]
fn centrals_starting_together_create_the_schema_once() {
    use lottery::store::{postgres::PostgresStore, Durability};
    let Some((pg, url)) = cluster_with_db("centrals_starting_together_create_the_schema_once")
    else {
        return;
    };
    let target = target(&url);
    runtime().block_on(async {
        let opens = (0..4).map(|_| PostgresStore::open(&target, Durability::Sync, STEP));
        for opened in futures::future::join_all(opens).await {
            let (store, stored) = opened.unwrap();
            assert!(stored.is_empty());
            lottery::store::Store::close(&store).await;
        }
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT version FROM schema_version ORDER BY version"
        ),
        (1..=lottery::store::postgres::schema::MIGRATIONS.len())
            .map(|v| vec![Some(v.to_string())])
            .collect::<Vec<_>>()
    );
}

/// Agency 1's rows and count as the tables hold them: `document@seq …`,
/// and `agencies.stored`.
fn agency_one(pg: &PgCluster) -> Vec<Vec<Option<String>>> {
    pg.query(
        "lottery",
        "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
         (SELECT stored::text FROM agencies WHERE agency = 1) FROM bets WHERE agency = 1",
    )
}

/// `document@seq` for documents `docs` stored from seq 0 on.
fn numbered(docs: impl IntoIterator<Item = u32>) -> String {
    docs.into_iter()
        .enumerate()
        .map(|(seq, doc)| format!("{doc}@{seq}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Submits `bets` (receipt `receipt`) to `store` on a fresh sequence and
/// returns how the store answered.
async fn store_batch(
    store: &lottery::store::postgres::PostgresStore,
    bets: &lottery::model::Bets,
    receipt: Receipt,
) -> Result<(), lottery::store::StorageError> {
    use lottery::store::{Sequence, Store};
    let stored = store
        .submit(bets, 0, &Sequence::new(), receipt)
        .await
        .unwrap();
    stored.await
}

#[test]
fn rows_of_a_commit_never_acknowledged_are_taken_back_out_before_the_next_batch() {
    use lottery::store::Store;
    let Some((pg, _)) = cluster_with_db("rows_of_a_commit_never_acknowledged") else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let store = rt.block_on(open_store(&relay.url("lottery")));
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        store_batch(&store, &batch(1, 0..3), acked).await.unwrap();
        // The next batch's commit happens but its answer is lost: the
        // central never acknowledges those rows, so their agency sends
        // them again.
        relay.arm(Lose::Answer);
        let lost = batch(1, 3..6);
        let receipt = after(Some(acked), 1, &lost);
        assert!(store_batch(&store, &lost, receipt).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Answer);
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..6)), Some("6".into())]],
        "the commit whose answer was lost happened"
    );
    rt.block_on(async {
        let next = after(Some(acked), 1, &batch(1, 6..9));
        store_batch(&store, &batch(1, 6..9), next).await.unwrap();
        store.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![
            Some("0@0 1@1 2@2 6@3 7@4 8@5".to_string()),
            Some("6".into())
        ]]
    );
}

/// Central A loses the answer to the commit of agency 1's bets 3..6 (the
/// commit happens), then a session of the agency opens on central B, which
/// tells it that 6 bets are stored: those rows are acknowledged now, and A
/// settling its doubt (before agency 2's session opens) must leave them.
/// `hello_on_a`: whether agency 1 had said HELLO on A too (a reference
/// agency does not, and A then knows no session of it).
fn a_lost_commit_counted_by_another_central_stays(test: &str, hello_on_a: bool) {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db(test) else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let a = rt.block_on(open_store(&relay.url("lottery")));
    let b = rt.block_on(open_store(&url));
    let first = after(None, 1, &batch(1, 0..3));
    let second = after(Some(first), 1, &batch(1, 3..6));
    rt.block_on(async {
        if hello_on_a {
            assert_eq!(a.open_session(1).await.unwrap().receipt.count, 0);
        }
        store_batch(&a, &batch(1, 0..3), first).await.unwrap();
        relay.arm(Lose::Answer);
        assert!(store_batch(&a, &batch(1, 3..6), second).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Answer);
    rt.block_on(async {
        // The agency moves to B: HELLO answers `STORED:6`.
        assert_eq!(b.open_session(1).await.unwrap().receipt, second);
        // Any work on A settles its doubt first.
        a.open_session(2).await.unwrap();
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..6)), Some("6".into())]],
        "central A removed bets central B acknowledged"
    );
    rt.block_on(async {
        // The agency goes on from 6 on B.
        let third = after(Some(second), 1, &batch(1, 6..9));
        store_batch(&b, &batch(1, 6..9), third).await.unwrap();
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..9)), Some("9".into())]]
    );
}

#[test]
fn a_lost_commit_counted_by_a_session_on_another_central_stays() {
    a_lost_commit_counted_by_another_central_stays("a_lost_commit_counted_hello_on_both", true);
}

#[test]
fn a_lost_commit_of_an_agency_without_hello_counted_on_another_central_stays() {
    a_lost_commit_counted_by_another_central_stays("a_lost_commit_counted_no_hello_on_a", false);
}

/// Central A's commit of agency 1's bets 5..8 never reaches the database,
/// and the agency (no HELLO anywhere) sends the same bets to central B,
/// which stores and acknowledges them: the table then holds exactly what
/// A's commit would have left, under the same epoch. A settling its doubt
/// must find that its own transaction did not commit, and remove nothing.
#[test]
fn rows_another_central_stored_where_a_lost_commit_would_have_are_kept() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("rows_another_central_stored_where_a_lost_commit") else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let a = rt.block_on(open_store(&relay.url("lottery")));
    let first = after(None, 1, &batch(1, 0..5));
    let second = after(Some(first), 1, &batch(1, 5..8));
    rt.block_on(async {
        store_batch(&a, &batch(1, 0..5), first).await.unwrap();
    });
    // Central B starts now: it reads agency 1's 5 bets from the table.
    let b = rt.block_on(open_store(&url));
    rt.block_on(async {
        relay.arm(Lose::Commit);
        assert!(store_batch(&a, &batch(1, 5..8), second).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Commit);
    rt.block_on(async {
        store_batch(&b, &batch(1, 5..8), second).await.unwrap();
        // Any work on A settles its doubt first.
        a.open_session(2).await.unwrap();
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..8)), Some("8".into())]],
        "central A removed bets central B acknowledged"
    );
}

/// Agency 1 sends 5 bets to central A without HELLO. Its next batch waits
/// on agency 1's row of `agencies` (held by someone else) when A's backend
/// is terminated, so A answers `STORAGE_FAILED`. The agency moves to
/// central B, says HELLO (`resume from bet 5`) and sends the 3 bets with
/// `FIRST:5`: B acknowledges `STORED:8`. Then agency 2's HELLO on A makes A
/// settle what it was unsure of: every acknowledged bet must still be there.
#[test]
fn an_agency_without_hello_whose_batch_died_on_one_central_keeps_what_another_acknowledged() {
    let Some((pg, url)) = cluster_with_db("an_agency_without_hello_whose_batch_died") else {
        return;
    };
    let a = central(&format!("{url}?application_name=central_a"), 2);
    let b = central(&url, 2);
    let bet = |doc: u32| {
        format!(
            "NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|NACIMIENTO:1999-03-17\\|\
             NUMERO:7574\\|AGENCY_ID:1"
        )
    };
    let batch = |first: Option<u32>, docs: std::ops::Range<u32>| {
        let mut payload = format!("BATCH_SIZE:{}", docs.len());
        if let Some(first) = first {
            payload += &format!("|FIRST:{first}");
        }
        for (i, doc) in docs.enumerate() {
            payload += &format!("|BET_{}:{}", i + 1, bet(doc));
        }
        payload + "\n"
    };
    // A reference agency: no HELLO, no FIRST.
    let mut on_a = connect(&a.address());
    let stored = exchange(&mut on_a, &batch(None, 0..5));
    assert!(stored.contains("|STORED:5"), "{stored}");
    // Someone holds agency 1's row: A's next batch waits for it.
    let rt = runtime();
    let holder = rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .batch_execute("BEGIN; SELECT 1 FROM agencies WHERE agency = 1 FOR UPDATE")
            .await
            .unwrap();
        client
    });
    send(&mut on_a, &batch(None, 5..8));
    let deadline = Instant::now() + STEP;
    let waiting = loop {
        let waiting = pg.query(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'central_a' \
             AND wait_event_type = 'Lock'",
        );
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(Instant::now() < deadline, "central A's batch never waited");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A DBA, a pooler or a network cut ends A's backend.
    let pid = waiting[0][0].clone().unwrap();
    pg.query("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let refused = receive(&mut on_a);
    assert!(
        refused.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|"),
        "{refused}"
    );
    rt.block_on(async { holder.batch_execute("ROLLBACK").await.unwrap() });
    drop(on_a);
    // The agency moves to B, resumes from the table and is acknowledged.
    let mut on_b = connect(&b.address());
    let welcome = exchange(&mut on_b, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(
        welcome.contains("resume from bet 5") && welcome.contains("|STORED:5|"),
        "{welcome}"
    );
    let stored = exchange(&mut on_b, &batch(Some(5), 5..8));
    assert!(
        stored.starts_with("STATUS:SUCCESS") && stored.contains("|STORED:8"),
        "{stored}"
    );
    // Any work on A: agency 2's HELLO.
    let welcome = hello(&a.address(), 2);
    assert!(welcome.starts_with("STATUS:SUCCESS"), "{welcome}");
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..8)), Some("8".into())]],
        "acknowledged bets were removed"
    );
    drop(on_b);
    let log = stop(&a);
    assert!(!log.contains("removed: "), "{log}");
    stop(&b);
}

#[test]
fn a_central_started_before_its_database_waits_for_it_and_serves() {
    let Some((mut pg, url)) = cluster_with_db("a_central_started_before_its_database") else {
        return;
    };
    pg.stop();
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "60");
    let proc = Proc::spawn(cmd);
    proc.wait_for("action: database_connect | result: in_progress");
    pg.start_again();
    proc.wait_for("action: database_connect | result: success");
    let line = proc.wait_for("action: listen | result: success");
    let port = line
        .split(" | ")
        .find_map(|field| field.strip_prefix("address: "))
        .and_then(|address| address.rsplit(':').next())
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let server = Server { proc, port };
    let data = generated(1, 300);
    let expected = expected(data.path(), 1, WINNING);
    run_agencies(
        &[1],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(300),
    );
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    stop(&server);
}

#[test]
fn a_refused_login_is_not_retried() {
    let Some(pg) = PgCluster::start_or_skip("a_refused_login_is_not_retried") else {
        return;
    };
    // No such database: asking again will not create it.
    let url = pg.url("nope");
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "60");
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let log = central.output();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("result: in_progress"), "{log}");
    assert!(
        log.contains(&format!(
            "action: exit | result: fail | error: database 127.0.0.1:{}/nope: refused the connection: FATAL: database \"nope\" does not exist",
            pg.port
        )),
        "{log}"
    );
}

#[test]
fn a_url_without_the_password_the_database_asks_for_is_a_configuration_error_at_once() {
    const TEST: &str =
        "a_url_without_the_password_the_database_asks_for_is_a_configuration_error_at_once";
    let Some(mut pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    pg.query("postgres", "CREATE ROLE guarded LOGIN PASSWORD 'hunter2'");
    pg.query("postgres", "CREATE DATABASE guarded OWNER guarded");
    // This role must give its password on loopback (the first matching
    // line wins); a restart, not a reload, so it holds from the first
    // connection on.
    pg.stop();
    let hba = pg.data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all guarded 127.0.0.1/32 scram-sha-256\n{text}"),
    )
    .unwrap();
    pg.start_again();
    let url = format!("postgres://guarded@127.0.0.1:{}/guarded", pg.port);
    let mut cmd = central_command(&url, 1);
    // The habit of libpq's tools, which this program does not share.
    cmd.env("PGPASSWORD", "hunter2");
    let central = Proc::spawn(cmd);
    // At once: well within the 30 s the database is waited for.
    let status = central.wait_exit(STEP);
    let (log, stderr) = (central.output(), central.stderr());
    assert_eq!(status.code(), Some(2), "{log}\n{stderr}");
    assert!(!log.contains("result: in_progress"), "{log}");
    let says = format!(
        "database 127.0.0.1:{}/guarded: the database asks for a password and the storage URL \
         gives none (PGPASSWORD is set, but this program reads neither it nor ~/.pgpass): put \
         it in the URL, postgres://USER:PASSWORD@HOST/DB or ?password=PASSWORD",
        pg.port
    );
    assert!(stderr.contains(&says), "{stderr}");
    assert!(!format!("{log}{stderr}").contains("hunter2"));
}

#[test]
fn a_database_that_holds_a_commit_past_shutdown_is_named_in_the_closing_line() {
    const TEST: &str = "a_database_that_holds_a_commit_past_shutdown_is_named_in_the_closing_line";
    let Some(pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    let url = pg.create_db("stuck");
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_SHUTDOWN_GRACE", "1");
    let server = Server::spawn(cmd);
    let mut agency = connect(&server.address());
    let batch = |doc: u32| {
        format!(
            "BATCH_SIZE:1|BET_1:NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|\
             NACIMIENTO:1999-03-17\\|NUMERO:7574\\|AGENCY_ID:1\n"
        )
    };
    let stored = exchange(&mut agency, &batch(30_000_001));
    assert!(stored.contains("|STORED:1"), "{stored}");
    // Another session holds agency 1's row: the central's next commit
    // waits for it, as it would on a hung database.
    let rt = runtime();
    let (client, connection) = rt
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .unwrap();
    rt.spawn(connection);
    rt.block_on(client.batch_execute("BEGIN; SELECT * FROM agencies WHERE agency = 1 FOR UPDATE"))
        .unwrap();
    send(&mut agency, &batch(30_000_002));
    let deadline = Instant::now() + STEP;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    while pg.query("stuck", waiting)[0][0].as_deref() != Some("1") {
        assert!(
            Instant::now() < deadline,
            "the central's commit never waited"
        );
        // A poll interval, not a synchronisation: the loop ends on the
        // database's answer.
        std::thread::sleep(Duration::from_millis(20));
    }
    server.proc.signal(Signal::SIGTERM);
    let line = server.proc.wait_for("the store did not close within");
    assert!(
        line.contains("ERROR    action: close_database | result: fail | reason: "),
        "{line}"
    );
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", server.proc.output());
    rt.block_on(client.batch_execute("ROLLBACK")).unwrap();
}

/// Set in the run of [`a_developer_who_is_not_root_gets_a_cluster_of_their_own`]
/// that root starts as another user.
const AS_DEVELOPER: &str = "LOTTERY_PG_TEST_AS_DEVELOPER";

#[test]
fn a_developer_who_is_not_root_gets_a_cluster_of_their_own() {
    const TEST: &str = "a_developer_who_is_not_root_gets_a_cluster_of_their_own";
    if common::pg::running_as_root() && std::env::var_os(AS_DEVELOPER).is_none() {
        // Run as root: this very test runs again as `nobody`, a developer
        // who owns nothing here but a temporary directory.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let Some((uid, gid)) = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0] != "nobody" {
                return None;
            }
            Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
        }) else {
            skipped(TEST, "no user nobody to run as");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).unwrap();
        let out = {
            use std::os::unix::process::CommandExt;
            Command::new(std::env::current_exe().unwrap())
                .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(AS_DEVELOPER, "1")
                .env("TMPDIR", tmp.path())
                .uid(uid)
                .gid(gid)
                .output()
                .unwrap()
        };
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "as nobody:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "as nobody:\n{stdout}\n{stderr}"
        );
        return;
    }
    let Some(pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    let url = pg.create_db("mine");
    let central = central(&url, 1);
    assert_eq!(
        hello(&central.address(), 1),
        format!(
            "STATUS:SUCCESS|MESSAGE:agency 1: resume from bet 0|STORED:0|DIGEST:{}\n",
            Receipt::empty(1).digest
        )
    );
    stop(&central);
}

#[test]
fn a_bad_storage_url_is_a_configuration_error_that_hides_the_password() {
    let cmd = central_command(
        "postgres://lottery:hunter2@db/bets?target_session_attrs=sometimes",
        1,
    );
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let stderr = central.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "invalid SERVER_STORAGE = \"postgres://lottery:***@db/bets?target_session_attrs=sometimes\": not a PostgreSQL URL: "
        ),
        "{stderr}"
    );
    assert!(!format!("{}{stderr}", central.output()).contains("hunter2"));
}

#[test]
fn a_bad_storage_url_in_the_config_file_is_quoted_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[server]\nstorage = \"postgres://lottery:hunter2@db/bets?target_session_attrs=sometimes\"\n",
    )
    .unwrap();
    let mut cmd = lottery();
    cmd.arg("server").env("LOTTERY_CONFIG", &config);
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let stderr = central.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "storage = \"postgres://lottery:***@db/bets?target_session_attrs=sometimes\""
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// `lottery verify` (or another operator tool) on the database at `url`:
/// (exit code, stdout, stderr).
fn tool(what: &str, url: &str, agencies: u32) -> (Option<i32>, String, String) {
    let out = lottery()
        .arg(what)
        .arg("--storage")
        .arg(url)
        .arg("--agencies")
        .arg(agencies.to_string())
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a central on the database at `url` and expects it to refuse to
/// serve: exit 1 before listening. Returns its stderr.
fn refused_start(url: &str, agencies: u32) -> String {
    let proc = Proc::spawn(central_command(url, agencies));
    let status = proc.wait_exit(STEP);
    assert_eq!(
        status.code(),
        Some(1),
        "{}\n{}",
        proc.output(),
        proc.stderr()
    );
    assert!(
        !proc.output().contains("action: listen"),
        "{}",
        proc.output()
    );
    proc.stderr()
}

#[test]
fn verify_the_central_and_new_round_check_a_postgres_round_against_its_rows() {
    let Some((pg, url)) = cluster_with_db("verify_the_central_and_new_round_on_postgres") else {
        return;
    };
    let data = generated(2, 300);
    let expected = expected(data.path(), 2, WINNING);
    assert!(expected.winners.values().all(|w| !w.is_empty()));
    let server = central(&url, 2);
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(600),
    );
    server.proc.wait_for("action: sorteo | result: success");
    // A count edited in table agencies after the draw is not served: the
    // HELLO that would resume from it is refused, naming the sealed count.
    pg.query("lottery", "UPDATE agencies SET stored = 0 WHERE agency = 1");
    let answer = hello(&server.address(), 1);
    assert!(
        answer.starts_with("STATUS:ERROR|")
            && answer.contains("CODE:STORAGE_FAILED")
            && answer.contains("agency 1: table agencies says 0 bets with digest ")
            && answer.contains("but the draw sealed 300 bets with digest "),
        "{answer}"
    );
    pg.query(
        "lottery",
        "UPDATE agencies SET stored = 300 WHERE agency = 1",
    );
    let answer = hello(&server.address(), 1);
    assert!(answer.contains("STORED:300"), "{answer}");
    stop(&server);

    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("the draw record tables draw and draw_agencies matches the stored bets "),
        "{out}"
    );
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    let seal = lottery::receipt::seal(WINNING, 2, &receipts);
    assert!(out.contains(&format!("seal {seal}")), "{out}");

    // Each tampering, on a copy of the database: what verify and a central
    // starting on it say (exit 1 both).
    let cases = [
        (
            "a bet's number changed",
            "UPDATE bets SET number = CASE WHEN number = 1 THEN 2 ELSE 1 END \
             WHERE agency = 1 AND seq = 0",
            "agency 1 digest: the record says ",
        ),
        (
            "a row added",
            "INSERT INTO bets VALUES (2, 300, 'Forged', 'Row', '12345678', '1990-01-01', 7574)",
            "agency 2 count: the record says 300, the stored bets 301",
        ),
        (
            "winners swapped",
            "UPDATE draw_agencies d SET winners = o.winners FROM draw_agencies o \
             WHERE d.agency <> o.agency",
            "agency 1 winners: the record says [",
        ),
        (
            "the draw deleted",
            "DELETE FROM draw_agencies; DELETE FROM draw",
            "missing, but round 1 was sealed on ",
        ),
        (
            "the winning number changed",
            "UPDATE draw SET winning_number = 1234",
            "winning number: the record says 1234, the configuration 7574",
        ),
        // The receipts a restarted agency resumes from: checked against the
        // rows as the record is, or an agency is told it holds nothing.
        (
            "an agency's count zeroed in table agencies",
            "UPDATE agencies SET stored = 0 WHERE agency = 1",
            "agency 1 count: table agencies says 0, the stored bets 300",
        ),
        (
            "an agency's digest replaced in table agencies",
            "UPDATE agencies SET digest = (SELECT digest FROM agencies WHERE agency = 1) \
             WHERE agency = 2",
            "agency 2 digest: table agencies says ",
        ),
        (
            "an agency's row deleted from table agencies",
            "DELETE FROM agencies WHERE agency = 2",
            "agency 2 count: table agencies says 0, the stored bets 300",
        ),
    ];
    for (i, (what, sql, says)) in cases.iter().enumerate() {
        let copy = format!("tampered{i}");
        pg.query(
            "postgres",
            &format!("CREATE DATABASE {copy} TEMPLATE lottery"),
        );
        pg.query(&copy, sql);
        let copy_url = pg.url(&copy);
        let (code, out, err) = tool("verify", &copy_url, 2);
        assert_eq!(code, Some(1), "{what}: verify\n{out}\n{err}");
        assert!(out.contains(says), "{what}: verify says\n{out}");
        let refused = refused_start(&copy_url, 2);
        assert!(
            refused.contains(says),
            "{what}: the central says\n{refused}"
        );
        if i == 0 {
            // A round whose record does not match is not kept as sealed.
            let (code, out, err) = tool("new-round", &copy_url, 2);
            assert_eq!(code, Some(1), "{out}\n{err}");
            assert!(err.contains("does not match the stored bets"), "{err}");
            assert_eq!(
                pg.query(&copy, "SELECT count(*) FROM rounds WHERE kept_as IS NULL"),
                vec![vec![Some("1".to_string())]]
            );
        }
    }

    // A new round keeps this one's rows in tables named by round and seal,
    // and the next central starts empty.
    let (code, out, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let kept = format!("round_1_{}", seal.short());
    assert!(
        out.contains(&format!(
            "round 1 (seal {seal}) kept as table bets_{kept} (receipts in agencies_{kept}) \
             and tables draw_{kept} and draw_agencies_{kept}"
        )),
        "{out}"
    );
    assert_eq!(
        pg.query(
            "lottery",
            &format!("SELECT count(*), min(seq), max(seq) FROM bets_{kept}")
        ),
        vec![vec![
            Some("600".to_string()),
            Some("0".to_string()),
            Some("299".to_string())
        ]]
    );
    assert_eq!(
        pg.query(
            "lottery",
            &format!("SELECT encode(seal, 'hex') FROM draw_{kept}")
        ),
        vec![vec![Some(seal.to_string())]]
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT (SELECT count(*) FROM bets) + (SELECT count(*) FROM agencies) \
             + (SELECT count(*) FROM draw) + (SELECT count(*) FROM draw_agencies)"
        ),
        vec![vec![Some("0".to_string())]]
    );
    assert_eq!(
        pg.query("lottery", "SELECT round, kept_as FROM rounds"),
        vec![vec![Some("1".to_string()), Some(kept.clone())]]
    );
    // Nothing to keep now: said, not an error.
    let (code, out, _) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("round 2 holds no bets and no draw"),
        "{out}"
    );

    // Round 2: the agencies upload from their first bet and a new draw is
    // sealed as round 2.
    let server = central(&url, 2);
    let log = server.proc.output();
    assert!(
        log.contains(&format!("storage: {url} | rows: 0 | agencies: 0")),
        "{log}"
    );
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(600),
    );
    server.proc.wait_for("action: sorteo | result: success");
    stop(&server);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT round, encode(seal, 'hex'), kept_as FROM rounds ORDER BY round"
        )[1],
        vec![Some("2".to_string()), Some(seal.to_string()), None]
    );
}

/// `lottery winners` with `args`, and `env` added to its environment:
/// (exit code, stdout, stderr).
fn winners(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = lottery()
        .arg("winners")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn winners_prints_the_draw_recorded_in_the_database_and_changes_nothing() {
    let Some((pg, url)) = cluster_with_db("winners_prints_the_draw_recorded_in_the_database")
    else {
        return;
    };
    let tables = || {
        pg.query(
            "lottery",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
        )
    };
    // A database no central has used: refused, naming it, and left as it
    // was (no schema created).
    let (code, out, err) = winners(&["--storage", &url], &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("database 127.0.0.1:{}/lottery: ", pg.port)),
        "{err}"
    );
    assert!(!out.contains("winning documents"), "{out}");
    assert_eq!(tables(), vec![vec![Some("0".to_string())]]);

    let data = generated(2, 300);
    let expected = expected(data.path(), 2, WINNING);
    assert!(expected.winners.values().all(|w| !w.is_empty()));
    let server = central(&url, 2);
    let address = server.address();
    let work = tempfile::tempdir().unwrap();
    let one = start_agency(
        1,
        &address,
        &data_file(data.path(), 1),
        &work.path().join("w1.txt"),
    );
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");

    // Bets stored, no draw yet: refused (exit 1), the database named
    // without its password, whether it came from server.storage or
    // --storage.
    let with_password = url.replacen("postgres@", "postgres:hunter2@", 1);
    let refusal = format!(
        "no draw recorded in the database postgres://postgres:***@127.0.0.1:{}/lottery \
         (tables draw and draw_agencies): the draw has not happened yet",
        pg.port
    );
    for (args, env) in [
        (vec![], vec![("SERVER_STORAGE", with_password.as_str())]),
        (vec!["--storage", with_password.as_str()], vec![]),
    ] {
        let (code, out, err) = winners(&args, &env);
        assert_eq!(code, Some(1), "{out}\n{err}");
        assert!(err.contains(&refusal), "{err}");
        assert!(!out.contains("winning documents"), "{out}");
        assert!(!format!("{out}{err}").contains("hunter2"), "{out}\n{err}");
    }

    let two = start_agency(
        2,
        &address,
        &data_file(data.path(), 2),
        &work.path().join("w2.txt"),
    );
    assert!(one.wait_exit(PATIENCE).success());
    assert!(two.wait_exit(PATIENCE).success());
    server.proc.wait_for("action: sorteo | result: success");

    // The draw, against the running central: the exact table, every count,
    // winner and the seal computed from the data files.
    let drawn_at = pg.query("lottery", "SELECT drawn_at FROM draw")[0][0]
        .clone()
        .unwrap();
    let want = expected_winners_table(&expected, 2, WINNING, &drawn_at);
    let (code, out, err) = winners(&[], &[("SERVER_STORAGE", &url)]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out, want);
    // A role that may only read the tables is enough: nothing is written,
    // migrated or created.
    pg.query(
        "lottery",
        "CREATE ROLE reader LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader",
    );
    let reader = url.replacen("postgres@", "reader@", 1);
    let (code, out, err) = winners(&["--storage", &reader], &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out, want);
    stop(&server);
}

#[test]
fn a_database_from_before_receipts_gets_its_digests_from_its_rows_at_open() {
    use lottery::store::postgres::{schema::MIGRATIONS, PostgresStore};
    use lottery::store::{Durability, Store};
    let Some((pg, url)) = cluster_with_db("a_database_from_before_receipts") else {
        return;
    };
    // What a central of schema version 1 left: rows and counts, no digests.
    pg.query(
        "lottery",
        &format!(
            "CREATE TABLE schema_version (version integer PRIMARY KEY); {} \
             INSERT INTO schema_version VALUES (1); \
             INSERT INTO bets SELECT 1, g, 'Ana', 'Pérez', (10 + g)::text, '1999-03-17', 7574 \
             FROM generate_series(0, 2) g; \
             INSERT INTO bets SELECT 2, g, 'Ana', 'Pérez', (20 + g)::text, '1999-03-17', 7574 \
             FROM generate_series(1, 0, -1) g; \
             INSERT INTO agencies (agency, stored) VALUES (1, 3), (2, 2)",
            MIGRATIONS[0]
        ),
    );
    let stored = runtime().block_on(async {
        let (store, stored) = PostgresStore::open(&target(&url), Durability::Sync, STEP)
            .await
            .unwrap();
        store.close().await;
        stored
    });
    // Chained in seq order, not the order the rows were inserted in
    // (agency 2's went in backwards).
    let receipts = BTreeMap::from([
        (1, after(None, 1, &batch(1, 10..13))),
        (2, after(None, 2, &batch(2, 20..22))),
    ]);
    assert_eq!(stored, receipts);
    assert_eq!(stored_receipts(&pg, "lottery"), receipts);
    assert_eq!(
        pg.query("lottery", "SELECT max(version) FROM schema_version"),
        vec![vec![Some(MIGRATIONS.len().to_string())]]
    );
}

#[test]
fn bets_another_central_stored_are_refused_never_removed() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("bets_another_central_stored") else {
        return;
    };
    let rt = runtime();
    // Two centrals on one database, both opened before agency 1 uploads.
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        let first = a
            .submit(&batch(1, 0..3), 0, &Sequence::new(), acked)
            .await
            .unwrap();
        first.await.unwrap();
        // Central B still believes agency 1 holds nothing: refused, twice,
        // and central A's acknowledged rows stay.
        for docs in [10..13, 20..23] {
            let stale = b
                .submit(
                    &batch(1, docs.clone()),
                    0,
                    &Sequence::new(),
                    after(None, 1, &batch(1, docs)),
                )
                .await
                .unwrap();
            let err = stale.await.unwrap_err().to_string();
            assert!(
                err.contains(
                    "agency 1: the table holds 3 of its bets, this central acknowledged 0; \
                     another central on this database stored them"
                ),
                "{err}"
            );
        }
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
             (SELECT encode(digest, 'hex') FROM agencies) FROM bets"
        ),
        vec![vec![
            Some("0@0 1@1 2@2".to_string()),
            Some(acked.digest.to_string())
        ]]
    );
}

/// `addresses` rotated to start at the `first`-th: each agency is given
/// every central, starting with a different one.
fn rotated(addresses: &[String], first: usize) -> String {
    let mut list = addresses.to_vec();
    list.rotate_left(first % addresses.len());
    list.join(",")
}

#[test]
fn three_centrals_six_agencies_one_central_killed_mid_upload_draw_once() {
    let Some((pg, url)) = cluster_with_db("three_centrals_six_agencies") else {
        return;
    };
    let agencies = 6;
    let data = generated(agencies, 20_000);
    let expected = expected(data.path(), agencies, WINNING);
    let centrals: Vec<Server> = (0..3).map(|_| central(&url, agencies)).collect();
    let addresses: Vec<String> = centrals.iter().map(Server::address).collect();
    let out = tempfile::tempdir().unwrap();
    // Agencies 1 and 4 start on the first central, 2 and 5 on the second,
    // 3 and 6 on the third.
    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let list = rotated(&addresses, (id - 1) as usize);
            let agency = start_agency(id, &list, &data_file(data.path(), id), &winners);
            (id, winners, agency)
        })
        .collect();
    // The first central dies once it stored a batch: its agencies move on.
    centrals[0]
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    centrals[0].proc.signal(Signal::SIGKILL);
    let deadline = Instant::now() + upload_limit(120_000) + PATIENCE;
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id} failed: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(
            &read_winners(winners),
            &expected.winners[id],
            "agency {id} winners"
        );
    }
    // Every input bet exactly once, in each agency's order.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM agencies WHERE finished"),
        vec![vec![Some("6".to_string())]]
    );
    // An agency that comes back after the draw, to a central that did not
    // draw, gets its winners at once and stores nothing.
    let late = central(&url, agencies);
    run_agencies(&[2], &late.address(), data.path(), &expected, PATIENCE);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let mut logs = vec![centrals[0].proc.output()];
    logs.extend(centrals[1..].iter().map(stop));
    logs.push(stop(&late));
    let draws: usize = logs
        .iter()
        .map(|log| log.matches("action: sorteo | result: success").count())
        .sum();
    assert_eq!(
        draws,
        1,
        "one draw across the centrals:\n{}",
        logs.join("\n")
    );
    // The survivors and the late central saw nothing go wrong.
    for log in &logs[1..] {
        assert!(!log.contains("result: fail"), "{log}");
    }
    assert!(
        logs[1..3]
            .iter()
            .any(|log| log.contains("state: drawn_by_another_central")),
        "the central that did not draw learned of it:\n{}",
        logs.join("\n")
    );
    assert!(
        logs[3].contains("state: already_drawn") && !logs[3].contains("action: sorteo"),
        "{}",
        logs[3]
    );
}

#[test]
fn an_agency_moving_to_another_central_resumes_there_and_fences_the_old_session() {
    use lottery::store::{Sequence, SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("an_agency_moving_to_another_central") else {
        return;
    };
    let rt = runtime();
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    let first = after(None, 1, &batch(1, 0..3));
    let second = after(Some(first), 1, &batch(1, 3..6));
    rt.block_on(async {
        // A session of agency 1 on central A stores 3 bets.
        let opened = a.open_session(1).await.unwrap();
        assert_eq!(opened.receipt.count, 0);
        let stored = a.submit(&batch(1, 0..3), 0, &Sequence::new(), first);
        stored.await.unwrap().await.unwrap();
        // It moves to central B, which answers HELLO from the table.
        let moved = b.open_session(1).await.unwrap();
        assert_eq!((moved.receipt, moved.finished), (first, false));
        // Agency 2 stores on A in the same group as A's fenced batch.
        a.open_session(2).await.unwrap();
        let fenced = a
            .submit(&batch(1, 3..6), 0, &Sequence::new(), second)
            .await
            .unwrap();
        let other = a
            .submit(
                &batch(2, 0..2),
                0,
                &Sequence::new(),
                after(None, 2, &batch(2, 0..2)),
            )
            .await
            .unwrap();
        let err = fenced.await.unwrap_err().to_string();
        assert!(
            err.contains(
                "agency 1: superseded by a newer session of the agency on another central"
            ),
            "{err}"
        );
        other.await.unwrap();
        // The older session cannot announce the end either.
        let err = a.finish(1, 1).await.unwrap_err().to_string();
        assert!(err.contains("superseded"), "{err}");
        // The newer session stores the rest, nothing twice, and finishes.
        let rest = b.submit(&batch(1, 3..6), 0, &Sequence::new(), second);
        rest.await.unwrap().await.unwrap();
        assert_eq!(b.finish(1, 1).await.unwrap(), 1);
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, string_agg(document || '@' || seq, ' ' ORDER BY seq) FROM bets \
             GROUP BY agency ORDER BY agency"
        ),
        vec![
            vec![Some("1".into()), Some("0@0 1@1 2@2 3@3 4@4 5@5".into())],
            vec![Some("2".into()), Some("0@0 1@1".into())],
        ]
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, stored, epoch, finished FROM agencies ORDER BY agency"
        ),
        vec![
            vec![
                Some("1".into()),
                Some("6".into()),
                Some("2".into()),
                Some("t".into())
            ],
            vec![
                Some("2".into()),
                Some("2".into()),
                Some("1".into()),
                Some("f".into())
            ],
        ]
    );
}

#[test]
fn a_session_superseded_on_another_central_stores_nothing_more() {
    let Some((pg, url)) = cluster_with_db("a_session_superseded_on_another_central") else {
        return;
    };
    let (a, b) = (central(&url, 2), central(&url, 2));
    let bet = |doc: u32| {
        format!(
            "NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|NACIMIENTO:1999-03-17\\|\
             NUMERO:7574\\|AGENCY_ID:1"
        )
    };
    let batch = |first: u32| {
        format!(
            "BATCH_SIZE:2|FIRST:{first}|BET_1:{}|BET_2:{}\n",
            bet(first),
            bet(first + 1)
        )
    };
    // Agency 1 opens a session on central A and stores two bets there.
    let mut old = connect(&a.address());
    let welcome = exchange(&mut old, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(welcome.contains("|STORED:0|"), "{welcome}");
    let stored = exchange(&mut old, &batch(0));
    assert!(stored.starts_with("STATUS:SUCCESS"), "{stored}");
    // It moves to central B, which answers from the table.
    let mut new = connect(&b.address());
    let welcome = exchange(&mut new, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(welcome.contains("|STORED:2|"), "{welcome}");
    // The older session on A is fenced: refused, nothing stored.
    let refused = exchange(&mut old, &batch(2));
    assert!(
        refused.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|")
            && refused.contains(
                "agency 1: superseded by a newer session of the agency on another central"
            ),
        "{refused}"
    );
    a.proc.wait_for("action: store | result: fail");
    let refused = exchange(&mut old, "ACTION:BETTING_FINISHED|AGENCY_ID:1\n");
    assert!(refused.contains("superseded"), "{refused}");
    // The newer one goes on from bet 2.
    let stored = exchange(&mut new, &batch(2));
    assert!(stored.starts_with("STATUS:SUCCESS"), "{stored}");
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
             (SELECT finished::text FROM agencies WHERE agency = 1) FROM bets"
        ),
        vec![vec![Some("0@0 1@1 2@2 3@3".into()), Some("false".into())]]
    );
    drop((old, new));
    stop(&a);
    stop(&b);
}

#[test]
fn the_last_two_announcements_on_two_centrals_at_once_count_every_agency() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("the_last_two_announcements") else {
        return;
    };
    let rt = runtime();
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    rt.block_on(async {
        a.open_session(1).await.unwrap();
        b.open_session(2).await.unwrap();
    });
    for round in 0..20 {
        // Whichever commits second must see the other's announcement, or
        // neither central would draw.
        let (one, two) = rt.block_on(async { tokio::join!(a.finish(1, 2), b.finish(2, 2)) });
        let (one, two) = (one.unwrap(), two.unwrap());
        assert_eq!(one.max(two), 2, "round {round}: {one}, {two}");
        pg.query("lottery", "UPDATE agencies SET finished = false");
    }
    rt.block_on(async {
        a.close().await;
        b.close().await;
    });
}

/// An agency above the configured number that finished (a row left by a
/// central configured for more agencies) is not one of this lottery's: it
/// neither completes the set early nor keeps it from completing.
#[test]
fn only_the_configured_agencies_count_as_finished() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("only_the_configured_agencies_count") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    pg.query(
        "lottery",
        "INSERT INTO agencies (agency, finished) VALUES (7, true)",
    );
    let counts: Vec<u32> = rt.block_on(async {
        let mut counts = Vec::new();
        for agency in 1..=3 {
            store.open_session(agency).await.unwrap();
            counts.push(store.finish(agency, 3).await.unwrap());
        }
        store.close().await;
        counts
    });
    assert_eq!(counts, [1, 2, 3]);
}

#[test]
fn an_agency_waiting_on_one_central_is_told_who_finished_on_the_others() {
    let Some((_pg, url)) = cluster_with_db("an_agency_waiting_on_one_central") else {
        return;
    };
    let (a, b) = (central(&url, 3), central(&url, 3));
    let finish = |address: &str, agency: u32| {
        let mut stream = connect(address);
        let welcome = exchange(&mut stream, &format!("ACTION:HELLO|AGENCY_ID:{agency}\n"));
        assert!(welcome.starts_with("STATUS:SUCCESS"), "{welcome}");
        send(
            &mut stream,
            &format!("ACTION:BETTING_FINISHED|AGENCY_ID:{agency}\n"),
        );
        stream
    };
    let _one = finish(&a.address(), 1);
    a.proc
        .wait_for("action: agencia_finalizada | result: success");
    let mut two = finish(&b.address(), 2);
    // Agency 1 finished on the other central: counted.
    assert_eq!(
        receive(&mut two),
        "STATUS:WAITING|MESSAGE:waiting for the draw: 2 of 3 agencies finished\n"
    );
    let _ = (stop(&a), stop(&b));
}

/// An operator may ask any central: with a shared database, `lottery
/// status` shows what every central stored and who finished anywhere.
#[test]
fn status_on_any_central_shows_the_agencies_of_every_central() {
    let Some((_pg, url)) = cluster_with_db("status_on_any_central") else {
        return;
    };
    let data = generated(2, 700);
    let (a, b) = (central(&url, 3), central(&url, 3));
    let out = tempfile::tempdir().unwrap();
    let one = start_agency(
        1,
        &a.address(),
        &data_file(data.path(), 1),
        &out.path().join("w1.txt"),
    );
    a.proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");
    let status = lottery()
        .args(["status", "--address", &b.address()])
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status,
        "agency   bets held  state\n     1         700  finished\n     2           0  waiting\n     \
         3           0  waiting\n total         700\n1 of 3 agencies finished; draw pending\n"
    );
    drop(one);
    let _ = (stop(&a), stop(&b));
}

#[test]
fn the_primary_killed_and_its_synchronous_standby_promoted_loses_no_acknowledged_bet() {
    let Some(mut primary) = PgCluster::start_or_skip("the_primary_killed_and_its_standby_promoted")
    else {
        return;
    };
    primary.create_db("lottery");
    let standby = primary.standby();
    primary.wait_for_sync_standby();
    // Both hosts: the central connects to whichever accepts writes.
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/lottery?target_session_attrs=read-write",
        common::pg::SUPERUSER,
        primary.port,
        standby.port
    );
    let agencies = 4;
    let data = generated(agencies, 8_000);
    let expected = expected(data.path(), agencies, WINNING);
    let server = central(&url, agencies);
    let out = tempfile::tempdir().unwrap();
    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let mut cmd =
                agency_command(id, &server.address(), &data_file(data.path(), id), &winners);
            // Small batches, so that the upload is still under way.
            cmd.env("CLI_BATCH_MAXAMOUNT", "20");
            (id, winners, Proc::spawn(cmd))
        })
        .collect();
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    primary.stop_with(Signal::SIGKILL);
    server
        .proc
        .wait_for("action: apuesta_recibida | result: fail");
    // Before the promotion nothing writes to the standby: every batch the
    // central acknowledged so far (committed on the primary, so flushed on
    // the synchronous standby) must be there already.
    let acknowledged: u64 = server
        .proc
        .output()
        .lines()
        .filter_map(|l| {
            l.split("apuesta_recibida | result: success | cantidad: ")
                .nth(1)
        })
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum();
    let on_standby: u64 = standby.query("lottery", "SELECT count(*) FROM bets")[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        acknowledged > 0 && on_standby >= acknowledged,
        "{acknowledged} bets acknowledged, {on_standby} on the standby"
    );
    // What an operator or a failover manager does.
    standby.promote();
    let deadline = Instant::now() + upload_limit(32_000) + PATIENCE;
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id}: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(&read_winners(winners), &expected.winners[id], "agency {id}");
    }
    server.proc.wait_for("action: sorteo | result: success");
    // Every input bet on the new primary, once, in each agency's order.
    assert_eq!(stored_rows(&standby, "lottery"), expected.rows);
    let counts: BTreeMap<u32, usize> = expected.rows.iter().map(|(a, r)| (*a, r.len())).collect();
    assert_eq!(agency_counts(&standby, "lottery"), counts);
    let log = stop(&server);
    assert!(log.contains("state: reconnected"), "{log}");
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
}

/// The load tool against the database with several centrals: every bet of
/// every agency stored once, whichever central it went through, and one
/// draw reported.
#[test]
fn bench_with_three_centrals_stores_every_bet_once_and_reports_one_draw() {
    let Some((pg, url)) = cluster_with_db("bench_with_three_centrals") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let out = lottery()
        .args(["bench", "--agencies", "4", "--bets-per-agency", "1500"])
        .args(["--storage", &url, "--centrals", "3"])
        .arg("--work-dir")
        .arg(work.path())
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(
            "4 agencies x 1500 bets, window 8, 3 centrals, durable acknowledgements \
             (PostgreSQL, synchronous commit)"
        ),
        "{report}"
    );
    assert!(report.contains("6000 bets in "), "{report}");
    assert!(report.contains("reconnects: 0, "), "{report}");
    let expected = expected(&work.path().join("data"), 4, WINNING);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM draw"),
        vec![vec![Some("1".to_string())]]
    );
}

#[test]
fn bench_centrals_need_a_database() {
    let out = lottery()
        .args(["bench", "--centrals", "2"])
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--storage"), "{err}");
}

/// An agency that never said HELLO has no row in `agencies` until its
/// first batch's transaction makes one: batches of it in groups in flight
/// one behind the other are each stored after the last, not refused.
#[test]
fn a_new_agency_s_batches_in_groups_one_behind_the_other_are_all_stored() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("a_new_agency_s_batches_in_groups") else {
        return;
    };
    runtime().block_on(async {
        let store = open_store(&url).await;
        let sequence = Sequence::new();
        let mut receipt = None;
        let mut pending = Vec::new();
        for i in 0..12u32 {
            let bets = batch(7, i * 10..i * 10 + 10);
            let next = after(receipt, 7, &bets);
            receipt = Some(next);
            pending.push(store.submit(&bets, 0, &sequence, next).await.unwrap());
            // Each batch a group of its own, started before the last commits.
            tokio::task::yield_now().await;
        }
        for (i, stored) in pending.into_iter().enumerate() {
            stored
                .await
                .unwrap_or_else(|e| panic!("batch {i} refused: {e}"));
        }
        store.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq), \
                    (SELECT stored FROM agencies WHERE agency = 7) FROM bets"
        ),
        vec![vec![
            Some("120".to_string()),
            Some("120".to_string()),
            Some("0".to_string()),
            Some("119".to_string()),
            Some("120".to_string())
        ]]
    );
}

/// Two centrals storing the first bets of the same agency at once (an
/// agency that never said HELLO, so no session fences either): one is
/// stored, the other refused, never both: nothing in the table but the
/// writers' check keeps a `seq` from being written twice.
#[test]
fn two_centrals_storing_a_new_agency_s_first_bets_at_once_store_them_once() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("two_centrals_storing_a_new_agency") else {
        return;
    };
    let outcomes = runtime().block_on(async {
        let one = open_store(&url).await;
        let two = open_store(&url).await;
        let mut outcomes = Vec::new();
        for round in 0..5u32 {
            let agency = 10 + round;
            let bets = batch(agency, 0..50);
            let receipt = after(None, agency, &bets);
            let a = one
                .submit(&bets, 0, &Sequence::new(), receipt)
                .await
                .unwrap();
            let b = two
                .submit(&bets, 0, &Sequence::new(), receipt)
                .await
                .unwrap();
            let (a, b) = futures::join!(a, b);
            outcomes.push((agency, a.is_ok(), b.is_ok()));
        }
        one.close().await;
        two.close().await;
        outcomes
    });
    for (agency, a, b) in outcomes {
        assert!(a || b, "agency {agency}: neither central stored its bets");
        assert!(
            !(a && b),
            "agency {agency}: both centrals acknowledged its bets"
        );
        assert_eq!(
            pg.query(
                "lottery",
                &format!(
                    "SELECT count(*), count(DISTINCT seq), \
                     (SELECT stored FROM agencies WHERE agency = {agency}) \
                     FROM bets WHERE agency = {agency}"
                )
            ),
            vec![vec![
                Some("50".to_string()),
                Some("50".to_string()),
                Some("50".to_string())
            ]],
            "agency {agency}"
        );
    }
}

/// `lottery new-round` on a database a central is still connected to is
/// refused, naming why; once the central is stopped it goes on.
#[test]
fn new_round_waits_for_the_centrals_to_stop() {
    let Some((_pg, url)) = cluster_with_db("new_round_waits_for_the_centrals") else {
        return;
    };
    let server = central(&url, 2);
    let (code, _, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("of a running central (from 127.0.0.1) are open on this database: a new round starts with every central stopped"),
        "{err}"
    );
    let _ = stop(&server);
    let (code, out, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// Every agency's announcement is in the table but no draw is recorded:
/// the central that was drawing died before its commit. Any central draws
/// then, without waiting for an agency to announce again.
#[test]
fn every_agency_finished_and_no_draw_recorded_makes_a_central_draw() {
    let Some((pg, url)) = cluster_with_db("every_agency_finished_and_no_draw") else {
        return;
    };
    // The schema, then the state a central that died mid-draw leaves.
    let first = central(&url, 2);
    let _ = stop(&first);
    pg.query(
        "lottery",
        "INSERT INTO agencies (agency, finished) VALUES (1, true), (2, true)",
    );
    let server = central(&url, 2);
    server
        .proc
        .wait_for("action: sorteo | result: success | winning_number: 7574 | bets: 0");
    assert_eq!(
        pg.query("lottery", "SELECT count(*), max(bets) FROM draw"),
        vec![vec![Some("1".to_string()), Some("0".to_string())]]
    );
    let _ = stop(&server);
}

/// A row taken out of `bets` behind the centrals' back: the draw must be
/// refused, not recorded over fewer bets than were acknowledged.
#[test]
fn a_draw_over_fewer_bets_than_were_acknowledged_is_refused() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("a_draw_over_fewer_bets_than_were_acknowledged") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    rt.block_on(async {
        let bets = batch(1, 0..3);
        store_batch(&store, &bets, after(None, 1, &bets))
            .await
            .unwrap();
    });
    pg.query("lottery", "DELETE FROM bets WHERE seq = 2");
    let err = rt.block_on(async {
        let drawn = store.draw_once(WINNING, 1).await;
        store.close().await;
        drawn.unwrap_err().to_string()
    });
    assert!(
        err.contains(
            "the stored bets differ from what was acknowledged \
             (agency 1: 2 in the store, 3 acknowledged); nothing was recorded"
        ),
        "{err}"
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT (SELECT count(*) FROM draw), (SELECT count(*) FROM rounds)"
        ),
        vec![vec![Some("0".into()), Some("0".into())]]
    );
}

/// Three centrals asking for the draw at once, then again one after the
/// other (and a central started afterwards): one draw is recorded, and
/// every call answers with it.
#[test]
fn the_draw_runs_once_whichever_centrals_ask_together_or_in_turn() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("the_draw_runs_once_whichever_centrals_ask") else {
        return;
    };
    let rt = runtime();
    let centrals: Vec<_> = (0..3).map(|_| rt.block_on(open_store(&url))).collect();
    let draws = rt.block_on(async {
        let bets = batch(1, 0..3);
        store_batch(&centrals[0], &bets, after(None, 1, &bets))
            .await
            .unwrap();
        let together =
            futures::future::join_all(centrals.iter().map(|c| c.draw_once(WINNING, 1))).await;
        let mut draws: Vec<_> = together
            .into_iter()
            .map(|d| d.expect("every central gets the draw"))
            .collect();
        for c in &centrals {
            draws.push(c.draw_once(WINNING, 1).await.expect("the recorded draw"));
        }
        let late = open_store(&url).await;
        draws.push(late.draw_once(WINNING, 1).await.expect("the recorded draw"));
        late.close().await;
        for c in &centrals {
            c.close().await;
        }
        draws
    });
    assert_eq!(
        draws.iter().filter(|(_, ran)| *ran).count(),
        1,
        "one central runs the draw"
    );
    let (first, _) = &draws[0];
    assert_eq!(first.winners_of(1), ["0", "1", "2"]);
    for (draw, _) in &draws {
        assert_eq!(
            (draw.seal, &draw.winners, draw.bets),
            (first.seal, &first.winners, 3)
        );
    }
    assert_eq!(
        pg.query("lottery", "SELECT count(*), max(bets) FROM draw"),
        vec![vec![Some("1".into()), Some("3".into())]]
    );
}

/// The path where an agency keeps the seal its winners came with: beside
/// its data file.
fn kept_seal(data: &Path, agency: u32) -> std::path::PathBuf {
    let mut name = data_file(data, agency).into_os_string();
    name.push(".seal");
    name.into()
}

/// A consistent forgery: one agency's row edited, its receipt in
/// `agencies` recomputed to match, the draw and the ledger deleted. The
/// central draws it again and `verify` agrees with it, but an agency that
/// kept the round's first seal exits 3, and `verify --seal` with the
/// published seal exits 1.
#[test]
fn a_consistent_forgery_is_caught_by_the_kept_seal_and_verify_seal() {
    let Some((pg, url)) = cluster_with_db("a_consistent_forgery_on_postgres") else {
        return;
    };
    let data = generated(2, 200);
    let expected = expected(data.path(), 2, WINNING);
    let server = central(&url, 2);
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(400),
    );
    server.proc.wait_for("action: sorteo | result: success");
    stop(&server);
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    let published = lottery::receipt::seal(WINNING, 2, &receipts);
    for agency in [1, 2] {
        let kept = std::fs::read_to_string(kept_seal(data.path(), agency)).unwrap();
        assert!(
            kept.contains(&format!("seal = \"{published}\"")),
            "agency {agency} kept\n{kept}"
        );
    }

    // The forgery, consistent throughout the database.
    pg.query(
        "lottery",
        "UPDATE bets SET number = CASE WHEN number = 1 THEN 2 ELSE 1 END \
         WHERE agency = 1 AND seq = 0",
    );
    let mut forged = Receipt::empty(1);
    for row in &stored_rows(&pg, "lottery")[&1] {
        let texts = [&row[1], &row[2], &row[3], &row[4]].map(|t| t.as_bytes());
        forged.push(texts, row[5].parse().unwrap());
    }
    pg.query(
        "lottery",
        &format!(
            "UPDATE agencies SET digest = decode('{}', 'hex') WHERE agency = 1; \
             DELETE FROM draw_agencies; DELETE FROM draw; DELETE FROM rounds",
            forged.digest
        ),
    );
    // Every agency finished and no draw: the central draws at once.
    let server = central(&url, 2);
    server.proc.wait_for("action: sorteo | result: success");
    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(0), "the forgery is consistent\n{out}\n{err}");
    let resealed = lottery::receipt::seal(
        WINNING,
        2,
        &BTreeMap::from([(1, forged), (2, receipts[&2])]),
    );
    assert!(out.contains(&format!("seal {resealed}")), "{out}");

    // The published seal, checked by anyone.
    let check = |seal: &str| {
        let out = lottery()
            .args([
                "verify",
                "--storage",
                &url,
                "--agencies",
                "2",
                "--seal",
                seal,
            ])
            .env("LOTTERY_CONFIG", "/dev/null")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(&published.to_string());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "differs: seal: the published seal is {published}, the stored bets give {resealed}"
        )),
        "{out}"
    );
    let (code, out) = check(&resealed.to_string());
    assert_eq!(code, Some(0), "{out}");

    // The untouched agency, run again, compares the seal it kept.
    let winners = data.path().join("winners-2-again.txt");
    let agency = start_agency(2, &server.address(), &data_file(data.path(), 2), &winners);
    let status = agency.wait_exit(PATIENCE);
    assert_eq!(
        status.code(),
        Some(3),
        "{}\n{}",
        agency.output(),
        agency.stderr()
    );
    let said = agency.stderr();
    assert!(
        said.contains(&format!("the central sealed this round as {resealed}"))
            && said.contains(&format!("this agency was given {published}")),
        "{said}"
    );
    assert!(!winners.exists(), "no winners are reported");
    assert!(
        !agency.output().contains("consulta_ganadores"),
        "{}",
        agency.output()
    );
    stop(&server);
}
