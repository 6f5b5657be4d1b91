//! The draw record in the tables `draw` and `draw_agencies`, checked
//! against the table of sealed rounds.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::{Draw, PgTarget, RecordAt, StorageError};

use super::connect::where_;
use super::database;
use super::digest_of;
use super::recover::snapshot;

/// Writes the draw record in `tx`: `draw`, `draw_agencies`, and the round's
/// row in `rounds`.
pub(super) async fn insert_draw(
    tx: &Transaction<'_>,
    draw: &Draw,
) -> Result<(), tokio_postgres::Error> {
    // The single row's key refuses a second draw.
    let close = draw.closed.as_ref().map(|c| &c.close);
    tx.execute(
        "INSERT INTO draw (winning_number, drawn_at, bets, seal, closed_by, closed_at, \
         close_reason) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &i32::from(draw.winning_number),
            &draw.drawn_at,
            &(draw.bets as i64),
            &draw.seal.0.as_slice(),
            &close.map(|c| c.by.as_str()),
            &close.map(|c| c.at.as_str()),
            &close.map(|c| c.reason.as_str()),
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
            "INSERT INTO draw_agencies (agency, bets, digest, winners, finished) \
             VALUES ($1, $2, $3, $4, $5)",
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
                &draw.closed.as_ref().map(|c| c.finished.contains(&agency)),
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

/// A draw record (or rounds) error: the tables named, for messages.
pub(super) fn record_error(target: &PgTarget, reason: String) -> StorageError {
    StorageError::Record {
        kept: RecordAt::Tables(where_(target)),
        reason,
    }
}

/// The current round's sealed row in `rounds`, if it is sealed: its
/// number, seal, drawn_at and bets.
pub(super) async fn sealed_round(
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
pub(super) async fn load_draw_in(
    target: &PgTarget,
    tx: &Transaction<'_>,
) -> Result<Option<Draw>, StorageError> {
    let fail = |e: tokio_postgres::Error| database(target, e);
    let refuse = |reason: String| record_error(target, reason);
    let head = tx
        .query_opt(
            "SELECT winning_number, drawn_at, bets, seal, closed_by, closed_at, close_reason \
             FROM draw",
            &[],
        )
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
    let by: Option<String> = head.get(4);
    let close = match by {
        None => None,
        Some(by) => Some(crate::close::SalesClose {
            by: crate::close::ClosedBy::from_name(&by)
                .ok_or_else(|| refuse(format!("closed_by {by:?} is not operator or close_at")))?,
            at: head.get::<_, Option<String>>(5).unwrap_or_default(),
            reason: head.get::<_, Option<String>>(6).unwrap_or_default(),
        }),
    };
    let before_receipts = || {
        refuse(
            "recorded before receipts (schema version 1): it has no seal and digests, so it \
             cannot be checked"
                .into(),
        )
    };
    let seal = digest_of(&seal.ok_or_else(before_receipts)?).ok_or_else(before_receipts)?;
    let mut draw = Draw {
        closed: close.map(|close| crate::store::ClosedRound {
            close,
            finished: Default::default(),
        }),
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
            "SELECT agency, bets, digest, winners, finished FROM draw_agencies",
            &[],
        )
        .await
        .map_err(fail)?
    {
        let (agency, count, digest, winners): (i32, i64, Option<&[u8]>, Vec<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let agency = agency as AgencyId;
        let finished: Option<bool> = row.get(4);
        if let (Some(closed), Some(true)) = (draw.closed.as_mut(), finished) {
            closed.finished.insert(agency);
        }
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

/// The draw record, checked against `rounds` (see `load_draw_in`), read
/// in one snapshot without changing anything.
///
/// # Errors
/// The database failed, or the record is missing or replaced.
pub async fn load_draw(
    target: &PgTarget,
    client: &mut Client,
) -> Result<Option<Draw>, StorageError> {
    let fail = |e: tokio_postgres::Error| database(target, e);
    let tx = snapshot(client).await.map_err(fail)?;
    let draw = load_draw_in(target, &tx).await?;
    tx.commit().await.map_err(fail)?;
    Ok(draw)
}
