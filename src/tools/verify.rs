//! `lottery verify` and `lottery new-round`: the operator's side of the
//! receipts. Verify recomputes a round's outcome from the stored bets and
//! compares it with the draw record, the same check the central makes when
//! it starts on a drawn round; new-round keeps a drawn round aside.

use std::fmt::Write as _;

use crate::config::ServerConfig;
use crate::receipt::{differences, seal, served_differences, Digest};
use crate::store::{self, NewRound};

/// What `lottery verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The report, one line per agency and the seal, or one per difference.
    pub report: String,
    /// Every difference; empty when the record matches the bets.
    pub differences: Vec<String>,
    /// There is no draw record: the round is not drawn, and nothing was
    /// compared.
    pub undrawn: bool,
}

/// Recomputes every agency's count and digest, the seal and the winners
/// from the stored bets (read only: nothing is changed), and compares them
/// with the draw record, the configuration, the receipts the store serves
/// to agencies that resume (a database's table `agencies`) and, when given,
/// the `published` seal (the one the agencies were given: a round drawn
/// again over forged bets agrees with itself, not with it).
///
/// # Errors
/// The bets or the record cannot be read (a missing record, or one the
/// ledger says was replaced, is a difference instead).
pub async fn verify(config: &ServerConfig, published: Option<Digest>) -> anyhow::Result<Verified> {
    let record = config.draw_record_shown();
    let missing = config.draw_record_path().map_or_else(
        || "in the database's tables draw and draw_agencies".to_string(),
        |p| format!("at {}", p.display()),
    );
    let mut reader = store::Reader::open(&config.store_options()).await?;
    let draw = match reader.load_draw().await {
        Ok(Some(draw)) => draw,
        Ok(None) => {
            return Ok(Verified {
                report: format!(
                    "no draw record {missing}: this round is not drawn, so there is nothing to \
                     verify\n"
                ),
                differences: Vec::new(),
                undrawn: true,
            });
        }
        Err(e @ store::StorageError::Record { .. }) => {
            let difference = e.to_string();
            return Ok(Verified {
                report: format!("{difference}\n"),
                differences: vec![difference],
                undrawn: false,
            });
        }
        Err(e) => return Err(e.into()),
    };
    let found = reader.recompute(draw.winning_number).await?;
    let mut differences = differences(
        draw.claimed(),
        &found,
        config.agencies,
        config.winning_number,
    );
    if let Some((source, served)) = reader.served().await? {
        differences.extend(served_differences(source, &served, &found, config.agencies));
    }
    differences.extend(close_differences(
        &draw,
        reader.load_close().await?.as_ref(),
        config.agencies,
    ));
    if let (Some(_), Some(at_close)) = (&draw.closed, reader.stored_at_close().await?) {
        for agency in 1..=config.agencies {
            let (then, drawn) = (
                at_close.get(&agency).copied().unwrap_or(0),
                draw.receipt_of(agency).count,
            );
            if then != drawn {
                differences.push(format!(
                    "close: agency {agency} had {then} bets stored when sales closed, the draw \
                     counted {drawn}"
                ));
            }
        }
    }
    let sealed = seal(draw.winning_number, config.agencies, &found.receipts);
    if let Some(published) = published.filter(|p| *p != sealed) {
        differences.push(format!(
            "seal: the published seal is {published}, the stored bets give {sealed}"
        ));
    }
    let mut report = String::new();
    if differences.is_empty() {
        let _ = writeln!(
            report,
            "the draw record {record} matches the stored bets {}",
            config.storage
        );
        if let Some(closed) = &draw.closed {
            let _ = writeln!(report, "{}; drawn at {}", closed.close, draw.drawn_at);
            let _ = writeln!(
                report,
                "{:>6}  {:>10}  {:<8}  digest",
                "agency", "bets", "state"
            );
            for agency in 1..=config.agencies {
                let r = draw.receipt_of(agency);
                let state = if closed.finished.contains(&agency) {
                    "finished"
                } else {
                    "closed"
                };
                let _ = writeln!(
                    report,
                    "{agency:>6}  {:>10}  {state:<8}  {}",
                    r.count, r.digest
                );
            }
        } else {
            let _ = writeln!(report, "{:>6}  {:>10}  digest", "agency", "bets");
            for agency in 1..=config.agencies {
                let r = draw.receipt_of(agency);
                let _ = writeln!(report, "{agency:>6}  {:>10}  {}", r.count, r.digest);
            }
        }
        let _ = writeln!(
            report,
            "winning number {}, seal {}",
            draw.winning_number, draw.seal
        );
        if let Some(published) = published {
            let _ = writeln!(report, "the published seal {published} is this round's");
        }
    } else {
        for d in &differences {
            let _ = writeln!(report, "differs: {d}");
        }
    }
    Ok(Verified {
        report,
        differences,
        undrawn: false,
    })
}

