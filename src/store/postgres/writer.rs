//! The database's writer: one task plans every write, and stores groups of
//! batches on a few connections at once.
//!
//! Connections hand it whole batches, their rows already encoded (see
//! [`super::rows`]), and go on reading while it works. The writer takes
//! every batch that is waiting as one group: it numbers the group's rows
//! after those planned before it and starts the group's transaction on a
//! connection of its own: `COPY … FROM STDIN (FORMAT binary)`, then the
//! agencies' new counts, then the commit, answering every batch of the
//! group once the commit returns (group commit, as the bets file's writer
//! groups its `fdatasync`; `synchronous_commit` is on).
//!
//! Up to [`CONNECTIONS`] groups are in flight, one after the other: while
//! one commits, the next one's rows are already being copied, so the
//! server never waits for the central between two commits. Their order is
//! kept by a [`Relay`] from each group to the next: a group updates
//! `agencies` only once the group before it holds its rows there (so
//! PostgreSQL queues the second update of an agency behind the first), and
//! commits only once the group before it committed; if that one failed, it
//! rolls back. So the groups commit in the order they were planned, and
//! nothing is ever stored after a batch that was not.
//!
//! Each bet's `seq` is its place in its agency's upload. The writer keeps
//! each agency's receipt as acknowledged (its count is the next `seq`): the
//! same receipts the central resumes agencies from. The receipt a batch
//! comes with is written to `agencies` in the batch's transaction, so what
//! is committed is exactly what is acknowledged. The update of `agencies`
//! is also the check that the rows are this central's to write: it changes
//! an agency's row only where it still holds what this central expects (its
//! count, and the epoch of this central's session of the agency), so rows
//! another central stored meanwhile, or a newer session of the agency on
//! another central, make it refuse that agency's batches; the group is then
//! copied again without them.
//!
//! When a transaction fails the writer drops its connection. A failure
//! before its `COMMIT` was sent stored nothing. A `COMMIT` whose answer was
//! lost leaves a doubt, settled before anything else is written: once
//! every group in flight is answered, the writer asks the database whether
//! that transaction committed (its id, `pg_xact_status`), and if it did,
//! removes its rows, never acknowledged (their agencies send them again),
//! unless someone counted them since: rows stored after them, or a session
//! of the agency opened on any central (its HELLO was answered with them).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::SinkExt;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Statement};
use tracing::{info, warn};

use super::connect::{connect, reason, Session};
use super::rows::{Rows, COPY, HEADER, TRAILER};
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::{Agency, PgTarget, Sequence, StoreMetrics, WriterMetrics};

/// The advisory lock an announcement's transaction holds ("finish" in
/// ASCII).
const FINISH_LOCK: i64 = 0x0000_6669_6e69_7368;

/// How many batches may wait for the writer before senders wait too.
pub const QUEUE_DEPTH: usize = 1024;

/// Groups in flight at once, each on a connection of its own. Two let one
/// group's rows be copied while the one before it commits; the third lets
/// the server copy two groups at once on this machine's two cores (see
/// docs/PERFORMANCE.md, "The PostgreSQL store").
pub const CONNECTIONS: usize = 3;

/// Most batches, and most rows, in one group: bounds a transaction's size
/// and so the wait of the first batch in it.
const MAX_GROUP: usize = 512;
const MAX_GROUP_ROWS: usize = 8192;

/// What a batch behind a failed one of its connection is told.
const BEHIND_A_FAILED_BATCH: &str = "an earlier batch of this connection was not stored";

/// What the batches of a group rolled back because the group before it
/// failed are told.
const BEHIND_A_FAILED_GROUP: &str =
    "not stored: an earlier transaction of this central failed (see the line before)";

