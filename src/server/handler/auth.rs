//! Who the peer is: `HELLO` and the operator's `HELLO`, the gate before
//! authentication, wrong secrets and certificates, and the claim of an
//! agency's session.

use std::time::{Duration, Instant};

use tracing::warn;

use super::finish::still_waiting_ticks;
use super::refusals::Refused;
use super::{Handler, Incoming, Next, Now};
use crate::logging::{action, result};
use crate::lottery::LotteryError;
use crate::model::AgencyId;
use crate::server::guard::{Broken, TOTAL_STRIKES};
use crate::server::intake::Session;
use crate::server::strangers::Pass;
use crate::wire::{ErrorCode, FrameError, Reply, Request};

/// What a connection may send. Before it authenticates (when the central
/// requires secrets), only `HELLO`; an operator session, only `PING`,
/// `STATUS` and `CLOSE`; a connection that speaks for an agency (or any connection
/// when secrets are off), everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Anonymous,
    Operator,
    Full,
}

/// Why [`Handler::gate`] turns a message away; the connection then closes.
pub(super) enum Gated {
    /// Not authenticated yet, and not a `HELLO`.
    Anonymous,
    /// An operator session sent something other than `PING`, `STATUS` or
    /// `CLOSE`.
    OperatorOnly,
}

impl Handler {
    /// The peer has shown it is one of ours: it leaves the strangers.
    pub(super) fn vouch(&mut self) {
        self.vouched = true;
        self.pass = None;
    }

    /// Whether a broken connection (`how`) is logged in full: always once
    /// vouched for; for a stranger, the first of its address in a while,
    /// the rest counted in its `auth_failures` summary.
    pub(super) fn in_full(&self, how: Broken) -> bool {
        self.vouched || self.settings.guard.broken(self.peer.ip(), how, Now::now())
    }

    /// When a stranger's time to authenticate is up: `auth_timeout` after
    /// its accept.
    pub(super) fn auth_deadline(&self) -> Instant {
        let accepted = self.pass.as_ref().map_or(self.opened, Pass::since);
        accepted + self.settings.auth_timeout
    }

    /// The one rule for what is answered before (and, in an operator
    /// session, after) authentication: `Some` turns the message away and
    /// closes the connection. End of stream and framing errors pass: they
    /// end the connection on their own.
    pub(super) fn gate(&self, incoming: &Incoming) -> Option<Gated> {
        let request = match incoming {
            Incoming::Request(request) => Some(request),
            Incoming::Invalid(_) => None,
            Incoming::Broken(_) | Incoming::Closed => return None,
        };
        let hello = matches!(
            request,
            Some(Request::Hello { .. } | Request::OperatorHello { .. })
        );
        match (self.access, request) {
            (Access::Full, _) => None,
            (Access::Operator, Some(Request::Ping | Request::Status | Request::Close { .. })) => {
                None
            }
            (Access::Operator, _) => Some(Gated::OperatorOnly),
            (Access::Anonymous, _) if hello => None,
            (Access::Anonymous, _) => Some(Gated::Anonymous),
        }
    }

    /// Answers a message the gate turned away, and hangs up. Refusals
    /// before authentication are counted for the address's summary line
    /// rather than logged one by one: a flood must not flood the log.
    pub(super) async fn turn_away(&mut self, gated: Gated) -> Result<(), FrameError> {
        let ip = self.peer.ip();
        let (code, reason) = match gated {
            Gated::Anonymous => {
                if let Some(report) = self.settings.guard.unauthenticated(ip, Now::now()) {
                    report.log();
                }
                let reason = "this central requires HELLO with the agency's SECRET first";
                (ErrorCode::Unauthenticated, reason.to_string())
            }
            Gated::OperatorOnly => {
                let reason = "an operator session may send only PING, STATUS and CLOSE".to_string();
                let refused = Refused::connection(None, ErrorCode::Unauthenticated, reason);
                return self.refuse(refused).await;
            }
        };
        self.reply_error(code, reason).await
    }

