//! The accept loop: binds the port, fits the connection limit to the
//! open-files limit and enforces it and the caps on strangers, completes the
//! TLS handshake, and spawns one tracked [`Handler`] task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn, Instrument};

use super::handler::Handler;
use super::strangers::{Full, Pass};
use super::Settings;
use crate::config::{ConfigError, ServerConfig};
use crate::logging::{action, result};
use crate::lottery::Lottery;
use crate::store::Store;
use crate::tls::{self, BoxedIo, Identity};
use crate::wire::{ErrorCode, FrameError, Reply, ServerCodec};

/// The guard's clock (tokio's, so tests can pause it).
type Now = tokio::time::Instant;

/// Files the central keeps open besides its connections: the listener,
/// stdio, the bets file and draw record, the runtime's own descriptors, and a
/// margin for refusing connections over the limit.
pub const RESERVED_FILES: u64 = 32;

/// Fewest connections worth starting with; under a lower open-files limit
/// the central refuses to start.
pub const MIN_CONNECTIONS: u64 = 8;

/// Makes `config.max_connections` fit the process's open-files limit
/// (RLIMIT_NOFILE), so that a connection over the limit is refused with
/// `SERVER_BUSY` rather than left hanging on "Too many open files".
///
/// First raises the soft limit to the hard one. If `max_connections` plus
/// [`RESERVED_FILES`] still does not fit, lowers `max_connections` to what
/// does and logs a WARN `open_files` line naming both numbers. Where the
/// limit cannot be read, changes nothing.
///
/// # Errors
/// [`ConfigError::Invalid`] (exit code 2) when not even
/// [`MIN_CONNECTIONS`] connections fit.
pub fn fit_open_files(config: &mut ServerConfig) -> Result<(), ConfigError> {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return Ok(());
    };
    let mut limit = soft;
    // Fails where the hard limit is "unlimited" but the kernel caps it
    // lower; the soft limit then stays what it was.
    if hard > soft && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        limit = hard;
    }
    let room = limit.saturating_sub(RESERVED_FILES);
    let wanted = config.max_connections as u64;
    if wanted <= room {
        return Ok(());
    }
    if room < MIN_CONNECTIONS {
        return Err(ConfigError::Invalid {
            key: "server.max_connections".into(),
            value: config.max_connections.to_string(),
            reason: format!(
                "the open-files limit (RLIMIT_NOFILE) is {limit}: beside the central's own \
                 {RESERVED_FILES} files that leaves room for {room} connections, fewer than \
                 {MIN_CONNECTIONS}; raise it (ulimit -n, or LimitNOFILE / --ulimit nofile=)"
            ),
        });
    }
    warn!(
        action = action::OPEN_FILES,
        result = result::SUCCESS,
        limit,
        max_connections = room,
        configured = wanted,
        reason = %format!(
            "the open-files limit (RLIMIT_NOFILE) leaves room for {room} connections, not the \
             {wanted} of server.max_connections; serving {room}, the rest get SERVER_BUSY \
             (raise the limit to serve more)"
        )
    );
    config.max_connections = usize::try_from(room).expect("room < max_connections, a usize");
    Ok(())
}

/// Binds the listening socket on all interfaces with the configured backlog.
///
/// # Errors
/// The port cannot be bound.
pub fn bind(config: &ServerConfig) -> std::io::Result<TcpListener> {
    bind_addr(
        SocketAddr::from(([0, 0, 0, 0], config.port)),
        config.listen_backlog,
    )
}

/// Binds `addr` with `backlog` (tests bind `127.0.0.1:0`).
///
/// # Errors
/// The address cannot be bound.
pub fn bind_addr(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    reserve_addr(addr)?.listen(backlog)
}

