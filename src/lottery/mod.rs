//! The lottery's shared state: which agencies are connected and which have
//! finished, and the draw, which runs exactly once when the last configured
//! agency finishes.
//!
//! [`Lottery`] is a cheap handle (like mini-redis's `Db`); its methods own the
//! locking, so no guard ever leaves this module.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::store::file as storage;
use crate::wire::{AgencyState, ErrorCode};

/// The outcome of the draw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draw {
    /// The winning number.
    pub winning_number: u16,
    /// When the draw ran (RFC 3339, UTC).
    pub drawn_at: String,
    /// Winner documents per agency, in the order they were stored.
    pub winners: HashMap<AgencyId, Vec<String>>,
    /// Bets per agency taken into account.
    pub bets_per_agency: BTreeMap<AgencyId, u64>,
    /// Bets taken into account.
    pub bets: u64,
    /// How long reading the bets file took (zero for a draw read back from
    /// its record).
    pub elapsed: Duration,
}

impl Draw {
    /// The winners of one agency (empty when it has none).
    pub fn winners_of(&self, agency: AgencyId) -> &[String] {
        self.winners.get(&agency).map_or(&[], Vec::as_slice)
    }

    /// Writes the draw record atomically: a temporary file beside `path`,
    /// synced, renamed over `path`, then the directory synced, so a crash
    /// leaves either no record or the whole record.
    ///
    /// # Errors
    /// Any step of the write failed.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let record = DrawRecord {
            winning_number: self.winning_number,
            drawn_at: self.drawn_at.clone(),
            bets: self.bets,
            agencies: self
                .bets_per_agency
                .keys()
                .chain(self.winners.keys())
                .map(|&a| {
                    let entry = AgencyRecord {
                        bets: self.bets_per_agency.get(&a).copied().unwrap_or(0),
                        winners: self.winners_of(a).to_vec(),
                    };
                    (a.to_string(), entry)
                })
                .collect(),
        };
        let text = toml::to_string(&record).map_err(std::io::Error::other)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        std::fs::File::open(&dir)?.sync_all()
    }

    /// Reads a draw record written by [`Draw::save`]; `Ok(None)` when there
    /// is none.
    ///
    /// # Errors
    /// The record exists but cannot be read or parsed.
    pub fn load(path: &Path) -> std::io::Result<Option<Draw>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let record: DrawRecord = toml::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        let mut winners = HashMap::new();
        let mut bets_per_agency = BTreeMap::new();
        for (agency, entry) in record.agencies {
            let agency: AgencyId = agency.parse().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("agency key {agency:?} is not a number"),
                )
            })?;
            bets_per_agency.insert(agency, entry.bets);
            if !entry.winners.is_empty() {
                winners.insert(agency, entry.winners);
            }
        }
        Ok(Some(Draw {
            winning_number: record.winning_number,
            drawn_at: record.drawn_at,
            winners,
            bets_per_agency,
            bets: record.bets,
            elapsed: Duration::ZERO,
        }))
    }
}

/// The draw record's file format (TOML).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct DrawRecord {
    winning_number: u16,
    drawn_at: String,
    bets: u64,
    agencies: BTreeMap<String, AgencyRecord>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AgencyRecord {
    bets: u64,
    winners: Vec<String>,
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
    /// The draw could not read the bets file or write its record.
    #[error("the draw failed: {0}")]
    Draw(String),
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
            LotteryError::OutOfOrder { .. } => ErrorCode::OutOfOrder,
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
    /// Bets stored per agency: where each agency's upload resumes.
    stored: HashMap<AgencyId, u64>,
    /// Set once, by the agency whose announcement completes the set, or read
    /// back from the draw record on start.
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
    draw_record: PathBuf,
}

/// Handle to the lottery state, shared by every connection.
#[derive(Debug, Clone)]
pub struct Lottery {
    shared: Arc<Shared>,
}

