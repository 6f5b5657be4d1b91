//! The lottery's shared state: which agencies are connected and which have
//! finished, and the draw, which runs exactly once when the last configured
//! agency finishes.
//!
//! [`Lottery`] is a cheap handle (like mini-redis's `Db`); its methods own the
//! locking, so no guard ever leaves this module.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::protocol::ErrorCode;
use crate::storage::{self, StorageError};

/// The outcome of the draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// The winning number.
    pub winning_number: u16,
    /// Winner documents per agency, in the order they were stored.
    pub winners: HashMap<AgencyId, Vec<String>>,
    /// Bets taken into account.
    pub bets: u64,
    /// How long reading the bets file took.
    pub elapsed: Duration,
}

impl Draw {
    /// The winners of one agency (empty when it has none).
    pub fn winners_of(&self, agency: AgencyId) -> &[String] {
        self.winners.get(&agency).map_or(&[], Vec::as_slice)
    }
}

/// What the lottery refuses, with the code sent back to the agency.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LotteryError {
    /// The id is outside `1..=agencies`.
    #[error("agency {0} is not one of the configured agencies 1..={1}")]
    UnknownAgency(AgencyId, u32),
    /// A connection that speaks for one agency sent a message for another.
    #[error("this connection speaks for agency {bound}, not {claimed}")]
    OtherAgency {
        /// The connection's agency.
        bound: AgencyId,
        /// The agency the message named.
        claimed: AgencyId,
    },
    /// Another open connection speaks for the agency.
    #[error("agency {0} is already connected")]
    Busy(AgencyId),
    /// The agency already finished (or the draw is done): no more bets.
    #[error("agency {0} already finished betting")]
    Finished(AgencyId),
    /// The draw could not read the bets file.
    #[error("the draw failed: {0}")]
    Draw(String),
}

impl LotteryError {
    /// The wire error code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            LotteryError::UnknownAgency(..) | LotteryError::OtherAgency { .. } => {
                ErrorCode::WrongAgency
            }
            LotteryError::Busy(_) => ErrorCode::AgencyBusy,
            LotteryError::Finished(_) => ErrorCode::AgencyFinished,
            LotteryError::Draw(_) => ErrorCode::StorageFailed,
        }
    }
}

/// The mutable part, behind the mutex.
#[derive(Debug, Default)]
struct LotteryState {
    /// Agencies with an open connection that has claimed them.
    connected: HashSet<AgencyId>,
    /// Agencies that announced they finished.
    finished: BTreeSet<AgencyId>,
    /// Set once, by the agency whose announcement completes the set.
    draw: Option<Arc<Draw>>,
}

#[derive(Debug)]
struct Shared {
    /// A `tokio` mutex because the draw reads the bets file while holding it:
    /// the guard spans an `.await`, and no second draw can start meanwhile.
    state: Mutex<LotteryState>,
    /// Woken (all waiters at once) when the draw is published.
    drawn: Notify,
    agencies: u32,
    winning_number: u16,
    bets_file: PathBuf,
}

/// Handle to the lottery state, shared by every connection.
#[derive(Debug, Clone)]
pub struct Lottery {
    shared: Arc<Shared>,
}

impl Lottery {
    /// A lottery for agencies `1..=agencies`, drawing `winning_number` over
    /// the bets in `bets_file`.
    pub fn new(agencies: u32, winning_number: u16, bets_file: PathBuf) -> Lottery {
        Lottery {
            shared: Arc::new(Shared {
                state: Mutex::new(LotteryState::default()),
                drawn: Notify::new(),
                agencies,
                winning_number,
                bets_file,
            }),
        }
    }

    /// Makes `agency` this connection's. Call [`Lottery::release`] when the
    /// connection ends.
    ///
    /// # Errors
    /// The id is out of range, or another connection holds it.
    pub async fn claim(&self, agency: AgencyId) -> Result<(), LotteryError> {
        if agency == 0 || agency > self.shared.agencies {
            return Err(LotteryError::UnknownAgency(agency, self.shared.agencies));
        }
        let mut state = self.shared.state.lock().await;
        if !state.connected.insert(agency) {
            return Err(LotteryError::Busy(agency));
        }
        Ok(())
    }

    /// Frees `agency` for a later connection.
    pub async fn release(&self, agency: AgencyId) {
        self.shared.state.lock().await.connected.remove(&agency);
    }

    /// Checks that `agency` may still send bets.
    ///
    /// Only the connection holding the agency's claim sends its bets and its
    /// announcement, one after the other, so the answer cannot change between
    /// this check and the store.
    ///
    /// # Errors
    /// [`LotteryError::Finished`] once it announced it finished or the draw
    /// is done.
    pub async fn check_open(&self, agency: AgencyId) -> Result<(), LotteryError> {
        let state = self.shared.state.lock().await;
        if state.finished.contains(&agency) || state.draw.is_some() {
            return Err(LotteryError::Finished(agency));
        }
        Ok(())
    }