/// One batch for the writer.
pub struct Append {
    /// Its bets, as rows still to be numbered.
    pub rows: Rows,
    /// The agency's receipt once these bets are stored.
    pub receipt: Receipt,
    pub sequence: Sequence,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// What the writer is asked to do.
pub enum Request {
    Append(Append),
    /// A session of the agency opened on this central: take a new epoch
    /// (fencing older sessions on every central), and answer what the
    /// table holds for it. Through the writer so that it is ordered with
    /// the commits: the counts it reads are final.
    Open(AgencyId, oneshot::Sender<Result<Agency, String>>),
    /// The agency finished: record it (fenced by the session's epoch), and
    /// answer how many of agencies `1..=n` (the second field) have
    /// finished, on every central.
    Finish(AgencyId, u32, oneshot::Sender<Result<u32, String>>),
    /// Store what was sent before, close the connections, then answer.
    Close(oneshot::Sender<()>),
}

/// A batch of a group in flight, waiting for its answer.
struct Pending {
    agency: AgencyId,
    sequence: Sequence,
    done: oneshot::Sender<Result<(), String>>,
}

/// What a group leaves in an agency's row of `agencies`, and what it
/// expects there before.
#[derive(Debug, Clone)]
struct Update {
    agency: AgencyId,
    /// The count the table must hold before the group.
    expected: i64,
    /// This central's session of the agency (see `Writer::epochs`).
    epoch: Option<i64>,
    /// The receipt after the group: its count is the table's count after.
    receipt: Receipt,
    /// The agency's row in `agencies` is known to be committed (see
    /// `Writer::rows`): nothing to create before locking it.
    row_exists: bool,
}

/// A group as its transaction writes it.
struct Plan {
    /// Each batch's rows, numbered, in order.
    chunks: Vec<(AgencyId, Bytes)>,
    updates: Vec<Update>,
}

/// A group's side of the relay to the next group. A sender dropped
/// unsent reads as `false`.
struct Relay {
    /// The group's rows of `agencies` are locked (or it wrote none):
    /// the next group may update its own.
    locked: Option<oneshot::Sender<bool>>,
    /// The group committed (`false`: it did not, or may not have).
    committed: Option<oneshot::Sender<bool>>,
}

/// The next group's side of the relay.
struct Baton {
    locked: oneshot::Receiver<bool>,
    committed: oneshot::Receiver<bool>,
}

fn relay() -> (Relay, Baton) {
    let (locked, locked_rx) = oneshot::channel();
    let (committed, committed_rx) = oneshot::channel();
    (
        Relay {
            locked: Some(locked),
            committed: Some(committed),
        },
        Baton {
            locked: locked_rx,
            committed: committed_rx,
        },
    )
}

fn signal(slot: &mut Option<oneshot::Sender<bool>>, value: bool) {
    if let Some(tx) = slot.take() {
        let _ = tx.send(value);
    }
}

/// How a group ended.
enum Outcome {
    /// Committed, but for the agencies in `refused` (and why), whose
    /// batches were left out.
    Stored { refused: HashMap<AgencyId, String> },
    /// Rolled back because the group before it failed: nothing stored.
    Behind,
    /// The transaction failed. `doubt`: its `COMMIT` was sent, so it may
    /// have committed, its answer lost; `None` when it failed before, and
    /// so stored nothing.
    Failed { why: String, doubt: Option<Doubt> },
}

/// A group whose `COMMIT` was sent but never answered: what identifies its
/// rows, so that only they are ever taken back out.
#[derive(Debug, Clone)]
struct Doubt {
    /// The group's transaction id (`pg_current_xact_id`): the database
    /// says whether it committed.
    xid: i64,
    /// Per agency, the count its commit left, and the epoch the agency's
    /// row held under the group's lock: if either moved on since, someone
    /// counted those rows (a later commit, or a HELLO answered with them).
    agencies: HashMap<AgencyId, (i64, i64)>,
}

/// A connection of the writer, with the statements a group runs prepared
/// once, so a group's statements each take one round trip.
struct Conn {
    client: Client,
    /// The server's address as it answered (`IP:PORT`; `None` over a Unix
    /// socket): with several hosts, the primary this connection reached.
    server: Option<String>,
    copy: Statement,
    create: Statement,
    lock: Statement,
    upsert: Statement,
}

/// Makes sure each of the group's agencies has its row in `agencies`, so
/// that [`LOCK_AGENCIES`] has a row to lock: a row another transaction is
/// inserting is waited for (the conflict), then left as that one made it.
const CREATE_AGENCIES: &str = "INSERT INTO agencies (agency) \
    SELECT a FROM unnest($1::int4[]) AS a ORDER BY a ON CONFLICT (agency) DO NOTHING";

/// Locks the group's agencies' rows (see [`update_agencies`]), and names
/// the group's transaction (see [`Doubt`]).
const LOCK_AGENCIES: &str = "SELECT agency, stored, epoch, pg_current_xact_id()::text::int8 \
                             FROM agencies WHERE agency = ANY($1) ORDER BY agency FOR UPDATE";

/// Moves the group's agencies' counts and digests.
const UPSERT_AGENCIES: &str = "INSERT INTO agencies (agency, stored, digest) \
    SELECT * FROM unnest($1::int4[], $2::int8[], $3::bytea[]) \
    ON CONFLICT (agency) DO UPDATE SET stored = excluded.stored, digest = excluded.digest";

/// The address the server answered on: which host of several is the one
/// written to.
const SERVER_ADDRESS: &str = "SELECT host(inet_server_addr()) || ':' || inet_server_port()";

impl Conn {
    async fn prepare(client: Client) -> Result<Conn, String> {
        let (server, copy, create, lock, upsert) = futures::try_join!(
            client.query_one(SERVER_ADDRESS, &[]),
            client.prepare(COPY),
            client.prepare(CREATE_AGENCIES),
            client.prepare(LOCK_AGENCIES),
            client.prepare(UPSERT_AGENCIES)
        )
        .map_err(reason)?;
        Ok(Conn {
            client,
            server: server.get(0),
            copy,
            create,
            lock,
            upsert,
        })
    }
}

/// A group's task's result: its connection back, unless it failed.
struct Finished {
    client: Option<Conn>,
    outcome: Outcome,
}

/// A group in flight.
struct InFlight {
    task: JoinHandle<Finished>,
    /// When its transaction started, for the commit time.
    started: std::time::Instant,
    pending: Vec<Pending>,
    /// Per agency, the receipt once the group is stored.
    receipts: HashMap<AgencyId, Receipt>,
}

/// The writer's state.
struct Writer {
    target: PgTarget,
    session: Session,
    /// Connections not in use by a group.
    idle: Vec<Conn>,
    /// A connection broke since the last one was opened: the next is
    /// logged as a reconnection.
    lost: bool,
    /// Per agency, the receipt acknowledged: its count is where the next
    /// group not yet planned starts, once the groups in flight are in.
    acked: HashMap<AgencyId, Receipt>,
    /// Per agency, the count after the groups planned so far: the next
    /// batch's first `seq`. Equal to `acked`'s counts when nothing is in
    /// flight.
    planned: HashMap<AgencyId, i64>,
    /// A transaction whose `COMMIT` was never answered, until it is
    /// settled (see `settle_doubt`).
    doubt: Option<Doubt>,
    /// Per agency, the epoch of its session opened last on this central
    /// (older sessions here were closed by the lottery before it opened):
    /// the table's `agencies.epoch` must still hold it for this central to
    /// write for the agency, or a newer session opened on another central.
    /// Absent for an agency that never said HELLO here (a reference agency).
    epochs: HashMap<AgencyId, i64>,
    /// Agencies whose row in `agencies` this writer saw committed. Rows are
    /// never deleted while centrals run, so a group need not create these.
    rows: HashSet<AgencyId>,
    /// The groups in flight, in the order they commit.
    in_flight: VecDeque<InFlight>,
    /// The relay from the group planned last, for the next one.
    baton: Option<Baton>,
    /// A group failed: no new group starts until those in flight are
    /// answered (they all fail behind it).
    failing: bool,
    /// Each group's commit time and size.
    metrics: StoreMetrics,
    /// Groups in flight and reconnections.
    writer_metrics: WriterMetrics,
    /// The server its last new connection reached.
    primary: Arc<Mutex<Option<String>>>,
}

/// What the writer measures, handed in by the store that starts it.
pub struct Measured {
    /// Every store's measurements.
    pub store: StoreMetrics,
    /// The database writer's own.
    pub writer: WriterMetrics,
    /// The server its last new connection reached (see [`Conn`]).
    pub primary: Arc<Mutex<Option<String>>>,
}

/// Runs the writer until it is asked to close or every sender is gone.
pub async fn run(
    target: PgTarget,
    session: Session,
    client: Client,
    stored: HashMap<AgencyId, Receipt>,
    mut requests: mpsc::Receiver<Request>,
    measured: Measured,
) {
    // Prepared on first use (see `Writer::connection`) when this fails.
    let idle: Vec<Conn> = Conn::prepare(client).await.into_iter().collect();
    let mut writer = Writer {
        target,
        session,
        idle,
        lost: false,
        planned: HashMap::new(),
        rows: stored.keys().copied().collect(),
        acked: stored,
        doubt: None,
        epochs: HashMap::new(),
        in_flight: VecDeque::new(),
        baton: None,
        failing: false,
        metrics: measured.store,
        writer_metrics: measured.writer,
        primary: measured.primary,
    };
    if let Some(conn) = writer.idle.first() {
        writer.reached(conn);
    }
    writer.reset_plan();
    let mut waiting: VecDeque<Append> = VecDeque::new();
    // A request that must wait for every batch before it to be answered.
    let mut control: Option<Request> = None;
    let mut senders_gone = false;
    loop {
        let accepting = control.is_none() && !senders_gone;
        let in_flight = &mut writer.in_flight;
        let event = tokio::select! {
            finished = async {
                match in_flight.front_mut() {
                    Some(group) => (&mut group.task).await,
                    None => std::future::pending().await,
                }
            } => Event::Finished(finished),
            request = requests.recv(), if accepting => Event::Request(request),
        };
        match event {
            Event::Finished(finished) => {
                let group = writer
                    .in_flight
                    .pop_front()
                    .expect("the front group finished");
                writer
                    .writer_metrics
                    .groups_in_flight
                    .set(writer.in_flight.len() as i64);
                writer.answer(group, finished);
            }
            Event::Request(None) => senders_gone = true,
            Event::Request(Some(Request::Append(a))) => waiting.push_back(a),
            Event::Request(Some(other)) => control = Some(other),
        }
        // Every batch already waiting joins the group about to start.
        while control.is_none() && !senders_gone && waiting.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(Request::Append(a)) => waiting.push_back(a),
                Ok(other) => control = Some(other),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => senders_gone = true,
            }
        }
        if writer.in_flight.is_empty() {
            writer.failing = false;
            writer.baton = None;
            writer.reset_plan();
        }
        while !waiting.is_empty() && !writer.failing && writer.in_flight.len() < CONNECTIONS {
            writer.start_group(&mut waiting).await;
        }
        if !writer.in_flight.is_empty() || !waiting.is_empty() {
            continue;
        }
        match control.take() {
            Some(Request::Open(agency, done)) => {
                let _ = done.send(writer.open(agency).await);
                writer.reset_plan();
            }
            Some(Request::Finish(agency, agencies, done)) => {
                let _ = done.send(writer.finish(agency, agencies).await);
            }
            Some(Request::Close(done)) => {
                writer.close(&mut requests);
                let _ = done.send(());
                return;
            }
            Some(Request::Append(_)) => unreachable!("batches wait in `waiting`"),
            None if senders_gone => {
                writer.close(&mut requests);
                return;
            }
            None => {}
        }
    }
}

