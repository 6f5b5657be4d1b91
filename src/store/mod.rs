//! The storage seam: everything the central keeps goes through [`Store`]:
//! batches appended durably, the bets counted per agency at start, the
//! draw's tally, and the draw record.
//!
//! The server and the lottery hold an `Arc<dyn Store>` and never learn which
//! backend is behind it; [`open`] picks one from `server.storage`
//! ([`Storage`]): the bets file ([`file`](mod@file)), the embedded default,
//! or a PostgreSQL database ([`postgres`]). Another backend is a module here
//! and an arm in [`open`], with nothing to change in the server, the wire or
//! the agency.

mod error;
pub mod file;
pub mod metrics;
pub mod options;
pub mod postgres;
pub mod target;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::close::SalesClose;
use crate::model::{AgencyId, Bets};
use crate::receipt::{Digest, Receipt, Recomputed};

pub use error::{Backend, RecordAt, StorageError};
pub use metrics::{StoreMetrics, WriterMetrics};
pub use options::{Durability, Options};
pub use target::{PgTarget, Storage};

/// The outcome of one submitted batch: resolves once its bets are stored
/// (durably, unless the store was opened without syncing) or refused.
pub type Stored = BoxFuture<'static, Result<(), StorageError>>;

/// What the central keeps, whatever keeps it.
///
/// Every method that waits returns a boxed future so the trait can be used
/// as `dyn Store`; a box per batch is noise beside the batch's own work.
pub trait Store: Send + Sync + fmt::Debug {
    /// Where the bets are, for log lines (a path, or a URL without its
    /// password).
    fn describe(&self) -> String;

    /// Hands `bets` (from their `skip`-th on) to the store after the
    /// earlier batches of `sequence`, and returns once they are queued (it
    /// waits only while the store's queue is full). Await the returned
    /// [`Stored`] for the outcome.
    ///
    /// Ordering: batches of one sequence are stored in the order they were
    /// submitted, and once one fails every later one fails too without
    /// being stored.
    ///
    /// `receipt` is the agency's receipt once these bets are stored: a
    /// store that keeps receipts (a database row) writes it together with
    /// the bets; the bets file recomputes receipts when it is opened
    /// instead, and ignores it.
    ///
    /// # Errors
    /// The store is closed.
    fn submit<'a>(
        &'a self,
        bets: &Bets,
        skip: usize,
        sequence: &Sequence,
        receipt: Receipt,
    ) -> BoxFuture<'a, Result<Stored, StorageError>>;

    /// Reads every stored bet back and tallies the draw of
    /// `winning_number`: bets per agency and each agency's winners in the
    /// order they were stored.
    ///
    /// # Errors
    /// The bets cannot be read back, or one of them is damaged.
    fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>>;

    /// Recomputes, from the stored bets alone (read in the stored order,
    /// never from what was counted while storing), each agency's receipt
    /// and its winners for `winning_number`: what the central compares with
    /// a draw record when it starts on a drawn round.
    ///
    /// # Errors
    /// The bets cannot be read back, or one of them is damaged.
    fn recompute(&self, winning_number: u16) -> BoxFuture<'_, Result<Recomputed, StorageError>>;

    /// The recorded draw, if the draw already happened.
    ///
    /// # Errors
    /// A record exists but cannot be read.
    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>>;

    /// Records the draw for good (all or nothing) before any agency learns
    /// of it.
    ///
    /// # Errors
    /// The record could not be written durably.
    fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>>;

    /// Stores what was submitted before, flushes and closes; later
    /// submissions fail with [`StorageError::Closed`].
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Closes sales for good, at one point in the order of the batches:
    /// every batch stored before it is in the draw, every batch after it
    /// is refused with [`StorageError::SalesClosed`] and not stored, and
    /// none is both. The close is kept before this returns, so a store
    /// opened later hands it back ([`Store::load_close`]). Returns the
    /// close in force and whether it is `close`: sales closed already
    /// (from another central, or by an earlier call) keep the first one.
    ///
    /// # Errors
    /// The close could not be kept; sales are then still open.
    fn close_sales<'a>(
        &'a self,
        close: &'a ClosedRound,
    ) -> BoxFuture<'a, Result<(ClosedRound, bool), StorageError>>;

    /// The close of sales kept, if sales were closed.
    ///
    /// # Errors
    /// A close is kept but cannot be read.
    fn load_close(&self) -> BoxFuture<'_, Result<Option<ClosedRound>, StorageError>>;

    /// The log action that says this store was closed (or could not be):
    /// `close_bets_file`, or `close_database` for a database.
    fn close_action(&self) -> &'static str {
        crate::logging::action::CLOSE_BETS_FILE
    }

    /// This store as one that other centrals share (a database), or
    /// `None` for one only this process uses (the bets file). Asked once,
    /// when the lottery starts: with `None` its in-memory state is the
    /// truth and nothing is added to its hot path; with a shared store what
    /// it keeps in memory is only a cache, and [`SharedStore`] is the truth.
    fn into_shared(self: Arc<Self>) -> Option<Arc<dyn SharedStore>> {
        None
    }

    /// Where the receipts handed back by [`open`] (and served to agencies
    /// that resume) are kept, for messages: a store that keeps them apart
    /// from its bets (a database table) has them checked against its bets
    /// when the round is drawn.
    fn served_from(&self) -> &'static str {
        "the receipts read when the store opened"
    }

    /// What the store measures about its commits (handles to its own
    /// counters; a store that measures nothing hands back fresh ones that
    /// stay at zero).
    fn metrics(&self) -> StoreMetrics {
        StoreMetrics::default()
    }
}

