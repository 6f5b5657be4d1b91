//! What a store measures about itself, for the central's `/metrics`: cheap
//! handles (atomics behind an `Arc`) the store's writer updates once per
//! group it commits, never per bet.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// Every store's: how long its commits take and how many batches each
/// carries.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Seconds per group commit: the bets file's write and `fdatasync`, or a
    /// database transaction from its first row to its commit.
    pub commit_seconds: Histogram,
    /// Batches committed together in one group.
    pub group_batches: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            // 50 µs to about 3.3 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 17)),
            // 1 to 512 batches (a file group holds at most 512).
            group_batches: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
        }
    }
}

/// Only a database writer's: its groups in flight and its retries.
#[derive(Debug, Clone, Default)]
pub struct WriterMetrics {
    /// Groups whose transaction is open now.
    pub groups_in_flight: Gauge,
    /// Connections the writer opened again after losing one; the batches
    /// of a group lost with it fail and their agencies send them again.
    pub retries: Counter,
}
