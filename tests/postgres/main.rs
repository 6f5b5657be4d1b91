//! The PostgreSQL store against a real cluster (see `common::pg`): each
//! test starts its own throwaway cluster, or says that it skipped. What is
//! checked is what an operator and the agencies depend on: the rows of
//! `bets` (compared with the input files), each agency's winners, the
//! central's log lines and exit codes.
//!
//! The tests stand in one module per subject (`store`, `one_central`,
//! `several_centrals`, `failover`, `tools`); the helpers they share are
//! here.

mod admin;
mod close;
#[path = "../common/mod.rs"]
mod common;
mod failover;
mod one_central;
mod several_centrals;
mod store;
mod tools;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pg::{CommitRelay, Lose, PgCluster};
use common::*;
use lottery::receipt::Receipt;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

const WINNING: u16 = 7574;

fn generated(agencies: u32, bets_per_agency: u64) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies,
        bets_per_agency,
        seed: 1300 + u64::from(agencies),
        winning_number: WINNING,
        winner_share: 0.01,
        // Names with commas, quotes, `|`, `:`, `\` and accents.
        tricky_share: 0.05,
        crlf: false,
    })
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

fn connect(address: &str) -> Raw {
    Raw::connect_within(address, STEP)
}

/// Sends one frame holding `payload` and returns the next reply's payload
/// that is not a still-waiting frame.
fn exchange(stream: &mut Raw, payload: &str) -> String {
    stream.send(payload);
    loop {
        let body = stream.reply();
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
