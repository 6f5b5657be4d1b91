//! The draw: tally the stored bets, record the outcome, publish it. It runs
//! once, on a task of its own, outside the state lock, so the central keeps
//! answering PING, STATUS and HELLO while it reads the bets back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::{error, info};

use super::{Drawn, Lottery, LotteryError};
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::Draw;

impl Lottery {
    /// Runs the draw started by `agency`'s announcement and waits for it.
    ///
    /// Every batch was stored before it was acknowledged, and every agency
    /// announced it finished after its last acknowledgement, so the store
    /// holds every bet by now.
    pub(super) async fn run_draw(&self, agency: AgencyId) -> Result<(), LotteryError> {
        // A task of its own, tracked so shutdown waits for it: the draw
        // completes and is published even if the connection that started
        // it is dropped half way.
        let running = Running {
            lottery: self.clone(),
            agency,
            done: false,
            failure: None,
        };
        let task = self.shared.tasks.track_future(running.run());
        match crate::task::spawn_named("draw", task).await {
            Ok(outcome) => outcome,
            // `Running`'s drop has published the failure already.
            Err(panicked) => Err(LotteryError::Draw(format!("the draw stopped: {panicked}"))),
        }
    }

    /// Draws (or, with a shared store, finds the draw another central
    /// recorded first: then `false`) and records it.
    async fn draw_and_record(&self) -> Result<(Arc<Draw>, bool), LotteryError> {
        let shared = &self.shared;
        if let Some(store) = &shared.shared_store {
            // The store draws exactly once for every central, checking the
            // tally against the receipts it holds (this central's counts
            // are only those of its own sessions).
            let (draw, ran) = store
                .draw_once(shared.winning_number, shared.agencies)
                .await
                .map_err(|e| LotteryError::Draw(e.to_string()))?;
            return Ok((Arc::new(draw), ran));
        }
        let started = Instant::now();
        let closed = self.lock().closed.clone();
        if let Some(closed) = closed {
            let draw = self.draw_closed(closed, started).await?;
            shared
                .store
                .save_draw(&draw)
                .await
                .map_err(|e| LotteryError::Draw(format!("writing the draw record: {e}")))?;
            return Ok((Arc::new(draw), true));
        }
        let tally = shared
            .store
            .tally(shared.winning_number)
            .await
            .map_err(|e| LotteryError::Draw(e.to_string()))?;
        // The receipts acknowledged to the agencies: the tally must hold
        // exactly their bets.
        let acknowledged: BTreeMap<AgencyId, Receipt> = {
            let state = self.lock();
            state.stored.iter().map(|(&a, &r)| (a, r)).collect()
        };
        let draw = Draw::from_tally(
            shared.winning_number,
            shared.agencies,
            tally,
            &acknowledged,
            started.elapsed(),
        )
        .map_err(|differences| {
            LotteryError::Draw(format!(
                "the stored bets differ from what was acknowledged ({}); nothing was recorded: \
                 put the bets back and the agencies' retries will draw again",
                differences.join(", ")
            ))
        })?;
        shared
            .store
            .save_draw(&draw)
            .await
            .map_err(|e| LotteryError::Draw(format!("writing the draw record: {e}")))?;
        Ok((Arc::new(draw), true))
    }
}

