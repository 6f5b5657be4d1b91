//! [`StorageError`]: what the seam's methods fail with, whichever backend
//! keeps the bets, each variant printing what that backend holds.

use std::fmt;
use std::io;
use std::path::PathBuf;

/// A failure of the store, whichever backend keeps the bets.
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
    #[error("database {target}: {source}")]
    Database {
        /// `host:port,…/dbname`.
        target: String,
        /// What failed: the backend's own typed error (the PostgreSQL
        /// store's `PgError`, which links the driver's).
        source: Box<dyn std::error::Error + Send + Sync>,
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
    #[error("{0} is closed")]
    Closed(Backend),
    /// The draw record (or the rounds ledger) says something the store
    /// cannot accept: a sealed round's record missing or replaced.
    #[error("draw record {kept}: {reason}")]
    Record {
        /// The record (or ledger).
        kept: RecordAt,
        /// What is wrong.
        reason: String,
    },
}

/// Which backend a [`StorageError::Closed`] comes from, for its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The bets file.
    File,
    /// A PostgreSQL database.
    Database,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::File => "the bets file",
            Backend::Database => "the database",
        })
    }
}

/// Where a draw record is kept, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordAt {
    /// A record file (or the ledger of rounds beside it).
    File(PathBuf),
    /// A database's tables: its hosts and database, never a password.
    Tables(String),
}

impl fmt::Display for RecordAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordAt::File(path) => write!(f, "{}", path.display()),
            RecordAt::Tables(target) => {
                write!(f, "{target} (tables draw, draw_agencies, rounds)")
            }
        }
    }
}