/// What woke the writer.
enum Event {
    Finished(Result<Finished, tokio::task::JoinError>),
    Request(Option<Request>),
}

impl Writer {
    /// Plans from what is acknowledged: nothing is in flight.
    fn reset_plan(&mut self) {
        self.planned = self
            .acked
            .iter()
            .map(|(&agency, r)| (agency, r.count as i64))
            .collect();
    }

    /// Fails what raced in behind a close, drops the connections and says
    /// so.
    fn close(&mut self, requests: &mut mpsc::Receiver<Request>) {
        requests.close();
        while let Ok(request) = requests.try_recv() {
            let closed = || "the database store is closed".to_string();
            match request {
                Request::Append(a) => {
                    let _ = a.done.send(Err(closed()));
                }
                Request::Close(done) => {
                    let _ = done.send(());
                }
                Request::Open(_, done) => {
                    let _ = done.send(Err(closed()));
                }
                Request::Finish(_, _, done) => {
                    let _ = done.send(Err(closed()));
                }
            }
        }
        self.idle.clear();
        info!(
            action = action::CLOSE_DATABASE,
            result = result::SUCCESS,
            storage = %self.target
        );
    }

    /// A connection for a group or a statement: an idle one, or a new one.
    async fn connection(&mut self) -> Result<Conn, String> {
        while let Some(conn) = self.idle.pop() {
            if !conn.client.is_closed() {
                return Ok(conn);
            }
        }
        let client = Conn::prepare(connect(&self.target, self.session).await?).await?;
        self.reached(&client);
        if std::mem::take(&mut self.lost) {
            self.writer_metrics.retries.inc();
            info!(
                action = action::DATABASE_CONNECT,
                result = result::SUCCESS,
                storage = %self.target,
                state = "reconnected"
            );
        }
        Ok(client)
    }

