//! [`Guard`]: throttles failed authentications per peer address, and keeps
//! the count of them for summary log lines.
//!
//! Without it a client could try thousands of secrets a second, each one
//! a log line. With it, [`STRIKES`] wrong secrets from one address lock
//! that address out for [`FIRST_LOCKOUT`], each later lockout twice as
//! long (up to [`MAX_LOCKOUT`]); while locked out, a `HELLO` is refused
//! without its secret being looked at, so even a right guess is worth
//! nothing. Every event is counted, and at most one line per address per
//! [`REPORT_INTERVAL`] reports the counts (the first event of an address is
//! reported at once, so a mistyped secret shows up without delay).
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

/// Wrong secrets from one address before it is locked out.
pub const STRIKES: u32 = 3;
/// The first lockout of an address; each later one lasts twice as long.
/// Long enough that a lockout outlasts any burst of local retries, short
/// enough that an operator's typos cost seconds.
pub const FIRST_LOCKOUT: Duration = Duration::from_secs(10);
/// The longest lockout.
pub const MAX_LOCKOUT: Duration = Duration::from_secs(600);
/// At most one summary line per address per interval.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// An address quiet for this long starts afresh (no strikes, first
/// lockout short again) and is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(900);
/// Most addresses remembered at once (a few MiB): a flood from many
/// addresses must not grow the central's memory without bound. When full,
/// an address that is not locked out makes room.
pub const MAX_PEERS: usize = 65_536;

/// What happened with one address, counted for its summary line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// `HELLO`s with a wrong or missing secret.
    pub wrong_secret: u64,
    /// `HELLO`s refused unread because the address was locked out.
    pub locked_out: u64,
    /// Other messages before authentication, refused.
    pub unauthenticated: u64,
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
    /// How long it stays locked out, if it is.
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
            locked_out = self.tally.locked_out,
            unauthenticated = self.tally.unauthenticated,
            locked_for_secs = self.locked_for.map_or(0, |d| d.as_secs().max(1)),
            interval_secs = REPORT_INTERVAL.as_secs()
        );
    }
}

/// A refusal because the address is locked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    /// Until the lockout ends.
    pub remaining: Duration,
    /// A summary line due now, if any.
    pub report: Option<Report>,
}

/// One address's record.
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
        }
    }

    fn locked_for(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|&until| until > now)
            .map(|until| until - now)
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

/// Drops one address that is not locked out, the first met (the map's
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

/// The per-address record of failed authentications; a cheap handle,
/// shared by every connection of the central.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    peers: Arc<Mutex<HashMap<IpAddr, Peer>>>,
}

impl Guard {
    /// Runs `f` on `ip`'s record (a new one if none), starting afresh when
    /// the address was quiet for [`FORGET_AFTER`].
    fn with_peer<T>(&self, ip: IpAddr, now: Instant, f: impl FnOnce(&mut Peer) -> T) -> T {
        let mut peers = self.peers.lock().expect("guard lock");
        if peers.len() >= MAX_PEERS && !peers.contains_key(&ip) {
            make_room(&mut peers, now);
            if peers.len() >= MAX_PEERS {
                // Every address remembered is locked out: this one is
                // counted nowhere (and not reported: a line per attempt is
                // what the guard prevents) rather than grow the map.
                let mut stranger = Peer::new(now);
                stranger.reported_at = Some(now);
                return f(&mut stranger);
            }
        }
        let peer = peers.entry(ip).or_insert_with(|| Peer::new(now));
        if peer.forgettable(now) {
            *peer = Peer::new(now);
        }
        let out = f(peer);
        peer.last_event = now;
        out
    }

    /// Whether `ip` may try a secret now. A refusal is counted.
    ///
    /// # Errors
    /// The address is locked out: for how much longer, and a summary line
    /// if one is due.
    pub fn admit(&self, ip: IpAddr, now: Instant) -> Result<(), Lockout> {
        let peers = self.peers.lock().expect("guard lock");
        let locked = peers.get(&ip).and_then(|p| p.locked_for(now)).is_some();
        drop(peers);
        if !locked {
            return Ok(());
        }
        Err(self.with_peer(ip, now, |peer| {
            peer.pending.locked_out += 1;
            Lockout {
                remaining: peer.locked_for(now).unwrap_or_default(),
                report: peer.report_if_due(ip, now),
            }
        }))
    }

    /// Counts a wrong or missing secret from `ip`; the [`STRIKES`]th locks
    /// the address out. Returns a summary line if one is due.
    pub fn wrong_secret(&self, ip: IpAddr, now: Instant) -> Option<Report> {
        self.with_peer(ip, now, |peer| {
            peer.pending.wrong_secret += 1;
            peer.strikes += 1;
            if peer.strikes >= STRIKES {
                let lockout = FIRST_LOCKOUT
                    .saturating_mul(1 << peer.lockouts.min(16))
                    .min(MAX_LOCKOUT);
                peer.locked_until = Some(now + lockout);
                peer.lockouts += 1;
                peer.strikes = 0;
            }
            peer.report_if_due(ip, now)
        })
    }

