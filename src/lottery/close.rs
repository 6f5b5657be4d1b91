//! The close of sales: kept by the store at one point in the order of the
//! batches, then the draw at once, over what was stored.

use tracing::{info, warn};

use super::{Lottery, LotteryError, NO_AGENCY};
use crate::close::{ClosedBy, SalesClose};
use crate::logging::{action, result};
use crate::store::ClosedRound;

impl Lottery {
    /// Closes sales now, `by` an operator (connected `from` that address)
    /// or the central's `close_at`, for `reason`: the store orders the
    /// close after every batch it took and before every later one (refused
    /// `BETTING_CLOSED`) and keeps it; then the draw starts, on a task of
    /// its own, over the bets stored. Once asked, the close runs to its end
    /// on a task of its own, whatever becomes of the caller.
    ///
    /// # Errors
    /// Sales are closed already (here or on another central sharing the
    /// store: the draw still runs), the round is drawn or being drawn, or
    /// the store could not keep the close (sales stay open).
    pub async fn close_sales(
        &self,
        by: ClosedBy,
        reason: String,
        from: &str,
    ) -> Result<SalesClose, LotteryError> {
        let finished = {
            let mut state = self.lock();
            if let Some(closed) = &state.closed {
                return Err(already_closed(&closed.close));
            }
            if let Some(draw) = self.draw() {
                return Err(LotteryError::CloseRefused(format!(
                    "the round is drawn already (at {}, seal {}): there is nothing left to close",
                    draw.drawn_at, draw.seal
                )));
            }
            if state.drawing {
                return Err(LotteryError::CloseRefused(
                    "every agency has finished and the draw is under way: there is nothing left \
                     to close"
                        .into(),
                ));
            }
            if state.closing {
                return Err(LotteryError::CloseRefused(
                    "another close of sales is being kept right now".into(),
                ));
            }
            state.closing = true;
            state.finished.clone()
        };
        let round = ClosedRound {
            close: SalesClose::now(by, reason),
            finished,
        };
        let lottery = self.clone();
        let from = from.to_string();
        let keeping = tokio::spawn(async move { lottery.keep_close(round, &from).await });
        keeping.await.unwrap_or_else(|e| {
            Err(LotteryError::Store(format!(
                "the close of sales stopped: {e}"
            )))
        })
    }

    /// The rest of [`Lottery::close_sales`], once `closing` is set: has the
    /// store keep `round`, then takes it (and starts the draw), or clears
    /// `closing` if the store could not.
    async fn keep_close(&self, round: ClosedRound, from: &str) -> Result<SalesClose, LotteryError> {
        let by = round.close.by;
        let kept = self.shared.store.close_sales(&round).await;
        let (kept, this) = match kept {
            Ok(kept) => kept,
            Err(e) => {
                warn!(action = action::CIERRE, result = result::FAIL, by = %by, error = %e);
                let start = {
                    let mut state = self.lock();
                    state.closing = false;
                    // Every agency may have finished meanwhile: their draw
                    // waited for the close.
                    let all = state.finished.len() as u32 == self.shared.agencies;
                    let start = all && !state.drawing && self.draw().is_none();
                    state.drawing |= start;
                    start
                };
                if start {
                    self.spawn_draw();
                }
                return Err(LotteryError::Store(format!(
                    "the close of sales could not be kept, sales are still open: {e}"
                )));
            }
        };
        if this {
            self.lock().close_logged = true;
            info!(
                action = action::CIERRE,
                result = result::SUCCESS,
                by = %kept.close.by,
                from,
                at = kept.close.at.as_str(),
                reason = kept.close.reason.as_str(),
                finished = kept.finished.len(),
                agencies = self.shared.agencies
            );
        }
        if !this {
            // Another central closed first (its clock, or its operator).
            let mut state = self.lock();
            log_closed_elsewhere(&mut state, &kept);
        }
        self.closed_by_store(kept.clone(), false);
        if this {
            Ok(kept.close)
        } else {
            Err(already_closed(&kept.close))
        }
    }

    /// Takes a close the store kept (by this central, by another, or before
    /// a restart): from now on batches are refused, and the draw runs at
    /// once unless it is done or running.
    ///
    /// `elsewhere`: the store's watch saw it, and unless this central is
    /// closing it itself, another central closed (said once, in the log).
    pub fn closed_by_store(&self, kept: ClosedRound, elsewhere: bool) {
        let start = {
            let mut state = self.lock();
            if !elsewhere {
                // Its caller says it (this central's close, or a start).
                state.close_logged = true;
            } else if !state.closing {
                // Learned from the store: closed on another central (while
                // this one closes, its own close says which).
                log_closed_elsewhere(&mut state, &kept);
            }
            state.closing = false;
            if state.closed.is_none() {
                state.closed = Some(kept);
            }
            let start = !state.drawing && self.draw().is_none();
            state.drawing |= start;
            start
        };
        if start {
            self.spawn_draw();
        }
    }

    /// Takes the close a draw recorded by another central was drawn
    /// after, should this central not know of it yet (the draw can come
    /// before the watch sees the close): batches are refused
    /// `BETTING_CLOSED` here too.
    pub(super) fn adopt_close(&self, closed: &ClosedRound) {
        let mut state = self.lock();
        if state.closed.is_none() {
            log_closed_elsewhere(&mut state, closed);
            state.closed = Some(closed.clone());
        }
    }

    /// Runs the draw on a task of its own (it logs itself, done or
    /// failed; a failure is retried by the next announcement).
    fn spawn_draw(&self) {
        let lottery = self.clone();
        tokio::spawn(async move {
            let _ = lottery.run_draw(NO_AGENCY).await;
        });
    }
}

/// Says, once, that another central closed sales.
fn log_closed_elsewhere(state: &mut super::State, kept: &ClosedRound) {
    if std::mem::replace(&mut state.close_logged, true) {
        return;
    }
    info!(
        action = action::CIERRE,
        result = result::SUCCESS,
        state = "closed_elsewhere",
        by = %kept.close.by,
        at = kept.close.at.as_str(),
        reason = kept.close.reason.as_str()
    );
}

/// The refusal of a second close.
fn already_closed(close: &SalesClose) -> LotteryError {
    LotteryError::CloseRefused(format!("{close} already: a second close is refused"))
}
