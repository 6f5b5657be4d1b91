//! [`Guard`]: what peers that have not authenticated do wrong, counted per
//! address for summary log lines, and the throttle on wrong secrets.
//!
//! Secrets are long and random (see `config::secret_strength`), so
//! guessing one is hopeless at any speed: the throttle is there to keep a
//! guesser's cost to the central and to its log small, never to keep an
//! agency out. [`STRIKES`] wrong secrets from one address throttle that
//! address for [`FIRST_LOCKOUT`], each later time twice as long (up to
//! [`MAX_LOCKOUT`]); [`TOTAL_STRIKES`] wrong secrets from any addresses
//! throttle every address the same way, so a guesser spread over many
//! addresses is slowed too. A throttled `HELLO` is still compared: a right
//! secret gets in at once, and a wrong one is answered only at the end of
//! its connection's authentication deadline, so each guess holds one of
//! the few connections an address (and all strangers) may have.
//!
//! Every event is counted, and at most one line per address per
//! [`REPORT_INTERVAL`] reports the counts (the first event of an address is
//! reported at once, so a mistyped secret shows up without delay). A broken
//! frame or a timeout of a stranger is logged in full at most once per
//! address per interval, the rest counted.
//!
//! Time comes from `tokio::time::Instant`, so tests run it on a paused
//! clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use crate::logging::{action, result};

/// Wrong secrets from one address before it is throttled.
pub const STRIKES: u32 = 3;
/// Wrong secrets from all addresses together before every address is
/// throttled: a few operators' typos never reach it, a spread-out guesser
/// soon does.
pub const TOTAL_STRIKES: u32 = 20;
/// The first throttle of an address (or of all); each later one lasts
/// twice as long.
pub const FIRST_LOCKOUT: Duration = Duration::from_secs(10);
/// The longest throttle.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(600);
/// At most one summary line per address per interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// An address quiet for this long starts afresh (no strikes, first
/// throttle short again) and is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Most addresses remembered at once (a few MiB): a flood from many
/// addresses must not grow the central's memory without bound. When full,
/// an address that is not throttled makes room.
pub const MAX_PEERS: usize = 65_536;

/// What happened with one address, counted for its summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `HELLO`s with a wrong or missing secret, answered at once.
    pub wrong_secret: u64,
    /// `HELLO`s with a wrong or missing secret while throttled, answered
    /// late.
    pub throttled: u64,
    /// Other messages before authentication, refused.
    pub unauthenticated: u64,
    /// Connections of strangers that ended on a broken frame, beyond the
    /// one logged in full.
    pub bad_frames: u64,
    /// Connections of strangers that timed out (not authenticated in time,
    /// or a frame not completed), beyond the one logged in full.
    pub timed_out: u64,
    /// Connections refused or closed to keep strangers within their caps.
    pub refused: u64,
}

impl Tally {
    fn is_empty(&self) -> bool {
        *self == Tally::default()
    }
}

/// One summary line's worth: an address and its counts since its last line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The peer's address.
    pub peer: IpAddr,
    /// What it did since the last report.
    pub tally: Tally,
    /// How long its wrong secrets stay throttled, if they are.
    pub locked_for: Option<Duration>,
}

impl Report {
    /// Logs the summary line.
    pub fn log(&self) {
        warn!(
            action = action::AUTH_FAILURES,
            result = result::FAIL,
            peer = %self.peer,
            wrong_secret = self.tally.wrong_secret,
            throttled = self.tally.throttled,
            unauthenticated = self.tally.unauthenticated,
            bad_frames = self.tally.bad_frames,
            timed_out = self.tally.timed_out,
            refused = self.tally.refused,
            locked_for_secs = self.locked_for.map_or(0, |d| d.as_secs().max(1)),
            interval_secs = REPORT_INTERVAL.as_secs()
        );
    }
}

/// What a wrong secret led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Strike {
    /// The secret came while its address (or every address) was
    /// throttled: answer it late.
    pub throttled: bool,
    /// Throttled only because every address is.
    pub by_total: bool,
    /// A summary line due now, if any.
    pub report: Option<Report>,
    /// This strike throttled every address, for so long: worth a line.
    pub all_throttled: Option<Duration>,
    /// This strike started a lockout (of its address, or of every one).
    pub locked_out: bool,
}