impl Lottery {
    /// A lottery for agencies `1..=agencies`, drawing `winning_number` over
    /// the bets in `bets_file` and recording the outcome in `draw_record`.
    /// `stored` holds the bets already in the file per agency; `draw` a draw
    /// read back from its record.
    pub fn new(
        agencies: u32,
        winning_number: u16,
        bets_file: PathBuf,
        draw_record: PathBuf,
        stored: BTreeMap<AgencyId, u64>,
        draw: Option<Draw>,
    ) -> Lottery {
        let state = LotteryState {
            stored: stored.into_iter().collect(),
            draw: draw.map(Arc::new),
            ..LotteryState::default()
        };
        Lottery {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                drawn: Notify::new(),
                agencies,
                winning_number,
                bets_file,
                draw_record,
            }),
        }
    }

    /// Bets stored for `agency`: the position its upload resumes from.
    pub async fn stored(&self, agency: AgencyId) -> u64 {
        self.shared
            .state
            .lock()
            .await
            .stored
            .get(&agency)
            .copied()
            .unwrap_or(0)
    }

    /// Bets stored for `agency`, and whether it may still send more (not
    /// once it announced it finished, nor after the draw), under one lock:
    /// the central asks both for every batch.
    ///
    /// Only the connection holding the agency's claim sends its bets and its
    /// announcement, one after the other, so the answer cannot change between
    /// this check and the store.
    pub async fn intake(&self, agency: AgencyId) -> (u64, Result<(), LotteryError>) {
        let state = self.shared.state.lock().await;
        let stored = state.stored.get(&agency).copied().unwrap_or(0);
        let open = if state.finished.contains(&agency) || state.draw.is_some() {
            Err(LotteryError::Finished(agency))
        } else {
            Ok(())
        };
        (stored, open)
    }

    /// Records `count` more bets stored for `agency`; returns the new total.
    pub async fn add_stored(&self, agency: AgencyId, count: u64) -> u64 {
        let mut state = self.shared.state.lock().await;
        let total = state.stored.entry(agency).or_default();
        *total += count;
        *total
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

    /// Records that `agency` finished. When it is the last one, runs the
    /// draw (once), records it, publishes it and wakes every waiting agency.
    ///
    /// Announcing again (after a reconnection) is harmless: the agency just
    /// waits for the draw again. Connections refuse a second announcement of
    /// their own before it gets here.
    ///
    /// # Errors
    /// A draw that could not read the bets file or write its record; the
    /// announcement is then forgotten, so that announcing again retries.
    pub async fn finish(&self, agency: AgencyId) -> Result<(), LotteryError> {
        let mut state = self.shared.state.lock().await;
        let first_time = state.finished.insert(agency);
        if first_time {
            info!(
                action = action::AGENCIA_FINALIZADA,
                result = result::SUCCESS,
                agency,
                finished = state.finished.len(),
                agencies = self.shared.agencies
            );
        }
        if state.draw.is_none() && state.finished.len() as u32 == self.shared.agencies {
            let draw = match self.run_draw().await {
                Ok(draw) => draw,
                Err(e) => {
                    state.finished.remove(&agency);
                    return Err(LotteryError::Draw(e));
                }
            };
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

    /// Reads the bets file back as a stream, collects each agency's winners,
    /// and writes the draw record. Every batch was written before it was
    /// acknowledged, and every agency announced it finished after its last
    /// acknowledgement, so the file holds every bet by now.
    async fn run_draw(&self) -> Result<Draw, String> {
        let path = self.shared.bets_file.clone();
        let record = self.shared.draw_record.clone();
        let winning_number = self.shared.winning_number;
        crate::task::spawn_blocking_named("draw", move || {
            let started = Instant::now();
            let tally =
                storage::tally(&path, u32::from(winning_number)).map_err(|e| e.to_string())?;
            let draw = Draw {
                winning_number,
                drawn_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                winners: tally.winners,
                bets_per_agency: tally.per_agency,
                bets: tally.rows,
                elapsed: started.elapsed(),
            };
            draw.save(&record)
                .map_err(|e| format!("writing the draw record {}: {e}", record.display()))?;
            Ok(draw)
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

    /// The configured agency count, whether the draw is done, and each
    /// agency that holds bets or has finished, in agency order.
    pub async fn status(&self) -> (u32, bool, Vec<AgencyState>) {
        let state = self.shared.state.lock().await;
        let mut ids: BTreeSet<AgencyId> = state.stored.keys().copied().collect();
        ids.extend(state.finished.iter().copied());
        let states = ids
            .into_iter()
            .map(|agency| AgencyState {
                agency,
                held: state.stored.get(&agency).copied().unwrap_or(0),
                finished: state.finished.contains(&agency),
            })
            .collect();
        (self.shared.agencies, state.draw.is_some(), states)
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
    use crate::store::file::encode_rows;

    fn write_bets(path: &std::path::Path, bets: &[(u32, &str, u16)]) {
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
        let record = dir.path().join("draw.toml");
        let lottery = Lottery::new(3, 5, path, record.clone(), BTreeMap::new(), None);
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
        // Announcing again (a reconnected agency) is harmless.
        lottery.finish(2).await.unwrap();
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
        assert_eq!(lottery.intake(1).await.1, Err(LotteryError::Finished(1)));

        // The record reads back as the same draw.
        let back = Draw::load(&record).unwrap().unwrap();
        assert_eq!(back.winners, draw.winners);
        assert_eq!(
            back.bets_per_agency,
            BTreeMap::from([(1, 2), (2, 2), (3, 1)])
        );
        assert_eq!(back.bets, 5);
        assert_eq!(back.drawn_at, draw.drawn_at);
    }

    #[tokio::test]
    async fn claims_are_exclusive_and_ranged() {
        let dir = tempfile::tempdir().unwrap();
        let lottery = Lottery::new(
            2,
            5,
            dir.path().join("bets.csv"),
            dir.path().join("draw.toml"),
            BTreeMap::new(),
            None,
        );
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
        let lottery = Lottery::new(
            2,
            5,
            dir.path().join("bets.csv"),
            dir.path().join("draw.toml"),
            BTreeMap::new(),
            None,
        );
        let cancel = CancellationToken::new();
        cancel.cancel();
        assert!(lottery.wait_for_draw(&cancel).await.is_none());
    }
}