impl Lottery {
    /// The draw of a round whose sales closed: over exactly the bets the
    /// store held at the close (it refuses every batch after it), read
    /// back with their receipts. Batches stored before the close may still
    /// be on their way to being acknowledged, so what was acknowledged may
    /// be less than what is stored, never more, and never other bets.
    async fn draw_closed(
        &self,
        closed: crate::store::ClosedRound,
        started: Instant,
    ) -> Result<Draw, LotteryError> {
        let shared = &self.shared;
        let found = shared
            .store
            .recompute(shared.winning_number)
            .await
            .map_err(|e| LotteryError::Draw(e.to_string()))?;
        let acknowledged: BTreeMap<AgencyId, Receipt> = {
            let state = self.lock();
            state.stored.iter().map(|(&a, &r)| (a, r)).collect()
        };
        let lost: Vec<String> = acknowledged
            .iter()
            .filter_map(|(&agency, acked)| {
                let stored = found
                    .receipts
                    .get(&agency)
                    .copied()
                    .unwrap_or_else(|| Receipt::empty(agency));
                let lost = stored.count < acked.count
                    || (stored.count == acked.count && stored.digest != acked.digest);
                lost.then(|| {
                    format!(
                        "agency {agency}: {} in the store, {} acknowledged",
                        stored.count, acked.count
                    )
                })
            })
            .collect();
        if !lost.is_empty() {
            return Err(LotteryError::Draw(format!(
                "the stored bets lack bets that were acknowledged ({}); nothing was recorded:                  put the bets back and the agencies' retries will draw again",
                lost.join(", ")
            )));
        }
        let tally = crate::store::Tally {
            rows: found.receipts.values().map(|r| r.count).sum(),
            per_agency: found.receipts.iter().map(|(&a, r)| (a, r.count)).collect(),
            winners: found.winners,
        };
        let mut draw = Draw::from_tally(
            shared.winning_number,
            shared.agencies,
            tally,
            &found.receipts,
            started.elapsed(),
        )
        .map_err(|differences| LotteryError::Draw(differences.join(", ")))?;
        draw.closed = Some(closed);
        Ok(draw)
    }
}

/// A draw under way. However it ends (done, failed, or its task panicking
/// or dropped), the lottery is left ready: done publishes the draw; any
/// other end forgets the announcement that started it and lets the next
/// announcement draw again, and only then tells the waiting agencies, so
/// none of them can miss the retry.
struct Running {
    lottery: Lottery,
    agency: AgencyId,
    done: bool,
    /// Why it failed, for the agencies waiting for it.
    failure: Option<String>,
}

impl Running {
    async fn run(mut self) -> Result<(), LotteryError> {
        match self.lottery.draw_and_record().await {
            Ok((draw, false)) => {
                // Another central ran it: it logged the draw, once.
                if let Some(closed) = &draw.closed {
                    self.lottery.adopt_close(closed);
                }
                log_drawn_elsewhere(&draw);
                self.lottery.shared.drawn.send_replace(Drawn::Done(draw));
                self.lottery.lock().drawing = false;
                self.done = true;
                Ok(())
            }
            Ok((draw, true)) => {
                info!(
                    action = action::SORTEO,
                    result = result::SUCCESS,
                    winning_number = draw.winning_number,
                    bets = draw.bets,
                    winners = draw.winners.values().map(Vec::len).sum::<usize>(),
                    seal = %draw.seal,
                    millis = draw.elapsed.as_millis() as u64
                );
                self.lottery.shared.drawn.send_replace(Drawn::Done(draw));
                self.lottery.lock().drawing = false;
                self.done = true;
                Ok(())
            }
            Err(e) => {
                error!(action = action::SORTEO, result = result::FAIL, reason = %e);
                self.failure = Some(match &e {
                    LotteryError::Draw(reason) => reason.clone(),
                    other => other.to_string(),
                });
                Err(e)
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut state = self.lottery.lock();
            state.finished.remove(&self.agency);
            state.drawing = false;
        }
        let reason = self.failure.take().unwrap_or_else(|| {
            "the draw stopped before it was recorded; announce again to retry".to_string()
        });
        self.lottery
            .shared
            .drawn
            .send_replace(Drawn::Failed(reason));
    }
}

/// Says that another central of the same database ran the draw (which
/// that central logged as `sorteo`, once).
pub(super) fn log_drawn_elsewhere(draw: &crate::store::Draw) {
    info!(
        action = action::DRAW_RECORD,
        result = result::SUCCESS,
        state = "drawn_by_another_central",
        drawn_at = draw.drawn_at.as_str(),
        bets = draw.bets,
        seal = %draw.seal
    );
}