/// What a stranger's connection ended on, beyond a refused message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A framing error.
    Frame,
    /// A deadline passed.
    Timeout,
}

/// One address's record (or all addresses', for the total).
#[derive(Debug)]
struct Peer {
    /// Wrong secrets since the last lockout.
    strikes: u32,
    /// Lockouts so far; the next lasts `FIRST_LOCKOUT * 2^lockouts`.
    lockouts: u32,
    locked_until: Option<Instant>,
    last_event: Instant,
    /// Counted, not yet logged.
    pending: Tally,
    /// When the last summary line was due; `None` before the first.
    reported_at: Option<Instant>,
    /// When a stranger's broken connection was last logged in full.
    detailed_at: Option<Instant>,
}

impl Peer {
    fn new(now: Instant) -> Peer {
        Peer {
            strikes: 0,
            lockouts: 0,
            locked_until: None,
            last_event: now,
            pending: Tally::default(),
            reported_at: None,
            detailed_at: None,
        }
    }

    fn locked_for(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|&until| until > now)
            .map(|until| until - now)
    }

    /// Counts a strike; the `limit`th starts a lockout, returned.
    fn strike(&mut self, limit: u32, now: Instant) -> Option<Duration> {
        self.strikes += 1;
        if self.strikes < limit {
            return None;
        }
        let lockout = FIRST_LOCKOUT
            .saturating_mul(1 << self.lockouts.min(16))
            .min(MAX_LOCKOUT);
        self.locked_until = Some(now + lockout);
        self.lockouts += 1;
        self.strikes = 0;
        Some(lockout)
    }

    /// The summary line, when one is due for this address at `now`.
    fn report_if_due(&mut self, peer: IpAddr, now: Instant) -> Option<Report> {
        let due = self
            .reported_at
            .is_none_or(|at| now >= at + REPORT_INTERVAL);
        (due && !self.pending.is_empty()).then(|| self.report(peer, now))
    }

    fn report(&mut self, peer: IpAddr, now: Instant) -> Report {
        self.reported_at = Some(now);
        Report {
            peer,
            tally: std::mem::take(&mut self.pending),
            locked_for: self.locked_for(now),
        }
    }

    /// Nothing to remember: no lockout running, nothing unreported, quiet
    /// for long enough.
    fn forgettable(&self, now: Instant) -> bool {
        self.locked_for(now).is_none()
            && self.pending.is_empty()
            && now >= self.last_event + FORGET_AFTER
    }
}

/// Drops one address that is not throttled, the first met (the map's
/// order is arbitrary): cheap, which matters under a flood from many
/// addresses, the only time the map is full. Its unreported counts are
/// lost; the other addresses' lines show the flood.
fn make_room(peers: &mut HashMap<IpAddr, Peer>, now: Instant) {
    let unlocked = peers
        .iter()
        .find(|(_, peer)| peer.locked_for(now).is_none())
        .map(|(ip, _)| *ip);
    if let Some(ip) = unlocked {
        peers.remove(&ip);
    }
}

/// Every address's record, and the record of all of them together.
#[derive(Debug)]
struct Book {
    peers: HashMap<IpAddr, Peer>,
    /// Wrong secrets from any address: the throttle on all of them.
    total: Peer,
}

impl Default for Book {
    fn default() -> Book {
        Book {
            peers: HashMap::new(),
            total: Peer::new(Instant::now()),
        }
    }
}

/// The per-address record of strangers' failures; a cheap handle, shared
/// by every connection of the central.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    book: Arc<Mutex<Book>>,
}

