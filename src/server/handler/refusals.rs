//! Refusals and timeouts: one log line naming the peer, one error reply.

use tracing::{info, warn};

use super::Handler;
use crate::logging::{action, result};
use crate::lottery::{LotteryError, Standing};
use crate::model::AgencyId;
use crate::server::guard::Broken;
use crate::wire::{AgencyState, ErrorCode, FrameError};

impl Handler {
    /// Ends a connection that sat idle, that started a frame and did not
    /// finish it in time (a slow or stalled sender), or that did not
    /// authenticate in time (`unvouched`).
    pub(super) async fn time_out(
        &mut self,
        mid_frame: bool,
        unvouched: bool,
    ) -> Result<(), FrameError> {
        let (reason, limit) = if unvouched && self.settings.secrets.required() {
            ("not authenticated in time", self.settings.auth_timeout)
        } else if unvouched {
            ("no valid request in time", self.settings.auth_timeout)
        } else if mid_frame {
            ("frame not completed in time", self.settings.frame_timeout)
        } else {
            ("idle for too long", self.settings.idle_timeout)
        };
        let reason = format!("{reason} ({}s)", limit.as_secs());
        // A stranger's is counted for its address's summary line instead,
        // but the first in a while.
        let in_full = self.in_full(Broken::Timeout);
        if in_full && (mid_frame || unvouched) {
            warn!(
                action = action::CONNECTION,
                result = result::FAIL,
                peer = %self.peer,
                code = %ErrorCode::Timeout,
                reason = reason.as_str()
            );
        } else if in_full {
            info!(
                action = action::IDLE_TIMEOUT,
                result = result::SUCCESS,
                peer = %self.peer,
                reason = reason.as_str()
            );
        }
        // Best effort, and bounded: the peer may not be reading either.
        let limit = self.settings.frame_timeout;
        let _ = tokio::time::timeout(limit, self.reply_error(ErrorCode::Timeout, reason)).await;
        Ok(())
    }

    /// Logs a refusal once, as a `result: fail` line naming the peer; a
    /// stranger's refused connection (a broken frame) only when
    /// [`Handler::in_full`] says so.
    pub(super) fn log_refused(&self, r: &Refused) {
        if r.action == action::APUESTA_RECIBIDA {
            self.settings
                .metrics
                .refused(r.cantidad.unwrap_or(0), r.code);
        }
        if r.action == action::CONNECTION && !self.in_full(Broken::Frame) {
            return;
        }
        warn!(
            action = r.action,
            result = result::FAIL,
            cantidad = r.cantidad,
            agency = r.agency,
            peer = %self.peer,
            code = %r.code,
            reason = r.reason.as_str()
        );
    }

    /// Logs a refusal and answers it.
    pub(super) async fn refuse(&mut self, refused: Refused) -> Result<(), FrameError> {
        self.log_refused(&refused);
        self.reply_error(refused.code, refused.reason).await
    }
}

/// A refused request: what it was, the code it is answered with, and why.
pub(super) struct Refused {
    /// The log action: `apuesta_recibida` for a batch, `agencia_finalizada`
    /// for an announcement, `request` for any other message, `connection`
    /// for the connection itself.
    pub(super) action: &'static str,
    /// Bets in a refused batch (the contract's `cantidad`).
    pub(super) cantidad: Option<usize>,
    pub(super) agency: Option<AgencyId>,
    pub(super) code: ErrorCode,
    pub(super) reason: String,
}

impl Refused {
    pub(super) fn batch(count: usize, code: ErrorCode, reason: String) -> Refused {
        Refused {
            action: action::APUESTA_RECIBIDA,
            cantidad: Some(count),
            agency: None,
            code,
            reason,
        }
    }

    /// A message that is not a batch (malformed, or an unknown action):
    /// no `cantidad`, as no bets were refused.
    pub(super) fn request(code: ErrorCode, reason: String) -> Refused {
        Refused {
            action: action::REQUEST,
            cantidad: None,
            agency: None,
            code,
            reason,
        }
    }

    pub(super) fn connection(agency: Option<AgencyId>, code: ErrorCode, reason: String) -> Refused {
        Refused {
            action: action::CONNECTION,
            cantidad: None,
            agency,
            code,
            reason,
        }
    }
}

/// A refusal of an oversize frame, saying what would let such frames in.
pub(super) fn too_large(e: &dyn std::fmt::Display) -> String {
    format!(
        "{e}; to accept larger frames from legacy agencies, raise server.max_frame \
         (SERVER_MAX_FRAME)"
    )
}

/// The wire's code for each of the lottery's refusals: the rules say what
/// went wrong, the handler says it in the protocol's words.
impl From<&LotteryError> for ErrorCode {
    fn from(e: &LotteryError) -> ErrorCode {
        match e {
            LotteryError::UnknownAgency(..) | LotteryError::OtherAgency { .. } => {
                ErrorCode::WrongAgency
            }
            LotteryError::Busy(_) | LotteryError::TakeoverTimedOut { .. } => ErrorCode::AgencyBusy,
            LotteryError::Finished(_) => ErrorCode::AgencyFinished,
            LotteryError::Draw(_) | LotteryError::Store(_) => ErrorCode::StorageFailed,
            LotteryError::OutOfOrder { .. } => ErrorCode::OutOfOrder,
            LotteryError::SalesClosed(_) | LotteryError::CloseRefused(_) => {
                ErrorCode::BettingClosed
            }
        }
    }
}

/// An agency's standing, as STATUS carries it.
impl From<Standing> for AgencyState {
    fn from(s: Standing) -> AgencyState {
        AgencyState {
            agency: s.agency,
            held: s.held,
            finished: s.finished,
        }
    }
}
