//! [`Metrics`]: what the central counts for `/metrics`, with the
//! Prometheus project's own Rust crate (`prometheus-client`: typed metrics
//! over atomics, OpenMetrics text). The hot path adds to atomics once per
//! batch, never per bet and never under a lock; what the lottery's state
//! already knows (sessions, agencies finished, the draw) is read from it
//! when scraped.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

use crate::lottery::{DrawPhase, Lottery};
use crate::store::{SharedStore, Store};
use crate::wire::ErrorCode;

/// A label set of one static pair.
type Label = [(&'static str, &'static str); 1];

/// The central's counters and gauges, registered once; cheap handles
/// (each an `Arc` over atomics) shared by every connection.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Bets newly stored (a resent bet already stored is not counted).
    pub bets_stored: Counter,
    /// Bets in refused batches, by the error code they were answered with.
    bets_refused: Family<Label, Counter>,
    /// Batches whose bets were stored.
    pub batches_stored: Counter,
    /// Batches answered as stored already (a resend).
    pub batches_already_stored: Counter,
    /// Batches refused.
    pub batches_refused: Counter,
    /// Agencies' connections open now.
    pub connections_open: Gauge,
    /// From a batch read to its acknowledgement queued.
    pub ack_latency: Histogram,
    /// Wrong secrets (a connection that names none is summarised in the log,
    /// as `unauthenticated`, not counted here).
    pub auth_failures: Counter,
    /// Lockouts those started (an address, or every address, throttled).
    pub auth_lockouts: Counter,
    sessions: Family<Label, Gauge>,
    agencies: Gauge,
    agencies_finished: Gauge,
    draw_state: Family<Label, Gauge>,
    draw_duration: Gauge<f64, AtomicU64>,
    draw_time: Gauge<f64, AtomicU64>,
}

impl Metrics {
    /// Registers every metric, the store's own among them (and a shared
    /// store's writer's).
    pub fn new(store: &dyn Store, shared: Option<&dyn SharedStore>) -> Metrics {
        let mut registry = Registry::with_prefix("lottery");
        let bets_stored = Counter::default();
        registry.register("bets_stored", "Bets stored", bets_stored.clone());
        let bets_refused = Family::<Label, Counter>::default();
        registry.register(
            "bets_refused",
            "Bets in refused batches, by the error code of the reply",
            bets_refused.clone(),
        );
        let batches = Family::<Label, Counter>::default();
        registry.register(
            "batches",
            "Batches answered, by outcome: stored, already_stored (a resend), refused",
            batches.clone(),
        );
        let batch = |outcome| batches.get_or_create(&[("outcome", outcome)]).clone();
        let (batches_stored, batches_already_stored, batches_refused) =
            (batch("stored"), batch("already_stored"), batch("refused"));
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections of agencies (and operators) open now",
            connections_open.clone(),
        );
        let sessions = Family::<Label, Gauge>::default();
        registry.register(
            "sessions",
            "Agencies connected here now, by state: uploading, finished (waiting for or served \
             its winners)",
            sessions.clone(),
        );
        // 100 µs to about 6.5 s.
        let ack_latency = Histogram::new(exponential_buckets(0.000_1, 2.0, 17));
        registry.register_with_unit(
            "ack_latency",
            "From a batch read to its acknowledgement",
            Unit::Seconds,
            ack_latency.clone(),
        );
        let measured = store.metrics();
        registry.register_with_unit(
            "storage_commit",
            "One group commit: the bets file's write and fdatasync, or a database transaction",
            Unit::Seconds,
            measured.commit_seconds,
        );
        registry.register(
            "storage_group_batches",
            "Batches committed together in one group",
            measured.group_batches,
        );
        if let Some(shared) = shared {
            let writer = shared.writer_metrics();
            registry.register(
                "database_groups_in_flight",
                "Groups whose transaction is open now",
                writer.groups_in_flight,
            );
            registry.register(
                "database_retries",
                "Connections the database writer opened again after losing one",
                writer.retries,
            );
        }
        let agencies = Gauge::default();
        registry.register(
            "agencies",
            "Agencies that must finish before the draw",
            agencies.clone(),
        );
        let agencies_finished = Gauge::default();
        registry.register(
            "agencies_finished",
            "Agencies known to have finished (on any central sharing the store)",
            agencies_finished.clone(),
        );
        let draw_state = Family::<Label, Gauge>::default();
        registry.register(
            "draw_state",
            "1 for the draw's state now (waiting, running, failed, done), 0 for the others",
            draw_state.clone(),
        );
        let draw_duration = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "draw_duration",
            "How long the draw took to tally the bets (0 before it is done)",
            Unit::Seconds,
            draw_duration.clone(),
        );
        let draw_time = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "draw_timestamp",
            "When the draw was recorded, in seconds since the Unix epoch (0 before)",
            Unit::Seconds,
            draw_time.clone(),
        );
        let auth_failures = Counter::default();
        registry.register("auth_failures", "Wrong secrets", auth_failures.clone());
        let auth_lockouts = Counter::default();
        registry.register(
            "auth_lockouts",
            "Lockouts started by wrong secrets (one address, or every address)",
            auth_lockouts.clone(),
        );
        Metrics {
            registry,
            bets_stored,
            bets_refused,
            batches_stored,
            batches_already_stored,
            batches_refused,
            connections_open,
            ack_latency,
            auth_failures,
            auth_lockouts,
            sessions,
            agencies,
            agencies_finished,
            draw_state,
            draw_duration,
            draw_time,
        }
    }

    /// Counts a refused batch of `bets` bets, answered with `code`.
    pub fn refused(&self, bets: usize, code: ErrorCode) {
        self.batches_refused.inc();
        self.bets_refused
            .get_or_create(&[("code", code.as_str())])
            .inc_by(bets as u64);
    }

    /// The metrics as OpenMetrics text, the lottery's state read now.
    pub fn render(&self, lottery: &Lottery) -> String {
        let view = lottery.agencies_view();
        let connected = view.iter().filter(|a| a.connected);
        let finished_here = connected.clone().filter(|a| a.finished).count();
        let uploading = connected.count() - finished_here;
        self.sessions
            .get_or_create(&[("state", "uploading")])
            .set(uploading as i64);
        self.sessions
            .get_or_create(&[("state", "finished")])
            .set(finished_here as i64);
        self.agencies.set(view.len() as i64);
        self.agencies_finished
            .set(i64::from(lottery.finished_count()));
        let phase = lottery.phase();
        for p in DrawPhase::ALL {
            self.draw_state
                .get_or_create(&[("state", p.name())])
                .set(i64::from(p == phase));
        }
        if let Some(draw) = lottery.draw() {
            self.draw_duration.set(draw.elapsed.as_secs_f64());
            if let Some(at) = draw.drawn_at_unix() {
                self.draw_time.set(at);
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}
