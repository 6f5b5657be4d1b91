//! Batches: checked, placed against what is stored, handed to the store
//! (pipelined), and answered in request order when the store settles them.

use tracing::{debug, info};

use super::refusals::Refused;
use super::{Handler, Next};
use crate::logging::{action, result};
use crate::model::Bets;
use crate::server::intake::{Placement, Session, Settled};
use crate::store::StorageError;
use crate::wire::{ErrorCode, FrameError, Reply};

impl Handler {
    /// Checks a batch and hands it to the store; its acknowledgement is
    /// sent when the store answers, while later frames are read.
    pub(super) async fn handle_batch(
        &mut self,
        first: Option<u64>,
        bets: Bets,
    ) -> Result<Next, FrameError> {
        let count = bets.len();
        // Every bet of the batch must speak for one agency: the connection's.
        let mut agencies = bets.agencies().enumerate();
        let (_, agency) = agencies.next().expect("a batch holds at least one bet");
        if let Some((i, other)) = agencies.find(|&(_, a)| a != agency) {
            let reason = format!(
                "BET_{}: AGENCY_ID {other} differs from BET_1's {agency}",
                i + 1,
            );
            self.drain().await?;
            return self.reject(count, ErrorCode::WrongAgency, reason).await;
        }
        let broken = match self.session_for(agency) {
            Ok(session) => session.is_broken(),
            Err(e) => {
                self.drain().await?;
                return self.reject(count, ErrorCode::from(&e), e.to_string()).await;
            }
        };
        if broken {
            // A batch of this connection failed: every batch sent after it
            // fails too, so none is stored after a gap. Once they are all
            // answered, only a batch that says where it starts may begin a
            // new order, placed against what is really stored.
            self.drain().await?;
            if let (_, Err(e @ crate::lottery::LotteryError::SalesClosed(_))) =
                self.claimed().claim().intake()
            {
                return self.reject(count, ErrorCode::from(&e), e.to_string()).await;
            }
            if first.is_none() {
                let reason = "an earlier batch of this connection was not stored; \
                              reconnect and resume from the stored count"
                    .to_string();
                return self.reject(count, ErrorCode::StorageFailed, reason).await;
            }
            self.claimed().restart_sequence();
        }
        let mut placement = self.claimed().place(first, count);
        if !matches!(placement, Placement::Store { .. }) {
            // Refusals and repeats are answered in order, and against what
            // is really stored: settle the batches in flight first.
            self.drain().await?;
            placement = self.claimed().place(first, count);
        }
        let skip = match placement {
            Placement::Store { skip } => skip,
            Placement::AlreadyStored { stored } => {
                self.settings.metrics.batches_already_stored.inc();
                info!(
                    action = action::APUESTA_RECIBIDA,
                    result = result::SUCCESS,
                    cantidad = count,
                    already_stored = count
                );
                let reply = Reply::Success {
                    message: format!("already stored {count} bets"),
                    stored: Some(stored),
                    digest: None,
                };
                self.send(&reply).await?;
                return Ok(Next::Continue);
            }
            Placement::Refuse(e) => {
                return self.reject(count, ErrorCode::from(&e), e.to_string()).await
            }
        };
        if let Err(e) = self.claimed().submit(&bets, skip).await {
            self.drain().await?;
            return self
                .reject(count, ErrorCode::StorageFailed, e.to_string())
                .await;
        }
        Ok(Next::Continue)
    }

    /// Answers `settled` and every later batch the store has already
    /// answered, in one write.
    pub(super) async fn acknowledge(&mut self, settled: Settled) -> Result<(), FrameError> {
        let mut next = Some(settled);
        while let Some(settled) = next.take() {
            self.answer(settled).await?;
            next = self.session.as_mut().and_then(Session::try_settled);
        }
        self.flush().await
    }

    /// Logs a settled batch and queues its reply.
    pub(super) async fn answer(&mut self, settled: Settled) -> Result<(), FrameError> {
        let count = settled.count;
        let total = match settled.outcome {
            Ok(total) => total,
            Err(e) => {
                let code = match e {
                    StorageError::SalesClosed(_) => ErrorCode::BettingClosed,
                    _ => ErrorCode::StorageFailed,
                };
                let refused = Refused::batch(count, code, e.to_string());
                self.log_refused(&refused);
                let reply = Reply::Error {
                    code: refused.code,
                    message: refused.reason,
                };
                return self.feed(&reply).await;
            }
        };
        let metrics = &self.settings.metrics;
        metrics.bets_stored.inc_by(settled.new);
        metrics.batches_stored.inc();
        metrics
            .ack_latency
            .observe(settled.submitted.elapsed().as_secs_f64());
        info!(
            action = action::APUESTA_RECIBIDA,
            result = result::SUCCESS,
            cantidad = count
        );
        for b in settled.logged.iter().flat_map(Bets::iter) {
            debug!(
                action = action::APUESTA_ALMACENADA,
                result = result::SUCCESS,
                dni = b.document,
                numero = b.number
            );
        }
        let reply = Reply::Success {
            message: format!("stored {count} bets"),
            stored: Some(total),
            digest: None,
        };
        self.feed(&reply).await
    }

    /// Waits for every batch in flight and answers each.
    pub(super) async fn drain(&mut self) -> Result<(), FrameError> {
        if self.in_flight() == 0 {
            return Ok(());
        }
        while self.in_flight() > 0 {
            let session = self.session.as_mut().expect("batches in flight have one");
            let settled = session.next_settled().await;
            self.answer(settled).await?;
        }
        self.flush().await
    }

    pub(super) async fn reject(
        &mut self,
        count: usize,
        code: ErrorCode,
        reason: String,
    ) -> Result<Next, FrameError> {
        self.refuse(Refused::batch(count, code, reason)).await?;
        Ok(Next::Continue)
    }
}
