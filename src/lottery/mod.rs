//! The lottery's shared state: which agencies are connected and which have
//! finished, the bets held for each, and the draw, which runs exactly once
//! when the last configured agency finishes.
//!
//! [`Lottery`] is a cheap handle (like mini-redis's `Db`); its methods own the
//! locking, so no guard ever leaves this module. What only the connection
//! speaking for an agency may do (count its stored bets, announce it
//! finished) is done through that agency's [`Claim`], which frees the agency
//! when dropped, however the connection ends.

mod claim;
mod close;
mod draw;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::{info, warn};

use crate::close::SalesClose;
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Receipt;
use crate::store::{ClosedRound, Draw, SharedStore, Store, Watched};

pub use claim::Claim;

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
    /// A new session waited for the older connection of its agency to let
    /// go, and it did not in time.
    #[error(
        "agency {agency} is held by an older connection that did not let go within {}s \
         (its batches in flight not yet settled); try again",
        waited.as_secs()
    )]
    TakeoverTimedOut {
        /// The agency.
        agency: AgencyId,
        /// How long the new session waited.
        waited: Duration,
    },
    /// The agency already finished (or the draw is done): no more bets.
    #[error("agency {0} already finished betting")]
    Finished(AgencyId),
    /// The draw could not read the bets back or write its record.
    #[error("the draw failed: {0}")]
    Draw(String),
    /// A store shared by several centrals could not be asked (or told)
    /// where the agency stands.
    #[error("{0}")]
    Store(String),
    /// Sales are closed: no more bets.
    #[error("{0}: no more bets are taken this round")]
    SalesClosed(SalesClose),
    /// A close of sales refused: closed already, or the round drawn.
    #[error("{0}")]
    CloseRefused(String),
    /// A batch starts past the agency's stored bets: some would be missing.
    #[error(
        "batch starts at bet {first} but agency {agency} has {stored} stored; resume from {stored}"
    )]
    OutOfOrder {
        /// The agency.
        agency: AgencyId,
        /// Where the batch starts.
        first: u64,
        /// Bets stored for the agency.
        stored: u64,
    },
}

/// Where one agency stands, as `status` shows it: the rules' own view, which
/// the handler puts on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// The agency.
    pub agency: AgencyId,
    /// Bets the central holds for it.
    pub held: u64,
    /// It announced that it finished.
    pub finished: bool,
}

/// The mutable part, behind the mutex.
#[derive(Debug, Default)]
struct State {
    /// Agencies whose [`Claim`] is alive, with what ends the holding
    /// connection when a newer session takes over.
    connected: HashMap<AgencyId, Holder>,
    /// Agencies that announced they finished.
    finished: BTreeSet<AgencyId>,
    /// Each agency's receipt of its stored bets (agencies with bets only):
    /// its count is where the agency's upload resumes.
    stored: HashMap<AgencyId, Receipt>,
    /// A draw is being run; nobody starts another meanwhile.
    drawing: bool,
    /// With a shared store: the most agencies it last said had finished,
    /// on every central (this central's `finished` holds only its own).
    counted: u32,
    /// Sales are closed: the draw runs over what was stored, whoever
    /// finished.
    closed: Option<ClosedRound>,
    /// A close is being kept by the store; no draw starts meanwhile.
    closing: bool,
    /// The close is in the log already (`cierre`), said once.
    close_logged: bool,
    /// When each agency's connection last did something here (claimed,
    /// stored a batch, finished, went away): for the operator's status page.
    last_seen: HashMap<AgencyId, SystemTime>,
}

impl State {
    /// The receipt of `agency`'s stored bets.
    fn receipt(&self, agency: AgencyId) -> Receipt {
        self.stored
            .get(&agency)
            .copied()
            .unwrap_or_else(|| Receipt::empty(agency))
    }
}

/// How long the draw watcher waits before looking again when every agency
/// has finished but it could not draw (a draw is running on this central,
/// or it failed).
const REDRAW_PAUSE: Duration = Duration::from_secs(2);

/// How often the central says which agencies the draw waits for, once
/// some have finished: a round stalled on an agency that never announced
/// (its announcement lost, the agency stopped) shows in the log.
pub const DRAW_WAITING_EVERY: Duration = Duration::from_secs(60);

/// The agency a draw started by the watcher, not by an announcement, is
/// counted for: none (ids start at 1).
const NO_AGENCY: AgencyId = 0;

/// Where the draw stands, as the agencies waiting for it watch it.
#[derive(Debug, Clone)]
enum Drawn {
    /// Not every agency has finished, or the draw is running.
    NotYet,
    /// The last attempt failed (the reason); the next announcement retries.
    Failed(String),
    /// Done and recorded.
    Done(Arc<Draw>),
}