impl Guard {
    /// Runs `f` on `ip`'s record (a new one if none) and the total,
    /// starting afresh whichever was quiet for [`FORGET_AFTER`].
    fn with_peer<T>(
        &self,
        ip: IpAddr,
        now: Instant,
        f: impl FnOnce(&mut Peer, &mut Peer) -> T,
    ) -> T {
        let mut book = self.book.lock().expect("guard lock");
        let Book { peers, total } = &mut *book;
        if total.forgettable(now) {
            *total = Peer::new(now);
        }
        total.last_event = now;
        if peers.len() >= MAX_PEERS && !peers.contains_key(&ip) {
            make_room(peers, now);
            if peers.len() >= MAX_PEERS {
                // Every address remembered is throttled: this one is
                // counted nowhere (and not reported: a line per attempt is
                // what the guard prevents) rather than grow the map.
                let mut stranger = Peer::new(now);
                stranger.reported_at = Some(now);
                stranger.detailed_at = Some(now);
                return f(&mut stranger, total);
            }
        }
        let peer = peers.entry(ip).or_insert_with(|| Peer::new(now));
        if peer.forgettable(now) {
            *peer = Peer::new(now);
        }
        let out = f(peer, total);
        peer.last_event = now;
        out
    }

    /// Counts a wrong or missing secret from `ip`. The [`STRIKES`]th from
    /// one address throttles it, the [`TOTAL_STRIKES`]th from all of them
    /// throttles every address; a secret that comes while either lasts is
    /// counted as throttled and is to be answered late.
    pub fn wrong_secret(&self, ip: IpAddr, now: Instant) -> Strike {
        self.with_peer(ip, now, |peer, total| {
            let own = peer.locked_for(now).is_some();
            let by_total = !own && total.locked_for(now).is_some();
            let throttled = own || by_total;
            let mut all_throttled = None;
            let mut locked_out = false;
            if throttled {
                peer.pending.throttled += 1;
            } else {
                peer.pending.wrong_secret += 1;
                locked_out = peer.strike(STRIKES, now).is_some();
                all_throttled = total.strike(TOTAL_STRIKES, now);
                locked_out |= all_throttled.is_some();
            }
            Strike {
                throttled,
                by_total,
                report: peer.report_if_due(ip, now),
                all_throttled,
                locked_out,
            }
        })
    }

