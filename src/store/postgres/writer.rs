//! The database's writer: one task owns the writing connection.
//! Connections hand it whole batches and go on reading while it works; it
//! takes every batch that is waiting and stores them in one transaction
//! (`COPY … FROM STDIN (FORMAT binary)`, then the agencies' new counts),
//! and answers them all once the commit returns: group commit, as the bets
//! file's writer groups its `fdatasync`. A batch is acknowledged only after
//! the commit that holds it, with `synchronous_commit` on.
//!
//! Each bet's `seq` is its place in its agency's upload. The writer keeps
//! each agency's receipt as acknowledged (its count is the next `seq`): the
//! same receipts the central resumes agencies from. The receipt a batch
//! comes with is written to `agencies` in the batch's transaction, so what
//! is committed is exactly what is acknowledged. When a transaction fails the writer drops its
//! connection and, on the next one, first removes any rows beyond those
//! counts: a commit whose answer was lost may still have happened, and
//! those bets, never acknowledged, will be sent again.

use std::collections::HashMap;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Client;
use tracing::{info, warn};

use super::{connect, reason, Session};
use crate::logging::{action, result};
use crate::model::{AgencyId, Bets};
use crate::receipt::Receipt;
use crate::store::{Agency, PgTarget, Sequence};

/// The advisory lock an announcement's transaction holds ("finish" in
/// ASCII).
const FINISH_LOCK: i64 = 0x0000_6669_6e69_7368;

/// How many batches may wait for the writer before senders wait too.
pub const QUEUE_DEPTH: usize = 1024;

/// Most batches stored in one transaction: bounds a transaction's size
/// (and the latency of the first batch in it).
const MAX_GROUP: usize = 512;

/// The columns the writer fills, in `COPY` order.
const COPY: &str = "COPY bets (agency, seq, first_name, last_name, document, birthdate, number) \
                    FROM STDIN (FORMAT binary)";
const COPY_TYPES: [Type; 7] = [
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT4,
];

/// One batch for the writer.
pub struct Append {
    pub bets: Bets,
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
    /// answer how many agencies have finished, on every central.
    Finish(AgencyId, oneshot::Sender<Result<u32, String>>),
    /// Store what was sent before, close the connection, then answer.
    Close(oneshot::Sender<()>),
}

/// The writer's state: the connection (when it has one) and the counts.
struct Writer {
    target: PgTarget,
    session: Session,
    client: Option<Client>,
    /// Per agency, the receipt acknowledged: its count is the next bet's
    /// `seq`.
    acked: HashMap<AgencyId, Receipt>,
    /// A transaction failed after writing rows: the counts its commit would
    /// have left per agency, as the table holds them if the commit happened
    /// though its answer was lost. Empty when no such doubt is pending.
    attempted: HashMap<AgencyId, i64>,
    /// Per agency, the epoch of its session opened last on this central
    /// (older sessions here were closed by the lottery before it opened):
    /// the table's `agencies.epoch` must still hold it for this central to
    /// write for the agency, or a newer session opened on another central.
    /// Absent for an agency that never said HELLO here (a reference agency).
    epochs: HashMap<AgencyId, i64>,
}