/// What only a store shared by several centrals does: the sessions, the
/// finished agencies and the one draw, held for every central at once.
/// [`Store::into_shared`] hands it over, so a store that is not shared has
/// none of these methods at all.
pub trait SharedStore: Store {
    /// Opens a new session of `agency` (a `HELLO`) on this
    /// central, fencing every older session of it on any central (their
    /// later batches fail), and returns what the store holds for it.
    ///
    /// # Errors
    /// The store could not be reached.
    fn open_session(&self, agency: AgencyId) -> BoxFuture<'_, Result<Agency, StorageError>>;

    /// Records for good that `agency` finished, and returns
    /// how many of the lottery's agencies (`1..=agencies`) have finished,
    /// on every central. A row of an agency above them (left by a central
    /// configured for more) would otherwise complete the set early.
    ///
    /// # Errors
    /// The store could not be reached, or a newer session of the agency
    /// opened on another central.
    fn finish(&self, agency: AgencyId, agencies: u32) -> BoxFuture<'_, Result<u32, StorageError>>;

    /// What every central stored for each of agencies
    /// `1..=agencies` that stored bets or finished (its count, and whether
    /// it finished): the operator's view of the whole lottery.
    ///
    /// # Errors
    /// The store could not be reached.
    fn agencies(&self, agencies: u32) -> BoxFuture<'_, Result<AgencyTotals, StorageError>>;

    /// The draw of `winning_number` over `agencies`, run by
    /// exactly one central: whichever calls first tallies, checks the
    /// tally against every agency's receipt and records the draw
    /// (returning it with `true`); every later call, on any central,
    /// returns the recorded draw with `false`.
    ///
    /// # Errors
    /// The store could not be reached, or its bets are not what was
    /// acknowledged.
    fn draw_once(
        &self,
        winning_number: u16,
        agencies: u32,
    ) -> BoxFuture<'_, Result<(Draw, bool), StorageError>>;

    /// Resolves with the draw once another central (or
    /// this one) recorded it, or once sales are closed or every one of
    /// agencies `1..=agencies` has finished with no draw recorded (the
    /// central drawing died before its commit: this one should draw).
    fn drawn(&self, agencies: u32) -> BoxFuture<'_, Watched>;

    /// What the database writer measures: its groups in flight and its
    /// retries.
    fn writer_metrics(&self) -> WriterMetrics;

    /// The server (`IP:PORT`) the writer's last new connection reached:
    /// with several hosts, the primary; `None` before any, or over a Unix
    /// socket.
    fn primary(&self) -> Option<String>;
}

