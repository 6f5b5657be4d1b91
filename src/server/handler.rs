//! [`Handler`]: serves one connection, reading requests in order, pipelining
//! batches to the store through its [`Session`], and answering in request
//! order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::guard::Broken;
use super::intake::{Placement, Session, Settled};
use super::strangers::Pass;
use super::Settings;
use crate::logging::{action, result};
use crate::lottery::{Lottery, LotteryError};
use crate::model::{AgencyId, Bets};
use crate::net::{BoxedIo, Identity};
use crate::receipt::Sealed;
use crate::store::Store;
use crate::wire::{
    status_replies, winners_replies, ErrorCode, FrameError, MessageError, Reply, Request,
    ServerCodec, STILL_WAITING_EVERY,
};

/// The guard's clock (tokio's, so tests can pause it).
type Now = tokio::time::Instant;

/// Read buffer of a connection: room for two full frames, so that an
/// agency's window of batches is read with fewer syscalls than one each.
/// Not more: with a thousand agencies connected, each KiB here is a MiB of
/// the central's memory.
const READ_BUFFER: usize = 16 * 1024;

/// Most batches one connection may have at the store at once; the next
/// frame is read only when one of them is answered.
const MAX_IN_FLIGHT: usize = crate::config::MAX_WINDOW;

/// What a connection may send. Before it authenticates (when the central
/// requires secrets), only `HELLO`; an operator session, only `PING` and
/// `STATUS`; a connection that speaks for an agency (or any connection
/// when secrets are off), everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Anonymous,
    Operator,
    Full,
}

/// Why [`Handler::gate`] turns a message away; the connection then closes.
enum Gated {
    /// Not authenticated yet, and not a `HELLO`.
    Anonymous,
    /// An operator session sent something other than `PING` or `STATUS`.
    OperatorOnly,
}

/// What the connection does after a message.
enum Next {
    Continue,
    Close,
}

/// Serves one agency connection.
pub(super) struct Handler {
    /// The connection with our codec: requests in, replies out.
    framed: Framed<BoxedIo, ServerCodec>,
    /// The agency's address, for logs.
    peer: SocketAddr,
    /// The agency this connection speaks for, with its batches in flight;
    /// set by the first message that names an agency.
    session: Option<Session>,
    /// What the connection may send, given how it authenticated.
    access: Access,
    /// The peer has shown it is one of ours: it authenticated (or, where
    /// authentication is off, sent a valid request). Until then it is a
    /// stranger: it has [`Settings::auth_timeout`] to do so, and its broken
    /// frames and timeouts are summarised per address, not logged each.
    vouched: bool,
    /// Its place among the strangers, given up once vouched for.
    pass: Option<Pass>,
    /// The peer opened with `HELLO`, so it is an agency of this protocol:
    /// it is told while it waits (`STATUS:WAITING`) and its winners carry
    /// its receipt and the seal. The design's agencies never send `HELLO`
    /// and get exactly the contract's replies.
    said_hello: bool,
    /// Who the TLS handshake says the peer is: under mutual TLS, the only
    /// agency this connection may speak for.
    identity: Identity,
    /// Shared state and the draw.
    lottery: Lottery,
    /// Where batches go.
    store: Arc<dyn Store>,
    /// This connection's token, a child of the server's.
    shutdown: CancellationToken,
    /// Timeouts and secrets.
    settings: Arc<Settings>,
    /// A frame read while the connection waited for the draw, handled
    /// once the winners are sent (replies keep request order).
    stashed: Option<Frame>,
    /// When the connection was accepted, for its closing line.
    opened: Instant,
}

/// What the codec yields for one read: a request, a message error, or the
/// end of the stream.
type Frame = Option<Result<Result<Request, MessageError>, FrameError>>;

