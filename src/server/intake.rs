//! A connection's [`Session`]: its agency's claim and the batches it has in
//! flight at the store, whose settlement cannot be skipped.
//!
//! A handler reads on while the store works, so several batches of one
//! connection can be at the store at once. Each must be *settled* (its
//! outcome awaited and, if stored, counted) before the agency can resume
//! elsewhere, or its next session would start too early and store bets
//! twice. The session owns both the batches and the claim, and frees the
//! claim only after the last batch is settled: explicitly through
//! [`Session::settle`], or from `Drop` when the connection's task ends any
//! other way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;

use crate::lottery::{Claim, LotteryError};
use crate::model::{AgencyId, Bets};
use crate::receipt::Receipt;
use crate::store::{Sequence, StorageError, Store, Stored};

/// A batch handed to the store and not yet answered.
struct InFlight {
    /// Bets in the batch, as sent.
    count: usize,
    /// Bets it adds (a resent batch may overlap what is stored).
    new: u64,
    /// The agency's receipt once it is stored.
    after: Receipt,
    /// The new bets, kept for their DEBUG lines only when DEBUG is on.
    logged: Option<Bets>,
    stored: Stored,
    /// When the batch was handed to the store.
    submitted: Instant,
}

/// The outcome of the oldest batch in flight, once settled.
pub(super) struct Settled {
    /// Bets in the batch, as sent.
    pub count: usize,
    /// Bets of it not stored before (a resent batch may overlap).
    pub new: u64,
    /// The agency's new stored total, or why the batch was not stored.
    pub outcome: Result<u64, StorageError>,
    /// The batch's new bets, when DEBUG is on.
    pub logged: Option<Bets>,
    /// When it was submitted to the store.
    pub submitted: Instant,
}

/// Where a batch stands against the bets the central holds.
pub(super) enum Placement {
    /// Store it from its `skip`-th bet on.
    Store { skip: usize },
    /// Every bet of it is stored already: acknowledge it again.
    AlreadyStored { stored: u64 },
    /// Refuse it.
    Refuse(LotteryError),
}

/// One connection's hold on its agency, with its batches in flight.
pub(super) struct Session {
    /// Always `Some` until the session is dropped; taken only by `Drop`,
    /// which hands it to the task that settles what is left.
    claim: Option<Claim>,
    /// Batches at the store, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Keeps this connection's batches in order at the store.
    sequence: Sequence,
    store: Arc<dyn Store>,
    /// This connection already announced that its agency finished.
    pub announced: bool,
    /// Bets this connection stored, for its closing line.
    stored_here: u64,
}

impl Session {
    pub fn new(claim: Claim, store: Arc<dyn Store>) -> Session {
        Session {
            claim: Some(claim),
            in_flight: VecDeque::new(),
            sequence: Sequence::new(),
            store,
            announced: false,
            stored_here: 0,
        }
    }

    pub fn claim(&self) -> &Claim {
        self.claim.as_ref().expect("invariant: taken only by Drop")
    }

    pub fn agency(&self) -> AgencyId {
        self.claim().agency()
    }

    /// Batches at the store.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Where a batch of `count` bets starting at `first` stands against
    /// the bets the central holds for the agency, counting those still at
    /// the store.
    ///
    /// A batch that says where it starts is stored only from the first bet
    /// the central does not hold yet: a batch resent after a lost
    /// acknowledgement is acknowledged again, never stored twice.
    pub fn place(&self, first: Option<u64>, count: usize) -> Placement {
        let at_store = self.in_flight.iter().map(|b| b.new).sum::<u64>();
        let (held, open) = self.claim().intake();
        let expected = held.count + at_store;
        let skip = match first {
            None => 0,
            Some(first) if first > expected => {
                return Placement::Refuse(LotteryError::OutOfOrder {
                    agency: self.agency(),
                    first,
                    stored: expected,
                })
            }
            Some(first) => usize::try_from(expected - first)
                .unwrap_or(usize::MAX)
                .min(count),
        };
        if skip == count {
            return Placement::AlreadyStored { stored: expected };
        }
        match open {
            Ok(()) => Placement::Store { skip },
            Err(e) => Placement::Refuse(e),
        }
    }

    /// Whether the connection's order at the store is broken: a batch of
    /// it failed, so later ones fail too until the agency starts again
    /// from what is stored.
    pub fn is_broken(&self) -> bool {
        self.sequence.is_broken()
    }

    /// Starts a new order at the store once every batch of the broken one
    /// is answered: the next batch says where it starts (`FIRST`), so it is
    /// placed against what is really stored and cannot leave a gap.
    pub fn restart_sequence(&mut self) {
        debug_assert!(self.in_flight.is_empty());
        self.sequence = Sequence::new();
    }

    /// Hands `bets` (from their `skip`-th) to the store, in order after the
    /// batches already in flight.
    ///
    /// # Errors
    /// The store is closed.
    pub async fn submit(&mut self, bets: &Bets, skip: usize) -> Result<(), StorageError> {
        let submitted = Instant::now();
        // The receipt chains on from the last batch in flight (or what is
        // stored): batches of one agency are stored in the order submitted.
        // Hashed here, on the connection's own task, like the rows.
        let before = match self.in_flight.back() {
            Some(last) => last.after,
            None => self.claim().intake().0,
        };
        let after = before.after(bets.iter_bytes().skip(skip));
        let stored = self.store.submit(bets, skip, &self.sequence, after).await?;
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let mut new = Bets::new();
            new.extend(bets.iter().skip(skip));
            new
        });
        self.in_flight.push_back(InFlight {
            count: bets.len(),
            new: (bets.len() - skip) as u64,
            after,
            logged,
            stored,
            submitted,
        });
        Ok(())
    }

    /// Settles the oldest batch in flight once the store answers it; never
    /// resolves while none is in flight. Cancel-safe: the batch stays
    /// queued until its outcome is taken.
    pub async fn next_settled(&mut self) -> Settled {
        let outcome = match self.in_flight.front_mut() {
            Some(batch) => (&mut batch.stored).await,
            None => std::future::pending().await,
        };
        self.settle_front(outcome)
    }

    /// Settles the oldest batch in flight if the store already answered it.
    pub fn try_settled(&mut self) -> Option<Settled> {
        let outcome = (&mut self.in_flight.front_mut()?.stored).now_or_never()?;
        Some(self.settle_front(outcome))
    }

    fn settle_front(&mut self, outcome: Result<(), StorageError>) -> Settled {
        let batch = self
            .in_flight
            .pop_front()
            .expect("invariant: an outcome is for the oldest batch in flight");
        let outcome = outcome.map(|()| {
            self.stored_here += batch.new;
            self.claim().add_stored(batch.after)
        });
        Settled {
            count: batch.count,
            new: batch.new,
            outcome,
            logged: batch.logged,
            submitted: batch.submitted,
        }
    }

    /// Settles every batch in flight without answering (the connection is
    /// gone or going), then frees the agency. Returns the bets this
    /// connection stored.
    pub async fn settle(mut self) -> u64 {
        while !self.in_flight.is_empty() {
            self.next_settled().await;
        }
        self.stored_here
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.in_flight.is_empty() {
            return; // the claim drops with us
        }
        // Dropped with batches at the store (the connection's task was
        // aborted, or panicked): settle them on a task of their own and
        // free the agency only then.
        let claim = self.claim.take().expect("invariant: taken only here");
        let mut in_flight = std::mem::take(&mut self.in_flight);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                while let Some(batch) = in_flight.pop_front() {
                    if batch.stored.await.is_ok() {
                        claim.add_stored(batch.after);
                    }
                }
            });
        }
    }
}
