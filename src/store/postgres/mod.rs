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

mod rows;
pub mod schema;
mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, TryStreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, IsolationLevel, NoTls, Transaction};
use tracing::{error, info, warn};

use crate::logging::{action, result};
use crate::model::{AgencyId, Bets};
use crate::receipt::{self, Digest, Receipt, Recomputed, DIGEST_LEN};
use crate::store::{
    Agency, AgencyTotals, Backend, Draw, Durability, NewRound, PgTarget, RecordAt, Sequence,
    SharedStore, StorageError, Store, Stored, Tally, Watched,
};

/// How long one attempt to connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection whose other end vanished (a central or a database cut off
/// by the network, its host gone without closing anything) is given up on
/// after about 15 s by both ends: TCP keepalives after 5 s of silence, every
/// 2 s, 3 unanswered; and 15 s for data sent and never acknowledged.
///
/// Both ends matter. The central learns that its group failed, answers
/// `STORAGE_FAILED` and connects again, instead of waiting forever on a
/// reply. The database's backend, waiting for a vanished central's next
/// message inside a group's transaction, aborts it and releases the rows
/// it locked: without that, every other central's group for those agencies
/// would wait on the lock for as long as the server's own keepalives allow
/// (two hours by default), and the agencies could finish nowhere.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(15);

/// The connection settings of every connection a central or a tool opens
/// to `target`: its URL's, plus the time limits above on both ends.
fn client_config(target: &PgTarget) -> tokio_postgres::Config {
    let mut config = target.config().clone();
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("lottery");
    }
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(UNACKNOWLEDGED_LIMIT);
    // The backend's side, as session settings sent with the login (any
    // `options` of the URL are kept, before these).
    let server = format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
         -c tcp_user_timeout={}",
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
        KEEPALIVE_RETRIES,
        UNACKNOWLEDGED_LIMIT.as_millis()
    );
    let options = match config.get_options() {
        Some(given) if !given.is_empty() => format!("{given} {server}"),
        _ => server,
    };
    config.options(&options);
    config
}

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
    /// The URL lacks what the database asks for (a password): a mistake in
    /// the configuration, not in the database.
    pub configuration: bool,
}

