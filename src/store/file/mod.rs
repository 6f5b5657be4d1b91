//! The bets file backend: append-only CSV, one row per stored bet,
//! `agency,first_name,last_name,document,birthdate,number`.
//!
//! - [`row`]: the row format: the encoder, the one reader and the one row
//!   check that recovery, the draw and the tools share.
//! - [`writer`]: the writer thread: group commit, acknowledged after the sync.
//! - [`recover`](mod@recover): the check on start that cuts a torn last row.
//! - [`tally`](mod@tally): the draw's tally, in two halves for large files.
//! - `lock`: one central at a time on a bets file.
//! - `record`: the draw record; [`rounds`]: the ledger of sealed rounds and
//!   `lottery new-round`; `store`: all of it behind [`crate::store::Store`].

use std::io;
use std::path::PathBuf;

mod lock;
mod record;
pub mod recover;
pub mod rounds;
pub mod row;
mod store;
pub mod tally;
pub mod writer;

pub use record::{load_record, save_record};
pub use recover::{recover, Recovered};
pub use row::{encode_rows, read_rows, StoredBet};
pub use store::FileStore;
pub use tally::{recompute, tally};
pub use writer::{BetStore, Pending};

/// A failure of the bets file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Opening, writing or flushing failed.
    #[error("bets file {path}: {source}")]
    Io {
        /// The bets file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A stored row cannot be read back.
    #[error("bets file {path}, row {row}: {reason}")]
    Corrupt {
        /// The bets file.
        path: PathBuf,
        /// 1-based row number.
        row: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing or syncing failed; nothing of the batch was kept.
    #[error("bets file {path}: {reason}")]
    Write {
        /// The bets file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The database could not be reached, or failed a statement; `target`
    /// names its hosts and database, never a password.
    #[error("database {target}: {reason}")]
    Database {
        /// `host:port,…/dbname`.
        target: String,
        /// What failed.
        reason: String,
    },
    /// The storage URL lacks what the database asks for (a password): a
    /// configuration error (exit code 2), not retried.
    #[error("database {target}: {reason}")]
    DatabaseConfig {
        /// `host:port,…/dbname`.
        target: String,
        /// What is missing, and where to put it.
        reason: String,
    },
    /// The writer has stopped (the server is shutting down).
    #[error("the bets file is closed")]
    Closed,
    /// The draw record (or the rounds ledger) says something the store
    /// cannot accept: a sealed round's record missing or replaced.
    #[error("draw record {path}: {reason}")]
    Record {
        /// The record (or ledger).
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A method only a store shared by several centrals has was called on
    /// one that is not ([`crate::store::Store::shared`]): a bug.
    #[error("this store is not shared by several centrals")]
    Unshared,
}