    /// Notes the server a new connection reached.
    fn reached(&self, conn: &Conn) {
        *self.primary.lock().unwrap_or_else(|p| p.into_inner()) = conn.server.clone();
    }

    /// Gives a connection back after a statement: kept if it worked.
    fn give_back<T>(&mut self, client: Conn, outcome: &Result<T, String>) {
        if outcome.is_ok() {
            self.idle.push(client);
        } else {
            self.lost = true;
        }
    }

    /// Plans a group from the batches waiting (up to the limits) and starts
    /// its transaction.
    async fn start_group(&mut self, waiting: &mut VecDeque<Append>) {
        if let Err(why) = self.settle_doubt().await {
            // Nothing can be written before the doubt is cleared: fail
            // what waits, and try again with the next batches.
            self.fail_waiting(waiting, &why);
            return;
        }
        let mut pending = Vec::new();
        let mut chunks = Vec::new();
        let mut receipts: HashMap<AgencyId, Receipt> = HashMap::new();
        let mut expected: Vec<(AgencyId, i64)> = Vec::new();
        let mut rows = 0;
        while let Some(next) = waiting.front() {
            if pending.len() == MAX_GROUP || (rows > 0 && rows + next.rows.len() > MAX_GROUP_ROWS) {
                break;
            }
            let a = waiting.pop_front().expect("looked at above");
            if a.sequence.is_broken() {
                let _ = a.done.send(Err(BEHIND_A_FAILED_BATCH.into()));
                continue;
            }
            let agency = a.rows.agency();
            let at = self.planned.get(&agency).copied().unwrap_or(0);
            let after = at + a.rows.len() as i64;
            // The receipt must describe exactly the rows committed with it.
            if a.receipt.count as i64 != after {
                a.sequence.mark_broken();
                let _ = a.done.send(Err(format!(
                    "agency {agency}: the batch's receipt counts {} bets, the table would hold \
                     {after}",
                    a.receipt.count
                )));
                continue;
            }
            if !receipts.contains_key(&agency) {
                expected.push((agency, at));
            }
            self.planned.insert(agency, after);
            // A later batch of the group supersedes it.
            receipts.insert(agency, a.receipt);
            rows += a.rows.len();
            if !a.rows.is_empty() {
                chunks.push((agency, a.rows.number_from(at)));
            }
            pending.push(Pending {
                agency,
                sequence: a.sequence,
                done: a.done,
            });
        }
        if pending.is_empty() {
            return;
        }
        // In order of agency, as every transaction locks them.
        expected.sort_unstable();
        let updates: Vec<Update> = expected
            .into_iter()
            .map(|(agency, expected)| Update {
                agency,
                expected,
                epoch: self.epochs.get(&agency).copied(),
                receipt: receipts[&agency],
                row_exists: self.rows.contains(&agency),
            })
            .collect();
        let client = match self.connection().await {
            Ok(client) => client,
            Err(why) => {
                self.lost = true;
                warn!(
                    action = action::STORE,
                    result = result::FAIL,
                    storage = %self.target,
                    batches = pending.len(),
                    error = why.as_str()
                );
                for p in pending {
                    p.sequence.mark_broken();
                    let _ = p.done.send(Err(why.clone()));
                }
                // Nothing of this group was written. The plan goes back to
                // what is acknowledged: now, or once the groups in flight
                // (which may still commit) are answered.
                if self.in_flight.is_empty() {
                    self.reset_plan();
                } else {
                    self.failing = true;
                }
                return;
            }
        };
        let (relay, baton) = relay();
        let after = self.baton.replace(baton);
        let task = tokio::spawn(store_group(client, Plan { chunks, updates }, after, relay));
        self.in_flight.push_back(InFlight {
            task,
            started: std::time::Instant::now(),
            pending,
            receipts,
        });
        self.writer_metrics
            .groups_in_flight
            .set(self.in_flight.len() as i64);
    }

