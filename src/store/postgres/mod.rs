//! The PostgreSQL backend: the bets are rows of the table `bets`, the
//! counts per agency rows of `agencies`, the draw record rows of `draw` and
//! `draw_agencies` (see [`schema`] for the tables, and "The PostgreSQL
//! store" in docs/OPERATIONS.md).
//!
//! - [`schema`]: the versioned migrations applied on start.
//! - `connect`: one connection opened and prepared for its job, and the
//!   patient wait for the database at start.
//! - `writer`: the task that stores batches, one transaction per group
//!   (`rows`: the rows it copies in).
//! - `recover`: the bets read back: the draw's tally, the receipts
//!   recomputed from the bets alone, and those the table `agencies` serves.
//! - `record`: the draw record in `draw` and `draw_agencies`.
//! - `watch`: learning of a draw another central recorded.
//! - `rounds`: the tools' connection ([`Tool`]) and `lottery new-round`.
//! - here: [`PostgresStore`], all of it behind the seam's traits.
//!
//! Opening waits for the database (retrying with backoff for
//! `server.storage_connect_timeout`), migrates the schema, and reads the
//! counts each agency resumes from. The draw's tally and the draw record use
//! a connection of their own, opened when needed.

mod close;
mod connect;
mod error;
mod record;
mod recover;
mod rounds;
mod rows;
pub mod schema;
mod watch;
mod writer;

pub use connect::ConnectionSettings;
pub use error::ConnectError;
pub use error::PgError;
pub use record::load_draw;
pub use recover::{recompute, served, SERVED_FROM};
pub use rounds::{new_round, tool_connection, Tool};

use connect::{connect, reach, where_, Unreached};
use record::{insert_draw, load_draw_in};
use recover::{read_receipts, tally_in};
use watch::DRAW_POLL;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, IsolationLevel};
use tracing::{error, info, warn};

use crate::logging::{action, result};
use crate::model::{AgencyId, Bets};
use crate::receipt::{Digest, Receipt, Recomputed, DIGEST_LEN};
use crate::store::{
    Agency, AgencyTotals, Backend, Draw, Durability, PgTarget, Sequence, SharedStore, StorageError,
    Store, StoreMetrics, Stored, Tally, Watched, WriterMetrics,
};

/// The database behind the storage seam.
#[derive(Debug)]
pub struct PostgresStore {
    target: PgTarget,
    settings: ConnectionSettings,
    /// Batches to the writer task.
    requests: mpsc::Sender<writer::Request>,
    /// The writer's commit measurements.
    metrics: StoreMetrics,
    /// The writer's groups in flight and retries.
    writer_metrics: WriterMetrics,
    /// The server the writer's last new connection reached.
    primary: Arc<Mutex<Option<String>>>,
    /// The writer task; taken by [`Store::close`].
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for writer::Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            writer::Request::Append(a) => write!(f, "Append({} bets)", a.rows.len()),
            writer::Request::Close(_) => f.write_str("Close"),
            writer::Request::Open(agency, _) => write!(f, "Open({agency})"),
            writer::Request::Finish(agency, _, _) => write!(f, "Finish({agency})"),
        }
    }
}