/// Why a connection was refused before the server was asked anything more:
/// the database asks for something the URL does not give (a password), as
/// an operator needs it said; `None` for any other failure.
fn configuration_error(e: &tokio_postgres::Error) -> Option<String> {
    // tokio-postgres's configuration errors have no kind to match on; their
    // text starts with this.
    if !e.to_string().starts_with("invalid configuration") {
        return None;
    }
    let cause = std::error::Error::source(e).map(ToString::to_string);
    if cause.as_deref() != Some("password missing") {
        return Some(format!("{e}: {}", cause.unwrap_or_default()));
    }
    let pgpassword = if std::env::var_os("PGPASSWORD").is_some() {
        " (PGPASSWORD is set, but this program reads neither it nor ~/.pgpass)"
    } else {
        " (this program reads neither PGPASSWORD nor ~/.pgpass)"
    };
    Some(format!(
        "the database asks for a password and the storage URL gives none{pgpassword}: put it \
         in the URL, postgres://USER:PASSWORD@HOST/DB or ?password=PASSWORD"
    ))
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
    let config = client_config(target);
    let failed = |e: tokio_postgres::Error| match configuration_error(&e) {
        Some(reason) => ConnectError {
            retry: false,
            configuration: true,
            reason,
        },
        None => ConnectError {
            retry: worth_retrying(&e),
            configuration: false,
            reason: reason(e),
        },
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
        let session = Session { durability };
        let fail = |reason: String| StorageError::Database {
            target: where_(target),
            reason,
        };
        let mut client = reach(target, session, patience)
            .await
            .map_err(|e| match e {
                Unreached::Configuration(reason) => StorageError::DatabaseConfig {
                    target: where_(target),
                    reason,
                },
                Unreached::Failed(reason) => fail(reason),
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
        let task = tokio::spawn(writer::run(target.clone(), session, client, next, rx));
        let store = PostgresStore {
            target: target.clone(),
            session,
            requests,
            task: Mutex::new(Some(task)),
        };
        Ok((store, stored))
    }

    /// Hands the writer task a request that answers on `done`, and waits
    /// for the answer: requests go through the writer so that they are
    /// ordered with its commits.
    async fn ask<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, String>>) -> writer::Request,
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

/// How often a central looks for a draw recorded elsewhere, should a
/// notification be missed (a listening connection lost and reopened).
const DRAW_POLL: Duration = Duration::from_secs(2);

impl PostgresStore {
    /// Listens on [`DRAW_CHANNEL`] and looks at `draw` on each notification
    /// and every [`DRAW_POLL`]; returns the draw once it is recorded, or
    /// [`Watched::AllFinished`] once every one of `agencies` has finished
    /// and still no draw is recorded.
    async fn watch_draw(&self, agencies: u32) -> Result<Watched, String> {
        let config = client_config(&self.target);
        let (client, mut connection) = config.connect(NoTls).await.map_err(reason)?;
        let (tx, mut notified) = mpsc::unbounded_channel();
        // The connection must be polled for its notifications to arrive.
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.try_next().await.transpose() {
                if message.is_err() || tx.send(()).is_err() {
                    break;
                }
            }
        });
        let _stop = AbortOnDrop(driver);
        client
            .batch_execute(&format!("LISTEN {DRAW_CHANNEL}"))
            .await
            .map_err(reason)?;
        loop {
            // Listening before looking: a draw recorded in between is seen.
            let recorded: bool = client
                .query_one("SELECT EXISTS (SELECT 1 FROM draw)", &[])
                .await
                .map_err(reason)?
                .get(0);
            if recorded {
                let mut reader = self.side_connection().await.map_err(|e| e.to_string())?;
                if let Some(draw) = load_draw(&self.target, &mut reader)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    return Ok(Watched::Recorded(draw));
                }
            } else {
                let finished: i64 = client
                    .query_one(FINISHED_COUNT, &[&(agencies as i32)])
                    .await
                    .map_err(reason)?
                    .get(0);
                if finished == i64::from(agencies) {
                    return Ok(Watched::AllFinished);
                }
            }
            tokio::select! {
                woken = notified.recv() => {
                    if woken.is_none() {
                        return Err("the listening connection closed".into());
                    }
                }
                () = tokio::time::sleep(DRAW_POLL) => {}
            }
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The draw's tally in `tx`: counts per agency and the winners, in stored
/// order.
async fn tally_in(
    tx: &Transaction<'_>,
    winning_number: u16,
) -> Result<Tally, tokio_postgres::Error> {
    let mut tally = Tally::default();
    // Two scans of the whole table (`bets` has no index: see the schema's
    // step 3), which PostgreSQL runs in parallel workers; one query doing
    // both was slower (ordered aggregates are not parallel).
    for row in tx
        .query("SELECT agency, count(*) FROM bets GROUP BY agency", &[])
        .await?
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
        .await?
    {
        let (agency, document): (i32, String) = (row.get(0), row.get(1));
        tally
            .winners
            .entry(agency as AgencyId)
            .or_default()
            .push(document);
    }
    Ok(tally)
}

/// Writes the draw record in `tx`: `draw`, `draw_agencies`, and the round's
/// row in `rounds`.
async fn insert_draw(tx: &Transaction<'_>, draw: &Draw) -> Result<(), tokio_postgres::Error> {
    // The single row's key refuses a second draw.
    tx.execute(
        "INSERT INTO draw (winning_number, drawn_at, bets, seal) VALUES ($1, $2, $3, $4)",
        &[
            &i32::from(draw.winning_number),
            &draw.drawn_at,
            &(draw.bets as i64),
            &draw.seal.0.as_slice(),
        ],
    )
    .await?;
    let mut agencies: Vec<AgencyId> = draw
        .receipts
        .keys()
        .chain(draw.winners.keys())
        .copied()
        .collect();
    agencies.sort_unstable();
    agencies.dedup();
    let insert = tx
        .prepare(
            "INSERT INTO draw_agencies (agency, bets, digest, winners) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    for agency in agencies {
        let receipt = draw.receipt_of(agency);
        tx.execute(
            &insert,
            &[
                &(agency as i32),
                &(receipt.count as i64),
                &receipt.digest.0.as_slice(),
                &draw.winners_of(agency),
            ],
        )
        .await?;
    }
    // The round is sealed in the same transaction: a draw row deleted
    // later is refused at start instead of drawn again.
    tx.execute(
        "INSERT INTO rounds (round, seal, drawn_at, bets) \
         SELECT coalesce(max(round), 0) + 1, $1, $2, $3 FROM rounds",
        &[&draw.seal.0.as_slice(), &draw.drawn_at, &(draw.bets as i64)],
    )
    .await?;
    Ok(())
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
/// Why [`reach`] gave up.
enum Unreached {
    /// The configuration lacks what the database asks for.
    Configuration(String),
    /// Refused, or unreachable for the whole patience.
    Failed(String),
}

async fn reach(
    target: &PgTarget,
    session: Session,
    patience: Duration,
) -> Result<Client, Unreached> {
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
            Err(ConnectError {
                reason: why,
                retry,
                configuration,
            }) => {
                let now = Instant::now();
                if !retry {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    if configuration {
                        return Err(Unreached::Configuration(why));
                    }
                    return Err(Unreached::Failed(format!("refused the connection: {why}")));
                }
                if now >= deadline {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    return Err(Unreached::Failed(format!(
                        "unreachable for {} s ({attempt} attempts): {why}",
                        patience.as_secs()
                    )));
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
                    Ok(Err(reason)) => Err(StorageError::Database { target, reason }),
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
            let fail = |e| self.error(reason(e));
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
            let fail = |e| self.error(reason(e));
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
                .map_err(|e| self.error(reason(e)))?;
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
            let fail = |e| self.error(reason(e));
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
            let tally = tally_in(&tx, winning_number).await.map_err(fail)?;
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
            let draw = Draw::from_tally(
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
                            error = why.as_str(),
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

/// The tables that hold one round: kept together by `lottery new-round`.
const ROUND_TABLES: [&str; 4] = ["bets", "agencies", "draw", "draw_agencies"];

/// A draw record (or rounds) error: the tables named, for messages.
fn record_error(target: &PgTarget, reason: String) -> StorageError {
    StorageError::Record {
        kept: RecordAt::Tables(where_(target)),
        reason,
    }
}

/// A digest read from a `bytea` column.
fn digest_of(bytes: &[u8]) -> Option<Digest> {
    <[u8; DIGEST_LEN]>::try_from(bytes).ok().map(Digest)
}

/// Chains the rows `sql` selects (`agency, seq, first_name, last_name,
/// document, birthdate, number`, ordered by agency then seq) into each
/// agency's receipt with [`crate::receipt`], the one definition; the
/// documents of the rows whose number is `winning` are the winners. Rows are
/// streamed, never all held.
async fn chain_rows(
    tx: &Transaction<'_>,
    sql: &str,
    winning: Option<u16>,
) -> Result<Recomputed, String> {
    let rows = tx
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .map_err(reason)?;
    futures::pin_mut!(rows);
    let mut found = Recomputed::default();
    while let Some(row) = rows.try_next().await.map_err(reason)? {
        let (agency, seq): (i32, i64) = (row.get(0), row.get(1));
        let texts: [&str; 4] = [row.get(2), row.get(3), row.get(4), row.get(5)];
        let number: i32 = row.get(6);
        // The wire bounds numbers to 0..=9999; anything else was written
        // behind the central's back (and would not hash as itself).
        let Some(number) = u16::try_from(number).ok().filter(|n| *n <= 9999) else {
            return Err(format!(
                "bets row (agency {agency}, seq {seq}): number {number} is not within 0..=9999"
            ));
        };
        let agency = agency as AgencyId;
        found
            .receipts
            .entry(agency)
            .or_insert_with(|| Receipt::empty(agency))
            .push(texts.map(str::as_bytes), number);
        if winning == Some(number) {
            found
                .winners
                .entry(agency)
                .or_default()
                .push(texts[2].to_string());
        }
    }
    Ok(found)
}

/// Each agency's receipt as `agencies` holds it. A table from before
/// receipts (digest NULL beside stored rows) gets its digests recomputed
/// from `bets` here, once, and written back. Returns the receipts and how
/// many were recomputed.
async fn read_receipts(
    target: &PgTarget,
    client: &mut Client,
) -> Result<(BTreeMap<AgencyId, Receipt>, usize), StorageError> {
    let fail = |reason: String| StorageError::Database {
        target: where_(target),
        reason,
    };
    let tx = client.transaction().await.map_err(|e| fail(reason(e)))?;
    let rows = tx
        .query(
            "SELECT agency, stored, digest FROM agencies WHERE stored > 0 FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| fail(reason(e)))?;
    let mut receipts = BTreeMap::new();
    let mut missing = Vec::new();
    for row in rows {
        let (agency, count, digest): (i32, i64, Option<&[u8]>) =
            (row.get(0), row.get(1), row.get(2));
        match digest {
            None => missing.push((agency as AgencyId, count as u64)),
            Some(bytes) => {
                let digest = digest_of(bytes).ok_or_else(|| {
                    fail(format!(
                        "agencies: agency {agency}'s digest is not 32 bytes"
                    ))
                })?;
                receipts.insert(
                    agency as AgencyId,
                    Receipt {
                        count: count as u64,
                        digest,
                    },
                );
            }
        }
    }
    if !missing.is_empty() {
        let found = chain_rows(
            &tx,
            "SELECT b.agency, b.seq, b.first_name, b.last_name, b.document, b.birthdate, \
             b.number FROM bets b JOIN agencies a USING (agency) \
             WHERE a.digest IS NULL AND a.stored > 0 AND b.seq < a.stored \
             ORDER BY b.agency, b.seq",
            None,
        )
        .await
        .map_err(fail)?;
        for &(agency, count) in &missing {
            let receipt = found
                .receipts
                .get(&agency)
                .copied()
                .unwrap_or_else(|| Receipt::empty(agency));
            if receipt.count != count {
                return Err(fail(format!(
                    "agencies says agency {agency} stored {count} bets, but bets holds {} of \
                     them",
                    receipt.count
                )));
            }
            tx.execute(
                "UPDATE agencies SET digest = $2 WHERE agency = $1",
                &[&(agency as i32), &receipt.digest.0.as_slice()],
            )
            .await
            .map_err(|e| fail(reason(e)))?;
            receipts.insert(agency, receipt);
        }
    }
    tx.commit().await.map_err(|e| fail(reason(e)))?;
    Ok((receipts, missing.len()))
}

/// Where a database keeps the receipts agencies resume from, for messages.
pub const SERVED_FROM: &str = "table agencies";

/// Each agency's receipt as table `agencies` serves it to a `HELLO` (a
/// count of 0 is the empty receipt, whatever its digest says), read in
/// one snapshot without changing anything: what `lottery verify` checks
/// against the rows of `bets`.
///
/// # Errors
/// The database failed, or a digest beside stored bets is not 32 bytes.
pub async fn served(
    target: &PgTarget,
    client: &mut Client,
) -> Result<BTreeMap<AgencyId, Receipt>, StorageError> {
    let fail = |reason: String| StorageError::Database {
        target: where_(target),
        reason,
    };
    let tx = snapshot(client).await.map_err(|e| fail(reason(e)))?;
    let rows = tx
        .query("SELECT agency, stored, digest FROM agencies", &[])
        .await
        .map_err(|e| fail(reason(e)))?;
    let mut served = BTreeMap::new();
    for row in rows {
        let (agency, count, digest): (i32, i64, Option<&[u8]>) =
            (row.get(0), row.get(1), row.get(2));
        let agency = agency as AgencyId;
        let receipt = if count == 0 {
            Receipt::empty(agency)
        } else {
            let digest = digest.and_then(digest_of).ok_or_else(|| {
                fail(format!(
                    "agencies: agency {agency}'s digest is not 32 bytes"
                ))
            })?;
            Receipt {
                count: count as u64,
                digest,
            }
        };
        served.insert(agency, receipt);
    }
    tx.commit().await.map_err(|e| fail(reason(e)))?;
    Ok(served)
}

/// Recomputes every agency's receipt and its winners for `winning_number`
/// from the rows of `bets`, in one read-only snapshot: what `lottery
/// verify` and the central's start on a drawn round compare with the
/// record.
///
/// # Errors
/// The database failed, or a row holds a number out of range.
pub async fn recompute(
    target: &PgTarget,
    client: &mut Client,
    winning_number: u16,
) -> Result<Recomputed, StorageError> {
    let fail = |reason: String| StorageError::Database {
        target: where_(target),
        reason,
    };
    let tx = snapshot(client).await.map_err(|e| fail(reason(e)))?;
    let found = chain_rows(&tx, BETS_IN_ORDER, Some(winning_number))
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(|e| fail(reason(e)))?;
    Ok(found)
}

/// Every bet, in each agency's stored order.
const BETS_IN_ORDER: &str = "SELECT agency, seq, first_name, last_name, document, birthdate, \
                             number FROM bets ORDER BY agency, seq";

/// A read-only transaction over one snapshot.
async fn snapshot(client: &mut Client) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}

/// The current round's sealed row in `rounds`, if it is sealed: its
/// number, seal, drawn_at and bets.
async fn sealed_round(
    tx: &Transaction<'_>,
) -> Result<Option<(i32, Vec<u8>, String, i64)>, tokio_postgres::Error> {
    Ok(tx
        .query_opt(
            "SELECT round, seal, drawn_at, bets FROM rounds WHERE kept_as IS NULL \
             ORDER BY round DESC LIMIT 1",
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))))
}

/// The draw record in `tx`, checked against `rounds`: a record missing
/// while its round is sealed, or one whose seal is not the round's, is an
/// error (as the bets file's ledger does).
async fn load_draw_in(
    target: &PgTarget,
    tx: &Transaction<'_>,
) -> Result<Option<Draw>, StorageError> {
    let fail = |e| StorageError::Database {
        target: where_(target),
        reason: reason(e),
    };
    let refuse = |reason: String| record_error(target, reason);
    let head = tx
        .query_opt("SELECT winning_number, drawn_at, bets, seal FROM draw", &[])
        .await
        .map_err(fail)?;
    let round = sealed_round(tx).await.map_err(fail)?;
    let Some(head) = head else {
        return match round {
            None => Ok(None),
            Some((round, seal, drawn_at, bets)) => Err(refuse(format!(
                "missing, but round {round} was sealed on {drawn_at} over {bets} bets (seal {}), \
                 as table rounds says: a deleted draw does not make the central draw again; \
                 restore the rows of draw and draw_agencies (from a backup)",
                digest_of(&seal).map_or_else(|| "?".into(), |d| d.to_string())
            ))),
        };
    };
    let (winning_number, drawn_at, bets, seal): (i32, String, i64, Option<Vec<u8>>) =
        (head.get(0), head.get(1), head.get(2), head.get(3));
    let before_receipts = || {
        refuse(
            "recorded before receipts (schema version 1): it has no seal and digests, so it \
             cannot be checked"
                .into(),
        )
    };
    let seal = digest_of(&seal.ok_or_else(before_receipts)?).ok_or_else(before_receipts)?;
    let mut draw = Draw {
        winning_number: u16::try_from(winning_number)
            .ok()
            .filter(|n| *n <= 9999)
            .ok_or_else(|| refuse(format!("bad winning number {winning_number}")))?,
        drawn_at,
        winners: HashMap::new(),
        receipts: BTreeMap::new(),
        seal,
        bets: bets as u64,
        elapsed: Duration::ZERO,
    };
    for row in tx
        .query(
            "SELECT agency, bets, digest, winners FROM draw_agencies",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let (agency, count, digest, winners): (i32, i64, Option<&[u8]>, Vec<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let agency = agency as AgencyId;
        let digest = digest.and_then(digest_of).ok_or_else(before_receipts)?;
        draw.receipts.insert(
            agency,
            Receipt {
                count: count as u64,
                digest,
            },
        );
        if !winners.is_empty() {
            draw.winners.insert(agency, winners);
        }
    }
    if let Some((round, sealed, _, _)) = round {
        if digest_of(&sealed) != Some(draw.seal) {
            return Err(refuse(format!(
                "its seal {} is not the seal round {round} was drawn with, {} (in table rounds): \
                 the record was replaced",
                draw.seal,
                digest_of(&sealed).map_or_else(|| "?".into(), |d| d.to_string())
            )));
        }
    }
    Ok(Some(draw))
}

/// The draw record, checked against `rounds` (see [`load_draw_in`]), read
/// in one snapshot without changing anything.
///
/// # Errors
/// The database failed, or the record is missing or replaced.
pub async fn load_draw(
    target: &PgTarget,
    client: &mut Client,
) -> Result<Option<Draw>, StorageError> {
    let fail = |e| StorageError::Database {
        target: where_(target),
        reason: reason(e),
    };
    let tx = snapshot(client).await.map_err(fail)?;
    let draw = load_draw_in(target, &tx).await?;
    tx.commit().await.map_err(fail)?;
    Ok(draw)
}

/// A connection for the operator's tools (`lottery verify`, `lottery
/// new-round`): one attempt, and a schema this build knows at its latest
/// version (the central migrates it when it starts).
///
/// # Errors
/// The database cannot be reached, or its schema is not the latest.
pub async fn tool_connection(target: &PgTarget) -> Result<Client, StorageError> {
    let fail = |reason: String| StorageError::Database {
        target: where_(target),
        reason,
    };
    let session = Session {
        durability: Durability::Sync,
    };
    let client = connect(target, session).await.map_err(|e| fail(e.reason))?;
    let version = schema::version(&client).await.map_err(fail)?;
    if version != schema::MIGRATIONS.len() {
        return Err(fail(format!(
            "the schema is version {version}, this build's is {}: start the central on it once \
             (it migrates the schema), or run a matching lottery",
            schema::MIGRATIONS.len()
        )));
    }
    Ok(client)
}

/// A tool's connection to the database (`lottery verify`, `winners`,
/// `new-round`): checked against this build's schema once, then asked
/// everything the tool needs.
pub struct Tool {
    target: PgTarget,
    client: Client,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool")
            .field("target", &self.target)
            .finish()
    }
}

impl Tool {
    /// Connects to `target` as a tool: read only, nothing migrated.
    ///
    /// # Errors
    /// As [`tool_connection`].
    pub async fn open(target: &PgTarget) -> Result<Tool, StorageError> {
        let client = tool_connection(target).await?;
        Ok(Tool {
            target: target.clone(),
            client,
        })
    }

    /// As [`load_draw`].
    ///
    /// # Errors
    /// As [`load_draw`].
    pub async fn load_draw(&mut self) -> Result<Option<Draw>, StorageError> {
        load_draw(&self.target, &mut self.client).await
    }

    /// As [`recompute`].
    ///
    /// # Errors
    /// As [`recompute`].
    pub async fn recompute(&mut self, winning_number: u16) -> Result<Recomputed, StorageError> {
        recompute(&self.target, &mut self.client, winning_number).await
    }

    /// As [`served`].
    ///
    /// # Errors
    /// As [`served`].
    pub async fn served(&mut self) -> Result<BTreeMap<AgencyId, Receipt>, StorageError> {
        served(&self.target, &mut self.client).await
    }

    /// As [`new_round`].
    ///
    /// # Errors
    /// As [`new_round`].
    pub async fn new_round(
        &mut self,
        agencies: u32,
        winning_number: u16,
    ) -> Result<NewRound, StorageError> {
        new_round(&self.target, &mut self.client, agencies, winning_number).await
    }
}

/// `lottery new-round` on a database: the current round must be drawn and
/// its record must match its bets; its rows are then copied into tables
/// named by round and seal (`bets_round_1_a938d40f`, likewise `agencies_`,
/// `draw_`, `draw_agencies_`), the live tables emptied and `rounds` told
/// where the round went, all in one transaction. The next start of the
/// central is an empty round. Run it with the central stopped.
///
/// # Errors
/// The round is not drawn, its record does not match its bets, a kept
/// table's name is taken, or the database failed.
pub async fn new_round(
    target: &PgTarget,
    client: &mut Client,
    agencies: u32,
    winning_number: u16,
) -> Result<NewRound, StorageError> {
    let fail = |e| StorageError::Database {
        target: where_(target),
        reason: reason(e),
    };
    let refuse = |reason: String| record_error(target, reason);
    // A central keeps its writer's connections open while it runs (they
    // carry this build's application_name, or the URL's): one still
    // connected is still serving this round. One that lost every
    // connection (the database restarted, nothing written since) is not
    // seen: stopping the centrals first is still the operator's part.
    let running = client
        .query(
            "SELECT coalesce(host(client_addr), 'local socket') FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name = current_setting('application_name')",
            &[],
        )
        .await
        .map_err(fail)?;
    if !running.is_empty() {
        let from: BTreeSet<String> = running.iter().map(|r| r.get(0)).collect();
        return Err(StorageError::Database {
            target: where_(target),
            reason: format!(
                "{} connection(s) of a running central (from {}) are open on this database: a new \
             round starts with every central stopped: stop them, then run new-round again",
                running.len(),
                from.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .await
        .map_err(fail)?;
    // Nothing may change the round while it is checked and kept.
    tx.batch_execute(
        "LOCK TABLE bets, agencies, draw, draw_agencies, rounds IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .map_err(fail)?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(round) FILTER (WHERE kept_as IS NULL), \
                             coalesce(max(round), 0) + 1) FROM rounds",
            &[],
        )
        .await
        .map_err(fail)?
        .get(0);
    let current = current as u32;
    let Some(draw) = load_draw_in(target, &tx).await? else {
        let held: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM bets)", &[])
            .await
            .map_err(fail)?
            .get(0);
        if held {
            return Err(refuse(format!(
                "round {current} is not drawn yet (no draw record) and table bets holds bets: \
                 a new round starts only after the draw"
            )));
        }
        return Ok(NewRound::AlreadyEmpty { round: current });
    };
    let found = chain_rows(&tx, BETS_IN_ORDER, Some(draw.winning_number))
        .await
        .map_err(|reason| StorageError::Database {
            target: where_(target),
            reason,
        })?;
    let differences = receipt::differences(draw.claimed(), &found, agencies, winning_number);
    if !differences.is_empty() {
        return Err(refuse(format!(
            "does not match the stored bets, so the round is not kept as sealed: {}",
            differences.join("; ")
        )));
    }
    // A draw whose round row is gone (deleted by hand) is sealed now.
    let sealed = tx
        .query_opt(
            "SELECT round FROM rounds WHERE kept_as IS NULL AND seal = $1",
            &[&draw.seal.0.as_slice()],
        )
        .await
        .map_err(fail)?;
    let round = match sealed {
        Some(row) => row.get::<_, i32>(0) as u32,
        None => {
            tx.execute(
                "INSERT INTO rounds (round, seal, drawn_at, bets) VALUES ($1, $2, $3, $4)",
                &[
                    &(current as i32),
                    &draw.seal.0.as_slice(),
                    &draw.drawn_at,
                    &(draw.bets as i64),
                ],
            )
            .await
            .map_err(fail)?;
            current
        }
    };
    let suffix = format!("round_{round}_{}", draw.seal.short());
    for table in ROUND_TABLES {
        let kept = format!("{table}_{suffix}");
        let taken: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&kept])
            .await
            .map_err(fail)?
            .get(0);
        if taken {
            return Err(refuse(format!(
                "cannot keep round {round} as table {kept}: that table exists"
            )));
        }
        // A copy, not a rename: the live tables keep the shape (keys,
        // names) the migrations gave them.
        tx.batch_execute(&format!("CREATE TABLE {kept} AS TABLE {table}"))
            .await
            .map_err(fail)?;
    }
    tx.batch_execute(&format!("TRUNCATE {}", ROUND_TABLES.join(", ")))
        .await
        .map_err(fail)?;
    tx.execute(
        "UPDATE rounds SET kept_as = $2 WHERE round = $1",
        &[&(round as i32), &suffix],
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(NewRound::Kept {
        round,
        seal: draw.seal,
        bets: format!("table bets_{suffix} (receipts in agencies_{suffix})"),
        record: format!("tables draw_{suffix} and draw_agencies_{suffix}"),
    })
}