impl Handler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        io: BoxedIo,
        identity: Identity,
        pass: Option<Pass>,
        peer: SocketAddr,
        lottery: Lottery,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
        settings: Arc<Settings>,
    ) -> Handler {
        Handler {
            framed: Framed::with_capacity(
                io,
                ServerCodec::with_max_frame(settings.max_frame),
                READ_BUFFER,
            ),
            peer,
            session: None,
            // A client certificate naming an agency authenticates it; one
            // naming none is an operator's probe (`PING`, `STATUS`).
            access: match identity {
                Identity::Certificate(Some(_)) => Access::Full,
                Identity::Certificate(None) => Access::Operator,
                Identity::Anonymous if settings.secrets.required() => Access::Anonymous,
                Identity::Anonymous => Access::Full,
            },
            said_hello: false,
            vouched: pass.is_none(),
            pass,
            identity,
            lottery,
            store,
            shutdown,
            settings,
            stashed: None,
            opened: Instant::now(),
        }
    }

    pub async fn run(mut self) {
        let outcome = self.serve().await;
        let (agency, superseded) = self
            .session
            .as_ref()
            .map_or((0, false), |s| (s.agency(), s.claim().superseded()));
        // Batches already at the store are stored whatever happened to the
        // connection: count them before the agency can connect again, or
        // its next session would resume too early and store them twice.
        let stored = match self.session.take() {
            Some(session) => session.settle().await,
            None => 0,
        };
        let reason = match &outcome {
            Err(e) => {
                if self.in_full(Broken::Frame) {
                    warn!(action = action::CONNECTION, result = result::FAIL, peer = %self.peer, agency, error = %e);
                }
                "error"
            }
            Ok(()) if superseded => "superseded by a newer session of the agency",
            Ok(()) if self.shutdown.is_cancelled() => "shutdown",
            Ok(()) => "closed",
        };
        let millis = self.opened.elapsed().as_millis() as u64;
        macro_rules! closed {
            ($level:ident) => {
                $level!(
                    action = action::CLOSE_CONNECTION,
                    result = result::SUCCESS,
                    peer = %self.peer,
                    agency,
                    bets_stored = stored,
                    millis,
                    reason
                )
            };
        }
        if !self.vouched && !self.shutdown.is_cancelled() {
            // Never authenticated: what it did is counted in its address's
            // `auth_failures` summary, and a line per connection would let
            // a flood of strangers flood the log after all. At shutdown
            // every socket closed is logged, as for any resource; the caps
            // on strangers bound those lines.
            closed!(debug);
        } else {
            closed!(info);
        }
        // Dropping `self` closes the socket.
    }

    /// The peer has shown it is one of ours: it leaves the strangers.
    fn vouch(&mut self) {
        self.vouched = true;
        self.pass = None;
    }

    /// Whether a broken connection (`how`) is logged in full: always once
    /// vouched for; for a stranger, the first of its address in a while,
    /// the rest counted in its `auth_failures` summary.
    fn in_full(&self, how: Broken) -> bool {
        self.vouched || self.settings.guard.broken(self.peer.ip(), how, Now::now())
    }

    /// When a stranger's time to authenticate is up: `auth_timeout` after
    /// its accept.
    fn auth_deadline(&self) -> Instant {
        let accepted = self.pass.as_ref().map_or(self.opened, Pass::since);
        accepted + self.settings.auth_timeout
    }

    /// In-flight batches, for the read loop's limit.
    fn in_flight(&self) -> usize {
        self.session.as_ref().map_or(0, Session::in_flight)
    }

    async fn serve(&mut self) -> Result<(), FrameError> {
        let (frame_timeout, idle_timeout) =
            (self.settings.frame_timeout, self.settings.idle_timeout);
        let mut last_request = Instant::now();
        loop {
            // A frame under way must be completed within the frame timeout;
            // between frames the idle timeout runs. Look again at least
            // every frame timeout, as a frame may start while we wait.
            let partial = self.framed.codec().partial_since();
            let deadline = match partial {
                Some(started) => started + frame_timeout,
                None => last_request + idle_timeout,
            };
            let deadline = if self.vouched {
                deadline
            } else {
                deadline.min(self.auth_deadline())
            };
            let look_again = deadline.min(Instant::now() + frame_timeout);
            let room = self.in_flight() < MAX_IN_FLIGHT;
            // Race the read against shutdown, the store and the clock only
            // between requests. `Framed::next` is cancel-safe: a half-read
            // frame stays buffered, and is dropped unacknowledged if we hang
            // up; so is settling a batch, which stays queued until taken.
            let frame = if let Some(frame) = self.stashed.take() {
                Some(Ok(frame))
            } else {
                let settled = async {
                    match self.session.as_mut() {
                        Some(session) => session.next_settled().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                settled = settled => Some(Err(settled)),
                frame = self.framed.next(), if room => Some(Ok(frame)),
                _ = tokio::time::sleep_until(look_again.into()) => {
                    if Instant::now() < deadline || self.in_flight() > 0 {
                        continue;
                    }
                    let unvouched = !self.vouched && Instant::now() >= self.auth_deadline();
                    return self.time_out(partial.is_some(), unvouched).await;
                }
                }
            };
            let frame = match frame {
                // Whatever was read is stored and answered.
                None => return self.drain().await,
                Some(Err(settled)) => {
                    self.acknowledge(settled).await?;
                    continue;
                }
                Some(Ok(frame)) => frame,
            };
            // Replies go out in request order: only batches are pipelined,
            // so anything else waits for the batches before it.
            if !matches!(frame, Some(Ok(Ok(Request::Batch { .. })))) {
                self.drain().await?;
            }
            if let Some(gated) = self.gate(&frame) {
                return self.turn_away(gated).await;
            }
            // Where authentication is off, a valid request is all an agency
            // can show.
            if !self.settings.secrets.required() && matches!(frame, Some(Ok(Ok(_)))) {
                self.vouch();
            }
            let next = match frame {
                None => return Ok(()),
                Some(Err(e @ FrameError::TooLarge { .. })) => {
                    // Too large to read past: the stream is unusable, but
                    // the peer (and the operator, in the log) can still be
                    // told why before we hang up.
                    let agency = self.session.as_ref().map(Session::agency);
                    let refused =
                        Refused::connection(agency, ErrorCode::FrameTooLarge, too_large(&e));
                    let _ = self.refuse(refused).await;
                    return Ok(());
                }
                Some(Ok(Err(e @ MessageError::FrameTooLarge { batch, agency, .. }))) => {
                    // Read past and dropped: the stream is in step, so the
                    // agency's next batches and its announcement are served.
                    let agency = self.session.as_ref().map(Session::agency).or(agency);
                    let refused = Refused {
                        action: if batch.is_some() {
                            action::APUESTA_RECIBIDA
                        } else {
                            action::REQUEST
                        },
                        cantidad: batch,
                        agency,
                        code: ErrorCode::FrameTooLarge,
                        reason: too_large(&e),
                    };
                    self.refuse(refused).await?;
                    Next::Continue
                }
                Some(Err(e @ FrameError::TlsRecord)) => {
                    // A TLS client on this plain-text central: its own TLS
                    // stack cannot read this, but a person with a raw
                    // client can, and our agency recognises a plain-text
                    // answer to its handshake.
                    let message = crate::net::tls_unavailable_message();
                    let _ = self.reply_error(ErrorCode::TlsUnavailable, message).await;
                    return Err(e);
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(Err(e))) => {
                    let refused = if e.is_batch() {
                        let count = self.framed.codec().refused_batch().unwrap_or(0);
                        Refused::batch(count, e.code(), e.to_string())
                    } else {
                        Refused::request(e.code(), e.to_string())
                    };
                    self.refuse(refused).await?;
                    Next::Continue
                }
                // Under mutual TLS, only the certificate's agency.
                Some(Ok(Ok(request))) if self.certificate_refuses(&request).is_some() => {
                    let reason = self.certificate_refuses(&request).unwrap_or_default();
                    self.wrong_certificate(reason).await?
                }
                Some(Ok(Ok(Request::Hello { agency, secret }))) => {
                    self.handle_hello(agency, secret).await?
                }
                Some(Ok(Ok(Request::OperatorHello { secret }))) => {
                    self.handle_operator_hello(secret).await?
                }
                // Probes and operator views: no personal data, no agency;
                // past the gate, so an operator session or open access.
                Some(Ok(Ok(Request::Ping))) => {
                    let pong = Reply::Success {
                        message: "pong".into(),
                        stored: None,
                        digest: None,
                    };
                    self.send(&pong).await?;
                    Next::Continue
                }
                Some(Ok(Ok(Request::Status))) => {
                    let (agencies, drawn, states) = self.lottery.status_everywhere().await;
                    for reply in status_replies(agencies, drawn, &states) {
                        self.feed(&reply).await?;
                    }
                    self.flush().await?;
                    Next::Continue
                }
                Some(Ok(Ok(Request::Batch { first, bets }))) => {
                    self.handle_batch(first, bets).await?
                }
                Some(Ok(Ok(Request::Finished { agency, .. }))) => {
                    self.handle_finished(agency).await?
                }
            };
            if let Next::Close = next {
                return Ok(());
            }
            last_request = Instant::now();
        }
    }

    /// Ends a connection that sat idle, that started a frame and did not
    /// finish it in time (a slow or stalled sender), or that did not
    /// authenticate in time (`unvouched`).
    async fn time_out(&mut self, mid_frame: bool, unvouched: bool) -> Result<(), FrameError> {
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

    /// The one rule for what is answered before (and, in an operator
    /// session, after) authentication: `Some` turns the message away and
    /// closes the connection. End of stream and framing errors pass: they
    /// end the connection on their own.
    fn gate(&self, frame: &Frame) -> Option<Gated> {
        let Some(Ok(request)) = frame else {
            return None;
        };
        let request = request.as_ref().ok();
        let hello = matches!(
            request,
            Some(Request::Hello { .. } | Request::OperatorHello { .. })
        );
        match (self.access, request) {
            (Access::Full, _) => None,
            (Access::Operator, Some(Request::Ping | Request::Status)) => None,
            (Access::Operator, _) => Some(Gated::OperatorOnly),
            (Access::Anonymous, _) if hello => None,
            (Access::Anonymous, _) => Some(Gated::Anonymous),
        }
    }

    /// Answers a message the gate turned away, and hangs up. Refusals
    /// before authentication are counted for the address's summary line
    /// rather than logged one by one: a flood must not flood the log.
    async fn turn_away(&mut self, gated: Gated) -> Result<(), FrameError> {
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
                let reason = "an operator session may send only PING and STATUS".to_string();
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
    async fn wrong_secret(&mut self, reason: String) -> Result<Next, FrameError> {
        let ip = self.peer.ip();
        let strike = self.settings.guard.wrong_secret(ip, Now::now());
        if let Some(report) = strike.report {
            report.log();
        }
        if let Some(throttled_for) = strike.all_throttled {
            warn!(
                action = action::AUTH_THROTTLE,
                result = result::IN_PROGRESS,
                scope = "all_addresses",
                wrong_secrets = super::guard::TOTAL_STRIKES,
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

    /// Opens a read-only operator session (`PING`, `STATUS`): operator
    /// tools need not, and must not, speak for an agency, whose `HELLO`
    /// would take its session over.
    async fn handle_operator_hello(&mut self, secret: Option<String>) -> Result<Next, FrameError> {
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
            message: "operator session: PING and STATUS".into(),
            stored: None,
            digest: None,
        };
        self.send(&reply).await?;
        Ok(Next::Continue)
    }

    /// Under mutual TLS, why `request` names an agency other than the one
    /// the client certificate names; `None` when it may go on.
    fn certificate_refuses(&self, request: &Request) -> Option<String> {
        let agency = match request {
            Request::Hello { agency, .. } | Request::Finished { agency, .. } => *agency,
            Request::Batch { bets, .. } => bets.get(0)?.agency,
            Request::Ping | Request::Status | Request::OperatorHello { .. } => return None,
        };
        self.identity.refuses(agency)
    }

    /// Refuses a request for another agency than the certificate's, and
    /// hangs up: the peer is not who it claims to be.
    async fn wrong_certificate(&mut self, reason: String) -> Result<Next, FrameError> {
        // Batches of the certified agency still in flight are answered
        // first: replies keep request order.
        self.drain().await?;
        let refused = Refused::connection(None, ErrorCode::Unauthenticated, reason);
        self.refuse(refused).await?;
        Ok(Next::Close)
    }

    /// The connection's session for `agency`: claimed on its first message
    /// that names an agency; later messages must name the same one.
    fn session_for(&mut self, agency: AgencyId) -> Result<&mut Session, LotteryError> {
        self.check_agency(agency)?;
        if self.session.is_none() {
            let claim = self.lottery.claim(agency, &self.shutdown)?;
            self.session = Some(Session::new(claim, self.store.clone()));
        }
        Ok(self.session.as_mut().expect("set above"))
    }

    /// Refuses a message for another agency than the connection's.
    fn check_agency(&self, agency: AgencyId) -> Result<(), LotteryError> {
        match &self.session {
            Some(s) if s.agency() != agency => Err(LotteryError::OtherAgency {
                bound: s.agency(),
                claimed: agency,
            }),
            _ => Ok(()),
        }
    }

    /// A `HELLO` opens a new session of its agency: an older connection
    /// still holding the agency is closed (its batches in flight settled
    /// first), so a restarted agency is never locked out by its old
    /// connection.
    async fn open_session(&mut self, agency: AgencyId) -> Result<(), LotteryError> {
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

    async fn handle_hello(
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
            let refused = Refused::connection(Some(agency), e.code(), e.to_string());
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

    /// Checks a batch and hands it to the store; its acknowledgement is
    /// sent when the store answers, while later frames are read.
    async fn handle_batch(&mut self, first: Option<u64>, bets: Bets) -> Result<Next, FrameError> {
        let count = bets.len();
        // Every bet of the batch must speak for one agency: the connection's.
        let agency = bets.get(0).expect("a batch holds at least one bet").agency;
        if let Some((i, other)) = bets.iter().enumerate().find(|(_, b)| b.agency != agency) {
            let reason = format!(
                "BET_{}: AGENCY_ID {} differs from BET_1's {agency}",
                i + 1,
                other.agency
            );
            self.drain().await?;
            return self.reject(count, ErrorCode::WrongAgency, reason).await;
        }
        if let Err(e) = self.session_for(agency) {
            self.drain().await?;
            return self.reject(count, e.code(), e.to_string()).await;
        }
        let session = self.session.as_mut().expect("claimed above");
        if session.is_broken() {
            // A batch of this connection failed: every batch sent after it
            // fails too, so none is stored after a gap. Once they are all
            // answered, only a batch that says where it starts may begin a
            // new order, placed against what is really stored.
            self.drain().await?;
            let session = self.session.as_mut().expect("claimed above");
            if first.is_none() {
                let reason = "an earlier batch of this connection was not stored; \
                              reconnect and resume from the stored count"
                    .to_string();
                return self.reject(count, ErrorCode::StorageFailed, reason).await;
            }
            session.restart_sequence();
        }
        let session = self.session.as_mut().expect("claimed above");
        let mut placement = session.place(first, count);
        if !matches!(placement, Placement::Store { .. }) {
            // Refusals and repeats are answered in order, and against what
            // is really stored: settle the batches in flight first.
            self.drain().await?;
            placement = self
                .session
                .as_mut()
                .expect("claimed above")
                .place(first, count);
        }
        let skip = match placement {
            Placement::Store { skip } => skip,
            Placement::AlreadyStored { stored } => {
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
            Placement::Refuse(e) => return self.reject(count, e.code(), e.to_string()).await,
        };
        let session = self.session.as_mut().expect("claimed above");
        if let Err(e) = session.submit(&bets, skip).await {
            self.drain().await?;
            return self
                .reject(count, ErrorCode::StorageFailed, e.to_string())
                .await;
        }
        Ok(Next::Continue)
    }

    /// Answers `settled` and every later batch the store has already
    /// answered, in one write.
    async fn acknowledge(&mut self, settled: Settled) -> Result<(), FrameError> {
        let mut next = Some(settled);
        while let Some(settled) = next.take() {
            self.answer(settled).await?;
            next = self.session.as_mut().and_then(Session::try_settled);
        }
        self.flush().await
    }

    /// Logs a settled batch and queues its reply.
    async fn answer(&mut self, settled: Settled) -> Result<(), FrameError> {
        let count = settled.count;
        let total = match settled.outcome {
            Ok(total) => total,
            Err(e) => {
                let refused = Refused::batch(count, ErrorCode::StorageFailed, e.to_string());
                self.log_refused(&refused);
                let reply = Reply::Error {
                    code: refused.code,
                    message: refused.reason,
                };
                return self.feed(&reply).await;
            }
        };
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
    async fn drain(&mut self) -> Result<(), FrameError> {
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

    async fn reject(
        &mut self,
        count: usize,
        code: ErrorCode,
        reason: String,
    ) -> Result<Next, FrameError> {
        self.refuse(Refused::batch(count, code, reason)).await?;
        Ok(Next::Continue)
    }

    async fn handle_finished(&mut self, agency: AgencyId) -> Result<Next, FrameError> {
        let shutdown = self.shutdown.clone();
        let session = match self.session_for(agency) {
            Ok(session) => session,
            Err(e) => return self.refuse_finish(agency, e.code(), e.to_string()).await,
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
            return self.refuse_finish(agency, e.code(), e.to_string()).await;
        }
        self.session.as_mut().expect("claimed above").announced = true;
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
                frame = self.framed.next(), if self.stashed.is_none() => match frame {
                    None => return Ok(Next::Close),
                    Some(Err(e)) => return Err(e),
                    frame => self.stashed = Some(frame),
                },
            }
        };
        let draw = match drawn {
            None => return Ok(Next::Close),
            Some(Ok(draw)) => draw,
            Some(Err(e)) => {
                // The draw failed: the agency may announce again to retry.
                self.session.as_mut().expect("claimed above").announced = false;
                return self.refuse_finish(agency, e.code(), e.to_string()).await;
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

    async fn refuse_finish(
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

    /// Logs a refusal once, as a `result: fail` line naming the peer; a
    /// stranger's refused connection (a broken frame) only when
    /// [`Handler::in_full`] says so.
    fn log_refused(&self, r: &Refused) {
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
    async fn refuse(&mut self, refused: Refused) -> Result<(), FrameError> {
        self.log_refused(&refused);
        self.reply_error(refused.code, refused.reason).await
    }

    // Every write to the peer goes through these three, each with a deadline
    // (the frame timeout): a peer that stops reading is dropped instead of
    // holding its connection slot and its agency's claim for ever.

    async fn send(&mut self, reply: &Reply) -> Result<(), FrameError> {
        let limit = self.settings.frame_timeout;
        tokio::time::timeout(limit, self.framed.send(reply))
            .await
            .unwrap_or_else(|_| Err(stalled(limit)))
    }

    async fn feed(&mut self, reply: &Reply) -> Result<(), FrameError> {
        let limit = self.settings.frame_timeout;
        tokio::time::timeout(limit, self.framed.feed(reply))
            .await
            .unwrap_or_else(|_| Err(stalled(limit)))
    }

    async fn flush(&mut self) -> Result<(), FrameError> {
        let limit = self.settings.frame_timeout;
        tokio::time::timeout(limit, SinkExt::<&Reply>::flush(&mut self.framed))
            .await
            .unwrap_or_else(|_| Err(stalled(limit)))
    }

    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Result<(), FrameError> {
        self.send(&Reply::Error { code, message }).await
    }
}

/// A refused request: what it was, the code it is answered with, and why.
struct Refused {
    /// The log action: `apuesta_recibida` for a batch, `agencia_finalizada`
    /// for an announcement, `request` for any other message, `connection`
    /// for the connection itself.
    action: &'static str,
    /// Bets in a refused batch (the contract's `cantidad`).
    cantidad: Option<usize>,
    agency: Option<AgencyId>,
    code: ErrorCode,
    reason: String,
}

impl Refused {
    fn batch(count: usize, code: ErrorCode, reason: String) -> Refused {
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
    fn request(code: ErrorCode, reason: String) -> Refused {
        Refused {
            action: action::REQUEST,
            cantidad: None,
            agency: None,
            code,
            reason,
        }
    }

    fn connection(agency: Option<AgencyId>, code: ErrorCode, reason: String) -> Refused {
        Refused {
            action: action::CONNECTION,
            cantidad: None,
            agency,
            code,
            reason,
        }
    }
}

/// The clock of a connection's `STATUS:WAITING` frames: the first one
/// `first` after the wait starts, then one every [`STILL_WAITING_EVERY`]
/// (a late tick is not made up for: the agency needs one frame per
/// interval, not a burst).
fn still_waiting_ticks(first: Duration) -> tokio::time::Interval {
    let every = STILL_WAITING_EVERY;
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// A refusal of an oversize frame, saying what would let such frames in.
fn too_large(e: &dyn std::fmt::Display) -> String {
    format!(
        "{e}; to accept larger frames from legacy agencies, raise server.max_frame \
         (SERVER_MAX_FRAME)"
    )
}

/// The error of a write the peer did not take in time.
fn stalled(limit: std::time::Duration) -> FrameError {
    FrameError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the peer did not read its replies for {}s", limit.as_secs()),
    ))
}

/// Compares secrets in time that depends only on their lengths, so timing
/// does not tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