/// What a draw record says of the close of sales, against the close the
/// store kept (`kept`) and the configured `agencies`: a round drawn after a
/// close names it, as kept, drawn after it, its finished agencies among the
/// configured ones; a round drawn because every agency finished has no
/// close kept.
fn close_differences(
    draw: &store::Draw,
    kept: Option<&store::ClosedRound>,
    agencies: u32,
) -> Vec<String> {
    let mut found = Vec::new();
    match (&draw.closed, kept) {
        (None, None) => {}
        (None, Some(kept)) => found.push(format!(
            "close: {}, but the record says every agency finished",
            kept.close
        )),
        // The close is kept in the record alone once a round is set aside
        // or restored without it.
        (Some(_), None) => {}
        (Some(recorded), Some(kept)) => {
            if recorded.close != kept.close {
                found.push(format!(
                    "close: the record says {}, the store kept {}",
                    recorded.close, kept.close
                ));
            }
            if recorded.finished != kept.finished {
                let list = |s: &std::collections::BTreeSet<u32>| {
                    s.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                };
                found.push(format!(
                    "close: the record says agencies [{}] had finished, the store kept [{}]",
                    list(&recorded.finished),
                    list(&kept.finished)
                ));
            }
        }
    }
    if let Some(closed) = &draw.closed {
        let times = (
            crate::close::parse_time(&closed.close.at),
            crate::close::parse_time(&draw.drawn_at),
        );
        match times {
            // The draw's time is kept to the second.
            (Ok(at), Ok(drawn)) if drawn.timestamp() < at.timestamp() => found.push(format!(
                "close: drawn at {}, before sales closed at {}",
                draw.drawn_at, closed.close.at
            )),
            (Err(e), _) => found.push(format!("close: its time is unreadable: {e}")),
            _ => {}
        }
        if let Some(outside) = closed.finished.iter().find(|a| **a == 0 || **a > agencies) {
            found.push(format!(
                "close: agency {outside} is recorded as finished but is not one of the \
                 configured agencies 1..={agencies}"
            ));
        }
    }
    found
}

/// `lottery new-round`: keeps the drawn round's bets file and record aside
/// (named by round and seal), checked first; the next start is empty.
///
/// # Errors
/// The round is not drawn, its record does not match its bets, or a file
/// cannot be renamed.
pub async fn new_round(config: &ServerConfig) -> anyhow::Result<String> {
    Ok(
        match store::Reader::open(&config.store_options())
            .await?
            .new_round(config.agencies, config.winning_number)
            .await?
        {
            NewRound::AlreadyEmpty { round } => {
                format!("round {round} holds no bets and no draw: it is already a new round\n")
            }
            NewRound::Kept {
                round,
                seal,
                bets,
                record,
                close,
            } => format!(
                "round {round} (seal {seal}) kept as {bets} and {record}{}; the next start of \
                 the central begins round {} with no bets\n",
                close.map_or(String::new(), |c| format!(", its close of sales as {c}")),
                round + 1
            ),
        },
    )
}
