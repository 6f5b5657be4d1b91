//! `CLOSE`: an operator closes sales now.

use tracing::warn;

use super::refusals::Refused;
use super::{Handler, Next};
use crate::close::ClosedBy;
use crate::logging::action;
use crate::tls::Identity;
use crate::wire::{ErrorCode, FrameError, Reply, MAX_REASON_LEN};

impl Handler {
    /// Closes sales for an operator: only in an operator session (or,
    /// where the central requires no secrets, on a connection that speaks
    /// for no agency), with a reason.
    pub(super) async fn handle_close(&mut self, reason: String) -> Result<Next, FrameError> {
        let agency_connection = self.session.is_some()
            || self.said_hello
            || matches!(self.identity, Identity::Certificate(Some(_)));
        if agency_connection {
            let why = "CLOSE is an operator's: open an operator session (HELLO with \
                       ROLE:OPERATOR) on a connection that speaks for no agency";
            let refused = Refused::connection(None, ErrorCode::Unauthenticated, why.into());
            self.refuse(refused).await?;
            return Ok(Next::Close);
        }
        let reason = reason.trim().to_string();
        let bad = if reason.is_empty() {
            Some("REASON is empty: say why sales close (it is logged and kept)".to_string())
        } else if reason.len() > MAX_REASON_LEN {
            Some(format!(
                "REASON is {} bytes long; at most {MAX_REASON_LEN}",
                reason.len()
            ))
        } else {
            None
        };
        if let Some(why) = bad {
            let refused = Refused::request(ErrorCode::MalformedMessage, why);
            self.refuse(refused).await?;
            return Ok(Next::Continue);
        }
        let from = self.peer.to_string();
        match self
            .lottery
            .close_sales(ClosedBy::Operator, reason, &from)
            .await
        {
            Ok(close) => {
                let reply = Reply::Success {
                    message: format!("{close}; the draw runs now over the bets stored"),
                    stored: None,
                    digest: None,
                };
                self.send(&reply).await?;
            }
            Err(e) => {
                warn!(
                    action = action::CIERRE,
                    result = crate::logging::result::FAIL,
                    peer = %self.peer,
                    code = %ErrorCode::from(&e),
                    reason = %e
                );
                self.reply_error(ErrorCode::from(&e), e.to_string()).await?;
            }
        }
        Ok(Next::Continue)
    }
}