/// Where the draw stands, for the operator's views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawPhase {
    /// Not every agency has finished.
    Waiting,
    /// Every agency finished; the draw is being run.
    Running,
    /// The last attempt failed; the next announcement retries.
    Failed,
    /// Done and recorded.
    Done,
}

impl DrawPhase {
    /// Every phase, in order.
    pub const ALL: [DrawPhase; 4] = [
        DrawPhase::Waiting,
        DrawPhase::Running,
        DrawPhase::Failed,
        DrawPhase::Done,
    ];

    /// Its name in the views (a metric's label, the status page).
    pub fn name(self) -> &'static str {
        match self {
            DrawPhase::Waiting => "waiting",
            DrawPhase::Running => "running",
            DrawPhase::Failed => "failed",
            DrawPhase::Done => "done",
        }
    }
}

/// One agency as the operator's views show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyView {
    /// The agency.
    pub agency: AgencyId,
    /// Bets stored for it (as this central counted them).
    pub stored: u64,
    /// It announced that it finished here.
    pub finished: bool,
    /// A connection of it is open here now.
    pub connected: bool,
    /// When a connection of it last did something here.
    pub last_seen: Option<SystemTime>,
}

/// The connection holding a claim, as a newer session sees it.
#[derive(Debug)]
struct Holder {
    /// The holding connection's token: cancelling it closes that connection.
    connection: CancellationToken,
    /// Set before that token is cancelled, so the old connection can tell a
    /// takeover from a shutdown.
    superseded: Arc<AtomicBool>,
}

#[derive(Debug)]
struct Shared {
    /// A std mutex, not a Tokio one: nothing is awaited while it is held
    /// (the draw runs outside it), and a [`Claim`] must be able to free its
    /// agency from `Drop`, which cannot await.
    state: Mutex<State>,
    /// The draw once published; waiting agencies watch it, so a draw that
    /// lands between a look and a wait is never missed.
    drawn: watch::Sender<Drawn>,
    /// Woken whenever a claim is dropped, for a session taking over.
    released: Notify,
    /// The draw's task, so shutdown can wait for a draw under way.
    tasks: TaskTracker,
    /// With a shared store: the task that learns of a draw recorded by
    /// another central; aborted on close.
    watcher: Mutex<Option<tokio::task::AbortHandle>>,
    agencies: u32,
    winning_number: u16,
    store: Arc<dyn Store>,
    /// The same store when other centrals share it: then what is kept
    /// here is only a cache, and the store is the truth; `None` (the bets
    /// file) and this process's state is the truth.
    shared_store: Option<Arc<dyn SharedStore>>,
}

/// Handle to the lottery state, shared by every connection.
#[derive(Debug, Clone)]
pub struct Lottery {
    shared: Arc<Shared>,
}