/// Runs the writer until it is asked to close or every sender is gone.
pub async fn run(
    target: PgTarget,
    session: Session,
    client: Client,
    stored: HashMap<AgencyId, Receipt>,
    mut requests: mpsc::Receiver<Request>,
) {
    let mut writer = Writer {
        target,
        session,
        client: Some(client),
        acked: stored,
        attempted: HashMap::new(),
        epochs: HashMap::new(),
    };
    let mut closing = None;
    while closing.is_none() {
        let Some(first) = requests.recv().await else {
            break;
        };
        let mut group = Vec::new();
        match first {
            Request::Append(a) => group.push(a),
            Request::Close(done) => closing = Some(done),
            Request::Open(agency, done) => {
                let _ = done.send(writer.open(agency).await);
                continue;
            }
            Request::Finish(agency, done) => {
                let _ = done.send(writer.finish(agency).await);
                continue;
            }
        }
        while closing.is_none() && group.len() < MAX_GROUP {
            match requests.try_recv() {
                Ok(Request::Append(a)) => group.push(a),
                Ok(Request::Close(done)) => closing = Some(done),
                // Answered after the group it came behind, in order.
                Ok(Request::Open(agency, done)) => {
                    writer.store(std::mem::take(&mut group)).await;
                    let _ = done.send(writer.open(agency).await);
                }
                Ok(Request::Finish(agency, done)) => {
                    writer.store(std::mem::take(&mut group)).await;
                    let _ = done.send(writer.finish(agency).await);
                }
                Err(_) => break,
            }
        }
        if !group.is_empty() {
            writer.store(group).await;
        }
    }
    // Nothing is accepted after a close: fail what raced in behind it.
    requests.close();
    while let Ok(request) = requests.try_recv() {
        match request {
            Request::Append(a) => {
                let _ = a.done.send(Err("the database store is closed".into()));
            }
            Request::Close(done) => {
                let _ = done.send(());
            }
            Request::Open(_, done) => {
                let _ = done.send(Err("the database store is closed".into()));
            }
            Request::Finish(_, done) => {
                let _ = done.send(Err("the database store is closed".into()));
            }
        }
    }
    drop(writer.client.take());
    info!(
        action = action::CLOSE_DATABASE,
        result = result::SUCCESS,
        storage = %writer.target
    );
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

impl Writer {
    /// Clears up a commit whose answer was lost, if one is pending (see
    /// `attempted`), on a working connection.
    async fn settle_doubt(&mut self) -> Result<(), String> {
        if self.attempted.is_empty() {
            return Ok(());
        }
        let (acked, attempted) = (self.acked.clone(), self.attempted.clone());
        let epochs = self.epochs.clone();
        let target = self.target.clone();
        let client = reconnect(&mut self.client, &self.target, self.session).await?;
        let removed = forget_unacknowledged(client, &acked, &attempted, &epochs).await?;
        if removed > 0 {
            warn!(
                action = action::STORE,
                result = result::SUCCESS,
                storage = %target,
                removed,
                message = "removed bets whose commit was never acknowledged; \
                           their agencies send them again"
            );
        }
        self.attempted.clear();
        Ok(())
    }

    /// See [`Request::Open`].
    async fn open(&mut self, agency: AgencyId) -> Result<Agency, String> {
        let opened = self.try_open(agency).await;
        if opened.is_err() {
            // Reconnect next time.
            self.client = None;
        }
        opened
    }

    async fn try_open(&mut self, agency: AgencyId) -> Result<Agency, String> {
        self.settle_doubt().await?;
        let client = reconnect(&mut self.client, &self.target, self.session).await?;
        let row = client
            .query_one(
                "INSERT INTO agencies AS a (agency, epoch) VALUES ($1, 1) \
                 ON CONFLICT (agency) DO UPDATE SET epoch = a.epoch + 1 \
                 RETURNING a.stored, a.digest, a.epoch, a.finished",
                &[&(agency as i32)],
            )
            .await
            .map_err(reason)?;
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
        Ok(Agency { receipt, finished })
    }

    /// See [`Request::Finish`].
    async fn finish(&mut self, agency: AgencyId) -> Result<u32, String> {
        let finished = self.try_finish(agency).await;
        if finished.is_err() {
            self.client = None;
        }
        finished
    }

    async fn try_finish(&mut self, agency: AgencyId) -> Result<u32, String> {
        let epoch = self.epochs.get(&agency).copied();
        let client = reconnect(&mut self.client, &self.target, self.session).await?;
        let tx = client.transaction().await.map_err(reason)?;
        // Announcements on different centrals take turns: two last ones
        // at once would each count the other's as not yet committed, and
        // neither would draw. Each statement after the lock sees every
        // announcement committed before it.
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
            .query_one("SELECT count(*) FROM agencies WHERE finished", &[])
            .await
            .map_err(reason)?
            .get(0);
        tx.commit().await.map_err(reason)?;
        Ok(count as u32)
    }

    /// Stores `group` in one transaction and answers every batch of it.
    /// Batches of a broken sequence are failed without being stored.
    async fn store(&mut self, group: Vec<Append>) {
        let (live, broken): (Vec<Append>, Vec<Append>) =
            group.into_iter().partition(|a| !a.sequence.is_broken());
        for a in broken {
            let _ = a.done.send(Err(
                "an earlier batch of this connection was not stored".into()
            ));
        }
        if live.is_empty() {
            return;
        }
        match self.commit(&live).await {
            Ok((acked, refused)) => {
                self.acked = acked;
                self.attempted.clear();
                for (agency, why) in &refused {
                    warn!(
                        action = action::STORE,
                        result = result::FAIL,
                        storage = %self.target,
                        agency,
                        error = why.as_str()
                    );
                }
                for a in live {
                    match agency_of(&a).and_then(|agency| refused.get(&agency)) {
                        None => {
                            let _ = a.done.send(Ok(()));
                        }
                        Some(why) => {
                            a.sequence.mark_broken();
                            let _ = a.done.send(Err(why.clone()));
                        }
                    }
                }
            }
            Err(failed) => {
                let why = match failed {
                    // Nothing was written: no doubt to clear up later.
                    Failed::Refused(why) => {
                        self.attempted.clear();
                        why
                    }
                    Failed::Unsure(why) => why,
                };
                warn!(
                    action = action::STORE,
                    result = result::FAIL,
                    storage = %self.target,
                    batches = live.len(),
                    error = why.as_str()
                );
                // Dropped: the next group reconnects, and first checks for
                // rows of a commit whose answer was lost (when it got as far
                // as writing any: see `attempted`).
                self.client = None;
                for a in live {
                    // Before answering: a later batch of the same
                    // connection, already queued, must not be stored.
                    a.sequence.mark_broken();
                    let _ = a.done.send(Err(why.clone()));
                }
            }
        }
    }

    /// One transaction: the rows, then the agencies' receipts. Returns the
    /// receipts once committed, and the agencies whose batches were refused
    /// (with why) and left out: the others' batches are stored all the same.
    #[allow(clippy::type_complexity)]
    async fn commit(
        &mut self,
        live: &[Append],
    ) -> Result<(HashMap<AgencyId, Receipt>, HashMap<AgencyId, String>), Failed> {
        self.settle_doubt().await?;
        let acked = self.acked.clone();
        let mut next: HashMap<AgencyId, i64> =
            acked.iter().map(|(&a, r)| (a, r.count as i64)).collect();
        let mut receipts = acked.clone();
        let epochs = self.epochs.clone();
        // Until the checks below say which batches are written, every one
        // may be: should this attempt fail from here on, a commit that
        // happened is told by its exact count (see `attempted`).
        self.attempted = attempted_after(&next, live.iter());
        let client = reconnect(&mut self.client, &self.target, self.session).await?;
        let tx = client.transaction().await.map_err(reason)?;
        // Each agency's row is locked until the commit, and must hold this
        // central's session: its epoch (a newer session of the agency on
        // another central fences this one) and what this central
        // acknowledged. An agency that fails either has its batches left
        // out, before anything is written, so nothing of another central's
        // is ever taken for a lost commit; the other agencies' are stored.
        let mut group: Vec<i32> = live
            .iter()
            .filter_map(|a| agency_of(a).map(|agency| agency as i32))
            .collect();
        group.sort_unstable();
        group.dedup();
        let held: HashMap<i32, (i64, i64)> = tx
            .query(
                "SELECT agency, stored, epoch FROM agencies WHERE agency = ANY($1) FOR UPDATE",
                &[&group],
            )
            .await
            .map_err(reason)?
            .into_iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let mut refused = HashMap::new();
        for agency in group {
            let (table, epoch) = held.get(&agency).copied().unwrap_or((0, 0));
            let id = agency as AgencyId;
            let ours = next.get(&id).copied().unwrap_or(0);
            if epochs.get(&id).is_some_and(|&mine| mine != epoch) {
                refused.insert(id, superseded(id));
            } else if table != ours {
                refused.insert(
                    id,
                    format!(
                        "agency {agency}: the table holds {table} of its bets, this central \
                         acknowledged {ours}; another central on this database stored them \
                         (say HELLO again to resume from the table): nothing was stored"
                    ),
                );
            }
        }
        let live: Vec<&Append> = live
            .iter()
            .filter(|a| agency_of(a).is_some_and(|agency| !refused.contains_key(&agency)))
            .collect();
        if live.is_empty() {
            tx.rollback().await.map_err(reason)?;
            return Ok((acked, refused));
        }
        // What the table holds if this commit happens: kept until it is
        // answered, for `forget_unacknowledged` should the answer be lost.
        self.attempted = attempted_after(&next, live.iter().copied());
        let sink = tx.copy_in(COPY).await.map_err(reason)?;
        let copy = BinaryCopyInWriter::new(sink, &COPY_TYPES);
        futures::pin_mut!(copy);
        for a in &live {
            for bet in a.bets.iter() {
                let seq = next.entry(bet.agency).or_insert(0);
                let agency = i32::try_from(bet.agency).map_err(|e| e.to_string())?;
                let number = i32::from(bet.number);
                let row: [&(dyn ToSql + Sync); 7] = [
                    &agency,
                    seq,
                    &bet.first_name,
                    &bet.last_name,
                    &bet.document,
                    &bet.birthdate,
                    &number,
                ];
                copy.as_mut().write(&row).await.map_err(reason)?;
                *seq += 1;
            }
            // A batch holds one agency's bets; its receipt is that agency's
            // after it (a later batch of the group supersedes it).
            if let Some(first) = a.bets.iter().next() {
                receipts.insert(first.agency, a.receipt);
            }
        }
        copy.finish().await.map_err(reason)?;
        let mut changed: Vec<(i32, i64, Vec<u8>)> = Vec::new();
        for (&agency, receipt) in &receipts {
            if acked.get(&agency) == Some(receipt) {
                continue;
            }
            let count = next.get(&agency).copied().unwrap_or(0);
            // The receipt must describe exactly the rows committed with it.
            if receipt.count as i64 != count {
                return Err(Failed::Refused(format!(
                    "agency {agency}: the batch's receipt counts {} bets, the table would hold \
                     {count}",
                    receipt.count
                )));
            }
            changed.push((agency as i32, count, receipt.digest.0.to_vec()));
        }
        let agencies: Vec<i32> = changed.iter().map(|c| c.0).collect();
        let counts: Vec<i64> = changed.iter().map(|c| c.1).collect();
        let digests: Vec<&[u8]> = changed.iter().map(|c| c.2.as_slice()).collect();
        tx.execute(
            "INSERT INTO agencies (agency, stored, digest) \
             SELECT * FROM unnest($1::int4[], $2::int8[], $3::bytea[]) \
             ON CONFLICT (agency) DO UPDATE SET stored = excluded.stored, digest = excluded.digest",
            &[&agencies, &counts, &digests],
        )
        .await
        .map_err(reason)?;
        tx.commit().await.map_err(reason)?;
        Ok((receipts, refused))
    }
}

/// The counts per agency the table holds once `batches` are stored after
/// `acked`.
fn attempted_after<'a>(
    acked: &HashMap<AgencyId, i64>,
    batches: impl Iterator<Item = &'a Append>,
) -> HashMap<AgencyId, i64> {
    let mut counts = acked.clone();
    for a in batches {
        if let Some(agency) = agency_of(a) {
            *counts.entry(agency).or_insert(0) += a.bets.len() as i64;
        }
    }
    counts
}

