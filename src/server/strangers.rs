//! [`Strangers`]: the connections that have not authenticated yet, kept
//! within a cap per address and a cap in all, so that silent or guessing
//! peers cannot take the slots authenticated agencies need.
//!
//! A connection is a stranger from its accept until it authenticates (a
//! `HELLO` with a right secret, a client certificate naming an agency, or,
//! where authentication is off, its first valid request). The cap in all
//! leaves [`reserved`] of `max_connections` to connections that have
//! authenticated. When it is reached, a newcomer closes the oldest stranger
//! of the address that holds the most, as long as that address holds more
//! than the newcomer's would: a flood from a few addresses then only ever
//! displaces itself, and an agency arriving from any other address gets in.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Slots of `max_connections` that strangers never take, for `agencies`
/// agencies: one for each agency and one for its next session (a restarted
/// agency's takeover briefly needs both), and 4 for operator sessions; at
/// most half of them.
pub fn reserved(max_connections: usize, agencies: u32) -> usize {
    let wanted = (agencies as usize).saturating_mul(2).saturating_add(4);
    wanted.min(max_connections / 2)
}

/// The cap on strangers in all: `max_connections` less the [`reserved`]
/// slots. With no slot to reserve (a central for a handful of
/// connections), none of their own: the connection limit is the cap.
pub fn cap(max_connections: usize, agencies: u32) -> usize {
    match reserved(max_connections, agencies) {
        0 => usize::MAX,
        reserved => max_connections - reserved,
    }
}

/// Why a newcomer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Its address holds its cap of strangers.
    Address,
    /// Strangers hold their cap in all, and no address holds more than
    /// the newcomer's would.
    Total,
}

/// What the registry holds.
#[derive(Debug, Default)]
struct State {
    /// Per address, its strangers by admission order, each with the token
    /// that closes it.
    by_ip: HashMap<IpAddr, BTreeMap<u64, CancellationToken>>,
    /// Strangers in all.
    count: usize,
    next_id: u64,
}

impl State {
    fn remove(&mut self, ip: IpAddr, id: u64) -> Option<CancellationToken> {
        let entries = self.by_ip.get_mut(&ip)?;
        let token = entries.remove(&id)?;
        if entries.is_empty() {
            self.by_ip.remove(&ip);
        }
        self.count -= 1;
        Some(token)
    }
}

/// The registry of strangers; a cheap handle shared by the accept loop and
/// every connection.
#[derive(Debug, Clone)]
pub struct Strangers {
    state: Arc<Mutex<State>>,
    per_address: usize,
    total: usize,
}

impl Strangers {
    /// At most `per_address` strangers from one address and `total` in all.
    pub fn new(per_address: usize, total: usize) -> Strangers {
        Strangers {
            state: Arc::default(),
            per_address: per_address.max(1),
            total: total.max(1),
        }
    }

    /// The cap in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Admits a new connection from `ip` as a stranger, closing another one
    /// to make room if the cap in all is reached (see the module's rule).
    ///
    /// # Errors
    /// Which cap refuses it.
    pub fn admit(&self, ip: IpAddr) -> Result<Pass, Full> {
        let mut state = self.state.lock().expect("strangers lock");
        let own = state.by_ip.get(&ip).map_or(0, BTreeMap::len);
        if own >= self.per_address {
            return Err(Full::Address);
        }
        let made_room = state.count >= self.total;
        if made_room {
            // The address holding the most strangers yields its oldest, if
            // it holds more than this one would.
            let (&crowded, held) = state
                .by_ip
                .iter()
                .max_by_key(|(_, entries)| entries.len())
                .expect("strangers at the cap are somewhere");
            if held.len() <= own + 1 {
                return Err(Full::Total);
            }
            let oldest = *held.keys().next().expect("not empty");
            if let Some(token) = state.remove(crowded, oldest) {
                token.cancel();
            }
        }
        let id = state.next_id;
        state.next_id += 1;
        let evicted = CancellationToken::new();
        state
            .by_ip
            .entry(ip)
            .or_default()
            .insert(id, evicted.clone());
        state.count += 1;
        Ok(Pass {
            strangers: self.clone(),
            ip,
            id,
            evicted,
            made_room,
            since: std::time::Instant::now(),
        })
    }

    #[cfg(test)]
    fn count(&self) -> usize {
        self.state.lock().unwrap().count
    }
}

/// A stranger's place; dropped when the connection authenticates or
/// closes, which frees it.
#[derive(Debug)]
pub struct Pass {
    strangers: Strangers,
    ip: IpAddr,
    id: u64,
    evicted: CancellationToken,
    /// Another stranger was closed to admit this one.
    made_room: bool,
    /// When it was admitted (accepted): its time to authenticate runs
    /// from here, TLS handshake included.
    since: std::time::Instant,
}

impl Pass {
    /// Whether another stranger was closed to admit this one (its
    /// connection slot is about to be free).
    pub fn made_room(&self) -> bool {
        self.made_room
    }

    /// When the connection was accepted.
    pub fn since(&self) -> std::time::Instant {
        self.since
    }

    /// Cancelled when a newcomer took this place: the connection is to
    /// close at once.
    pub fn evicted(&self) -> CancellationToken {
        self.evicted.clone()
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut state = self.strangers.state.lock().expect("strangers lock");
        state.remove(self.ip, self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn one_address_holds_at_most_its_cap() {
        let strangers = Strangers::new(3, 10);
        let passes: Vec<Pass> = (0..3).map(|_| strangers.admit(ip(1)).unwrap()).collect();
        assert_eq!(strangers.admit(ip(1)).unwrap_err(), Full::Address);
        assert!(strangers.admit(ip(2)).is_ok(), "another address");
        drop(passes);
        assert_eq!(strangers.count(), 0, "every place freed");
        assert!(strangers.admit(ip(1)).is_ok());
    }

    #[test]
    fn at_the_cap_in_all_the_most_crowded_address_yields_its_oldest() {
        let strangers = Strangers::new(4, 4);
        let crowd: Vec<Pass> = (0..4).map(|_| strangers.admit(ip(1)).unwrap()).collect();
        let newcomer = strangers.admit(ip(2)).unwrap();
        assert!(crowd[0].evicted().is_cancelled(), "the oldest");
        assert!(crowd[1..].iter().all(|p| !p.evicted().is_cancelled()));
        assert_eq!(strangers.count(), 4);
        // The crowd may not push back out what is no bigger than itself.
        let _second = strangers.admit(ip(2)).unwrap();
        assert_eq!(strangers.admit(ip(1)).unwrap_err(), Full::Total);
        assert_eq!(strangers.admit(ip(2)).unwrap_err(), Full::Total, "2 and 2");
        assert!(!newcomer.evicted().is_cancelled());
        // Dropping an evicted pass frees nothing twice.
        drop(crowd);
        assert_eq!(strangers.count(), 2);
    }

    #[test]
    fn reserved_slots_grow_with_the_agencies_up_to_half() {
        assert_eq!(reserved(1024, 5), 14);
        assert_eq!(reserved(64, 1), 6);
        assert_eq!(reserved(16, 100), 8);
        assert_eq!(reserved(1, 1), 0);
        assert_eq!(cap(1024, 5), 1010);
        assert_eq!(cap(1, 1), usize::MAX, "the connection limit is the cap");
    }
}
