//! The storage seam as the central sees it, the same for each backend: what
//! a closed store answers.

mod common;

use std::time::Duration;

use common::pg::PgCluster;
use lottery::model::Bets;
use lottery::receipt::Receipt;
use lottery::store::{self, Durability, Options, Sequence, Storage};

/// Opens the store `storage` names, as a central opens it.
async fn open(storage: Storage, record: Option<std::path::PathBuf>) -> store::Opened {
    let options = Options {
        storage,
        record,
        durability: Durability::Sync,
        patience: Duration::from_secs(10),
    };
    store::open(&options).await.unwrap()
}

/// What a batch handed to `opened` after it was closed fails with.
async fn refused_after_close(opened: store::Opened) -> String {
    opened.store.close().await;
    let mut bets = Bets::new();
    bets.push_fields("1", "Ana", "Pérez", "30904465", "1999-03-17", "7574")
        .unwrap();
    let receipt = Receipt::empty(1).after(bets.iter());
    let refused = match opened
        .store
        .submit(&bets, 0, &Sequence::new(), receipt)
        .await
    {
        Ok(stored) => stored.await.unwrap_err(),
        Err(e) => e,
    };
    refused.to_string()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_closed_bets_file_says_the_bets_file_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let bets = dir.path().join("bets.csv");
    let record = Some(dir.path().join("bets.draw.toml"));
    let said = runtime()
        .block_on(async { refused_after_close(open(Storage::File(bets), record).await).await });
    assert_eq!(said, "the bets file is closed");
}

#[test]
fn a_closed_database_says_the_database_is_closed() {
    let Some(pg) = PgCluster::start_or_skip("a_closed_database_says_the_database_is_closed") else {
        return;
    };
    let url = pg.create_db("lottery");
    let said = runtime()
        .block_on(async { refused_after_close(open(url.parse().unwrap(), None).await).await });
    assert_eq!(said, "the database is closed");
}