/// Binds `server.port` without listening yet: the port is the central's
/// (another program cannot take it, and one that has it is found out now),
/// while connections to it are still refused.
///
/// # Errors
/// The port cannot be bound.
pub(super) fn reserve(config: &ServerConfig) -> std::io::Result<TcpSocket> {
    reserve_addr(SocketAddr::from(([0, 0, 0, 0], config.port)))
}

fn reserve_addr(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted server must not wait for the old socket's TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// The accept loop.
pub(super) struct Listener {
    /// The bound socket; dropped (closed) when the loop ends.
    pub listener: TcpListener,
    /// Cloned into every handler; the writer closes the file after the last.
    pub store: Arc<dyn Store>,
    /// Shared lottery state.
    pub lottery: Lottery,
    /// Tracks every handler so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled on shutdown: stops the accept loop.
    pub shutdown: CancellationToken,
    /// Parent of every handler's token; cancelled after the listener closes.
    pub connections: CancellationToken,
    /// Drops handlers outright once the grace period is over.
    pub hard_stop: CancellationToken,
    /// One permit per connection served: the connection limit.
    pub limit: Arc<Semaphore>,
    /// Timeouts, secrets and TLS, shared by every connection.
    pub settings: Arc<Settings>,
}

/// Refusals at the limit that may be in a TLS handshake at once (see
/// [`refuse_busy`]); beyond them a connection over the limit is closed
/// without a word, so a flood of connections cannot make the central spend
/// its CPU on handshakes it will only refuse.
const BUSY_HANDSHAKES: usize = 16;

impl Listener {
    /// Accepts until shutdown; returning drops (closes) the listening socket.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(10);
        let busy_handshakes = Arc::new(Semaphore::new(BUSY_HANDSHAKES));
        loop {
            let accepted = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                // `accept` is cancel-safe: losing the race loses no connection.
                accepted = self.listener.accept() => accepted,
            };
            match accepted {
                Ok((socket, peer)) => {
                    backoff = Duration::from_millis(10);
                    // Replies are small and latency-bound: never wait for Nagle.
                    if let Err(e) = socket.set_nodelay(true) {
                        warn!(action = action::CONNECTION, result = result::FAIL, peer = %peer, error = %e);
                    }
                    // A stranger until it authenticates: within the caps.
                    let pass = match self.settings.strangers.admit(peer.ip()) {
                        Ok(pass) => pass,
                        Err(full) => {
                            refuse_stranger(socket, peer, full, &self.settings);
                            continue;
                        }
                    };
                    let Some(permit) = self.permit(&pass).await else {
                        drop(pass);
                        // At the limit: say so and hang up, without holding
                        // a handler for it.
                        warn!(
                            action = action::CONNECTION,
                            result = result::FAIL,
                            peer = %peer,
                            code = %ErrorCode::ServerBusy,
                            reason = "connection limit reached"
                        );
                        let handshake = match &self.settings.tls {
                            None => None,
                            Some(_) => match busy_handshakes.clone().try_acquire_owned() {
                                Ok(permit) => Some(permit),
                                // Closed unanswered: the client retries as
                                // after any dropped connection.
                                Err(_) => continue,
                            },
                        };
                        let settings = self.settings.clone();
                        let refusal = async move {
                            refuse_busy(socket, settings).await;
                            drop(handshake);
                        };
                        let hard_stop = self.hard_stop.clone();
                        // Raced against the hard stop like a handler, so a
                        // refusal cannot outlast the grace period either.
                        self.tracker.spawn(async move {
                            tokio::select! {
                                _ = hard_stop.cancelled() => {}
                                _ = refusal => {}
                            }
                        });
                        continue;
                    };
                    let evicted = pass.evicted();
                    let conn = Accepted {
                        socket,
                        peer,
                        pass,
                        store: self.store.clone(),
                        lottery: self.lottery.clone(),
                        shutdown: self.connections.child_token(),
                        settings: self.settings.clone(),
                    };
                    let hard_stop = self.hard_stop.clone();
                    let guard = self.settings.guard.clone();
                    let open = Open::new(&self.settings.metrics.connections_open);
                    let task = self.tracker.track_future(
                        async move {
                            let _open = open;
                            tokio::select! {
                                biased;
                                _ = hard_stop.cancelled() => {}
                                // A newcomer took this stranger's place.
                                _ = evicted.cancelled() => {
                                    if let Some(report) = guard.refused(peer.ip(), Now::now()) {
                                        report.log();
                                    }
                                }
                                _ = conn.serve() => {}
                            }
                            drop(permit);
                        }
                        .instrument(tracing::info_span!("conn", %peer)),
                    );
                    crate::task::spawn_named(&format!("conn {peer}"), task);
                }
                Err(e) => {
                    // Usually out of file descriptors: wait for some to free
                    // up instead of spinning.
                    error!(action = action::CONNECTION, result = result::FAIL, error = %e);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

impl Listener {
    /// A connection slot for a newcomer. When its admission closed another
    /// stranger to make room, that one's slot is its own: it frees as soon
    /// as the closed connection's task runs, which the wait gives it time
    /// to (bounded, and never longer than a frame may take).
    async fn permit(&self, pass: &Pass) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if let Ok(permit) = self.limit.clone().try_acquire_owned() {
            return Some(permit);
        }
        if !pass.made_room() {
            return None;
        }
        let freed = tokio::time::timeout(
            self.settings.frame_timeout,
            self.limit.clone().acquire_owned(),
        );
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            freed = freed => freed.ok().and_then(Result::ok),
        }
    }
}

/// Tells a connection over the limit that the central is busy, then closes
/// it. Bounded in time, so a peer that does not read cannot keep it.
///
/// On a TLS central the answer goes through TLS, after the handshake: a TLS
/// client reading a plain-text frame would take this central for one that
/// does not speak TLS, which no retry can fix, and give up instead of
/// trying again later or moving to the next central. A plain-text client
/// is answered in plain text, as any other would be.
async fn refuse_busy(socket: TcpStream, settings: Arc<Settings>) {
    let reply = Reply::Error {
        code: ErrorCode::ServerBusy,
        message: "the central is at its connection limit; try again later".into(),
    };
    let refused = async {
        let io: BoxedIo = match &settings.tls {
            None => Box::new(socket),
            Some(tls) => match tls.accept(socket).await {
                Ok(tls::Accepted::Tls(stream, _)) => stream,
                Ok(tls::Accepted::PlainText(socket)) => Box::new(socket),
                Ok(tls::Accepted::Closed) | Err(_) => return,
            },
        };
        let mut framed = Framed::new(io, ServerCodec::new());
        if framed.send(&reply).await.is_err() {
            return;
        }
        // Read what the client sent meanwhile (its HELLO) before closing,
        // or the reset could reach it before the answer does.
        let mut io = framed.into_inner();
        if io.shutdown().await.is_ok() {
            let mut sink = [0u8; 1024];
            while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
        }
    };
    let _ = tokio::time::timeout(settings.frame_timeout, refused).await;
}

/// Refuses a connection over the caps on strangers, at once and without a
/// task: a flood must cost the central no more than the accept. A
/// plain-text peer is told `SERVER_BUSY` if the reply fits in the socket's
/// buffer (it always does, unless the peer is gone); a TLS peer is not
/// (it would take a plain-text answer for a central without TLS) and
/// retries as after any dropped connection. Counted in its address's
/// `auth_failures` summary, not logged one by one.
fn refuse_stranger(socket: TcpStream, peer: SocketAddr, full: Full, settings: &Settings) {
    if settings.tls.is_none() {
        let why = match full {
            Full::Address => format!(
                "too many connections from {} have not authenticated yet; try again later",
                peer.ip()
            ),
            Full::Total => {
                "too many connections have not authenticated yet; try again later".to_string()
            }
        };
        let reply = Reply::Error {
            code: ErrorCode::ServerBusy,
            message: why,
        };
        let mut frame = bytes::BytesMut::new();
        if tokio_util::codec::Encoder::encode(&mut ServerCodec::new(), &reply, &mut frame).is_ok() {
            let _ = socket.try_write(&frame);
        }
    }
    if let Some(report) = settings.guard.refused(peer.ip(), Now::now()) {
        report.log();
    }
}

/// A connection accepted, before its TLS handshake.
struct Accepted {
    socket: TcpStream,
    peer: SocketAddr,
    /// Its place among the strangers, until it authenticates.
    pass: Pass,
    store: Arc<dyn Store>,
    lottery: Lottery,
    shutdown: CancellationToken,
    settings: Arc<Settings>,
}

impl Accepted {
    /// Completes the TLS handshake (when on, within the frame timeout) and
    /// serves the connection with the identity the handshake gave it.
    async fn serve(self) {
        let (io, identity): (BoxedIo, Identity) = match &self.settings.tls {
            None => (Box::new(self.socket), Identity::Anonymous),
            Some(tls) => {
                let handshake =
                    tokio::time::timeout(self.settings.frame_timeout, tls.accept(self.socket));
                let outcome = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    outcome = handshake => outcome,
                };
                match outcome {
                    Ok(Ok(tls::Accepted::Tls(stream, identity))) => (stream, identity),
                    Ok(Ok(tls::Accepted::Closed)) => return,
                    Ok(Ok(tls::Accepted::PlainText(socket))) => {
                        warn!(
                            action = action::CONNECTION,
                            result = result::FAIL,
                            peer = %self.peer,
                            code = %ErrorCode::TlsRequired,
                            reason = "a plain-text client on this TLS central (its first byte is \
                                      not a TLS handshake); answered in plain text"
                        );
                        refuse_plain_text(socket, self.settings.frame_timeout).await;
                        return;
                    }
                    Ok(Err(e)) => {
                        warn!(
                            action = action::CONNECTION,
                            result = result::FAIL,
                            peer = %self.peer,
                            reason = %format!("TLS handshake failed: {e}")
                        );
                        return;
                    }
                    Err(_) => {
                        warn!(
                            action = action::CONNECTION,
                            result = result::FAIL,
                            peer = %self.peer,
                            code = %ErrorCode::Timeout,
                            reason = "TLS handshake not completed in time"
                        );
                        return;
                    }
                }
            }
        };
        // A client certificate authenticates: no longer a stranger.
        let pass = match identity {
            Identity::Certificate(_) => None,
            Identity::Anonymous => Some(self.pass),
        };
        Handler::new(
            io,
            identity,
            pass,
            self.peer,
            self.lottery,
            self.store,
            self.shutdown,
            self.settings,
        )
        .run()
        .await;
    }
}

/// Tells a plain-text client of a TLS central, in plain text and in our
/// protocol, that it must speak TLS, then closes. Bounded in time.
async fn refuse_plain_text(socket: TcpStream, limit: Duration) {
    let mut framed = Framed::new(socket, ServerCodec::new());
    let reply = Reply::Error {
        code: ErrorCode::TlsRequired,
        message: tls::tls_required_message(),
    };
    let answered = async {
        framed.send(&reply).await?;
        // Read what the client had sent before closing: closing a socket
        // with unread input resets the connection, and the reset can reach
        // the client before it has read the answer.
        let mut socket = framed.into_inner();
        socket.shutdown().await?;
        let mut sink = [0u8; 1024];
        while socket.read(&mut sink).await? > 0 {}
        Ok::<_, FrameError>(())
    };
    let _ = tokio::time::timeout(limit, answered).await;
}

/// Counts a connection open until dropped, however its task ends.
struct Open(prometheus_client::metrics::gauge::Gauge);

impl Open {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Open {
        gauge.inc();
        Open(gauge.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}
