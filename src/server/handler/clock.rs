//! The read loop's clock: when a connection has taken too long.

use std::time::{Duration, Instant};

/// How long the central has spent away from reading (writing its replies,
/// waiting for its store) since the peer's frame under way began. The
/// frame timeout blames the peer for a frame it does not finish; a peer
/// cannot send while the central is not reading (its window is full), so
/// that time is the central's, and the frame's deadline moves by it.
#[derive(Debug, Default)]
pub(super) struct FrameClock {
    /// When the frame under way began (the codec's `partial_since`).
    started: Option<Instant>,
    /// Time away from reading since then.
    away: Duration,
}

impl FrameClock {
    /// The deadline of the frame under way that began at `partial`, or
    /// `None` between frames.
    pub(super) fn deadline(
        &mut self,
        partial: Option<Instant>,
        limit: Duration,
    ) -> Option<Instant> {
        if partial != self.started {
            // Another frame (or none): its own clock.
            self.started = partial;
            self.away = Duration::ZERO;
        }
        partial.map(|started| started + limit + self.away)
    }

    /// The central was away from reading since `left`.
    pub(super) fn away_since(&mut self, left: Instant) {
        if self.started.is_some() {
            self.away += left.elapsed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_away_moves_only_the_frame_it_was_spent_in() {
        let mut clock = FrameClock::default();
        let limit = Duration::from_secs(10);
        let t0 = Instant::now();
        assert_eq!(clock.deadline(None, limit), None);
        // Away between frames: nobody's frame is charged or excused.
        clock.away_since(t0 - Duration::from_secs(3));
        assert_eq!(clock.deadline(Some(t0), limit), Some(t0 + limit));
        // Away during the frame: its deadline moves by that much.
        clock.away_since(Instant::now() - Duration::from_secs(4));
        let moved = clock.deadline(Some(t0), limit).unwrap();
        assert!(moved >= t0 + limit + Duration::from_secs(4), "{moved:?}");
        assert!(moved < t0 + limit + Duration::from_secs(5), "{moved:?}");
        // The next frame starts afresh.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(clock.deadline(Some(t1), limit), Some(t1 + limit));
    }
}
