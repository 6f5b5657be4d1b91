//! The end of an agency's upload: its announcement, the wait for the draw
//! (telling the agency it still waits), and its winners.

use std::time::Duration;

use futures::StreamExt;
use tracing::info;

use super::refusals::Refused;
use super::{Handler, Incoming, Next};
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::receipt::Sealed;
use crate::wire::{winners_replies, ErrorCode, FrameError, Reply, STILL_WAITING_EVERY};

impl Handler {
    pub(super) async fn handle_finished(&mut self, agency: AgencyId) -> Result<Next, FrameError> {
        let shutdown = self.shutdown.clone();
        let session = match self.session_for(agency) {
            Ok(session) => session,
            Err(e) => {
                return self
                    .refuse_finish(agency, ErrorCode::from(&e), e.to_string())
                    .await
            }
        };
        if session.announced {
            let reason =
                format!("agency {agency} already announced it finished on this connection");
            return self
                .refuse_finish(agency, ErrorCode::AgencyFinished, reason)
                .await;
        }
        // The announcement that completes the set runs the draw; shutdown
        // (or a newer session) must not wait for it: the draw goes on, on
        // its own task, and is recorded all the same.
        let finished = tokio::select! {
            finished = session.claim().finish() => finished,
            _ = shutdown.cancelled() => return Ok(Next::Close),
        };
        if let Err(e) = finished {
            return self
                .refuse_finish(agency, ErrorCode::from(&e), e.to_string())
                .await;
        }
        self.claimed().announced = true;
        // Hold the agency here until the draw, or until shutdown or a newer
        // session. Keep reading meanwhile: a peer that closes (an agency
        // restarted) frees its agency at once; anything it sends is kept
        // and handled after the winners, in order.
        // One wait for the whole loop, so an outcome published while a
        // frame is being taken is not missed.
        let lottery = self.lottery.clone();
        let wait = lottery.wait_for_draw(&shutdown);
        tokio::pin!(wait);
        let mut ticks = still_waiting_ticks(STILL_WAITING_EVERY);
        let drawn = loop {
            tokio::select! {
                drawn = &mut wait => break drawn,
                // Only agencies of this protocol are told (their reply
                // deadline restarts on each); the design's get nothing but
                // their winners.
                _ = ticks.tick(), if self.said_hello => {
                    let (agencies, finished) =
                        (self.lottery.status().0, self.lottery.finished_count());
                    let message = format!(
                        "waiting for the draw: {finished} of {agencies} agencies finished"
                    );
                    self.send(&Reply::Waiting { message }).await?;
                }
                read = self.framed.next(), if self.stashed.is_none() => match read.into() {
                    Incoming::Closed => return Ok(Next::Close),
                    Incoming::Broken(e) => return Err(e),
                    incoming => self.stashed = Some(incoming),
                },
            }
        };
        let draw = match drawn {
            None => return Ok(Next::Close),
            Some(Ok(draw)) => draw,
            Some(Err(e)) => {
                // The draw failed: the agency may announce again to retry.
                self.claimed().announced = false;
                return self
                    .refuse_finish(agency, ErrorCode::from(&e), e.to_string())
                    .await;
            }
        };
        let winners = draw.winners_of(agency);
        let sealed = self.said_hello.then(|| Sealed {
            receipt: draw.receipt_of(agency),
            seal: draw.seal,
        });
        for reply in winners_replies(winners, sealed) {
            self.feed(&reply).await?;
        }
        self.flush().await?;
        info!(
            action = action::CONSULTA_GANADORES,
            result = result::SUCCESS,
            agency,
            cant_ganadores = winners.len()
        );
        Ok(Next::Continue)
    }

    pub(super) async fn refuse_finish(
        &mut self,
        agency: AgencyId,
        code: ErrorCode,
        reason: String,
    ) -> Result<Next, FrameError> {
        let refused = Refused {
            action: action::AGENCIA_FINALIZADA,
            cantidad: None,
            agency: Some(agency),
            code,
            reason,
        };
        self.refuse(refused).await?;
        Ok(Next::Continue)
    }
}

/// The clock of a connection's `STATUS:WAITING` frames: the first one
/// `first` after the wait starts, then one every [`STILL_WAITING_EVERY`]
/// (a late tick is not made up for: the agency needs one frame per
/// interval, not a burst).
pub(super) fn still_waiting_ticks(first: Duration) -> tokio::time::Interval {
    let every = STILL_WAITING_EVERY;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}