    /// Fails every batch waiting with `why`.
    fn fail_waiting(&mut self, waiting: &mut VecDeque<Append>, why: &str) {
        warn!(
            action = action::STORE,
            result = result::FAIL,
            storage = %self.target,
            batches = waiting.len(),
            error = why
        );
        for a in waiting.drain(..) {
            a.sequence.mark_broken();
            let _ = a.done.send(Err(why.to_string()));
        }
    }

    /// Answers a group's batches from how its transaction ended.
    fn answer(&mut self, group: InFlight, finished: Result<Finished, tokio::task::JoinError>) {
        self.metrics
            .commit_seconds
            .observe(group.started.elapsed().as_secs_f64());
        self.metrics
            .group_batches
            .observe(group.pending.len() as f64);
        // A task that panicked leaves no doubt to settle: should its
        // commit have happened, the table holds more than this central
        // acknowledged, and its agencies' batches are refused until a HELLO
        // reads the table again. Nothing is removed that is not known to be
        // this central's.
        let finished = finished.unwrap_or_else(|e| Finished {
            client: None,
            outcome: Outcome::Failed {
                why: format!("the writer's task failed: {e}"),
                doubt: None,
            },
        });
        match finished.client {
            Some(client) => self.idle.push(client),
            None => self.lost = true,
        }
        let why = match finished.outcome {
            Outcome::Stored { refused } => {
                for (&agency, &receipt) in &group.receipts {
                    if !refused.contains_key(&agency) {
                        self.acked.insert(agency, receipt);
                        self.rows.insert(agency);
                    }
                }
                for (&agency, why) in &refused {
                    warn!(
                        action = action::STORE,
                        result = result::FAIL,
                        storage = %self.target,
                        agency,
                        error = why.as_str()
                    );
                    // Later groups planned on top of the refused batches
                    // are refused as well; plan from the table's count.
                    let acked = self.acked.get(&agency).map_or(0, |r| r.count as i64);
                    self.planned.insert(agency, acked);
                }
                for p in group.pending {
                    match refused.get(&p.agency) {
                        None => {
                            let _ = p.done.send(Ok(()));
                        }
                        Some(why) => {
                            let why = if p.sequence.is_broken() {
                                BEHIND_A_FAILED_BATCH.to_string()
                            } else {
                                why.clone()
                            };
                            p.sequence.mark_broken();
                            let _ = p.done.send(Err(why));
                        }
                    }
                }
                return;
            }
            Outcome::Behind => BEHIND_A_FAILED_GROUP.to_string(),
            Outcome::Failed { why, doubt } => {
                warn!(
                    action = action::STORE,
                    result = result::FAIL,
                    storage = %self.target,
                    batches = group.pending.len(),
                    error = why.as_str()
                );
                // Cleared up before the next group (see `settle_doubt`).
                // Groups behind this one roll back without sending their
                // `COMMIT`, so at most one is in doubt.
                if self.doubt.is_none() {
                    self.doubt = doubt;
                }
                why
            }
        };
        self.failing = true;
        for p in group.pending {
            // Before answering: a later batch of the same connection,
            // already queued, must not be stored.
            p.sequence.mark_broken();
            let _ = p.done.send(Err(why.clone()));
        }
    }

