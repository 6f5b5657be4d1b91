//! [`Handler`]: serves one connection, reading requests in order, pipelining
//! batches to the store through its [`Session`], and answering in request
//! order.

mod auth;
mod batch;
mod clock;
mod finish;
mod refusals;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::auth::Access;
use self::clock::FrameClock;
use self::refusals::{too_large, Refused};
use super::guard::Broken;
use super::intake::{Session, Settled};
use super::strangers::Pass;
use super::Settings;
use crate::logging::{action, result};
use crate::lottery::{Lottery, LotteryError};
use crate::model::AgencyId;
use crate::store::Store;
use crate::tls::{BoxedIo, Identity};
use crate::wire::{
    status_replies, AgencyState, ErrorCode, FrameError, MessageError, Reply, Request, ServerCodec,
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
    stashed: Option<Incoming>,
    /// When the connection was accepted, for its closing line.
    opened: Instant,
}

/// One read of the connection, as the read loop handles it.
enum Incoming {
    /// A whole, valid request.
    Request(Request),
    /// A whole frame that holds no valid message: it is refused, and the
    /// stream stays in step.
    Invalid(MessageError),
    /// The stream cannot go on (I/O, framing): the connection ends.
    Broken(FrameError),
    /// The peer closed the connection.
    Closed,
}

impl From<Option<Result<Result<Request, MessageError>, FrameError>>> for Incoming {
    fn from(read: Option<Result<Result<Request, MessageError>, FrameError>>) -> Incoming {
        match read {
            None => Incoming::Closed,
            Some(Err(e)) => Incoming::Broken(e),
            Some(Ok(Err(e))) => Incoming::Invalid(e),
            Some(Ok(Ok(request))) => Incoming::Request(request),
        }
    }
}

