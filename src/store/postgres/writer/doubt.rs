//! A commit whose answer was lost: what identifies its rows, and how the
//! writer settles it before it writes anything else.

use std::collections::HashMap;

use tokio_postgres::Client;
use tracing::warn;

use super::Writer;
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::postgres::PgError;

/// A group whose `COMMIT` was sent but never answered: what identifies its
/// rows, so that only they are ever taken back out.
#[derive(Debug, Clone)]
pub(super) struct Doubt {
    /// The group's transaction id (`pg_current_xact_id`): the database
    /// says whether it committed.
    pub(super) xid: i64,
    /// Per agency, the count its commit left, and the epoch the agency's
    /// row held under the group's lock: if either moved on since, someone
    /// counted those rows (a later commit, or a HELLO answered with them).
    pub(super) agencies: HashMap<AgencyId, (i64, i64)>,
}

impl Writer {
    /// Clears up a commit whose answer was lost, if one is pending (see
    /// `doubt`), on a working connection.
    pub(super) async fn settle_doubt(&mut self) -> Result<(), PgError> {
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
) -> Result<u64, PgError> {
    let tx = client.transaction().await.map_err(PgError::from)?;
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
        .map_err(PgError::from)?;
    let status: Option<String> = tx
        .query_one("SELECT pg_xact_status($1::int8::text::xid8)", &[&doubt.xid])
        .await
        .map_err(PgError::from)?
        .get(0);
    match status.as_deref() {
        Some("committed") => {}
        // Nothing of it was stored: whatever the table holds beyond what
        // this central acknowledged, another central stored.
        Some("aborted") => return tx.commit().await.map(|()| 0).map_err(PgError::from),
        other => {
            return Err(format!(
                "cannot tell whether transaction {} committed (the database says {})",
                doubt.xid,
                other.unwrap_or("nothing")
            )
            .into())
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
                .map_err(PgError::from)?;
            tx.execute(
                "UPDATE agencies SET stored = $2, digest = $3 WHERE agency = $1",
                &[&agency, &count, &digest],
            )
            .await
            .map_err(PgError::from)?;
        }
    }
    tx.commit().await.map_err(PgError::from)?;
    Ok(removed)
}