    /// Records that `agency` finished. When it is the last one, runs the
    /// draw (once), publishes it and wakes every waiting agency.
    ///
    /// # Errors
    /// [`LotteryError::Finished`] for a second announcement; a draw that
    /// could not read the bets file.
    pub async fn finish(&self, agency: AgencyId) -> Result<(), LotteryError> {
        let mut state = self.shared.state.lock().await;
        if !state.finished.insert(agency) {
            return Err(LotteryError::Finished(agency));
        }
        info!(
            action = action::AGENCIA_FINALIZADA,
            result = result::SUCCESS,
            agency,
            finished = state.finished.len(),
            agencies = self.shared.agencies
        );
        if state.draw.is_none() && state.finished.len() as u32 == self.shared.agencies {
            let draw = self.run_draw().await.map_err(|e| {
                // Let a later announcement try again.
                state.finished.remove(&agency);
                LotteryError::Draw(e.to_string())
            })?;
            info!(
                action = action::SORTEO,
                result = result::SUCCESS,
                winning_number = draw.winning_number,
                bets = draw.bets,
                winners = draw.winners.values().map(Vec::len).sum::<usize>(),
                millis = draw.elapsed.as_millis() as u64
            );
            state.draw = Some(Arc::new(draw));
            drop(state);
            self.shared.drawn.notify_waiters();
        }
        Ok(())
    }

    /// Reads the bets file back as a stream and collects each agency's
    /// winners. Every batch was written before it was acknowledged, and every
    /// agency announced it finished after its last acknowledgement, so the
    /// file holds every bet by now.
    async fn run_draw(&self) -> Result<Draw, StorageError> {
        let path = self.shared.bets_file.clone();
        let winning = u32::from(self.shared.winning_number);
        let winning_number = self.shared.winning_number;
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut winners: HashMap<AgencyId, Vec<String>> = HashMap::new();
            let bets = storage::scan(&path, |bet| {
                if bet.number == winning {
                    winners
                        .entry(bet.agency)
                        .or_default()
                        .push(bet.document.to_string());
                }
            })?;
            Ok(Draw {
                winning_number,
                winners,
                bets,
                elapsed: started.elapsed(),
            })
        })
        .await
        .expect("the draw does not panic")
    }

    /// The draw, if it is done.
    pub async fn draw(&self) -> Option<Arc<Draw>> {
        self.shared.state.lock().await.draw.clone()
    }

    /// Waits for the draw. Returns `None` if `cancel` fires first.
    pub async fn wait_for_draw(&self, cancel: &CancellationToken) -> Option<Arc<Draw>> {
        loop {
            // Register interest *before* looking, so a draw published between
            // the look and the wait still wakes us (`notify_waiters` stores no
            // permit for futures that do not exist yet).
            let notified = self.shared.drawn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(draw) = self.draw().await {
                return Some(draw);
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = &mut notified => {}
            }
        }
    }

    /// Agencies that have announced they finished.
    pub async fn finished(&self) -> Vec<AgencyId> {
        self.shared
            .state
            .lock()
            .await
            .finished
            .iter()
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;
    use crate::storage::encode_rows;

    fn write_bets(path: &std::path::Path, bets: &[(u32, &str, u16)]) {
        let bets: Vec<Bet> = bets
            .iter()
            .map(|(a, d, n)| {
                Bet::from_fields(&a.to_string(), "A", "B", d, "1999-03-17", &n.to_string()).unwrap()
            })
            .collect();
        let mut rows = Vec::new();
        encode_rows(&bets, &mut rows);
        std::fs::write(path, rows).unwrap();
    }

    #[tokio::test]
    async fn draw_happens_once_after_the_last_agency_and_is_per_agency() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        write_bets(
            &path,
            &[
                (1, "11", 5),
                (2, "22", 5),
                (2, "23", 6),
                (1, "12", 5),
                (3, "33", 1),
            ],
        );
        let lottery = Lottery::new(3, 5, path);
        let cancel = CancellationToken::new();

        let waiter = {
            let l = lottery.clone();
            let c = cancel.clone();
            tokio::spawn(async move { l.wait_for_draw(&c).await })
        };
        lottery.finish(1).await.unwrap();
        lottery.finish(2).await.unwrap();
        assert!(
            lottery.draw().await.is_none(),
            "no draw before every agency finished"
        );
        assert_eq!(lottery.finish(2).await, Err(LotteryError::Finished(2)));
        lottery.finish(3).await.unwrap();

        let draw = waiter.await.unwrap().expect("woken by the draw");
        assert_eq!(draw.winners_of(1), ["11", "12"]);
        assert_eq!(draw.winners_of(2), ["22"]);
        assert!(draw.winners_of(3).is_empty());
        assert_eq!(draw.bets, 5);
        // Later callers get the same draw at once.
        assert!(Arc::ptr_eq(
            &draw,
            &lottery.wait_for_draw(&cancel).await.unwrap()
        ));
        assert_eq!(lottery.check_open(1).await, Err(LotteryError::Finished(1)));
    }

    #[tokio::test]
    async fn claims_are_exclusive_and_ranged() {
        let dir = tempfile::tempdir().unwrap();
        let lottery = Lottery::new(2, 5, dir.path().join("bets.csv"));
        lottery.claim(1).await.unwrap();
        assert_eq!(lottery.claim(1).await, Err(LotteryError::Busy(1)));
        assert_eq!(
            lottery.claim(3).await,
            Err(LotteryError::UnknownAgency(3, 2))
        );
        lottery.release(1).await;
        lottery.claim(1).await.unwrap();
    }

    #[tokio::test]
    async fn waiting_is_cancellable() {
        let dir = tempfile::tempdir().unwrap();
        let lottery = Lottery::new(2, 5, dir.path().join("bets.csv"));
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(lottery.wait_for_draw(&cancel).await.is_none());
    }
}