impl PostgresStore {
    /// Reaches the database (retrying with backoff for `patience`),
    /// creates or migrates the schema, reads the bets held per agency, and
    /// starts the writer.
    ///
    /// # Errors
    /// The database stayed unreachable for `patience`, or refused the
    /// schema; the error names its hosts and database, never a password.
    pub async fn open(
        target: &PgTarget,
        durability: Durability,
        patience: Duration,
    ) -> Result<(PostgresStore, BTreeMap<AgencyId, Receipt>), StorageError> {
        let settings = ConnectionSettings { durability };
        let fail = |e: PgError| database(target, e);
        let mut client = reach(target, settings, patience)
            .await
            .map_err(|e| match e {
                Unreached::Configuration(reason) => StorageError::DatabaseConfig {
                    target: where_(target),
                    reason,
                },
                Unreached::Failed(reason) => fail(PgError::Unreachable(reason)),
            })?;
        let migrated = schema::migrate(&mut client).await.map_err(fail)?;
        info!(
            action = action::DATABASE_SCHEMA,
            result = result::SUCCESS,
            storage = %target,
            from_version = migrated.from,
            version = migrated.to
        );
        let (stored, recomputed) = read_receipts(target, &mut client).await?;
        info!(
            action = action::RECOVER,
            result = result::SUCCESS,
            storage = %target,
            rows = stored.values().map(|r| r.count).sum::<u64>(),
            agencies = stored.len(),
            digests_recomputed = recomputed
        );
        let next: HashMap<AgencyId, Receipt> = stored.iter().map(|(&a, &r)| (a, r)).collect();
        let (requests, rx) = mpsc::channel(writer::QUEUE_DEPTH);
        let metrics = StoreMetrics::default();
        let writer_metrics = WriterMetrics::default();
        let primary = Arc::new(Mutex::new(None));
        let measured = writer::Measured {
            store: metrics.clone(),
            writer: writer_metrics.clone(),
            primary: primary.clone(),
        };
        let task = crate::task::spawn_named(
            "database writer",
            writer::run(target.clone(), settings, client, next, rx, measured),
        );
        let store = PostgresStore {
            target: target.clone(),
            settings,
            requests,
            metrics,
            writer_metrics,
            primary,
            task: Mutex::new(Some(task)),
        };
        Ok((store, stored))
    }

    /// Hands the writer task a request that answers on `done`, and waits
    /// for the answer: requests go through the writer so that they are
    /// ordered with its commits.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, PgError>>) -> writer::Request,
    ) -> Result<T, StorageError> {
        let (done, answer) = oneshot::channel();
        self.requests
            .send(request(done))
            .await
            .map_err(|_| StorageError::Closed(Backend::Database))?;
        answer
            .await
            .map_err(|_| StorageError::Closed(Backend::Database))?
            .map_err(|reason| self.error(reason))
    }

    fn error(&self, e: impl Into<PgError>) -> StorageError {
        database(&self.target, e)
    }

    /// A connection of its own for a read or the draw record.
    async fn side_connection(&self) -> Result<Client, StorageError> {
        connect(&self.target, self.settings)
            .await
            .map_err(|e| self.error(e.reason))
    }
}

/// A failure of the store at `target`, as the seam reports it: the
/// database named (never its password), the typed error as its source.
pub(super) fn database(target: &PgTarget, e: impl Into<PgError>) -> StorageError {
    StorageError::Database {
        target: where_(target),
        source: Box::new(e.into()),
    }
}

/// The advisory lock the draw's transaction holds, so that exactly one
/// central draws ("draw" in ASCII).
const DRAW_LOCK: i64 = 0x6472_6177;

/// How many of the lottery's agencies (`1..=$1`) have finished, on every
/// central: what an announcement answers and what the draw watch looks
/// for. A row above them (left by a central configured for more) is not
/// one of this lottery's.
pub(super) const FINISHED_COUNT: &str =
    "SELECT count(*) FROM agencies WHERE finished AND agency <= $1";

/// The channel a recorded draw is announced on, to every central.
const DRAW_CHANNEL: &str = "lottery_draw";

impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.target.to_string()
    }

    fn metrics(&self) -> StoreMetrics {
        self.metrics.clone()
    }

    fn close_action(&self) -> &'static str {
        action::CLOSE_DATABASE
    }

    fn submit<'a>(
        &'a self,
        bets: &Bets,
        skip: usize,
        sequence: &Sequence,
        receipt: Receipt,
    ) -> BoxFuture<'a, Result<Stored, StorageError>> {
        // Encoded here, on the connection's task, so that the one writer
        // only numbers the rows.
        let rows = bets
            .iter()
            .next()
            .map(|first| rows::Rows::encode(first.agency, bets.iter().skip(skip)));
        let sequence = sequence.clone();
        async move {
            let Some(rows) = rows else {
                // No bets: nothing to store.
                return Ok(async { Ok(()) }.boxed());
            };
            let (done, outcome) = oneshot::channel();
            self.requests
                .send(writer::Request::Append(writer::Append {
                    rows,
                    receipt,
                    sequence,
                    done,
                }))
                .await
                .map_err(|_| StorageError::Closed(Backend::Database))?;
            let target = where_(&self.target);
            Ok(async move {
                match outcome.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(why)) => match &*why {
                        PgError::SalesClosed(close) => {
                            Err(StorageError::SalesClosed(close.clone()))
                        }
                        _ => Err(StorageError::Database {
                            target,
                            source: Box::new(why),
                        }),
                    },
                    Err(_) => Err(StorageError::Closed(Backend::Database)),
                }
            }
            .boxed())
        }
        .boxed()
    }

    fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e: tokio_postgres::Error| self.error(e);
            // One snapshot for the counts and the winners.
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(fail)?;
            let tally = tally_in(&tx, winning_number).await.map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            Ok(tally)
        }
        .boxed()
    }

    fn recompute(&self, winning_number: u16) -> BoxFuture<'_, Result<Recomputed, StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            recompute(&self.target, &mut client, winning_number).await
        }
        .boxed()
    }

    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            load_draw(&self.target, &mut client).await
        }
        .boxed()
    }

    fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e: tokio_postgres::Error| self.error(e);
            let tx = client.transaction().await.map_err(fail)?;
            insert_draw(&tx, draw).await.map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            Ok(())
        }
        .boxed()
    }

    fn into_shared(self: Arc<Self>) -> Option<Arc<dyn SharedStore>> {
        Some(self)
    }

    fn close_sales<'a>(
        &'a self,
        close: &'a crate::store::ClosedRound,
    ) -> BoxFuture<'a, Result<(crate::store::ClosedRound, bool), StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            close::close_sales(&self.target, &mut client, &close.close, writer::FINISH_LOCK).await
        }
        .boxed()
    }

    fn load_close(&self) -> BoxFuture<'_, Result<Option<crate::store::ClosedRound>, StorageError>> {
        async move {
            let client = self.side_connection().await?;
            close::load_close(&self.target, &client).await
        }
        .boxed()
    }

    fn served_from(&self) -> &'static str {
        SERVED_FROM
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            let (done, closed) = oneshot::channel();
            if self
                .requests
                .send(writer::Request::Close(done))
                .await
                .is_ok()
            {
                let _ = closed.await;
            }
            let task = self.task.lock().expect("not poisoned").take();
            if let Some(task) = task {
                if let Err(e) = task.await {
                    error!(action = action::CLOSE_DATABASE, result = result::FAIL, error = %e);
                }
            }
        }
        .boxed()
    }
}

impl SharedStore for PostgresStore {
    fn writer_metrics(&self) -> WriterMetrics {
        self.writer_metrics.clone()
    }

    fn primary(&self) -> Option<String> {
        self.primary
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn open_session(&self, agency: AgencyId) -> BoxFuture<'_, Result<Agency, StorageError>> {
        self.ask(move |done| writer::Request::Open(agency, done))
            .boxed()
    }