    /// Clears up a commit whose answer was lost, if one is pending (see
    /// `doubt`), on a working connection.
    async fn settle_doubt(&mut self) -> Result<(), String> {
        if self.doubt.is_none() {
            return Ok(());
        }
        let mut client = self.connection().await.inspect_err(|_| self.lost = true)?;
        let doubt = self.doubt.as_ref().expect("checked above");
        let removed = forget_unacknowledged(&mut client.client, &self.acked, doubt).await;
        self.give_back(client, &removed);
        let removed = removed?;
        if removed > 0 {
            warn!(
                action = action::STORE,
                result = result::SUCCESS,
                storage = %self.target,
                removed,
                message = "removed bets whose commit was never acknowledged; \
                           their agencies send them again"
            );
        }
        self.doubt = None;
        Ok(())
    }

    /// See [`Request::Open`].
    async fn open(&mut self, agency: AgencyId) -> Result<Agency, String> {
        self.settle_doubt().await?;
        let client = self.connection().await.inspect_err(|_| self.lost = true)?;
        let row = client
            .client
            .query_one(
                "INSERT INTO agencies AS a (agency, epoch) VALUES ($1, 1) \
                 ON CONFLICT (agency) DO UPDATE SET epoch = a.epoch + 1 \
                 RETURNING a.stored, a.digest, a.epoch, a.finished",
                &[&(agency as i32)],
            )
            .await
            .map_err(reason);
        self.give_back(client, &row);
        let row = row?;
        let (stored, digest, epoch, finished): (i64, Option<&[u8]>, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let receipt = if stored == 0 {
            Receipt::empty(agency)
        } else {
            let digest = digest
                .and_then(super::digest_of)
                .ok_or_else(|| format!("agencies: agency {agency}'s digest is not 32 bytes"))?;
            Receipt {
                count: stored as u64,
                digest,
            }
        };
        if stored == 0 {
            self.acked.remove(&agency);
        } else {
            self.acked.insert(agency, receipt);
        }
        self.epochs.insert(agency, epoch);
        self.rows.insert(agency);
        Ok(Agency { receipt, finished })
    }

    /// See [`Request::Finish`].
    async fn finish(&mut self, agency: AgencyId, agencies: u32) -> Result<u32, String> {
        let epoch = self.epochs.get(&agency).copied();
        let mut client = self.connection().await.inspect_err(|_| self.lost = true)?;
        let finished = announce(&mut client.client, agency, epoch, agencies).await;
        // A refusal (superseded) leaves the connection as good as before.
        match &finished {
            Err(why) if *why != superseded(agency) => self.lost = true,
            _ => self.idle.push(client),
        }
        finished
    }
}

/// Records that `agency` finished, fenced by `epoch`, and counts those of
/// agencies `1..=agencies` that did, on every central.
async fn announce(
    client: &mut Client,
    agency: AgencyId,
    epoch: Option<i64>,
    agencies: u32,
) -> Result<u32, String> {
    let tx = client.transaction().await.map_err(reason)?;
    // Announcements on different centrals take turns: two last ones at
    // once would each count the other's as not yet committed, and neither
    // would draw. Each statement after the lock sees every announcement
    // committed before it.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FINISH_LOCK])
        .await
        .map_err(reason)?;
    let marked = tx
        .execute(
            "INSERT INTO agencies AS a (agency, finished) VALUES ($1, true) \
             ON CONFLICT (agency) DO UPDATE SET finished = true \
             WHERE $2::int8 IS NULL OR a.epoch = $2",
            &[&(agency as i32), &epoch],
        )
        .await
        .map_err(reason)?;
    if marked == 0 {
        return Err(superseded(agency));
    }
    let count: i64 = tx
        .query_one(super::FINISHED_COUNT, &[&(agencies as i32)])
        .await
        .map_err(reason)?
        .get(0);
    tx.commit().await.map_err(reason)?;
    Ok(count as u32)
}

/// One group's transaction, on its own connection (see the module's
/// documentation for the order it keeps with the groups around it).
async fn store_group(conn: Conn, plan: Plan, after: Option<Baton>, mut relay: Relay) -> Finished {
    let Plan {
        mut chunks,
        mut updates,
    } = plan;
    let (mut after_locked, after_committed) = match after {
        Some(b) => (Some(b.locked), Some(b.committed)),
        None => (None, None),
    };
    let mut refused = HashMap::new();
    // A rollback that failed leaves the connection in doubt.
    let mut reusable = true;
    // Set once the `COMMIT` is sent: before, a failure stored nothing.
    let mut sent: Option<Doubt> = None;
    let stored: Result<Outcome, String> = async {
        let doubt = loop {
            copy(&conn, &chunks).await?;
            if let Some(locked) = after_locked.take() {
                if !locked.await.unwrap_or(false) {
                    reusable = roll_back(&conn).await;
                    return Ok(Outcome::Behind);
                }
            }
            let (left_out, doubt) = update_agencies(&conn, &updates).await?;
            if left_out.is_empty() {
                break doubt;
            }
            // Some agencies' rows are not what this central expects: leave
            // their batches out, and store the others' all the same.
            refused.extend(left_out);
            if !roll_back(&conn).await {
                return Err("the transaction could not be rolled back".to_string());
            }
            updates.retain(|u| !refused.contains_key(&u.agency));
            chunks.retain(|(agency, _)| !refused.contains_key(agency));
            if updates.is_empty() {
                signal(&mut relay.locked, true);
                let before = match after_committed {
                    Some(committed) => committed.await.unwrap_or(false),
                    None => true,
                };
                signal(&mut relay.committed, before);
                return Ok(Outcome::Stored { refused });
            }
        };
        signal(&mut relay.locked, true);
        if let Some(committed) = after_committed {
            if !committed.await.unwrap_or(false) {
                reusable = roll_back(&conn).await;
                return Ok(Outcome::Behind);
            }
        }
        sent = Some(doubt);
        conn.client.batch_execute("COMMIT").await.map_err(reason)?;
        signal(&mut relay.committed, true);
        Ok(Outcome::Stored { refused })
    }
    .await;
    // Whatever happened, the next group hears of it (a dropped sender
    // reads as a failure).
    drop(relay);
    match stored {
        Ok(outcome) => Finished {
            client: reusable.then_some(conn),
            outcome,
        },
        Err(why) => Finished {
            // Its state is unknown: dropped, so the server rolls back
            // whatever did not commit.
            client: None,
            outcome: Outcome::Failed { why, doubt: sent },
        },
    }
}

/// Ends the group's transaction without committing: whether the connection
/// can be used again.
async fn roll_back(conn: &Conn) -> bool {
    conn.client.batch_execute("ROLLBACK").await.is_ok()
}

/// Opens the group's transaction and copies its rows. `BEGIN` and the
/// `COPY` go out together: one round trip fewer.
async fn copy(conn: &Conn, chunks: &[(AgencyId, Bytes)]) -> Result<(), String> {
    let (begun, sink) = futures::join!(
        conn.client.batch_execute("BEGIN"),
        conn.client.copy_in::<_, Bytes>(&conn.copy)
    );
    begun.map_err(reason)?;
    let sink = sink.map_err(reason)?;
    futures::pin_mut!(sink);
    sink.feed(Bytes::from_static(HEADER))
        .await
        .map_err(reason)?;
    for (_, rows) in chunks {
        sink.feed(rows.clone()).await.map_err(reason)?;
    }
    sink.feed(Bytes::from_static(TRAILER))
        .await
        .map_err(reason)?;
    sink.as_mut().finish().await.map_err(reason)?;
    Ok(())
}

/// Locks the group's agencies' rows of `agencies` and checks that each
/// still holds what this central expects (see the module's
/// documentation); moves the counts and digests of those that do, and
/// returns the others, with why, and what identifies the group's rows
/// should its `COMMIT` go unanswered.
///
/// The rows are locked with `SELECT … FOR UPDATE`, in order of agency (so
/// two centrals never wait for each other in a cycle), which under `READ
/// COMMITTED` waits for a transaction holding one (the group before, or
/// another central's) and then reads the row as it committed.
async fn update_agencies(
    conn: &Conn,
    updates: &[Update],
) -> Result<(HashMap<AgencyId, String>, Doubt), String> {
    let mut agencies: Vec<i32> = updates.iter().map(|u| u.agency as i32).collect();
    agencies.sort_unstable();
    // An agency whose row this writer has not seen committed gets it
    // created first, in the same round trip (the server runs the two in
    // order): otherwise a row inserted by a transaction not yet committed
    // (the group before, or another central's) would be there to lock for
    // no one, and its agency would read as none stored.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&agencies];
    let held = if updates.iter().all(|u| u.row_exists) {
        conn.client.query(&conn.lock, &params).await
    } else {
        futures::try_join!(
            conn.client.execute(&conn.create, &params),
            conn.client.query(&conn.lock, &params)
        )
        .map(|(_, held)| held)
    }
    .map_err(reason)?;
    let xid: i64 = held
        .first()
        .ok_or("agencies: the group's rows are missing")?
        .get(3);
    let held: HashMap<i32, (i64, i64)> = held
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut refused = HashMap::new();
    let mut changed: Vec<&Update> = Vec::new();
    for u in updates {
        let agency = u.agency;
        let (table, epoch) = held.get(&(agency as i32)).copied().unwrap_or((0, 0));
        if u.epoch.is_some_and(|mine| mine != epoch) {
            refused.insert(agency, superseded(agency));
        } else if table != u.expected {
            refused.insert(
                agency,
                format!(
                    "agency {agency}: the table holds {table} of its bets, this central \
                     acknowledged {}; another central on this database stored them \
                     (say HELLO again to resume from the table): nothing was stored",
                    u.expected
                ),
            );
        } else {
            changed.push(u);
        }
    }
    let doubt = Doubt {
        xid,
        agencies: changed
            .iter()
            .map(|u| {
                let epoch = held.get(&(u.agency as i32)).map_or(0, |h| h.1);
                (u.agency, (u.receipt.count as i64, epoch))
            })
            .collect(),
    };
    if !refused.is_empty() {
        return Ok((refused, doubt));
    }
    let agencies: Vec<i32> = changed.iter().map(|u| u.agency as i32).collect();
    let counts: Vec<i64> = changed.iter().map(|u| u.receipt.count as i64).collect();
    let digests: Vec<&[u8]> = changed.iter().map(|u| &u.receipt.digest.0[..]).collect();
    conn.client
        .execute(&conn.upsert, &[&agencies, &counts, &digests])
        .await
        .map_err(reason)?;
    Ok((refused, doubt))
}

/// Why a fenced session's write is refused.
fn superseded(agency: AgencyId) -> String {
    format!(
        "agency {agency}: superseded by a newer session of the agency on another central \
         (its epoch in table agencies moved on): nothing was stored"
    )
}

/// Settles `doubt`: if its transaction committed, removes its rows (those
/// beyond the acknowledged receipts `acked`) and sets the receipts back, in
/// one transaction, for each agency whose row of `agencies` is still
/// exactly as that commit left it (its count, and its epoch): then nobody
/// counted those rows since, on any central. Returns how many it removed.
async fn forget_unacknowledged(
    client: &mut Client,
    acked: &HashMap<AgencyId, Receipt>,
    doubt: &Doubt,
) -> Result<u64, String> {
    let tx = client.transaction().await.map_err(reason)?;
    // Only the agencies in doubt: the others' groups, on any central, go on.
    let mut doubtful: Vec<i32> = doubt.agencies.keys().map(|&a| a as i32).collect();
    doubtful.sort_unstable();
    // The transaction in doubt held these rows until it ended: once they
    // are locked here, it has committed or rolled back for good.
    let rows = tx
        .query(
            "SELECT agency, stored, epoch FROM agencies WHERE agency = ANY($1) \
             ORDER BY agency FOR UPDATE",
            &[&doubtful],
        )
        .await
        .map_err(reason)?;
    let status: Option<String> = tx
        .query_one("SELECT pg_xact_status($1::int8::text::xid8)", &[&doubt.xid])
        .await
        .map_err(reason)?
        .get(0);
    match status.as_deref() {
        Some("committed") => {}
        // Nothing of it was stored: whatever the table holds beyond what
        // this central acknowledged, another central stored.
        Some("aborted") => return tx.commit().await.map(|()| 0).map_err(reason),
        other => {
            return Err(format!(
                "cannot tell whether transaction {} committed (the database says {})",
                doubt.xid,
                other.unwrap_or("nothing")
            ))
        }
    }
    let mut removed = 0;
    for row in rows {
        let (agency, stored, epoch): (i32, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let Some(&(left, seen)) = doubt.agencies.get(&(agency as AgencyId)) else {
            continue;
        };
        // A session opened since, on any central, was told these rows are
        // stored: they are acknowledged, no longer a doubt of ours.
        if epoch != seen {
            continue;
        }
        // Rows stored after them (by any central) continue them.
        if stored != left {
            continue;
        }
        let receipt = acked
            .get(&(agency as AgencyId))
            .copied()
            .unwrap_or_else(|| Receipt::empty(agency as AgencyId));
        let (count, digest) = (receipt.count as i64, receipt.digest.0.to_vec());
        if stored > count {
            removed += tx
                .execute(
                    "DELETE FROM bets WHERE agency = $1 AND seq >= $2",
                    &[&agency, &count],
                )
                .await
                .map_err(reason)?;
            tx.execute(
                "UPDATE agencies SET stored = $2, digest = $3 WHERE agency = $1",
                &[&agency, &count, &digest],
            )
            .await
            .map_err(reason)?;
        }
    }
    tx.commit().await.map_err(reason)?;
    Ok(removed)
}
