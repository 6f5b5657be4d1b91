//! [`Claim`]: one connection's hold on one agency, released when dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tracing::info;

use super::{Lottery, LotteryError};
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;

/// The right to speak for one agency: while it lives, no other connection
/// can claim the agency, and only its holder counts the agency's stored
/// bets or announces that the agency finished.
///
/// Dropping it frees the agency, whichever way the connection ended (a
/// close, an error, a panic), so an agency is never locked out by a
/// connection that is gone.
#[derive(Debug)]
#[must_use = "dropping a claim frees the agency at once"]
pub struct Claim {
    lottery: Lottery,
    agency: AgencyId,
    /// Set when a newer session of the agency took over.
    superseded: Arc<AtomicBool>,
}

impl Claim {
    pub(super) fn new(lottery: Lottery, agency: AgencyId, superseded: Arc<AtomicBool>) -> Claim {
        Claim {
            lottery,
            agency,
            superseded,
        }
    }

    /// Whether a newer session of the agency took over (and closed this
    /// connection).
    pub fn superseded(&self) -> bool {
        self.superseded.load(Ordering::Acquire)
    }

    /// The agency claimed.
    pub fn agency(&self) -> AgencyId {
        self.agency
    }

    /// The receipt of the agency's stored bets, and whether it may still
    /// send more (not once it announced it finished, nor after the draw),
    /// read together: the central asks both for every batch. Only this
    /// claim's holder changes either, so the answer holds until it acts on
    /// it.
    pub fn intake(&self) -> (Receipt, Result<(), LotteryError>) {
        let drawn = self.lottery.draw().is_some();
        let state = self.lottery.lock();
        let stored = state.receipt(self.agency);
        let open = if let Some(closed) = &state.closed {
            Err(LotteryError::SalesClosed(closed.close.clone()))
        } else if drawn || state.finished.contains(&self.agency) {
            Err(LotteryError::Finished(self.agency))
        } else {
            Ok(())
        };
        (stored, open)
    }

    /// Opens the agency's session (a `HELLO`). With a store shared by
    /// several centrals, the store fences every older session of the
    /// agency, on any central, and what it holds for the agency replaces
    /// what this central knew: the agency may have stored bets, or
    /// finished, on another central since. Without one, nothing to do: this
    /// process's state is the truth.
    ///
    /// # Errors
    /// The shared store could not be reached.
    pub async fn open(&self) -> Result<(), LotteryError> {
        let Some(store) = &self.lottery.shared.shared_store else {
            return Ok(());
        };
        let held = store
            .open_session(self.agency)
            .await
            .map_err(|e| LotteryError::Store(e.to_string()))?;
        // Once the round is sealed, the only count an agency may resume
        // from is the sealed one: a count edited in the store since (one
        // that would have the agency send its bets again, or report none)
        // is refused, not served.
        if let Some(draw) = self.lottery.draw() {
            let sealed = draw.receipt_of(self.agency);
            if held.receipt != sealed {
                return Err(LotteryError::Store(format!(
                    "agency {}: {} says {} bets with digest {}, but the draw sealed {} bets with \
                     digest {}: the central serves no count its round was not sealed with \
                     (`lottery verify` names every difference)",
                    self.agency,
                    store.served_from(),
                    held.receipt.count,
                    held.receipt.digest,
                    sealed.count,
                    sealed.digest
                )));
            }
        }
        let mut state = self.lottery.lock();
        if held.receipt.count > 0 {
            state.stored.insert(self.agency, held.receipt);
        } else {
            state.stored.remove(&self.agency);
        }
        if held.finished {
            state.finished.insert(self.agency);
        }
        Ok(())
    }

    /// Records that the agency's stored bets now end at `after` (a batch
    /// was stored: batches are counted in the order they were stored, so
    /// each one's receipt follows the last); returns the total.
    pub fn add_stored(&self, after: Receipt) -> u64 {
        let mut state = self.lottery.lock();
        state.last_seen.insert(self.agency, SystemTime::now());
        let stored = state.stored.entry(self.agency).or_insert(after);
        debug_assert!(after.count >= stored.count, "receipts only grow");
        *stored = after;
        after.count
    }

    /// Announces that the agency finished. When it is the last one, runs
    /// the draw (once, outside the lock), records it, and publishes it to
    /// every waiting agency.
    ///
    /// Announcing again (after a reconnection) is harmless: the agency just
    /// waits for the draw again.
    ///
    /// # Errors
    /// A draw that could not read the bets or write its record; the
    /// announcement is then forgotten, so that announcing again retries.
    pub async fn finish(&self) -> Result<(), LotteryError> {
        let agency = self.agency;
        // After the close, an agency that had not finished stays closed:
        // its announcement asks for the draw (its winners), and finishes
        // nothing, here or in a shared store, as the draw record says.
        let closed_out = {
            let mut state = self.lottery.lock();
            state.last_seen.insert(agency, SystemTime::now());
            if state
                .closed
                .as_ref()
                .is_some_and(|c| !c.finished.contains(&agency))
            {
                let start = !state.drawing && !state.closing && self.lottery.draw().is_none();
                state.drawing |= start;
                Some(start)
            } else {
                None
            }
        };
        match closed_out {
            Some(true) => return self.lottery.run_draw(agency).await,
            Some(false) => return Ok(()),
            None => {}
        }
        // With a shared store the announcement is recorded there first, and
        // who finished is counted there: the others may have finished on
        // other centrals.
        let everywhere = if let Some(store) = &self.lottery.shared.shared_store {
            let finished = store
                .finish(agency, self.lottery.shared.agencies)
                .await
                .map_err(|e| LotteryError::Store(e.to_string()))?;
            Some(finished)
        } else {
            None
        };
        let run_draw = {
            let mut state = self.lottery.lock();
            state.last_seen.insert(agency, SystemTime::now());
            let new = state.finished.insert(agency);
            let finished = everywhere.unwrap_or(state.finished.len() as u32);
            state.counted = state.counted.max(finished);
            if new {
                info!(
                    action = action::AGENCIA_FINALIZADA,
                    result = result::SUCCESS,
                    agency,
                    finished,
                    agencies = self.lottery.shared.agencies
                );
            }
            // Once sales are closed, any announcement may (re)start the
            // draw; while a close is being kept, none: the close's draw
            // follows.
            let all = finished == self.lottery.shared.agencies || state.closed.is_some();
            let start = all && !state.drawing && !state.closing && self.lottery.draw().is_none();
            state.drawing |= start;
            start
        };
        if !run_draw {
            return Ok(());
        }
        self.lottery.run_draw(agency).await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        {
            let mut state = self.lottery.lock();
            state.connected.remove(&self.agency);
            state.last_seen.insert(self.agency, SystemTime::now());
        }
        self.lottery.shared.released.notify_waiters();
    }
}
