//! The close of sales in the database: the one row of `sales`, updated
//! once, by whichever central closes first (see schema step 4).

use tokio_postgres::{Client, GenericClient};

use super::{database, PgError, DRAW_CHANNEL};
use crate::close::{ClosedBy, SalesClose};
use crate::store::{ClosedRound, PgTarget, StorageError};

/// What every group of batches reads in its transaction, locking the row
/// against a close until it commits: `closed_by` is set once sales closed.
pub(super) const SALES: &str = "SELECT closed_by, closed_at, reason FROM sales FOR SHARE";

/// Reads a row of [`SALES`] (or of `load_close`'s query): the close, if
/// sales are closed.
pub(super) fn close_of(row: &tokio_postgres::Row) -> Result<Option<SalesClose>, String> {
    let by: Option<String> = row.get(0);
    let Some(by) = by else {
        return Ok(None);
    };
    Ok(Some(SalesClose {
        by: ClosedBy::from_name(&by)
            .ok_or_else(|| format!("sales: closed_by {by:?} is not operator or close_at"))?,
        at: row.get::<_, Option<String>>(1).unwrap_or_default(),
        reason: row.get::<_, Option<String>>(2).unwrap_or_default(),
    }))
}

/// Closes sales with `close`, unless they are closed already: returns the
/// close in force, and whether it is this one. The agencies that had
/// finished are those the table says (announcements are ordered with it by
/// their advisory lock). Every central's watcher is woken at the commit.
///
/// # Errors
/// The database failed; sales are then as they were.
pub(super) async fn close_sales(
    target: &PgTarget,
    client: &mut Client,
    close: &SalesClose,
    finish_lock: i64,
) -> Result<(ClosedRound, bool), StorageError> {
    let fail = |e: tokio_postgres::Error| database(target, e);
    let tx = client.transaction().await.map_err(fail)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&finish_lock])
        .await
        .map_err(fail)?;
    // Waits for every group holding the row (FOR SHARE) to end: those
    // commit before the close; every later one reads it closed.
    let taken = tx
        .query_opt(
            "UPDATE sales SET closed_by = $1, closed_at = $2, reason = $3, \
             finished = (SELECT coalesce(array_agg(agency ORDER BY agency), '{}') \
                         FROM agencies WHERE finished) \
             WHERE id AND closed_by IS NULL RETURNING finished",
            &[&close.by.as_str(), &close.at, &close.reason],
        )
        .await
        .map_err(fail)?;
    let outcome = match taken {
        Some(row) => {
            // Every group that read the row before is committed now (the
            // update waited for it), and none after it stores anything:
            // these are the counts the draw must find.
            tx.batch_execute(
                "UPDATE sales SET \
                 counted = (SELECT coalesce(array_agg(agency ORDER BY agency), '{}') \
                            FROM agencies WHERE stored > 0), \
                 stored = (SELECT coalesce(array_agg(stored ORDER BY agency), '{}') \
                           FROM agencies WHERE stored > 0)",
            )
            .await
            .map_err(fail)?;
            let finished: Vec<i32> = row.get(0);
            (
                ClosedRound {
                    close: close.clone(),
                    finished: finished.into_iter().map(|a| a as u32).collect(),
                },
                true,
            )
        }
        None => {
            let kept = load_close(target, &tx).await?.ok_or_else(|| {
                database(
                    target,
                    PgError::Invalid(
                        "sales: the table's row is missing (schema step 4 inserts it)".into(),
                    ),
                )
            })?;
            (kept, false)
        }
    };
    tx.batch_execute(&format!("NOTIFY {DRAW_CHANNEL}"))
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(outcome)
}

/// Each agency's bets stored when sales closed (agencies with bets only),
/// as the close's transaction counted them; `None` while sales are open.
///
/// # Errors
/// The database failed.
pub(super) async fn stored_at_close(
    target: &PgTarget,
    client: &impl GenericClient,
) -> Result<Option<std::collections::BTreeMap<u32, u64>>, StorageError> {
    let row = client
        .query_opt(
            "SELECT counted, stored FROM sales WHERE closed_by IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| database(target, e))?;
    Ok(row.map(|row| {
        let agencies: Vec<i32> = row.get::<_, Option<Vec<i32>>>(0).unwrap_or_default();
        let counts: Vec<i64> = row.get::<_, Option<Vec<i64>>>(1).unwrap_or_default();
        agencies
            .into_iter()
            .zip(counts)
            .map(|(a, n)| (a as u32, n as u64))
            .collect()
    }))
}

/// The close of sales kept, if sales are closed.
///
/// # Errors
/// The database failed, or the row says something unreadable.
pub(super) async fn load_close(
    target: &PgTarget,
    client: &impl GenericClient,
) -> Result<Option<ClosedRound>, StorageError> {
    let fail = |reason: String| database(target, PgError::Invalid(reason));
    let row = client
        .query_opt(
            "SELECT closed_by, closed_at, reason, finished FROM sales WHERE closed_by IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| database(target, e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let close = close_of(&row).map_err(fail)?.expect("closed_by is set");
    let finished: Option<Vec<i32>> = row.get(3);
    Ok(Some(ClosedRound {
        close,
        finished: finished
            .unwrap_or_default()
            .into_iter()
            .map(|a| a as u32)
            .collect(),
    }))
}
