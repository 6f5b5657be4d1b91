//! One group's transaction: its plan, the relay that orders it behind the
//! group before it, and its statements (`COPY`, the agencies' counts, the
//! commit).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::SinkExt;
use tokio::sync::oneshot;
use tokio_postgres::{Client, Statement};

use super::doubt::Doubt;
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::postgres::rows::{COPY, HEADER, TRAILER};
use crate::store::postgres::PgError;

/// What a group leaves in an agency's row of `agencies`, and what it
/// expects there before.
#[derive(Debug, Clone)]
pub(super) struct Update {
    pub(super) agency: AgencyId,
    /// The count the table must hold before the group.
    pub(super) expected: i64,
    /// This central's session of the agency (see `Writer::epochs`).
    pub(super) epoch: Option<i64>,
    /// The receipt after the group: its count is the table's count after.
    pub(super) receipt: Receipt,
    /// The agency's row in `agencies` is known to be committed (see
    /// `Writer::rows`): nothing to create before locking it.
    pub(super) row_exists: bool,
}

impl Update {
    /// The agency's rows the group stores.
    fn rows(&self) -> u64 {
        self.receipt.count - self.expected as u64
    }
}

/// A group as its transaction writes it.
pub(super) struct Plan {
    /// Each batch's rows, numbered, in order.
    pub(super) chunks: Vec<(AgencyId, Bytes)>,
    pub(super) updates: Vec<Update>,
}

/// A group's side of the relay to the next group. A sender dropped
/// unsent reads as `false`.
pub(super) struct Relay {
    /// The group's rows of `agencies` are locked (or it wrote none):
    /// the next group may update its own.
    pub(super) locked: Option<oneshot::Sender<bool>>,
    /// The group committed (`false`: it did not, or may not have).
    pub(super) committed: Option<oneshot::Sender<bool>>,
}

/// The next group's side of the relay.
pub(super) struct Baton {
    pub(super) locked: oneshot::Receiver<bool>,
    pub(super) committed: oneshot::Receiver<bool>,
}