    fn finish(&self, agency: AgencyId, agencies: u32) -> BoxFuture<'_, Result<u32, StorageError>> {
        self.ask(move |done| writer::Request::Finish(agency, agencies, done))
            .boxed()
    }

    fn agencies(&self, agencies: u32) -> BoxFuture<'_, Result<AgencyTotals, StorageError>> {
        async move {
            let client = self.side_connection().await?;
            let rows = client
                .query(
                    "SELECT agency, stored, finished FROM agencies \
                     WHERE agency <= $1 AND (stored > 0 OR finished)",
                    &[&(agencies as i32)],
                )
                .await
                .map_err(|e| self.error(e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let (agency, stored, finished): (i32, i64, bool) =
                        (r.get(0), r.get(1), r.get(2));
                    (agency as AgencyId, (stored as u64, finished))
                })
                .collect())
        }
        .boxed()
    }

    fn draw_once(
        &self,
        winning_number: u16,
        agencies: u32,
    ) -> BoxFuture<'_, Result<(Draw, bool), StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e: tokio_postgres::Error| self.error(e);
            let started = Instant::now();
            let tx = client.transaction().await.map_err(fail)?;
            // Held until this transaction ends: a central that comes second
            // waits here, then finds the draw recorded and runs nothing.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DRAW_LOCK])
                .await
                .map_err(fail)?;
            if let Some(draw) = load_draw_in(&self.target, &tx).await? {
                tx.commit().await.map_err(fail)?;
                return Ok((draw, false));
            }
            // After a close, over what was stored before it (every group
            // after it stored nothing), whoever finished.
            let closed = close::load_close(&self.target, &tx).await?;
            let tally = tally_in(&tx, winning_number).await.map_err(fail)?;
            if let Some(at_close) = close::stored_at_close(&self.target, &tx).await? {
                let mut ids: Vec<AgencyId> = at_close.keys().copied().collect();
                ids.extend(tally.per_agency.keys());
                ids.sort_unstable();
                ids.dedup();
                let after: Vec<String> = ids
                    .into_iter()
                    .filter_map(|a| {
                        let (then, now) = (
                            at_close.get(&a).copied().unwrap_or(0),
                            tally.per_agency.get(&a).copied().unwrap_or(0),
                        );
                        (then != now).then(|| {
                            format!("agency {a}: {now} in the store, {then} when sales closed")
                        })
                    })
                    .collect();
                if !after.is_empty() {
                    return Err(self.error(format!(
                        "the stored bets are not those stored when sales closed ({}); nothing \
                         was recorded",
                        after.join(", ")
                    )));
                }
            }
            // The receipts acknowledged, by whichever central: the tally
            // must hold exactly their bets.
            let mut receipts: BTreeMap<AgencyId, Receipt> = (1..=agencies)
                .map(|agency| (agency, Receipt::empty(agency)))
                .collect();
            for row in tx
                .query(
                    "SELECT agency, stored, digest FROM agencies WHERE stored > 0",
                    &[],
                )
                .await
                .map_err(fail)?
            {
                let (agency, count, digest): (i32, i64, Option<&[u8]>) =
                    (row.get(0), row.get(1), row.get(2));
                let agency = agency as AgencyId;
                let digest = digest.and_then(digest_of).ok_or_else(|| {
                    self.error(format!(
                        "agencies: agency {agency}'s digest is not 32 bytes"
                    ))
                })?;
                receipts.insert(
                    agency,
                    Receipt {
                        count: count as u64,
                        digest,
                    },
                );
            }
            let mut draw = Draw::from_tally(
                winning_number,
                agencies,
                tally,
                &receipts,
                started.elapsed(),
            )
            .map_err(|differences| {
                self.error(format!(
                    "the stored bets differ from what was acknowledged ({}); nothing was recorded",
                    differences.join(", ")
                ))
            })?;
            draw.closed = closed.map(|mut c| {
                c.finished.retain(|a| *a <= agencies);
                c
            });
            insert_draw(&tx, &draw).await.map_err(fail)?;
            // Delivered at the commit: every central's watcher wakes.
            tx.batch_execute(&format!("NOTIFY {DRAW_CHANNEL}"))
                .await
                .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
            Ok((draw, true))
        }
        .boxed()
    }

    fn drawn(&self, agencies: u32) -> BoxFuture<'_, Watched> {
        async move {
            loop {
                match self.watch_draw(agencies).await {
                    Ok(watched) => return watched,
                    Err(why) => {
                        warn!(
                            action = action::DATABASE_CONNECT,
                            result = result::FAIL,
                            storage = %self.target,
                            error = %why,
                            state = "draw_watch_lost"
                        );
                        tokio::time::sleep(DRAW_POLL).await;
                    }
                }
            }
        }
        .boxed()
    }
}

/// A digest read from a `bytea` column.
fn digest_of(bytes: &[u8]) -> Option<Digest> {
    <[u8; DIGEST_LEN]>::try_from(bytes).ok().map(Digest)
}