    /// Counts a message refused before authentication (no secret was
    /// tried: it does not lock the address out). Returns a summary line if
    /// one is due.
    pub fn unauthenticated(&self, ip: IpAddr, now: Instant) -> Option<Report> {
        self.with_peer(ip, now, |peer| {
            peer.pending.unauthenticated += 1;
            peer.report_if_due(ip, now)
        })
    }

    /// The summary lines due at `now` (their interval is over), and drops
    /// the addresses there is nothing more to remember of. Called on a
    /// timer, so counts left at the end of a burst are reported too.
    pub fn due(&self, now: Instant) -> Vec<Report> {
        let mut peers = self.peers.lock().expect("guard lock");
        let reports = peers
            .iter_mut()
            .filter_map(|(ip, peer)| peer.report_if_due(*ip, now))
            .collect();
        peers.retain(|_, peer| !peer.forgettable(now));
        reports
    }

    /// Every count not yet reported, whatever the interval (at shutdown).
    pub fn flush(&self, now: Instant) -> Vec<Report> {
        let mut peers = self.peers.lock().expect("guard lock");
        peers
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

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.peers.lock().unwrap().len()
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
            guard.admit(ip, Instant::now()).unwrap();
            guard.wrong_secret(ip, Instant::now());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn three_wrong_secrets_lock_the_address_out_and_only_it() {
        let guard = Guard::default();
        for _ in 0..STRIKES - 1 {
            assert!(guard.admit(A, Instant::now()).is_ok());
            guard.wrong_secret(A, Instant::now());
        }
        assert!(
            guard.admit(A, Instant::now()).is_ok(),
            "two strikes: still in"
        );
        guard.wrong_secret(A, Instant::now());
        let lockout = guard.admit(A, Instant::now()).unwrap_err();
        assert_eq!(lockout.remaining, FIRST_LOCKOUT);
        assert!(guard.admit(B, Instant::now()).is_ok(), "another address");
        tokio::time::advance(FIRST_LOCKOUT - Duration::from_millis(1)).await;
        assert!(guard.admit(A, Instant::now()).is_err(), "until it ends");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(guard.admit(A, Instant::now()).is_ok(), "then free again");
    }

    #[tokio::test(start_paused = true)]
    async fn each_lockout_lasts_twice_the_last_up_to_the_cap() {
        let guard = Guard::default();
        let mut expected = FIRST_LOCKOUT;
        for _ in 0..10 {
            strike_out(&guard, A);
            let remaining = guard.admit(A, Instant::now()).unwrap_err().remaining;
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
            assert!(guard.admit(A, Instant::now()).is_err(), "locked out");
        }
        let report = guard.flush(Instant::now());
        assert_eq!(report.len(), 1);
        // The first strike was reported at once; the rest since then.
        assert_eq!(report[0].tally.wrong_secret, u64::from(STRIKES) - 1);
        assert_eq!(report[0].tally.locked_out, 5);
        assert_eq!(report[0].locked_for, Some(FIRST_LOCKOUT));
        tokio::time::advance(FIRST_LOCKOUT).await;
        strike_out(&guard, A);
        assert_eq!(
            guard.admit(A, Instant::now()).unwrap_err().remaining,
            FIRST_LOCKOUT * 2,
            "a second lockout soon after is longer"
        );
        tokio::time::advance(FIRST_LOCKOUT * 2 + FORGET_AFTER).await;
        guard.flush(Instant::now());
        assert!(guard.due(Instant::now()).is_empty());
        assert_eq!(guard.remembered(), 0, "nothing left to remember");
        strike_out(&guard, A);
        assert_eq!(
            guard.admit(A, Instant::now()).unwrap_err().remaining,
            FIRST_LOCKOUT,
            "forgotten: the first lockout again"
        );
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
        assert!(guard.admit(A, Instant::now()).is_err(), "still locked out");
    }

    #[tokio::test(start_paused = true)]
    async fn other_messages_are_counted_but_never_lock_out() {
        let guard = Guard::default();
        for _ in 0..100 {
            guard.unauthenticated(A, Instant::now());
        }
        assert!(guard.admit(A, Instant::now()).is_ok());
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
            let report = match guard.admit(A, Instant::now()) {
                Ok(()) => guard.wrong_secret(A, Instant::now()),
                Err(lockout) => lockout.report,
            };
            lines.extend(report);
        }
        lines.extend(guard.flush(Instant::now()));
        // The first attempt at once, then one a minute, then the rest.
        assert_eq!(lines.len(), 3, "{lines:?}");
        let counted: u64 = lines
            .iter()
            .map(|r| r.tally.wrong_secret + r.tally.locked_out)
            .sum();
        assert_eq!(counted, attempts, "every attempt is in some line");
        let wrong: u64 = lines.iter().map(|r| r.tally.wrong_secret).sum();
        // Lockouts of 10, 20 and 40 s end within the 100 s: four rounds of
        // strikes in all, everything else refused unread.
        assert_eq!(wrong, 4 * u64::from(STRIKES));
        assert!(lines[0].locked_for.is_none(), "the first strike");
        assert!(lines[1].locked_for.is_some());
    }
}