/// What [`SharedStore::drawn`] saw.
#[derive(Debug)]
pub enum Watched {
    /// The draw, recorded.
    Recorded(Box<Draw>),
    /// Every agency finished, and no draw is recorded.
    AllFinished,
    /// Sales were closed (on any central), and no draw is recorded.
    Closed(ClosedRound),
}

/// What a shared store holds for one agency when a session of it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agency {
    /// The receipt of its stored bets: where its upload resumes.
    pub receipt: Receipt,
    /// Whether it announced it finished (on any central).
    pub finished: bool,
}

/// A store just opened, and what it already held.
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Each agency's receipt of the bets held (agencies with bets only):
    /// its count is where the agency's upload resumes.
    pub stored: BTreeMap<AgencyId, Receipt>,
}

/// Opens the store `options.storage` names, after checking (and, for the
/// file, repairing) what it holds.
///
/// # Errors
/// The store cannot be opened, or what it holds is damaged.
pub async fn open(options: &Options) -> Result<Opened, StorageError> {
    let durability = options.durability;
    match &options.storage {
        Storage::File(bets) => {
            let record = options.file_record();
            let (store, stored) = file::FileStore::open(bets, &record, durability).await?;
            Ok(Opened {
                store: Arc::new(store),
                stored,
            })
        }
        Storage::Postgres(target) => {
            let (store, stored) =
                postgres::PostgresStore::open(target, durability, options.patience).await?;
            Ok(Opened {
                store: Arc::new(store),
                stored,
            })
        }
    }
}

/// The store as the tools open it (`lottery verify`, `winners`,
/// `new-round`), never as a central does: nothing is created, migrated or
/// repaired, and a database is reached once for everything a tool asks.
#[derive(Debug)]
pub enum Reader {
    /// The bets file and its draw record.
    File {
        /// The bets file.
        bets: PathBuf,
        /// Its draw record.
        record: PathBuf,
    },
    /// A database, connected.
    Database(Box<postgres::Tool>),
}

impl Reader {
    /// Opens the store `options` names for a tool.
    ///
    /// # Errors
    /// The database cannot be reached, or its schema is not this build's.
    pub async fn open(options: &Options) -> Result<Reader, StorageError> {
        Ok(match &options.storage {
            Storage::File(bets) => Reader::File {
                bets: bets.clone(),
                record: options.file_record(),
            },
            Storage::Postgres(target) => {
                Reader::Database(Box::new(postgres::Tool::open(target).await?))
            }
        })
    }

    /// The draw recorded, if there is one, checked against the ledger (or
    /// table) of sealed rounds.
    ///
    /// # Errors
    /// A record exists but cannot be read, or a sealed round's record is
    /// missing or replaced.
    pub async fn load_draw(&mut self) -> Result<Option<Draw>, StorageError> {
        match self {
            Reader::File { bets, record } => {
                let (bets, record) = (bets.clone(), record.clone());
                tokio::task::spawn_blocking(move || {
                    file::rounds::load_checked(&bets, &record, false)
                })
                .await
                .expect("reading the record does not panic")
            }
            Reader::Database(tool) => tool.load_draw().await,
        }
    }

    /// Recomputes, from the stored bets alone and without changing
    /// anything (a torn last row is left alone and not counted), each
    /// agency's receipt and its winners for `winning_number`: what
    /// `lottery verify` compares with the draw record.
    ///
    /// # Errors
    /// The bets cannot be read, or a row is damaged.
    pub async fn recompute(&mut self, winning_number: u16) -> Result<Recomputed, StorageError> {
        match self {
            Reader::File { bets, .. } => {
                let bets = bets.clone();
                tokio::task::spawn_blocking(move || file::recompute(&bets, winning_number))
                    .await
                    .expect("reading the bets back does not panic")
            }
            Reader::Database(tool) => tool.recompute(winning_number).await,
        }
    }

