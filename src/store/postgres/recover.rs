//! Reading the bets back: the draw's tally, the receipts recomputed from
//! the bets alone, and the receipts the table `agencies` serves.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use tokio_postgres::{Client, IsolationLevel, Transaction};

use crate::model::AgencyId;
use crate::receipt::{Receipt, Recomputed};
use crate::store::{PgTarget, StorageError, Tally};

use super::digest_of;
use super::{database, PgError};

/// The draw's tally in `tx`: counts per agency and the winners, in stored
/// order.
pub(super) async fn tally_in(
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

/// Chains the rows `sql` selects (`agency, seq, first_name, last_name,
/// document, birthdate, number`, ordered by agency then seq) into each
/// agency's receipt with [`crate::receipt`], the one definition; the
/// documents of the rows whose number is `winning` are the winners. Rows are
/// streamed, never all held.
pub(super) async fn chain_rows(
    tx: &Transaction<'_>,
    sql: &str,
    winning: Option<u16>,
) -> Result<Recomputed, PgError> {
    let rows = tx
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .map_err(PgError::from)?;
    futures::pin_mut!(rows);
    let mut found = Recomputed::default();
    while let Some(row) = rows.try_next().await.map_err(PgError::from)? {
        let (agency, seq): (i32, i64) = (row.get(0), row.get(1));
        let texts: [&str; 4] = [row.get(2), row.get(3), row.get(4), row.get(5)];
        let number: i32 = row.get(6);
        // The wire bounds numbers to 0..=9999; anything else was written
        // behind the central's back (and would not hash as itself).
        let Some(number) = u16::try_from(number).ok().filter(|n| *n <= 9999) else {
            return Err(format!(
                "bets row (agency {agency}, seq {seq}): number {number} is not within 0..=9999"
            )
            .into());
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
pub(super) async fn read_receipts(
    target: &PgTarget,
    client: &mut Client,
) -> Result<(BTreeMap<AgencyId, Receipt>, usize), StorageError> {
    let fail = |e: PgError| database(target, e);
    let tx = client.transaction().await.map_err(|e| fail(e.into()))?;
    let rows = tx
        .query(
            "SELECT agency, stored, digest FROM agencies WHERE stored > 0 FOR UPDATE",
            &[],
        )
        .await
        .map_err(|e| fail(e.into()))?;
    let mut receipts = BTreeMap::new();
    let mut missing = Vec::new();
    for row in rows {
        let (agency, count, digest): (i32, i64, Option<&[u8]>) =
            (row.get(0), row.get(1), row.get(2));
        match digest {
            None => missing.push((agency as AgencyId, count as u64)),
            Some(bytes) => {
                let digest = digest_of(bytes).ok_or_else(|| {
                    fail(PgError::Invalid(format!(
                        "agencies: agency {agency}'s digest is not 32 bytes"
                    )))
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
                return Err(fail(PgError::Invalid(format!(
                    "agencies says agency {agency} stored {count} bets, but bets holds {} of \
                     them",
                    receipt.count
                ))));
            }
            tx.execute(
                "UPDATE agencies SET digest = $2 WHERE agency = $1",
                &[&(agency as i32), &receipt.digest.0.as_slice()],
            )
            .await
            .map_err(|e| fail(e.into()))?;
            receipts.insert(agency, receipt);
        }
    }
    tx.commit().await.map_err(|e| fail(e.into()))?;
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
    let fail = |e: PgError| database(target, e);
    let tx = snapshot(client).await.map_err(|e| fail(e.into()))?;
    let rows = tx
        .query("SELECT agency, stored, digest FROM agencies", &[])
        .await
        .map_err(|e| fail(e.into()))?;
    let mut served = BTreeMap::new();
    for row in rows {
        let (agency, count, digest): (i32, i64, Option<&[u8]>) =
            (row.get(0), row.get(1), row.get(2));
        let agency = agency as AgencyId;
        let receipt = if count == 0 {
            Receipt::empty(agency)
        } else {
            let digest = digest.and_then(digest_of).ok_or_else(|| {
                fail(PgError::Invalid(format!(
                    "agencies: agency {agency}'s digest is not 32 bytes"
                )))
            })?;
            Receipt {
                count: count as u64,
                digest,
            }
        };
        served.insert(agency, receipt);
    }
    tx.commit().await.map_err(|e| fail(e.into()))?;
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
    let fail = |e: PgError| database(target, e);
    let tx = snapshot(client).await.map_err(|e| fail(e.into()))?;
    let found = chain_rows(&tx, BETS_IN_ORDER, Some(winning_number))
        .await
        .map_err(fail)?;
    tx.commit().await.map_err(|e| fail(e.into()))?;
    Ok(found)
}

/// Every bet, in each agency's stored order.
pub(super) const BETS_IN_ORDER: &str =
    "SELECT agency, seq, first_name, last_name, document, birthdate, \
                             number FROM bets ORDER BY agency, seq";

/// A read-only transaction over one snapshot.
pub(super) async fn snapshot(
    client: &mut Client,
) -> Result<Transaction<'_>, tokio_postgres::Error> {
    client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
}