    /// Answers a wrong or missing secret, counts it against the address
    /// (its summary line says how many), and hangs up. While the address
    /// (or every address) is throttled, the answer waits for the end of the
    /// connection's time to authenticate: a guesser then holds one of the
    /// few places its address has among the strangers for that long.
    pub(super) async fn wrong_secret(&mut self, reason: String) -> Result<Next, FrameError> {
        let ip = self.peer.ip();
        let strike = self.settings.guard.wrong_secret(ip, Now::now());
        self.settings.metrics.auth_failures.inc();
        if strike.locked_out {
            self.settings.metrics.auth_lockouts.inc();
        }
        if let Some(report) = strike.report {
            report.log();
        }
        if let Some(throttled_for) = strike.all_throttled {
            warn!(
                action = action::AUTH_THROTTLE,
                result = result::IN_PROGRESS,
                scope = "all_addresses",
                wrong_secrets = TOTAL_STRIKES,
                throttled_for_secs = throttled_for.as_secs(),
                message = "wrong secrets from many addresses: every wrong secret is answered \
                           late for a while (right ones still get in at once)"
            );
        }
        let mut reason = reason;
        if strike.throttled {
            let shutdown = self.shutdown.clone();
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep_until(self.auth_deadline().into()) => {}
            }
            let from = if strike.by_total {
                "many addresses".to_string()
            } else {
                ip.to_string()
            };
            reason.push_str(&format!(
                " (answered late: too many wrong secrets from {from})"
            ));
        }
        self.reply_error(ErrorCode::Unauthenticated, reason).await?;
        Ok(Next::Close)
    }

    /// Opens an operator session (`PING`, `STATUS`, `CLOSE`): operator
    /// tools need not, and must not, speak for an agency, whose `HELLO`
    /// would take its session over.
    pub(super) async fn handle_operator_hello(
        &mut self,
        secret: Option<String>,
    ) -> Result<Next, FrameError> {
        if self.settings.secrets.required() {
            let Some(expected) = &self.settings.secrets.operator else {
                let reason = "no operator secret is configured on this central".to_string();
                return self.wrong_secret(reason).await;
            };
            let presented = secret.as_deref().unwrap_or("");
            if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
                return self
                    .wrong_secret("wrong or missing SECRET for the operator".into())
                    .await;
            }
            if self.access == Access::Anonymous {
                self.access = Access::Operator;
            }
            self.vouch();
        }
        let reply = Reply::Success {
            message: "operator session: PING, STATUS and CLOSE".into(),
            stored: None,
            digest: None,
        };
        self.send(&reply).await?;
        Ok(Next::Continue)
    }

    /// Under mutual TLS, why `request` names an agency other than the one
    /// the client certificate names; `None` when it may go on.
    pub(super) fn certificate_refuses(&self, request: &Request) -> Option<String> {
        let agency = match request {
            Request::Hello { agency, .. } | Request::Finished { agency, .. } => *agency,
            Request::Batch { bets, .. } => bets.get(0)?.agency,
            Request::Ping
            | Request::Status
            | Request::Close { .. }
            | Request::OperatorHello { .. } => return None,
        };
        self.identity.refuses(agency)
    }

    /// Refuses a request for another agency than the certificate's, and
    /// hangs up: the peer is not who it claims to be.
    pub(super) async fn wrong_certificate(&mut self, reason: String) -> Result<Next, FrameError> {
        // Batches of the certified agency still in flight are answered
        // first: replies keep request order.
        self.drain().await?;
        let refused = Refused::connection(None, ErrorCode::Unauthenticated, reason);
        self.refuse(refused).await?;
        Ok(Next::Close)
    }

    /// A `HELLO` opens a new session of its agency: an older connection
    /// still holding the agency is closed (its batches in flight settled
    /// first), so a restarted agency is never locked out by its old
    /// connection.
    pub(super) async fn open_session(&mut self, agency: AgencyId) -> Result<(), LotteryError> {
        self.check_agency(agency)?;
        if self.session.is_none() {
            // The old connection needs at most a write deadline to answer
            // what it has and let go, plus its batches' time at the store.
            let patience = self.settings.frame_timeout * 2;
            let shutdown = self.shutdown.clone();
            let lottery = self.lottery.clone();
            let take_over = lottery.take_over(agency, &shutdown, patience);
            tokio::pin!(take_over);
            // The first one early: an agency gives up on HELLO (and takes
            // this central for a reference one) after its hello_timeout,
            // which is at least 2 s.
            let mut ticks = still_waiting_ticks(Duration::from_secs(1));
            let claim = loop {
                tokio::select! {
                    claim = &mut take_over => break claim?,
                    // Shut down (or itself superseded) while waiting.
                    _ = shutdown.cancelled() => return Err(LotteryError::Busy(agency)),
                    // Tell the agency, whose HELLO deadline is short, that
                    // the central is alive. A failed write ends the
                    // connection at its next reply; the takeover is bounded.
                    _ = ticks.tick() => {
                        let why = format!("waiting for an older connection of agency {agency} to let go");
                        let _ = self.send(&Reply::Waiting { message: why }).await;
                    }
                }
            };
            // A store shared with other centrals says where the agency
            // stands (it may have stored bets elsewhere) and fences its
            // older sessions there.
            claim.open().await?;
            self.session = Some(Session::new(claim, self.store.clone()));
        }
        Ok(())
    }

    pub(super) async fn handle_hello(
        &mut self,
        agency: AgencyId,
        secret: Option<String>,
    ) -> Result<Next, FrameError> {
        self.said_hello = true;
        // Certified by its client certificate: no secret needed.
        let certified = self.identity.certified_agency() == Some(agency);
        match self.settings.secrets.agencies.get(&agency) {
            _ if certified => {}
            Some(expected) => {
                let presented = secret.as_deref().unwrap_or("");
                if !constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
                    let reason = format!("wrong or missing SECRET for agency {agency}");
                    return self.wrong_secret(reason).await;
                }
            }
            // Secrets are on, and this agency has none (it is not one of
            // the configured agencies): it cannot get in.
            None if self.settings.secrets.required() => {
                let reason = format!("no secret is configured for agency {agency}");
                return self.wrong_secret(reason).await;
            }
            None => {}
        }
        self.vouch();
        if let Err(e) = self.open_session(agency).await {
            let refused = Refused::connection(Some(agency), ErrorCode::from(&e), e.to_string());
            self.refuse(refused).await?;
            return Ok(Next::Continue);
        }
        self.access = Access::Full;
        // The receipt: the agency checks it against its own file before it
        // resumes.
        let stored = self.lottery.stored(agency);
        let reply = Reply::Success {
            message: format!("agency {agency}: resume from bet {}", stored.count),
            stored: Some(stored.count),
            digest: Some(stored.digest),
        };
        self.send(&reply).await?;
        Ok(Next::Continue)
    }
}

/// Compares secrets in time that depends only on their lengths, so timing
/// does not tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