    /// How long wrong secrets from `ip` stay throttled (its own throttle
    /// or every address's, whichever ends later); `None` when they are not.
    #[cfg(test)]
    fn throttled_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let book = self.book.lock().expect("guard lock");
        let own = book.peers.get(&ip).and_then(|p| p.locked_for(now));
        own.max(book.total.locked_for(now))
    }

    /// Counts a message refused before authentication (no secret was
    /// tried: it does not throttle the address). Returns a summary line if
    /// one is due.
    pub fn unauthenticated(&self, ip: IpAddr, now: Instant) -> Option<Report> {
        self.with_peer(ip, now, |peer, _| {
            peer.pending.unauthenticated += 1;
            peer.report_if_due(ip, now)
        })
    }

    /// Counts a connection from `ip` refused (or closed) to keep strangers
    /// within their caps. Returns a summary line if one is due.
    pub fn refused(&self, ip: IpAddr, now: Instant) -> Option<Report> {
        self.with_peer(ip, now, |peer, _| {
            peer.pending.refused += 1;
            peer.report_if_due(ip, now)
        })
    }

    /// A stranger's connection from `ip` broke: whether to log it in full
    /// (the first of the address in [`REPORT_INTERVAL`]); otherwise it is
    /// counted for the summary line.
    pub fn broken(&self, ip: IpAddr, how: Broken, now: Instant) -> bool {
        self.with_peer(ip, now, |peer, _| {
            let due = peer
                .detailed_at
                .is_none_or(|at| now >= at + REPORT_INTERVAL);
            if due {
                peer.detailed_at = Some(now);
            } else {
                match how {
                    Broken::Frame => peer.pending.bad_frames += 1,
                    Broken::Timeout => peer.pending.timed_out += 1,
                }
            }
            due
        })
    }

    /// The summary lines due at `now` (their interval is over), and drops
    /// the addresses there is nothing more to remember of. Called on a
    /// timer, so counts left at the end of a burst are reported too.
    pub fn due(&self, now: Instant) -> Vec<Report> {
        let mut book = self.book.lock().expect("guard lock");
        let reports = book
            .peers
            .iter_mut()
            .filter_map(|(ip, peer)| peer.report_if_due(*ip, now))
            .collect();
        book.peers.retain(|_, peer| !peer.forgettable(now));
        reports
    }

    /// Every count not yet reported, whatever the interval (at shutdown).
    pub fn flush(&self, now: Instant) -> Vec<Report> {
        let mut book = self.book.lock().expect("guard lock");
        book.peers
            .iter_mut()
            .filter(|(_, peer)| !peer.pending.is_empty())
            .map(|(ip, peer)| peer.report(*ip, now))
            .collect()
    }

    /// Logs the summary lines due every [`REPORT_INTERVAL`] / 4 until
    /// `stop`, then every count left.
    pub async fn report_until(&self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(REPORT_INTERVAL / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.due(Instant::now()).iter().for_each(Report::log),
            }
        }
        self.flush(Instant::now()).iter().for_each(Report::log);
    }

    /// Starts the record of all addresses afresh (tests of one address's
    /// escalation, which would otherwise reach it).
    #[cfg(test)]
    fn forget_total(&self) {
        self.book.lock().unwrap().total = Peer::new(Instant::now());
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.book.lock().unwrap().peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// `STRIKES` wrong secrets from `ip`, now.
    fn strike_out(guard: &Guard, ip: IpAddr) {
        for _ in 0..STRIKES {
            assert!(!guard.wrong_secret(ip, Instant::now()).throttled);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn three_wrong_secrets_throttle_the_address_and_only_it() {
        let guard = Guard::default();
        for _ in 0..STRIKES - 1 {
            assert!(!guard.wrong_secret(A, Instant::now()).throttled);
        }
        assert_eq!(guard.throttled_for(A, Instant::now()), None, "two strikes");
        assert!(
            !guard.wrong_secret(A, Instant::now()).throttled,
            "the third is answered at once"
        );
        assert_eq!(guard.throttled_for(A, Instant::now()), Some(FIRST_LOCKOUT));
        assert!(
            guard.wrong_secret(A, Instant::now()).throttled,
            "the fourth is not"
        );
        assert_eq!(
            guard.throttled_for(B, Instant::now()),
            None,
            "another address"
        );
        assert!(!guard.wrong_secret(B, Instant::now()).throttled);
        tokio::time::advance(FIRST_LOCKOUT - Duration::from_millis(1)).await;
        assert!(
            guard.throttled_for(A, Instant::now()).is_some(),
            "until it ends"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            guard.throttled_for(A, Instant::now()),
            None,
            "then free again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn each_lockout_lasts_twice_the_last_up_to_the_cap() {
        let guard = Guard::default();
        let mut expected = FIRST_LOCKOUT;
        for _ in 0..10 {
            guard.forget_total();
            strike_out(&guard, A);
            let remaining = guard.throttled_for(A, Instant::now()).unwrap();
            assert_eq!(remaining, expected);
            tokio::time::advance(remaining).await;
            expected = (expected * 2).min(MAX_LOCKOUT);
        }
        assert_eq!(expected, MAX_LOCKOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_address_starts_afresh_and_is_forgotten() {
        let guard = Guard::default();
        strike_out(&guard, A);
        for _ in 0..5 {
            assert!(guard.wrong_secret(A, Instant::now()).throttled);
        }
        let report = guard.flush(Instant::now());
        assert_eq!(report.len(), 1);
        // The first strike was reported at once; the rest since then.
        assert_eq!(report[0].tally.wrong_secret, u64::from(STRIKES) - 1);
        assert_eq!(report[0].tally.throttled, 5);
        assert_eq!(report[0].locked_for, Some(FIRST_LOCKOUT));
        tokio::time::advance(FIRST_LOCKOUT).await;
        strike_out(&guard, A);
        assert_eq!(
            guard.throttled_for(A, Instant::now()),
            Some(FIRST_LOCKOUT * 2),
            "a second lockout soon after is longer"
        );
        tokio::time::advance(FIRST_LOCKOUT * 2 + FORGET_AFTER).await;
        guard.flush(Instant::now());
        assert!(guard.due(Instant::now()).is_empty());
        assert_eq!(guard.remembered(), 0, "nothing left to remember");
        strike_out(&guard, A);
        assert_eq!(
            guard.throttled_for(A, Instant::now()),
            Some(FIRST_LOCKOUT),
            "forgotten: the first lockout again"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn wrong_secrets_spread_over_many_addresses_throttle_them_all() {
        let guard = Guard::default();
        let ip = |i: u32| IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i));
        // Fewer than STRIKES from each address: none is throttled alone.
        let mut all = None;
        for i in 0..TOTAL_STRIKES {
            let strike = guard.wrong_secret(ip(i), Instant::now());
            assert!(!strike.throttled, "guess {i}");
            all = all.or(strike.all_throttled);
        }
        assert_eq!(all, Some(FIRST_LOCKOUT), "the last one throttles all");
        let fresh = ip(TOTAL_STRIKES);
        assert_eq!(
            guard.throttled_for(fresh, Instant::now()),
            Some(FIRST_LOCKOUT)
        );
        let strike = guard.wrong_secret(fresh, Instant::now());
        assert!(strike.throttled && strike.by_total, "{strike:?}");
        tokio::time::advance(FIRST_LOCKOUT).await;
        assert_eq!(guard.throttled_for(fresh, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_and_lockouts_are_kept() {
        let guard = Guard::default();
        strike_out(&guard, A);
        for i in 0..MAX_PEERS as u32 + 10 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i) + 1));
            guard.unauthenticated(ip, Instant::now());
            if i % 1000 == 0 {
                tokio::time::advance(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(guard.remembered(), MAX_PEERS);
        assert!(
            guard.throttled_for(A, Instant::now()).is_some(),
            "still throttled"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn other_messages_are_counted_but_never_throttle() {
        let guard = Guard::default();
        for _ in 0..100 {
            guard.unauthenticated(A, Instant::now());
            guard.refused(A, Instant::now());
        }
        assert_eq!(guard.throttled_for(A, Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn broken_connections_one_in_full_a_minute_the_rest_counted() {
        let guard = Guard::default();
        assert!(
            guard.broken(A, Broken::Frame, Instant::now()),
            "the first in full"
        );
        assert!(
            guard.broken(B, Broken::Timeout, Instant::now()),
            "per address"
        );
        for _ in 0..99 {
            assert!(!guard.broken(A, Broken::Frame, Instant::now()));
        }
        assert!(!guard.broken(A, Broken::Timeout, Instant::now()));
        tokio::time::advance(REPORT_INTERVAL).await;
        assert!(
            guard.broken(A, Broken::Frame, Instant::now()),
            "a minute on"
        );
        let report = guard.flush(Instant::now());
        assert_eq!(report.len(), 1, "{report:?}");
        assert_eq!(
            (report[0].tally.bad_frames, report[0].tally.timed_out),
            (99, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_makes_one_line_per_interval_with_every_attempt_counted() {
        let guard = Guard::default();
        let mut lines = Vec::new();
        let attempts = 10_000u64;
        for i in 0..attempts {
            // A hundred attempts a second, for 100 s.
            if i % 100 == 0 && i > 0 {
                tokio::time::advance(Duration::from_secs(1)).await;
                lines.extend(guard.due(Instant::now()));
            }
            lines.extend(guard.wrong_secret(A, Instant::now()).report);
        }
        lines.extend(guard.flush(Instant::now()));
        // The first attempt at once, then one a minute, then the rest.
        assert_eq!(lines.len(), 3, "{lines:?}");
        let counted: u64 = lines
            .iter()
            .map(|r| r.tally.wrong_secret + r.tally.throttled)
            .sum();
        assert_eq!(counted, attempts, "every attempt is in some line");
        let wrong: u64 = lines.iter().map(|r| r.tally.wrong_secret).sum();
        // Lockouts of 10, 20 and 40 s end within the 100 s: four rounds of
        // strikes in all, everything else throttled.
        assert_eq!(wrong, 4 * u64::from(STRIKES));
        assert!(lines[0].locked_for.is_none(), "the first strike");
        assert!(lines[1].locked_for.is_some());
    }
}