    /// The close of sales kept for the current round, if sales were
    /// closed: what a closed round's draw record must say of its close.
    ///
    /// # Errors
    /// A close is kept but cannot be read.
    pub async fn load_close(&mut self) -> Result<Option<ClosedRound>, StorageError> {
        match self {
            Reader::File { bets, .. } => {
                let path = bets.with_extension("close.toml");
                tokio::task::spawn_blocking(move || {
                    file::load_close(&path).map_err(|source| StorageError::Io { path, source })
                })
                .await
                .expect("reading the close does not panic")
            }
            Reader::Database(tool) => tool.load_close().await,
        }
    }

    /// Each agency's bets stored when sales closed, where the store
    /// counted them at the close (a database, in its close's transaction);
    /// `None` for the bets file (whose writer refuses every batch after the
    /// close: its bets are what was stored before it) or while sales are
    /// open.
    ///
    /// # Errors
    /// The store cannot be read.
    pub async fn stored_at_close(
        &mut self,
    ) -> Result<Option<BTreeMap<AgencyId, u64>>, StorageError> {
        match self {
            Reader::File { .. } => Ok(None),
            Reader::Database(tool) => tool.stored_at_close().await,
        }
    }

    /// The receipts the store serves to agencies that resume, when it
    /// keeps them apart from its bets (a database's table `agencies`),
    /// with where they are kept, for messages; `None` for the bets file,
    /// whose receipts are computed from its bets each time it opens.
    ///
    /// # Errors
    /// The store cannot be read, or a kept receipt is damaged.
    pub async fn served(
        &mut self,
    ) -> Result<Option<(&'static str, BTreeMap<AgencyId, Receipt>)>, StorageError> {
        match self {
            Reader::File { .. } => Ok(None),
            Reader::Database(tool) => Ok(Some((postgres::SERVED_FROM, tool.served().await?))),
        }
    }

    /// `lottery new-round`, the one tool that writes (run with the central
    /// stopped): keeps the drawn round (of `agencies`, drawn on `winning`)
    /// aside, named by round and seal, so the central starts the next
    /// round empty.
    ///
    /// # Errors
    /// As [`file::rounds::new_round`].
    pub async fn new_round(
        &mut self,
        agencies: u32,
        winning: u16,
    ) -> Result<NewRound, StorageError> {
        match self {
            Reader::File { bets, record } => {
                let (bets, record) = (bets.clone(), record.clone());
                tokio::task::spawn_blocking(move || {
                    file::rounds::new_round(&bets, &record, agencies, winning)
                })
                .await
                .expect("starting a round does not panic")
            }
            Reader::Database(tool) => tool.new_round(agencies, winning).await,
        }
    }
}

/// The batches of one connection, kept in order by the store: once one of
/// them fails, every later one fails too rather than being stored after a
/// gap (a connection keeps several batches in flight).
#[derive(Debug, Clone, Default)]
pub struct Sequence(Arc<AtomicBool>);

impl Sequence {
    /// A sequence with nothing failed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a batch of it failed (and every later one fails too).
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Fails every later batch of the sequence: the store calls this when
    /// one of them could not be stored.
    pub fn mark_broken(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Per agency, the bets stored and whether it finished, on every central
/// (see [`SharedStore::agencies`]).
pub type AgencyTotals = BTreeMap<AgencyId, (u64, bool)>;

/// What the draw needs from the stored bets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Bets stored.
    pub rows: u64,
    /// Bets per agency.
    pub per_agency: BTreeMap<AgencyId, u64>,
    /// Each agency's winning documents, in the order they were stored.
    pub winners: HashMap<AgencyId, Vec<String>>,
}

/// A round drawn after a close of sales, not because every agency
/// finished: the close, and which agencies had finished by then (the
/// others were closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedRound {
    /// The close.
    pub close: SalesClose,
    /// The agencies that had announced they finished when the close was
    /// asked for.
    pub finished: BTreeSet<AgencyId>,
}

/// The outcome of the draw, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// Set when sales were closed before every agency finished.
    pub closed: Option<ClosedRound>,
    /// The winning number.
    pub winning_number: u16,
    /// When the draw ran (RFC 3339, UTC).
    pub drawn_at: String,
    /// Winner documents per agency, in the order they were stored.
    pub winners: HashMap<AgencyId, Vec<String>>,
    /// Each configured agency's receipt of the bets taken into account.
    pub receipts: BTreeMap<AgencyId, Receipt>,
    /// The seal over the winning number and every receipt
    /// ([`crate::receipt::seal`]).
    pub seal: Digest,
    /// Bets taken into account.
    pub bets: u64,
    /// How long reading the bets back took (zero for a draw read back from
    /// its record).
    pub elapsed: Duration,
}

