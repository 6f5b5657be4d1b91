//! [`Options`]: what the store is handed to open, resolved from the
//! configuration when it is loaded, so the store never reads the settings
//! itself (the configuration names a store; the store knows nothing of the
//! configuration).

use std::path::PathBuf;
use std::time::Duration;

use super::target::Storage;

/// Whether an acknowledgement waits for the rows to reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` once per group of batches before any of them is
    /// acknowledged: an acknowledged bet survives a crash of the machine.
    Sync,
    /// Acknowledge once the rows are in the operating system's page cache:
    /// they survive a crash of the server process, not of the machine. For
    /// measurements and throwaway runs.
    NoSync,
}

impl Options {
    /// Where a bets file's close of sales is kept: beside it, its
    /// extension replaced (`bets.csv` -> `bets.close.toml`); `None` for a
    /// database, which keeps it in a table.
    pub fn file_close(&self) -> Option<PathBuf> {
        match &self.storage {
            Storage::File(bets) => Some(bets.with_extension("close.toml")),
            Storage::Postgres(_) => None,
        }
    }
}

/// Where the store is and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The bets file, or the database.
    pub storage: Storage,
    /// The draw record of a bets file; `None` for a database, which keeps
    /// the record in its tables.
    pub record: Option<PathBuf>,
    /// Whether an acknowledgement waits for stable storage.
    pub durability: Durability,
    /// How long a database may take to answer at start, retried with
    /// backoff, before the central gives up.
    pub patience: Duration,
}

impl Options {
    /// The draw record's path of a bets file.
    pub(crate) fn file_record(&self) -> PathBuf {
        self.record
            .clone()
            .expect("a bets file has a draw record path")
    }
}
