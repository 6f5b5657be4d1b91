//! The database's writer: one task plans every write, and stores groups of
//! batches on a few connections at once.
//!
//! Connections hand it whole batches, their rows already encoded (see
//! [`super::rows`]), and go on reading while it works. The writer takes
//! every batch that is waiting as one group (while another group is in
//! flight, once [`NEXT_GROUP_ROWS`] rows wait): it numbers the group's rows
//! after those planned before it and starts the group's transaction on a
//! connection of its own: `COPY … FROM STDIN (FORMAT binary) WHERE …` (see
//! [`super::rows::COPY`] for why the `WHERE`), then the
//! agencies' new counts with the commit, answering every batch of the
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

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::{info, warn};

mod doubt;
mod group;
mod sessions;

pub(super) use sessions::FINISH_LOCK;

use doubt::Doubt;
use group::{relay, store_group, Baton, Conn, Finished, Outcome, Plan, Update};

use super::connect::{connect, ConnectionSettings};
use super::rows::Rows;
use super::PgError;
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::{Agency, PgTarget, Sequence, StoreMetrics, WriterMetrics};

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

/// While a group is in flight, the next one starts only once this many
/// rows wait for it (with none in flight, at once). Each transaction costs
/// the server about as much as a few hundred rows (its statements, its
/// commit's `fdatasync`: see docs/PERFORMANCE.md, "The PostgreSQL store"),
/// and starting a group as soon as a connection was free made groups of
/// about 420 rows: waiting for 700 made 40 % fewer transactions with one
/// central (30 % with three), and the database's and the central's CPU per
/// bet fell with them, more than the first batches of a group lose by
/// waiting. Below what five agencies keep outstanding (windows of 8
/// batches of 70 bets each).
const NEXT_GROUP_ROWS: usize = 700;

/// What a batch behind a failed one of its connection is told.
const BEHIND_A_FAILED_BATCH: &str = "an earlier batch of this connection was not stored";

/// What the batches of a group rolled back because the group before it
/// failed are told.
const BEHIND_A_FAILED_GROUP: &str =
    "not stored: an earlier transaction of this central failed (see the line before)";

/// How the writer answers a batch: the same failure may answer every
/// batch of a group, hence shared.
pub type Answer = Result<(), Arc<PgError>>;

/// One batch for the writer.
pub struct Append {
    /// Its bets, as rows still to be numbered.
    pub rows: Rows,
    /// The agency's receipt once these bets are stored.
    pub receipt: Receipt,
    pub sequence: Sequence,
    pub done: oneshot::Sender<Answer>,
}

/// What the writer is asked to do.
pub enum Request {
    Append(Append),
    /// A session of the agency opened on this central: take a new epoch
    /// (fencing older sessions on every central), and answer what the
    /// table holds for it. Through the writer so that it is ordered with
    /// the commits: the counts it reads are final.
    Open(AgencyId, oneshot::Sender<Result<Agency, PgError>>),
    /// The agency finished: record it (fenced by the session's epoch), and
    /// answer how many of agencies `1..=n` (the second field) have
    /// finished, on every central.
    Finish(AgencyId, u32, oneshot::Sender<Result<u32, PgError>>),
    /// Store what was sent before, close the connections, then answer.
    Close(oneshot::Sender<()>),
}

/// A batch of a group in flight, waiting for its answer.
struct Pending {
    agency: AgencyId,
    sequence: Sequence,
    done: oneshot::Sender<Answer>,
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
    settings: ConnectionSettings,
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
    settings: ConnectionSettings,
    client: Client,
    stored: HashMap<AgencyId, Receipt>,
    mut requests: mpsc::Receiver<Request>,
    measured: Measured,
) {
    // Prepared on first use (see `Writer::connection`) when this fails.
    let idle: Vec<Conn> = Conn::prepare(client).await.into_iter().collect();
    let mut writer = Writer {
        target,
        settings,
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
            } => Event::Finished(Box::new(finished)),
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
                writer.answer(group, *finished);
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
        while !waiting.is_empty()
            && !writer.failing
            && writer.in_flight.len() < CONNECTIONS
            && (writer.in_flight.is_empty()
                // A request waiting behind the batches, or the close, needs
                // them all started.
                || control.is_some()
                || senders_gone
                || waiting.len() >= MAX_GROUP
                || waiting.iter().map(|a| a.rows.len()).sum::<usize>() >= NEXT_GROUP_ROWS)
        {
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
    /// Boxed: a group's result holds its connection, many times the size
    /// of a request.
    Finished(Box<Result<Finished, tokio::task::JoinError>>),
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
            let closed = || PgError::NotDone("the database store is closed");
            match request {
                Request::Append(a) => {
                    let _ = a.done.send(Err(Arc::new(closed())));
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
    async fn connection(&mut self) -> Result<Conn, PgError> {
        while let Some(conn) = self.idle.pop() {
            if !conn.client.is_closed() {
                return Ok(conn);
            }
        }
        let client = Conn::prepare(connect(&self.target, self.settings).await?).await?;
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
    fn give_back<T>(&mut self, client: Conn, outcome: &Result<T, PgError>) {
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
            self.fail_waiting(waiting, Arc::new(why));
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
                let _ = a
                    .done
                    .send(Err(Arc::new(PgError::NotDone(BEHIND_A_FAILED_BATCH))));
                continue;
            }
            let agency = a.rows.agency();
            let at = self.planned.get(&agency).copied().unwrap_or(0);
            let after = at + a.rows.len() as i64;
            // The receipt must describe exactly the rows committed with it.
            if a.receipt.count as i64 != after {
                a.sequence.mark_broken();
                let _ = a.done.send(Err(Arc::new(PgError::Invalid(format!(
                    "agency {agency}: the batch's receipt counts {} bets, the table would hold \
                     {after}",
                    a.receipt.count
                )))));
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
                    error = %why
                );
                let why = Arc::new(why);
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
    fn fail_waiting(&mut self, waiting: &mut VecDeque<Append>, why: Arc<PgError>) {
        warn!(
            action = action::STORE,
            result = result::FAIL,
            storage = %self.target,
            batches = waiting.len(),
            error = %why
        );
        for a in waiting.drain(..) {
            a.sequence.mark_broken();
            let _ = a.done.send(Err(why.clone()));
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
                why: PgError::Invalid(format!("the writer's task failed: {e}")),
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
                    if let PgError::SalesClosed(_) = **why {
                        // Not a failure: the close, said once by the lottery.
                        let acked = self.acked.get(&agency).map_or(0, |r| r.count as i64);
                        self.planned.insert(agency, acked);
                        continue;
                    }
                    warn!(
                        action = action::STORE,
                        result = result::FAIL,
                        storage = %self.target,
                        agency,
                        error = %why
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
                            // Every batch after the close is told so.
                            let closed = matches!(**why, PgError::SalesClosed(_));
                            let why = if p.sequence.is_broken() && !closed {
                                Arc::new(PgError::NotDone(BEHIND_A_FAILED_BATCH))
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
            Outcome::Behind => Arc::new(PgError::NotDone(BEHIND_A_FAILED_GROUP)),
            Outcome::Failed { why, doubt } => {
                warn!(
                    action = action::STORE,
                    result = result::FAIL,
                    storage = %self.target,
                    batches = group.pending.len(),
                    error = %why
                );
                // Cleared up before the next group (see `settle_doubt`).
                // Groups behind this one roll back without sending their
                // `COMMIT`, so at most one is in doubt.
                if self.doubt.is_none() {
                    self.doubt = doubt;
                }
                Arc::new(why)
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
}
