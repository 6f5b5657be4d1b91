//! The PostgreSQL backend: the bets are rows of the table `bets`, the
//! counts per agency rows of `agencies`, the draw record rows of `draw` and
//! `draw_agencies` (see [`schema`] for the tables, and README's "The
//! PostgreSQL store").
//!
//! - [`schema`]: the versioned migrations applied on start.
//! - `writer`: the task that stores batches, one transaction per group.
//!
//! Opening waits for the database (retrying with backoff for
//! `server.storage_connect_timeout`), migrates the schema, and reads the
//! counts each agency resumes from. The draw's tally and the draw record use
//! a connection of their own, opened when needed.

pub mod schema;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, IsolationLevel, NoTls};
use tracing::{error, info, warn};

use crate::logging::{action, result};
use crate::model::{AgencyId, Bets};
use crate::store::{Draw, Durability, PgTarget, Sequence, StorageError, Store, Stored, Tally};

/// How long one attempt to connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The first wait between attempts to reach the database at start; each
/// failure doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What every connection sets up before its first statement.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    /// Whether a commit waits for its WAL to reach stable storage.
    durability: Durability,
}

/// A failed statement or connection, as text an operator can act on: the
/// server's own message when it sent one.
pub(crate) fn reason(e: tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.severity(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A connection that could not be opened.
#[derive(Debug)]
pub(crate) struct ConnectError {
    /// Why, as [`reason`] words it.
    pub reason: String,
    /// Whether trying again can help: the server was not reached, or said
    /// it cannot take connections yet (starting up, shutting down, full).
    /// A refused login (a wrong password, a missing database or role) will
    /// be refused again: the operator has to act.
    pub retry: bool,
}

impl From<ConnectError> for String {
    fn from(e: ConnectError) -> String {
        e.reason
    }
}

/// Whether a failed connection attempt is worth repeating (see
/// [`ConnectError::retry`]).
fn worth_retrying(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(code) => {
            *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                // Class 08: connection exceptions.
                || code.code().starts_with("08")
        }
    }
}

/// Opens one connection to `target` and prepares it for `session`.
pub(crate) async fn connect(target: &PgTarget, session: Session) -> Result<Client, ConnectError> {
    let mut config = target.config().clone();
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("lottery");
    }
    let failed = |e: tokio_postgres::Error| ConnectError {
        retry: worth_retrying(&e),
        reason: reason(e),
    };
    let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
    let shown = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(
                action = action::DATABASE_CONNECT,
                result = result::FAIL,
                storage = shown.as_str(),
                error = reason(e).as_str(),
                state = "lost"
            );
        }
    });
    // Whatever the database's default: a batch is acknowledged only once
    // its commit is on disk (unless durability was turned off on purpose).
    let commit = match session.durability {
        Durability::Sync => "on",
        Durability::NoSync => "off",
    };
    client
        .batch_execute(&format!("SET synchronous_commit = {commit}"))
        .await
        .map_err(failed)?;
    Ok(client)
}

/// The database behind the storage seam.
#[derive(Debug)]
pub struct PostgresStore {
    target: PgTarget,
    session: Session,
    /// Batches to the writer task.
    requests: mpsc::Sender<writer::Request>,
    /// The writer task; taken by [`Store::close`].
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for writer::Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            writer::Request::Append(a) => write!(f, "Append({} bets)", a.bets.len()),
            writer::Request::Close(_) => f.write_str("Close"),
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
    ) -> Result<(PostgresStore, BTreeMap<AgencyId, u64>), StorageError> {
        let session = Session { durability };
        let fail = |reason: String| StorageError::Database {
            target: where_(target),
            reason,
        };
        let mut client = reach(target, session, patience).await.map_err(fail)?;
        let migrated = schema::migrate(&mut client).await.map_err(fail)?;
        info!(
            action = action::DATABASE_SCHEMA,
            result = result::SUCCESS,
            storage = %target,
            from_version = migrated.from,
            version = migrated.to
        );
        let rows = client
            .query("SELECT agency, stored FROM agencies WHERE stored > 0", &[])
            .await
            .map_err(|e| fail(reason(e)))?;
        let mut stored = BTreeMap::new();
        let mut next = HashMap::new();
        for row in rows {
            let (agency, count): (i32, i64) = (row.get(0), row.get(1));
            stored.insert(agency as AgencyId, count as u64);
            next.insert(agency as AgencyId, count);
        }
        info!(
            action = action::RECOVER,
            result = result::SUCCESS,
            storage = %target,
            rows = stored.values().sum::<u64>(),
            agencies = stored.len()
        );
        let (requests, rx) = mpsc::channel(writer::QUEUE_DEPTH);
        let task = tokio::spawn(writer::run(target.clone(), session, client, next, rx));
        let store = PostgresStore {
            target: target.clone(),
            session,
            requests,
            task: Mutex::new(Some(task)),
        };
        Ok((store, stored))
    }

    fn error(&self, reason: String) -> StorageError {
        StorageError::Database {
            target: where_(&self.target),
            reason,
        }
    }

    /// A connection of its own for a read or the draw record.
    async fn side_connection(&self) -> Result<Client, StorageError> {
        connect(&self.target, self.session)
            .await
            .map_err(|e| self.error(e.reason))
    }
}

/// `host:port,…/dbname`: where the database is, for messages (never the
/// password).
fn where_(target: &PgTarget) -> String {
    format!(
        "{}/{}",
        target.hosts(),
        target.config().get_dbname().unwrap_or("")
    )
}