impl Lottery {
    /// A lottery for agencies `1..=agencies`, drawing `winning_number` over
    /// the bets in `store`. `stored` holds the receipts of the bets the
    /// store already has per agency; `draw` a draw read back from its record.
    pub fn new(
        agencies: u32,
        winning_number: u16,
        store: Arc<dyn Store>,
        stored: BTreeMap<AgencyId, Receipt>,
        draw: Option<Draw>,
    ) -> Lottery {
        let state = State {
            stored: stored.into_iter().collect(),
            // A draw runs only once every configured agency has finished
            // (or sales closed, which its record says, with who had): a
            // round drawn before a restart still has all of them done.
            finished: match &draw {
                Some(Draw {
                    closed: Some(closed),
                    ..
                }) => closed.finished.clone(),
                Some(_) => (1..=agencies).collect(),
                None => BTreeSet::new(),
            },
            closed: draw.as_ref().and_then(|d| d.closed.clone()),
            close_logged: draw.as_ref().is_some_and(|d| d.closed.is_some()),
            ..State::default()
        };
        let shared_store = store.clone().into_shared();
        let watch_store = shared_store.clone().filter(|_| draw.is_none());
        let lottery = Lottery {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                drawn: watch::Sender::new(draw.map_or(Drawn::NotYet, |d| Drawn::Done(Arc::new(d)))),
                released: Notify::new(),
                tasks: TaskTracker::new(),
                watcher: Mutex::new(None),
                agencies,
                winning_number,
                store,
                shared_store,
            }),
        };
        if let Some(store) = watch_store {
            // The agencies waiting here must learn of a draw that another
            // central ran; and should every agency have finished with no
            // draw recorded (the central drawing died before its commit),
            // this central draws. A weak handle: the watcher must not keep
            // the lottery alive.
            let weak = Arc::downgrade(&lottery.shared);
            let task = tokio::spawn(async move {
                // Drawn for everyone at most once here: a draw that fails
                // (logged) is retried by the agencies' announcements, not
                // every few seconds by the watcher.
                let mut tried = false;
                loop {
                    let watched = store.drawn(agencies).await;
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    let lottery = Lottery { shared };
                    match watched {
                        Watched::Recorded(draw) => {
                            lottery.publish_recorded(*draw);
                            return;
                        }
                        Watched::AllFinished if !tried => {
                            tried = true;
                            if lottery.draw_for_everyone().await {
                                return;
                            }
                        }
                        Watched::AllFinished => {}
                        // Closed on any central: refused here too, and
                        // drawn (once, by whichever central comes first).
                        Watched::Closed(closed) => lottery.closed_by_store(closed, true),
                    }
                    drop(lottery);
                    // Not drawn here (one is running on this central, or it
                    // failed): look again after a pause.
                    tokio::time::sleep(REDRAW_PAUSE).await;
                }
            });
            *lottery
                .shared
                .watcher
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(task.abort_handle());
        }
        lottery
    }

    /// Runs the draw for every agency, none of whose announcements on this
    /// central started it (see the watcher in [`Lottery::new`]), unless one
    /// is running here already. Whether the draw is done.
    async fn draw_for_everyone(&self) -> bool {
        let start = {
            let mut state = self.lock();
            let start = !state.drawing && self.draw().is_none();
            state.drawing |= start;
            start
        };
        if start {
            // Logged by the draw itself, done or failed.
            let _ = self.run_draw(NO_AGENCY).await;
        }
        self.draw().is_some()
    }

    /// Publishes a draw recorded by another central (unless this one
    /// published it already): its waiting agencies get their winners.
    fn publish_recorded(&self, draw: Draw) {
        let published = self.shared.drawn.send_if_modified(|drawn| {
            if matches!(drawn, Drawn::Done(_)) {
                return false;
            }
            *drawn = Drawn::Done(Arc::new(draw.clone()));
            true
        });
        if published {
            if let Some(closed) = &draw.closed {
                self.adopt_close(closed);
            }
            draw::log_drawn_elsewhere(&draw);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock; if one ever did, the
        // counts it guards are still whole (each update is one statement).
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The receipt of the bets stored for `agency`: its count is the
    /// position its upload resumes from.
    pub fn stored(&self, agency: AgencyId) -> Receipt {
        self.lock().receipt(agency)
    }

    /// Makes `agency` the caller's until the returned [`Claim`] is dropped.
    /// `connection` is the caller's token: a newer session of the agency
    /// cancels it to take over (see [`Lottery::take_over`]).
    ///
    /// # Errors
    /// The id is out of range, or another connection holds it.
    pub fn claim(
        &self,
        agency: AgencyId,
        connection: &CancellationToken,
    ) -> Result<Claim, LotteryError> {
        self.check_range(agency)?;
        let superseded = Arc::new(AtomicBool::new(false));
        let mut state = self.lock();
        if state.connected.contains_key(&agency) {
            return Err(LotteryError::Busy(agency));
        }
        let holder = Holder {
            connection: connection.clone(),
            superseded: superseded.clone(),
        };
        state.connected.insert(agency, holder);
        state.last_seen.insert(agency, SystemTime::now());
        Ok(Claim::new(self.clone(), agency, superseded))
    }

    /// Claims `agency` for a new session, closing the older connection that
    /// holds it if any: the newer session wins (an agency restarted while
    /// its old connection looks alive must not be locked out). The old
    /// connection settles its batches in flight before it lets go, so the
    /// count the new session is told afterwards is final and nothing is
    /// stored twice. Waits at most `patience` for it.
    ///
    /// # Errors
    /// The id is out of range, or the old connection did not let go in time.
    pub async fn take_over(
        &self,
        agency: AgencyId,
        connection: &CancellationToken,
        patience: Duration,
    ) -> Result<Claim, LotteryError> {
        self.check_range(agency)?;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            // Registered before looking, so a release between the look and
            // the wait still wakes us.
            let released = self.shared.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.claim(agency, connection) {
                Err(LotteryError::Busy(_)) => {
                    if let Some(old) = self.lock().connected.get(&agency) {
                        old.superseded
                            .store(true, std::sync::atomic::Ordering::Release);
                        old.connection.cancel();
                    }
                }
                claimed => return claimed,
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(LotteryError::TakeoverTimedOut {
                    agency,
                    waited: patience,
                });
            }
        }
    }

    fn check_range(&self, agency: AgencyId) -> Result<(), LotteryError> {
        if agency == 0 || agency > self.shared.agencies {
            return Err(LotteryError::UnknownAgency(agency, self.shared.agencies));
        }
        Ok(())
    }

    /// The draw, if it is done.
    pub fn draw(&self) -> Option<Arc<Draw>> {
        match &*self.shared.drawn.borrow() {
            Drawn::Done(draw) => Some(draw.clone()),
            _ => None,
        }
    }

    /// Waits for the draw: `Some(Ok)` once it is done, `Some(Err)` when an
    /// attempt fails while waiting (the agency should try again later),
    /// `None` if `cancel` fires first.
    pub async fn wait_for_draw(
        &self,
        cancel: &CancellationToken,
    ) -> Option<Result<Arc<Draw>, LotteryError>> {
        // Subscribed before looking: a draw published in between is seen
        // as a change. A failure from before this wait is not this wait's.
        let mut drawn = self.shared.drawn.subscribe();
        if let Drawn::Done(draw) = &*drawn.borrow_and_update() {
            return Some(Ok(draw.clone()));
        }
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return None,
                // The sender lives as long as `self`: this cannot fail.
                changed = drawn.changed() => changed.ok()?,
            }
            match &*drawn.borrow_and_update() {
                Drawn::Done(draw) => return Some(Ok(draw.clone())),
                Drawn::Failed(reason) => return Some(Err(LotteryError::Draw(reason.clone()))),
                Drawn::NotYet => {}
            }
        }
    }

    /// Waits for a draw under way to be recorded and published (or to
    /// fail): shutdown must not close the store under a draw.
    pub async fn close(&self) {
        if let Some(watcher) = self
            .shared
            .watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            watcher.abort();
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// The close of sales, once sales are closed.
    pub fn closed(&self) -> Option<SalesClose> {
        self.lock().closed.as_ref().map(|c| c.close.clone())
    }

    /// The configured agency count, whether the draw is done, and each
    /// agency that holds bets or has finished, in agency order.
    pub fn status(&self) -> (u32, bool, Vec<Standing>) {
        let drawn = self.draw().is_some();
        let state = self.lock();
        let mut ids: BTreeSet<AgencyId> = state.stored.keys().copied().collect();
        ids.extend(state.finished.iter().copied());
        let states = ids
            .into_iter()
            .map(|agency| Standing {
                agency,
                held: state.stored.get(&agency).map_or(0, |r| r.count),
                finished: state.finished.contains(&agency),
            })
            .collect();
        (self.shared.agencies, drawn, states)
    }

    /// [`Lottery::status`], and with a shared store what the other
    /// centrals stored and who finished there too, as the store holds it
    /// (this central's own counts may be ahead of it by batches not yet
    /// committed). Should the store not answer, this central's own view,
    /// with a warning.
    pub async fn status_everywhere(&self) -> (u32, bool, Vec<Standing>) {
        let (agencies, drawn, local) = self.status();
        let Some(store) = &self.shared.shared_store else {
            return (agencies, drawn, local);
        };
        let everywhere = match store.agencies(agencies).await {
            Ok(everywhere) => everywhere,
            Err(e) => {
                warn!(
                    action = action::STATUS,
                    result = result::FAIL,
                    error = %e,
                    message = "showing this central's agencies only"
                );
                return (agencies, drawn, local);
            }
        };
        let mut merged: BTreeMap<AgencyId, Standing> =
            local.into_iter().map(|s| (s.agency, s)).collect();
        for (agency, (held, finished)) in everywhere {
            let state = merged.entry(agency).or_insert(Standing {
                agency,
                held: 0,
                finished: false,
            });
            state.held = state.held.max(held);
            state.finished |= finished || drawn;
        }
        (agencies, drawn, merged.into_values().collect())
    }

    /// Where the draw stands now.
    pub fn phase(&self) -> DrawPhase {
        let drawing = self.lock().drawing;
        match &*self.shared.drawn.borrow() {
            Drawn::Done(_) => DrawPhase::Done,
            _ if drawing => DrawPhase::Running,
            Drawn::Failed(_) => DrawPhase::Failed,
            Drawn::NotYet => DrawPhase::Waiting,
        }
    }

    /// Every configured agency as this central sees it, in agency order:
    /// bets stored, finished, connected here, and when it was last seen
    /// here. No bettor's data: counts and times only.
    pub fn agencies_view(&self) -> Vec<AgencyView> {
        let state = self.lock();
        (1..=self.shared.agencies)
            .map(|agency| AgencyView {
                agency,
                stored: state.stored.get(&agency).map_or(0, |r| r.count),
                finished: state.finished.contains(&agency),
                connected: state.connected.contains_key(&agency),
                last_seen: state.last_seen.get(&agency).copied(),
            })
            .collect()
    }

    /// How many agencies are known to have finished: those that announced
    /// it here, or, with a shared store, the count it gave last (agencies
    /// on other centrals included), whichever is more.
    pub fn finished_count(&self) -> u32 {
        let state = self.lock();
        (state.finished.len() as u32).max(state.counted)
    }

    /// Logs, every `every`, which agencies the draw waits for, as long as
    /// some agency has finished and the draw is not done; returns once it is
    /// done, or when `done` is cancelled. With a shared store, agencies that
    /// finished on other centrals count as finished.
    pub async fn report_waiting(&self, every: Duration, done: CancellationToken) {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = done.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let (agencies, drawn, states) = self.status_everywhere().await;
            if drawn || self.draw().is_some() {
                return;
            }
            let finished: BTreeSet<AgencyId> = states
                .iter()
                .filter(|s| s.finished)
                .map(|s| s.agency)
                .collect();
            let waiting: Vec<String> = (1..=agencies)
                .filter(|a| !finished.contains(a))
                .map(|a| a.to_string())
                .collect();
            // Before any agency finished, nothing waits; with none left to
            // wait for, the draw is running (and logs itself).
            if finished.is_empty() || waiting.is_empty() {
                continue;
            }
            info!(
                action = action::DRAW_WAITING,
                result = result::IN_PROGRESS,
                finished = finished.len(),
                agencies,
                waiting_for = waiting.join(",").as_str()
            );
        }
    }

    /// Agencies that have announced they finished.
    #[cfg(test)]
    pub fn finished(&self) -> Vec<AgencyId> {
        self.lock().finished.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;
    use crate::store::file::{encode_rows, FileStore};
    use crate::store::{Durability, Sequence, StorageError, Stored, Tally};
    use futures::future::BoxFuture;
    use futures::FutureExt;
    use std::path::Path;

    fn write_bets(path: &Path, bets: &[(u32, &str, u16)]) {
        let bets: Vec<Bet> = bets
            .iter()
            .map(|(a, d, n)| {
                Bet::from_fields(&a.to_string(), "A", "B", d, "1999-03-17", &n.to_string()).unwrap()
            })
            .collect();
        let mut rows = Vec::new();
        encode_rows(bets.iter().map(Bet::as_ref), &mut rows);
        std::fs::write(path, rows).unwrap();
    }

    /// An agency waiting for the draw, on a task of its own.
    fn waiter(
        lottery: &Lottery,
    ) -> tokio::task::JoinHandle<Option<Result<Arc<Draw>, LotteryError>>> {
        let lottery = lottery.clone();
        tokio::spawn(async move { lottery.wait_for_draw(&CancellationToken::new()).await })
    }

    async fn file_store(dir: &Path) -> (Arc<dyn Store>, BTreeMap<AgencyId, Receipt>) {
        let (store, stored) = FileStore::open(
            &dir.join("bets.csv"),
            &dir.join("draw.toml"),
            Durability::Sync,
        )
        .await
        .unwrap();
        (Arc::new(store), stored)
    }

    #[tokio::test]
    async fn draw_happens_once_after_the_last_agency_and_is_per_agency() {
        let dir = tempfile::tempdir().unwrap();
        write_bets(
            &dir.path().join("bets.csv"),
            &[
                (1, "11", 5),
                (2, "22", 5),
                (2, "23", 6),
                (1, "12", 5),
                (3, "33", 1),
            ],
        );
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(3, 5, store.clone(), stored, None);
        let cancel = CancellationToken::new();

        let waiter = {
            let l = lottery.clone();
            let c = cancel.clone();
            tokio::spawn(async move { l.wait_for_draw(&c).await })
        };
        let (one, two, three) = (
            lottery.claim(1, &CancellationToken::new()).unwrap(),
            lottery.claim(2, &CancellationToken::new()).unwrap(),
            lottery.claim(3, &CancellationToken::new()).unwrap(),
        );
        one.finish().await.unwrap();
        two.finish().await.unwrap();
        assert!(
            lottery.draw().is_none(),
            "no draw before every agency finished"
        );
        // Announcing again (a reconnected agency) is harmless.
        two.finish().await.unwrap();
        three.finish().await.unwrap();

        let draw = waiter.await.unwrap().expect("woken by the draw").unwrap();
        assert_eq!(draw.winners_of(1), ["11", "12"]);
        assert_eq!(draw.winners_of(2), ["22"]);
        assert!(draw.winners_of(3).is_empty());
        assert_eq!(draw.bets, 5);
        // Later callers get the same draw at once.
        assert!(Arc::ptr_eq(
            &draw,
            &lottery.wait_for_draw(&cancel).await.unwrap().unwrap()
        ));
        assert_eq!(one.intake().1, Err(LotteryError::Finished(1)));

        // The record reads back as the same draw.
        let back = store.load_draw().await.unwrap().unwrap();
        assert_eq!(back.winners, draw.winners);
        let counts: BTreeMap<_, _> = back.receipts.iter().map(|(&a, r)| (a, r.count)).collect();
        assert_eq!(counts, BTreeMap::from([(1, 2), (2, 2), (3, 1)]));
        // Sealed over the receipts acknowledged, which are the stored bets'.
        assert_eq!((back.seal, &back.receipts), (draw.seal, &draw.receipts));
        let found = crate::store::file::recompute(&dir.path().join("bets.csv"), 5).unwrap();
        assert!(crate::receipt::differences(back.claimed(), &found, 3, 5).is_empty());
        assert_eq!(back.bets, 5);
        assert_eq!(back.drawn_at, draw.drawn_at);
        store.close().await;
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_draw_waits_the_agencies_it_waits_for_are_logged_each_interval() {
        let (log, _guard) = crate::logging::capture();
        let dir = tempfile::tempdir().unwrap();
        write_bets(&dir.path().join("bets.csv"), &[(2, "22", 5)]);
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(4, 5, store.clone(), stored, None);
        let every = Duration::from_secs(60);
        let reporter = tokio::spawn({
            let lottery = lottery.clone();
            async move {
                lottery
                    .report_waiting(every, CancellationToken::new())
                    .await
            }
        });
        // The store's writer thread keeps the paused clock from moving on
        // its own: move it by hand, then let the reporter run.
        async fn pass(time: Duration) {
            tokio::time::advance(time).await;
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }
        let waiting = || -> Vec<String> {
            log.lines()
                .into_iter()
                .filter(|l| l.contains("draw_waiting"))
                .collect()
        };
        // Nobody finished: nothing waits yet.
        pass(every).await;
        pass(every).await;
        assert_eq!(waiting(), Vec::<String>::new());
        let claims: Vec<Claim> = (1..=4)
            .map(|a| lottery.claim(a, &CancellationToken::new()).unwrap())
            .collect();
        claims[0].finish().await.unwrap();
        claims[2].finish().await.unwrap();
        // Once an interval, not sooner.
        pass(every - Duration::from_secs(1)).await;
        assert_eq!(waiting(), Vec::<String>::new());
        pass(Duration::from_secs(1)).await;
        let line = "INFO     action: draw_waiting | result: in_progress | finished: 2 | \
                    agencies: 4 | waiting_for: 2,4";
        assert_eq!(waiting(), [line]);
        claims[1].finish().await.unwrap();
        pass(every).await;
        let line2 = "INFO     action: draw_waiting | result: in_progress | finished: 3 | \
                     agencies: 4 | waiting_for: 4";
        assert_eq!(waiting(), [line, line2]);
        // Once drawn, the reports end.
        claims[3].finish().await.unwrap();
        assert!(lottery.draw().is_some());
        pass(every).await;
        assert!(reporter.is_finished(), "the reports end with the draw");
        assert_eq!(waiting().len(), 2);
        lottery.close().await;
        store.close().await;
    }

    #[tokio::test]
    async fn claims_are_exclusive_ranged_and_freed_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(2, 5, store, stored, None);
        let claim = lottery.claim(1, &CancellationToken::new()).unwrap();
        assert_eq!(
            lottery.claim(1, &CancellationToken::new()).unwrap_err(),
            LotteryError::Busy(1)
        );
        assert_eq!(
            lottery.claim(3, &CancellationToken::new()).unwrap_err(),
            LotteryError::UnknownAgency(3, 2)
        );
        let seven = Receipt {
            count: 7,
            ..Receipt::empty(1)
        };
        assert_eq!(claim.add_stored(seven), 7);
        drop(claim);
        let again = lottery.claim(1, &CancellationToken::new()).unwrap();
        assert_eq!(again.intake(), (seven, Ok(())));
        // A claim held by a task that panics is freed all the same.
        let l = lottery.clone();
        let panicked = tokio::spawn(async move {
            let _claim = l.claim(2, &CancellationToken::new()).unwrap();
            panic!("a connection's task fails");
        })
        .await;
        assert!(panicked.is_err());
        let _freed = lottery.claim(2, &CancellationToken::new()).unwrap();
    }

    #[tokio::test]
    async fn waiting_is_cancellable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(2, 5, store, stored, None);
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(lottery.wait_for_draw(&cancel).await.is_none());
    }

    /// A store whose tally (or, with `gate_record`, whose draw record)
    /// waits until the test lets it go, and whose record can be made to
    /// fail.
    #[derive(Debug)]
    struct Gated {
        inner: Arc<dyn Store>,
        gate: Arc<tokio::sync::Semaphore>,
        gate_record: bool,
        fail_record: bool,
        /// Told when the gated step is reached.
        reached: Arc<tokio::sync::Notify>,
        /// The tally panics once (a bug in a backend), then works.
        panic_once: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        /// Gates the tally; records and tallies work.
        fn new(inner: Arc<dyn Store>, gate: Arc<tokio::sync::Semaphore>) -> Gated {
            Gated {
                inner,
                gate,
                gate_record: false,
                fail_record: false,
                reached: Arc::default(),
                panic_once: false.into(),
            }
        }
    }

    impl Store for Gated {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn submit<'a>(
            &'a self,
            bets: &crate::model::Bets,
            skip: usize,
            sequence: &Sequence,
            receipt: Receipt,
        ) -> BoxFuture<'a, Result<Stored, StorageError>> {
            self.inner.submit(bets, skip, sequence, receipt)
        }
        fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
            async move {
                if self
                    .panic_once
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                {
                    panic!("a backend's tally panics");
                }
                if !self.gate_record {
                    self.reached.notify_one();
                    let _pass = self.gate.acquire().await.unwrap();
                }
                self.inner.tally(winning_number).await
            }
            .boxed()
        }
        fn recompute(
            &self,
            winning_number: u16,
        ) -> BoxFuture<'_, Result<crate::receipt::Recomputed, StorageError>> {
            self.inner.recompute(winning_number)
        }
        fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
            self.inner.load_draw()
        }
        fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
            async move {
                if self.gate_record {
                    self.reached.notify_one();
                    let _pass = self.gate.acquire().await.unwrap();
                }
                if self.fail_record {
                    return Err(StorageError::Closed(crate::store::Backend::File));
                }
                self.inner.save_draw(draw).await
            }
            .boxed()
        }
        fn close(&self) -> BoxFuture<'_, ()> {
            self.inner.close()
        }
        fn close_sales<'a>(
            &'a self,
            close: &'a crate::store::ClosedRound,
        ) -> BoxFuture<'a, Result<(crate::store::ClosedRound, bool), StorageError>> {
            self.inner.close_sales(close)
        }
        fn load_close(
            &self,
        ) -> BoxFuture<'_, Result<Option<crate::store::ClosedRound>, StorageError>> {
            self.inner.load_close()
        }
    }

    #[tokio::test]
    async fn a_draw_in_progress_blocks_neither_status_nor_claims() {
        let dir = tempfile::tempdir().unwrap();
        write_bets(&dir.path().join("bets.csv"), &[(1, "11", 5)]);
        let (inner, stored) = file_store(dir.path()).await;
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let store = Arc::new(Gated::new(inner, gate.clone()));
        let lottery = Lottery::new(1, 5, store, stored, None);
        let claim = lottery.claim(1, &CancellationToken::new()).unwrap();
        let finishing = tokio::spawn(async move {
            claim.finish().await.unwrap();
            claim
        });
        // The draw has started and waits at the gate: the state answers.
        while lottery.finished().is_empty() {
            tokio::task::yield_now().await;
        }
        let (agencies, drawn, states) = lottery.status();
        assert_eq!((agencies, drawn, states.len()), (1, false, 1));
        assert_eq!(lottery.stored(1).count, 1);
        assert!(lottery.draw().is_none());
        gate.add_permits(1);
        let claim = finishing.await.unwrap();
        assert_eq!(lottery.draw().unwrap().winners_of(1), ["11"]);
        drop(claim);
    }

    #[tokio::test]
    async fn a_new_session_takes_over_from_the_connection_holding_the_agency() {
        let dir = tempfile::tempdir().unwrap();
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(2, 5, store, stored, None);
        let old_connection = CancellationToken::new();
        let old = lottery.claim(1, &old_connection).unwrap();
        // The old connection lets go once told to, after its own work.
        let holder = tokio::spawn({
            let token = old_connection.clone();
            async move {
                token.cancelled().await;
                assert!(old.superseded());
                old.add_stored(Receipt {
                    count: 3,
                    ..Receipt::empty(1)
                });
                drop(old);
            }
        });
        let new_connection = CancellationToken::new();
        let new = lottery
            .take_over(1, &new_connection, Duration::from_secs(10))
            .await
            .unwrap();
        holder.await.unwrap();
        assert!(old_connection.is_cancelled());
        assert!(!new.superseded());
        // What the old session stored before letting go is counted.
        assert_eq!((new.intake().0.count, new.intake().1), (3, Ok(())));
        // A plain claim (a batch without HELLO) does not take over.
        assert_eq!(
            lottery.claim(1, &CancellationToken::new()).unwrap_err(),
            LotteryError::Busy(1)
        );
        // An old connection that never lets go: the newcomer gives up.
        let stuck = lottery.claim(2, &CancellationToken::new()).unwrap();
        let err = lottery
            .take_over(2, &CancellationToken::new(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            LotteryError::TakeoverTimedOut {
                agency: 2,
                waited: Duration::from_millis(50)
            }
        );
        assert!(matches!(err, LotteryError::TakeoverTimedOut { .. }));
        drop(stuck);
    }

    #[tokio::test]
    async fn the_draw_refuses_a_store_that_lost_acknowledged_bets() {
        let dir = tempfile::tempdir().unwrap();
        let bets = dir.path().join("bets.csv");
        write_bets(&bets, &[(1, "11", 5), (1, "12", 6), (2, "21", 5)]);
        let (store, stored) = file_store(dir.path()).await;
        let lottery = Lottery::new(2, 5, store.clone(), stored, None);
        let (one, two) = (
            lottery.claim(1, &CancellationToken::new()).unwrap(),
            lottery.claim(2, &CancellationToken::new()).unwrap(),
        );
        // The bets file goes missing under the running central.
        let aside = dir.path().join("aside.csv");
        std::fs::rename(&bets, &aside).unwrap();
        one.finish().await.unwrap();
        let waiter = waiter(&lottery);
        let err = two.finish().await.unwrap_err();
        assert!(matches!(err, LotteryError::Draw(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("agency 1: 0 in the store, 2 acknowledged")
                && text.contains("agency 2: 0 in the store, 1 acknowledged"),
            "{text}"
        );
        // The agency waiting is told too, and nothing is recorded.
        let told = waiter.await.unwrap().unwrap().unwrap_err();
        assert_eq!(told, err);
        assert!(lottery.draw().is_none());
        assert!(store.load_draw().await.unwrap().is_none());
        // Once the operator puts the file back, announcing again draws.
        std::fs::rename(&aside, &bets).unwrap();
        two.finish().await.unwrap();
        let draw = lottery.draw().unwrap();
        assert_eq!(
            (draw.winners_of(1), draw.winners_of(2)),
            (&["11".to_string()][..], &["21".to_string()][..])
        );
        assert_eq!(draw.bets, 3);
    }

    #[tokio::test]
    async fn no_winner_leaves_before_the_draw_record_is_stored() {
        for fail_record in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_bets(&dir.path().join("bets.csv"), &[(1, "11", 5)]);
            let (inner, stored) = file_store(dir.path()).await;
            let gate = Arc::new(tokio::sync::Semaphore::new(0));
            let reached = Arc::new(tokio::sync::Notify::new());
            let store = Arc::new(Gated {
                gate_record: true,
                fail_record,
                reached: reached.clone(),
                ..Gated::new(inner.clone(), gate.clone())
            });
            let lottery = Lottery::new(1, 5, store, stored, None);
            let waiter = waiter(&lottery);
            let claim = lottery.claim(1, &CancellationToken::new()).unwrap();
            let finishing = tokio::spawn(async move { claim.finish().await });
            // The record is being written: nobody may learn the outcome yet.
            reached.notified().await;
            assert!(
                lottery.draw().is_none(),
                "the draw was published before its record was stored"
            );
            gate.add_permits(1);
            let told = waiter.await.unwrap().unwrap();
            if fail_record {
                // A record that could not be stored publishes nothing.
                assert!(told.is_err() && finishing.await.unwrap().is_err());
                assert!(lottery.draw().is_none());
                assert!(inner.load_draw().await.unwrap().is_none());
            } else {
                assert_eq!(told.unwrap().winners_of(1), ["11"]);
                finishing.await.unwrap().unwrap();
                assert!(inner.load_draw().await.unwrap().is_some());
            }
        }
    }

    #[tokio::test]
    async fn a_draw_that_panics_leaves_the_lottery_ready_to_draw_again() {
        let dir = tempfile::tempdir().unwrap();
        write_bets(&dir.path().join("bets.csv"), &[(1, "11", 5), (2, "21", 5)]);
        let (inner, stored) = file_store(dir.path()).await;
        let gate = Arc::new(tokio::sync::Semaphore::new(2));
        let store = Arc::new(Gated {
            panic_once: true.into(),
            ..Gated::new(inner, gate)
        });
        let lottery = Lottery::new(2, 5, store, stored, None);
        let (one, two) = (
            lottery.claim(1, &CancellationToken::new()).unwrap(),
            lottery.claim(2, &CancellationToken::new()).unwrap(),
        );
        one.finish().await.unwrap();
        let waiter = waiter(&lottery);
        let err = two.finish().await.unwrap_err();
        assert!(matches!(err, LotteryError::Draw(_)), "{err}");
        // The agency waiting is told to retry, not left waiting for ever.
        assert!(waiter.await.unwrap().unwrap().is_err());
        // Announcing again draws.
        two.finish().await.unwrap();
        assert_eq!(lottery.draw().unwrap().winners_of(2), ["21"]);
        lottery.close().await;
    }
}