pub(super) fn relay() -> (Relay, Baton) {
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

pub(super) fn signal(slot: &mut Option<oneshot::Sender<bool>>, value: bool) {
    if let Some(tx) = slot.take() {
        let _ = tx.send(value);
    }
}

/// How a group ended.
pub(super) enum Outcome {
    /// Committed, but for the agencies in `refused` (and why), whose
    /// batches were left out.
    Stored {
        refused: HashMap<AgencyId, Arc<PgError>>,
    },
    /// Rolled back because the group before it failed: nothing stored.
    Behind,
    /// The transaction failed. `doubt`: its `COMMIT` was sent, so it may
    /// have committed, its answer lost; `None` when it failed before, and
    /// so stored nothing.
    Failed { why: PgError, doubt: Option<Doubt> },
}

/// A connection of the writer, with the statements a group runs prepared
/// once, so a group's statements each take one round trip.
pub(super) struct Conn {
    pub(super) client: Client,
    /// The server's address as it answered (`IP:PORT`; `None` over a Unix
    /// socket): with several hosts, the primary this connection reached.
    pub(super) server: Option<String>,
    pub(super) copy: Statement,
    pub(super) create: Statement,
    pub(super) lock: Statement,
    pub(super) sales: Statement,
    pub(super) upsert: Statement,
}

/// Makes sure each of the group's agencies has its row in `agencies`, so
/// that [`LOCK_AGENCIES`] has a row to lock: a row another transaction is
/// inserting is waited for (the conflict), then left as that one made it.
pub(super) const CREATE_AGENCIES: &str = "INSERT INTO agencies (agency) \
    SELECT a FROM unnest($1::int4[]) AS a ORDER BY a ON CONFLICT (agency) DO NOTHING";

/// Locks the group's agencies' rows (see [`check_agencies`]), and names
/// the group's transaction (see [`Doubt`]).
pub(super) const LOCK_AGENCIES: &str =
    "SELECT agency, stored, epoch, pg_current_xact_id()::text::int8 \
                             FROM agencies WHERE agency = ANY($1) ORDER BY agency FOR UPDATE";

/// Moves the group's agencies' counts and digests.
pub(super) const UPSERT_AGENCIES: &str = "INSERT INTO agencies (agency, stored, digest) \
    SELECT * FROM unnest($1::int4[], $2::int8[], $3::bytea[]) \
    ON CONFLICT (agency) DO UPDATE SET stored = excluded.stored, digest = excluded.digest";

/// The address the server answered on: which host of several is the one
/// written to.
const SERVER_ADDRESS: &str = "SELECT host(inet_server_addr()) || ':' || inet_server_port()";

impl Conn {
    pub(super) async fn prepare(client: Client) -> Result<Conn, PgError> {
        let (server, copy, create, lock, sales, upsert) = futures::try_join!(
            client.query_one(SERVER_ADDRESS, &[]),
            client.prepare(COPY),
            client.prepare(CREATE_AGENCIES),
            client.prepare(LOCK_AGENCIES),
            client.prepare(super::super::close::SALES),
            client.prepare(UPSERT_AGENCIES)
        )
        .map_err(PgError::from)?;
        Ok(Conn {
            client,
            server: server.get(0),
            copy,
            create,
            lock,
            sales,
            upsert,
        })
    }
}

/// A group's task's result: its connection back, unless it failed.
pub(super) struct Finished {
    pub(super) client: Option<Conn>,
    pub(super) outcome: Outcome,
}

/// One group's transaction, on its own connection (see the module's
/// documentation for the order it keeps with the groups around it).
pub(super) async fn store_group(
    conn: Conn,
    plan: Plan,
    after: Option<Baton>,
    mut relay: Relay,
) -> Finished {
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
    let stored: Result<Outcome, PgError> = async {
        let doubt = loop {
            let rows = updates.iter().map(Update::rows).sum();
            copy(&conn, &chunks, rows).await?;
            if let Some(locked) = after_locked.take() {
                if !locked.await.unwrap_or(false) {
                    reusable = roll_back(&conn).await;
                    return Ok(Outcome::Behind);
                }
            }
            let (left_out, doubt) = check_agencies(&conn, &updates).await?;
            if left_out.is_empty() {
                break doubt;
            }
            // Some agencies' rows are not what this central expects: leave
            // their batches out, and store the others' all the same.
            refused.extend(left_out.into_iter().map(|(a, why)| (a, Arc::new(why))));
            if !roll_back(&conn).await {
                return Err(PgError::NotDone("the transaction could not be rolled back"));
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
        // The rows are locked: the next group may queue behind them.
        signal(&mut relay.locked, true);
        if let Some(committed) = after_committed {
            if !committed.await.unwrap_or(false) {
                reusable = roll_back(&conn).await;
                return Ok(Outcome::Behind);
            }
        }
        // The new counts and the `COMMIT` go out together: one round trip
        // fewer between the group before committing and this one. Should
        // the update fail, the transaction is aborted and the server
        // answers the `COMMIT` with a rollback; the update's error is what
        // is told. From here on a lost answer is a doubt.
        sent = Some(doubt);
        let (moved, committed) = futures::join!(
            move_counts(&conn, &updates),
            conn.client.batch_execute("COMMIT")
        );
        moved?;
        committed.map_err(PgError::from)?;
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
pub(super) async fn roll_back(conn: &Conn) -> bool {
    conn.client.batch_execute("ROLLBACK").await.is_ok()
}

/// Opens the group's transaction and copies its rows, `rows` of them.
/// `BEGIN` and the `COPY` go out together: one round trip fewer.
///
/// The server's count of the rows it stored must be `rows`: a trigger on
/// `bets` that drops a row would otherwise have the group acknowledged
/// without it (COPY runs triggers, not rules).
pub(super) async fn copy(
    conn: &Conn,
    chunks: &[(AgencyId, Bytes)],
    rows: u64,
) -> Result<(), PgError> {
    let (begun, sink) = futures::join!(
        conn.client.batch_execute("BEGIN"),
        conn.client.copy_in::<_, Bytes>(&conn.copy)
    );
    begun.map_err(PgError::from)?;
    let sink = sink.map_err(PgError::from)?;
    futures::pin_mut!(sink);
    sink.feed(Bytes::from_static(HEADER))
        .await
        .map_err(PgError::from)?;
    for (_, rows) in chunks {
        sink.feed(rows.clone()).await.map_err(PgError::from)?;
    }
    sink.feed(Bytes::from_static(TRAILER))
        .await
        .map_err(PgError::from)?;
    let stored = sink.as_mut().finish().await.map_err(PgError::from)?;
    if stored != rows {
        return Err(PgError::Invalid(format!(
            "the database stored {stored} of the {rows} rows sent \
             (a trigger on table bets?): nothing of them was kept"
        )));
    }
    Ok(())
}

/// Locks the group's agencies' rows of `agencies` and checks that each
/// still holds what this central expects (see the module's
/// documentation); returns those that do not, with why, and what
/// identifies the group's rows should its `COMMIT` go unanswered. When
/// none is refused, [`move_counts`] then moves them all, with the commit.
///
/// The rows are locked with `SELECT … FOR UPDATE`, in order of agency (so
/// two centrals never wait for each other in a cycle), which under `READ
/// COMMITTED` waits for a transaction holding one (the group before, or
/// another central's) and then reads the row as it committed.
pub(super) async fn check_agencies(
    conn: &Conn,
    updates: &[Update],
) -> Result<(HashMap<AgencyId, PgError>, Doubt), PgError> {
    let mut agencies: Vec<i32> = updates.iter().map(|u| u.agency as i32).collect();
    agencies.sort_unstable();
    // An agency whose row this writer has not seen committed gets it
    // created first, in the same round trip (the server runs the two in
    // order): otherwise a row inserted by a transaction not yet committed
    // (the group before, or another central's) would be there to lock for
    // no one, and its agency would read as none stored.
    // Then `sales`, read under a share lock held to the commit, in the same
    // round trip: a close waits for this group, or this group sees it.
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&agencies];
    let (held, sales) = if updates.iter().all(|u| u.row_exists) {
        futures::try_join!(
            conn.client.query(&conn.lock, &params),
            conn.client.query_one(&conn.sales, &[])
        )
    } else {
        futures::try_join!(
            conn.client.execute(&conn.create, &params),
            conn.client.query(&conn.lock, &params),
            conn.client.query_one(&conn.sales, &[])
        )
        .map(|(_, held, sales)| (held, sales))
    }
    .map_err(PgError::from)?;
    let xid: i64 = held
        .first()
        .ok_or_else(|| PgError::Invalid("agencies: the group's rows are missing".into()))?
        .get(3);
    let held: HashMap<i32, (i64, i64)> = held
        .into_iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut refused = HashMap::new();
    if let Some(close) = super::super::close::close_of(&sales).map_err(PgError::Invalid)? {
        // Sales closed: nothing of the group is stored.
        for u in updates {
            refused.insert(u.agency, PgError::SalesClosed(close.clone()));
        }
        let doubt = Doubt {
            xid,
            agencies: HashMap::new(),
        };
        return Ok((refused, doubt));
    }
    let mut changed: Vec<&Update> = Vec::new();
    for u in updates {
        let agency = u.agency;
        let (table, epoch) = held.get(&(agency as i32)).copied().unwrap_or((0, 0));
        if u.epoch.is_some_and(|mine| mine != epoch) {
            refused.insert(agency, PgError::Superseded(agency));
        } else if table != u.expected {
            refused.insert(
                agency,
                PgError::Invalid(format!(
                    "agency {agency}: the table holds {table} of its bets, this central \
                     acknowledged {}; another central on this database stored them \
                     (say HELLO again to resume from the table): nothing was stored",
                    u.expected
                )),
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
    Ok((refused, doubt))
}

/// Moves the group's agencies' counts and digests, every one of them found
/// as this central expects by [`check_agencies`] (their rows locked since).
pub(super) async fn move_counts(conn: &Conn, updates: &[Update]) -> Result<(), PgError> {
    let agencies: Vec<i32> = updates.iter().map(|u| u.agency as i32).collect();
    let counts: Vec<i64> = updates.iter().map(|u| u.receipt.count as i64).collect();
    let digests: Vec<&[u8]> = updates.iter().map(|u| &u.receipt.digest.0[..]).collect();
    conn.client
        .execute(&conn.upsert, &[&agencies, &counts, &digests])
        .await
        .map_err(PgError::from)?;
    Ok(())
}