/// The agency a batch is for (a batch holds one agency's bets).
fn agency_of(a: &Append) -> Option<AgencyId> {
    a.bets.iter().next().map(|bet| bet.agency)
}

/// Why a fenced session's write is refused.
fn superseded(agency: AgencyId) -> String {
    format!(
        "agency {agency}: superseded by a newer session of the agency on another central \
         (its epoch in table agencies moved on): nothing was stored"
    )
}

/// Why a group was not stored.
enum Failed {
    /// Refused before anything was written.
    Refused(String),
    /// The transaction failed; if its commit happened, the answer was lost.
    Unsure(String),
}

impl From<String> for Failed {
    fn from(why: String) -> Failed {
        Failed::Unsure(why)
    }
}

/// The writer's connection, opened again if the last one failed.
async fn reconnect<'a>(
    client: &'a mut Option<Client>,
    target: &PgTarget,
    session: Session,
) -> Result<&'a mut Client, String> {
    if client.as_ref().is_none_or(Client::is_closed) {
        *client = Some(connect(target, session).await?);
        info!(
            action = action::DATABASE_CONNECT,
            result = result::SUCCESS,
            storage = %target,
            state = "reconnected"
        );
    }
    Ok(client.as_mut().expect("set above"))
}

/// Removes the rows beyond the acknowledged receipts `acked` (and sets the
/// receipts back), in one transaction, for the agencies whose count in the
/// table is exactly what the failed commit would have left (`attempted`):
/// only then are those rows this central's unanswered commit, and not
/// bets another central stored. Returns how many it removed.
async fn forget_unacknowledged(
    client: &mut Client,
    acked: &HashMap<AgencyId, Receipt>,
    attempted: &HashMap<AgencyId, i64>,
    epochs: &HashMap<AgencyId, i64>,
) -> Result<u64, String> {
    let tx = client.transaction().await.map_err(reason)?;
    let rows = tx
        .query("SELECT agency, stored, epoch FROM agencies FOR UPDATE", &[])
        .await
        .map_err(reason)?;
    let mut removed = 0;
    for row in rows {
        let (agency, stored, epoch): (i32, i64, i64) = (row.get(0), row.get(1), row.get(2));
        // A newer session on another central was told these rows are
        // stored: they are its, no longer a doubt of ours.
        if epochs
            .get(&(agency as AgencyId))
            .is_some_and(|&mine| mine != epoch)
        {
            continue;
        }
        let receipt = acked
            .get(&(agency as AgencyId))
            .copied()
            .unwrap_or_else(|| Receipt::empty(agency as AgencyId));
        let (count, digest) = (receipt.count as i64, receipt.digest.0.to_vec());
        if stored > count && attempted.get(&(agency as AgencyId)) == Some(&stored) {
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
