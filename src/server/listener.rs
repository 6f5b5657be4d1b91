//! The accept loop: binds the port, enforces the connection limit, completes
//! the TLS handshake, and spawns one tracked [`Handler`] task per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, warn, Instrument};

use super::handler::Handler;
use super::Settings;
use crate::config::ServerConfig;
use crate::logging::{action, result};
use crate::lottery::Lottery;
use crate::net::BoxedIo;
use crate::store::Store;
use crate::wire::{ErrorCode, Reply, ServerCodec};

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
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted server must not wait for the old socket's TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
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

impl Listener {
    /// Accepts until shutdown; returning drops (closes) the listening socket.
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(10);
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
                    let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                        // At the limit: say so and hang up, without holding
                        // a handler for it.
                        warn!(
                            action = action::CONNECTION,
                            result = result::FAIL,
                            peer = %peer,
                            code = %ErrorCode::ServerBusy,
                            reason = "connection limit reached"
                        );
                        let refusal = refuse_busy(socket, self.settings.frame_timeout);
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
                    let conn = Accepted {
                        socket,
                        peer,
                        store: self.store.clone(),
                        lottery: self.lottery.clone(),
                        shutdown: self.connections.child_token(),
                        settings: self.settings.clone(),
                    };
                    let hard_stop = self.hard_stop.clone();
                    let task = self.tracker.track_future(
                        async move {
                            tokio::select! {
                                _ = hard_stop.cancelled() => {}
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

/// Tells a connection over the limit that the central is busy, then closes
/// it. Bounded in time, so a peer that does not read cannot keep it.
async fn refuse_busy(socket: TcpStream, limit: Duration) {
    let mut framed = Framed::new(socket, ServerCodec::new());
    let reply = Reply::Error {
        code: ErrorCode::ServerBusy,
        message: "the central is at its connection limit; try again later".into(),
    };
    let _ = tokio::time::timeout(limit, framed.send(&reply)).await;
}

/// A connection accepted, before its TLS handshake.
struct Accepted {
    socket: TcpStream,
    peer: SocketAddr,
    store: Arc<dyn Store>,
    lottery: Lottery,
    shutdown: CancellationToken,
    settings: Arc<Settings>,
}

impl Accepted {
    /// Completes the TLS handshake (when on, within the frame timeout) and
    /// serves the connection.
    async fn serve(self) {
        let io: BoxedIo = match &self.settings.tls {
            None => Box::new(self.socket),
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(self.settings.frame_timeout, acceptor.accept(self.socket));
                let outcome = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    outcome = handshake => outcome,
                };
                match outcome {
                    Ok(Ok(stream)) => Box::new(stream),
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
        Handler::new(
            io,
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
