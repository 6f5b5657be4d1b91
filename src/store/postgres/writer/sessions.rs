//! The writer's work for the agencies' sessions: opening one (a new epoch,
//! fencing older sessions on every central) and recording that an agency
//! finished.

use tokio_postgres::Client;

use super::Writer;
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::postgres::PgError;
use crate::store::Agency;

/// The advisory lock an announcement's transaction holds ("finish" in
/// ASCII).
const FINISH_LOCK: i64 = 0x0000_6669_6e69_7368;

impl Writer {
    /// See [`Request::Open`].
    pub(super) async fn open(&mut self, agency: AgencyId) -> Result<Agency, PgError> {
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
            .map_err(PgError::from);
        self.give_back(client, &row);
        let row = row?;
        let (stored, digest, epoch, finished): (i64, Option<&[u8]>, i64, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let receipt = if stored == 0 {
            Receipt::empty(agency)
        } else {
            let digest = digest
                .and_then(crate::store::postgres::digest_of)
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
    pub(super) async fn finish(&mut self, agency: AgencyId, agencies: u32) -> Result<u32, PgError> {
        let epoch = self.epochs.get(&agency).copied();
        let mut client = self.connection().await.inspect_err(|_| self.lost = true)?;
        let finished = announce(&mut client.client, agency, epoch, agencies).await;
        // A refusal (superseded) leaves the connection as good as before.
        match &finished {
            Err(why) if !matches!(why, PgError::Superseded(_)) => self.lost = true,
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
) -> Result<u32, PgError> {
    let tx = client.transaction().await.map_err(PgError::from)?;
    // Announcements on different centrals take turns: two last ones at
    // once would each count the other's as not yet committed, and neither
    // would draw. Each statement after the lock sees every announcement
    // committed before it.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FINISH_LOCK])
        .await
        .map_err(PgError::from)?;
    let marked = tx
        .execute(
            "INSERT INTO agencies AS a (agency, finished) VALUES ($1, true) \
             ON CONFLICT (agency) DO UPDATE SET finished = true \
             WHERE $2::int8 IS NULL OR a.epoch = $2",
            &[&(agency as i32), &epoch],
        )
        .await
        .map_err(PgError::from)?;
    if marked == 0 {
        return Err(PgError::Superseded(agency));
    }
    let count: i64 = tx
        .query_one(
            crate::store::postgres::FINISHED_COUNT,
            &[&(agencies as i32)],
        )
        .await
        .map_err(PgError::from)?
        .get(0);
    tx.commit().await.map_err(PgError::from)?;
    Ok(count as u32)
}