impl Draw {
    /// [`Draw::drawn_at`] in seconds since the Unix epoch, when it parses.
    pub fn drawn_at_unix(&self) -> Option<f64> {
        chrono::DateTime::parse_from_rfc3339(&self.drawn_at)
            .ok()
            .map(|at| at.timestamp() as f64)
    }

    /// The draw of `winning_number` over agencies `1..=agencies` from the
    /// `tally` of the stored bets, sealed over the `acknowledged` receipts
    /// (an agency without one has its empty receipt), drawn now and read
    /// back in `elapsed`: the one rule both backends draw by.
    ///
    /// # Errors
    /// The tally does not hold exactly the bets acknowledged to each agency
    /// (a bets file cut or replaced under the central, rows edited in the
    /// database): drawing over it would record and announce a wrong
    /// outcome for good. Each difference, as `agency N: S in the store, A
    /// acknowledged`, in the order of the agencies.
    pub fn from_tally(
        winning_number: u16,
        agencies: u32,
        tally: Tally,
        acknowledged: &BTreeMap<AgencyId, Receipt>,
        elapsed: Duration,
    ) -> Result<Draw, Vec<String>> {
        let mut ids: BTreeSet<AgencyId> = tally.per_agency.keys().copied().collect();
        ids.extend(acknowledged.keys().copied());
        let differences: Vec<String> = ids
            .into_iter()
            .filter_map(|agency| {
                let stored = tally.per_agency.get(&agency).copied().unwrap_or(0);
                let acknowledged = acknowledged.get(&agency).map_or(0, |r| r.count);
                (stored != acknowledged).then(|| {
                    format!("agency {agency}: {stored} in the store, {acknowledged} acknowledged")
                })
            })
            .collect();
        if !differences.is_empty() {
            return Err(differences);
        }
        // Every configured agency is listed, one without bets with its
        // empty receipt.
        let receipts: BTreeMap<AgencyId, Receipt> = (1..=agencies)
            .map(|agency| {
                let receipt = acknowledged.get(&agency).copied();
                (agency, receipt.unwrap_or_else(|| Receipt::empty(agency)))
            })
            .collect();
        Ok(Draw {
            closed: None,
            winning_number,
            drawn_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            winners: tally.winners,
            seal: crate::receipt::seal(winning_number, agencies, &receipts),
            receipts,
            bets: tally.rows,
            elapsed,
        })
    }

    /// The winners of one agency (empty when it has none).
    pub fn winners_of(&self, agency: AgencyId) -> &[String] {
        self.winners.get(&agency).map_or(&[], Vec::as_slice)
    }

    /// The receipt of one agency (its empty one when it stored nothing).
    pub fn receipt_of(&self, agency: AgencyId) -> Receipt {
        self.receipts
            .get(&agency)
            .copied()
            .unwrap_or_else(|| Receipt::empty(agency))
    }

    /// The record's claims, to compare with the stored bets.
    pub fn claimed(&self) -> crate::receipt::Claimed<'_> {
        crate::receipt::Claimed {
            winning_number: self.winning_number,
            seal: self.seal,
            receipts: &self.receipts,
            winners: &self.winners,
        }
    }
}

/// What `lottery new-round` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewRound {
    /// The current round holds no bets and no draw: nothing to keep.
    AlreadyEmpty {
        /// The current round's number.
        round: u32,
    },
    /// The sealed round's files were kept under these names.
    Kept {
        /// The round kept.
        round: u32,
        /// Its seal.
        seal: Digest,
        /// Where its bets went, for the operator (a path, or tables).
        bets: String,
        /// Where its draw record went.
        record: String,
        /// Where its close of sales went, when it is kept apart from the
        /// record (the bets file's `bets.close.toml`).
        close: Option<String>,
    },
}