/// What wakes the read loop between requests.
enum Wake {
    /// The server is shutting down.
    Shutdown,
    /// The store answered a batch in flight.
    Settled(Settled),
    /// The peer sent something (or closed).
    Read(Incoming),
}

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

    /// In-flight batches, for the read loop's limit.
    fn in_flight(&self) -> usize {
        self.session.as_ref().map_or(0, Session::in_flight)
    }

    async fn serve(&mut self) -> Result<(), FrameError> {
        let (frame_timeout, idle_timeout) =
            (self.settings.frame_timeout, self.settings.idle_timeout);
        let mut last_request = Instant::now();
        let mut frame_clock = FrameClock::default();
        loop {
            // A frame under way must be completed within the frame timeout
            // (of our reading time); between frames the idle timeout runs.
            // Look again at least every frame timeout, as a frame may start
            // while we wait.
            let partial = self.framed.codec().partial_since();
            let deadline = frame_clock
                .deadline(partial, frame_timeout)
                .unwrap_or(last_request + idle_timeout);
            let deadline = if self.vouched {
                deadline
            } else {
                deadline.min(self.auth_deadline())
            };
            let look_again = deadline.min(Instant::now() + frame_timeout);
            let in_flight = self.in_flight();
            let room = in_flight < MAX_IN_FLIGHT;
            // Race the read against shutdown, the store and the clock only
            // between requests. `Framed::next` is cancel-safe: a half-read
            // frame stays buffered, and is dropped unacknowledged if we hang
            // up; so is settling a batch, which stays queued until taken.
            let wake = if let Some(incoming) = self.stashed.take() {
                Wake::Read(incoming)
            } else {
                let settled = async {
                    match self.session.as_mut() {
                        Some(session) => session.next_settled().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => Wake::Shutdown,
                settled = settled => Wake::Settled(settled),
                read = self.framed.next(), if room => Wake::Read(read.into()),
                // Not while batches are in flight: their answers wake us,
                // and a connection is never cut with batches at the store
                // (racing a deadline already past would spin meanwhile).
                _ = tokio::time::sleep_until(look_again.into()), if in_flight == 0 => {
                    if Instant::now() < deadline {
                        continue;
                    }
                    let unvouched = !self.vouched && Instant::now() >= self.auth_deadline();
                    return self.time_out(partial.is_some(), unvouched).await;
                }
                }
            };
            let incoming = match wake {
                // Whatever was read is stored and answered.
                Wake::Shutdown => return self.drain().await,
                Wake::Settled(settled) => {
                    let left = Instant::now();
                    self.acknowledge(settled).await?;
                    frame_clock.away_since(left);
                    continue;
                }
                Wake::Read(incoming) => incoming,
            };
            // Replies go out in request order: only batches are pipelined,
            // so anything else waits for the batches before it.
            if !matches!(incoming, Incoming::Request(Request::Batch { .. })) {
                self.drain().await?;
            }
            if let Some(gated) = self.gate(&incoming) {
                return self.turn_away(gated).await;
            }
            // Where authentication is off, a valid request is all an agency
            // can show.
            if !self.settings.secrets.required() && matches!(incoming, Incoming::Request(_)) {
                self.vouch();
            }
            let next = match incoming {
                Incoming::Closed => return Ok(()),
                Incoming::Broken(e @ FrameError::TooLarge { .. }) => {
                    // Too large to read past: the stream is unusable, but
                    // the peer (and the operator, in the log) can still be
                    // told why before we hang up.
                    let agency = self.session.as_ref().map(Session::agency);
                    let refused =
                        Refused::connection(agency, ErrorCode::FrameTooLarge, too_large(&e));
                    let _ = self.refuse(refused).await;
                    return Ok(());
                }
                Incoming::Invalid(e @ MessageError::FrameTooLarge { batch, agency, .. }) => {
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
                Incoming::Broken(e @ FrameError::TlsRecord) => {
                    // A TLS client on this plain-text central: its own TLS
                    // stack cannot read this, but a person with a raw
                    // client can, and our agency recognises a plain-text
                    // answer to its handshake.
                    let message = crate::tls::tls_unavailable_message();
                    let _ = self.reply_error(ErrorCode::TlsUnavailable, message).await;
                    return Err(e);
                }
                Incoming::Broken(e) => return Err(e),
                Incoming::Invalid(e) => {
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
                Incoming::Request(request) if self.certificate_refuses(&request).is_some() => {
                    let reason = self.certificate_refuses(&request).unwrap_or_default();
                    self.wrong_certificate(reason).await?
                }
                Incoming::Request(Request::Hello { agency, secret }) => {
                    self.handle_hello(agency, secret).await?
                }
                Incoming::Request(Request::OperatorHello { secret }) => {
                    self.handle_operator_hello(secret).await?
                }
                // Probes and operator views: no personal data, no agency;
                // past the gate, so an operator session or open access.
                Incoming::Request(Request::Ping) => {
                    let pong = Reply::Success {
                        message: "pong".into(),
                        stored: None,
                        digest: None,
                    };
                    self.send(&pong).await?;
                    Next::Continue
                }
                Incoming::Request(Request::Status) => {
                    let (agencies, drawn, standings) = self.lottery.status_everywhere().await;
                    let states: Vec<AgencyState> = standings.into_iter().map(Into::into).collect();
                    for reply in status_replies(agencies, drawn, &states) {
                        self.feed(&reply).await?;
                    }
                    self.flush().await?;
                    Next::Continue
                }
                Incoming::Request(Request::Batch { first, bets }) => {
                    self.handle_batch(first, bets).await?
                }
                Incoming::Request(Request::Finished { agency, .. }) => {
                    self.handle_finished(agency).await?
                }
            };
            if let Next::Close = next {
                return Ok(());
            }
            last_request = Instant::now();
        }
    }

    /// The connection's session for `agency`: claimed on its first message
    /// that names an agency; later messages must name the same one.
    fn session_for(&mut self, agency: AgencyId) -> Result<&mut Session, LotteryError> {
        self.check_agency(agency)?;
        let session = match self.session.take() {
            Some(session) => session,
            None => Session::new(
                self.lottery.claim(agency, &self.shutdown)?,
                self.store.clone(),
            ),
        };
        Ok(self.session.insert(session))
    }

    /// The connection's session, for a message that has claimed it
    /// ([`Handler::session_for`], [`Handler::open_session`]): from then on
    /// only [`Handler::run`] takes it, once the conversation is over.
    fn claimed(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("invariant: claimed by this message's handler")
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

/// The error of a write the peer did not take in time.
fn stalled(limit: std::time::Duration) -> FrameError {
    FrameError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the peer did not read its replies for {}s", limit.as_secs()),
    ))
}