/// Connects, retrying with doubling waits until `patience` runs out; logs
/// each failed attempt as `in_progress` so an operator sees what it waits
/// for. A refused login is not retried.
async fn reach(target: &PgTarget, session: Session, patience: Duration) -> Result<Client, String> {
    let deadline = Instant::now() + patience;
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        match connect(target, session).await {
            Ok(client) => {
                info!(
                    action = action::DATABASE_CONNECT,
                    result = result::SUCCESS,
                    storage = %target,
                    attempt
                );
                return Ok(client);
            }
            Err(ConnectError { reason: why, retry }) => {
                let now = Instant::now();
                if !retry {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    return Err(format!("refused the connection: {why}"));
                }
                if now >= deadline {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    return Err(format!(
                        "unreachable for {} s ({attempt} attempts): {why}",
                        patience.as_secs()
                    ));
                }
                let wait = backoff.min(deadline - now);
                warn!(
                    action = action::DATABASE_CONNECT,
                    result = result::IN_PROGRESS,
                    storage = %target,
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    error = why.as_str()
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

impl Store for PostgresStore {
    fn describe(&self) -> String {
        self.target.to_string()
    }

    fn submit<'a>(
        &'a self,
        bets: &Bets,
        skip: usize,
        sequence: &Sequence,
    ) -> BoxFuture<'a, Result<Stored, StorageError>> {
        let mut owned = Bets::with_capacity(bets.len().saturating_sub(skip), 0);
        owned.extend(bets.iter().skip(skip));
        let sequence = sequence.clone();
        async move {
            let (done, outcome) = oneshot::channel();
            self.requests
                .send(writer::Request::Append(writer::Append {
                    bets: owned,
                    sequence,
                    done,
                }))
                .await
                .map_err(|_| StorageError::Closed)?;
            let target = where_(&self.target);
            Ok(async move {
                match outcome.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(reason)) => Err(StorageError::Database { target, reason }),
                    Err(_) => Err(StorageError::Closed),
                }
            }
            .boxed())
        }
        .boxed()
    }

    fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e| self.error(reason(e));
            // One snapshot for the counts and the winners.
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(fail)?;
            let mut tally = Tally::default();
            for row in tx
                .query("SELECT agency, count(*) FROM bets GROUP BY agency", &[])
                .await
                .map_err(fail)?
            {
                let (agency, count): (i32, i64) = (row.get(0), row.get(1));
                tally.per_agency.insert(agency as AgencyId, count as u64);
                tally.rows += count as u64;
            }
            let number = i32::from(winning_number);
            for row in tx
                .query(
                    "SELECT agency, document FROM bets WHERE number = $1 ORDER BY agency, seq",
                    &[&number],
                )
                .await
                .map_err(fail)?
            {
                let (agency, document): (i32, String) = (row.get(0), row.get(1));
                tally
                    .winners
                    .entry(agency as AgencyId)
                    .or_default()
                    .push(document);
            }
            tx.commit().await.map_err(fail)?;
            Ok(tally)
        }
        .boxed()
    }

    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e| self.error(reason(e));
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(fail)?;
            let Some(head) = tx
                .query_opt("SELECT winning_number, drawn_at, bets FROM draw", &[])
                .await
                .map_err(fail)?
            else {
                return Ok(None);
            };
            let (winning_number, drawn_at, bets): (i32, String, i64) =
                (head.get(0), head.get(1), head.get(2));
            let mut draw = Draw {
                winning_number: u16::try_from(winning_number).map_err(|_| {
                    self.error(format!("draw: bad winning number {winning_number}"))
                })?,
                drawn_at,
                winners: HashMap::new(),
                bets_per_agency: BTreeMap::new(),
                bets: bets as u64,
                elapsed: Duration::ZERO,
            };
            for row in tx
                .query("SELECT agency, bets, winners FROM draw_agencies", &[])
                .await
                .map_err(fail)?
            {
                let (agency, count, winners): (i32, i64, Vec<String>) =
                    (row.get(0), row.get(1), row.get(2));
                draw.bets_per_agency
                    .insert(agency as AgencyId, count as u64);
                if !winners.is_empty() {
                    draw.winners.insert(agency as AgencyId, winners);
                }
            }
            tx.commit().await.map_err(fail)?;
            Ok(Some(draw))
        }
        .boxed()
    }

    fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
        async move {
            let mut client = self.side_connection().await?;
            let fail = |e| self.error(reason(e));
            let tx = client.transaction().await.map_err(fail)?;
            // The single row's key refuses a second draw.
            tx.execute(
                "INSERT INTO draw (winning_number, drawn_at, bets) VALUES ($1, $2, $3)",
                &[
                    &i32::from(draw.winning_number),
                    &draw.drawn_at,
                    &(draw.bets as i64),
                ],
            )
            .await
            .map_err(fail)?;
            let mut agencies: Vec<AgencyId> = draw
                .bets_per_agency
                .keys()
                .chain(draw.winners.keys())
                .copied()
                .collect();
            agencies.sort_unstable();
            agencies.dedup();
            let insert = tx
                .prepare("INSERT INTO draw_agencies (agency, bets, winners) VALUES ($1, $2, $3)")
                .await
                .map_err(fail)?;
            for agency in agencies {
                let count = draw.bets_per_agency.get(&agency).copied().unwrap_or(0) as i64;
                tx.execute(
                    &insert,
                    &[&(agency as i32), &count, &draw.winners_of(agency)],
                )
                .await
                .map_err(fail)?;
            }
            tx.commit().await.map_err(fail)?;
            Ok(())
        }
        .boxed()
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
