//! The central: a [`Listener`] accepts agencies and spawns one [`Handler`]
//! task per connection; handlers store batches through the
//! [`BetStore`](crate::store::file::BetStore) and meet at the
//! [`Lottery`](crate::lottery::Lottery) for the draw.
//!
//! Shutdown: the caller cancels the token. The accept loop stops and the
//! listener closes; each handler, cancelled through its child token, finishes
//! the batch it is handling (so whatever was acknowledged is in the file) and
//! closes; then the writer flushes and closes the bets file.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::config::{ConfigError, ServerConfig};
use crate::logging::{action, result};
use crate::lottery::{Draw, Lottery, LotteryError};
use crate::model::{AgencyId, Bets};
use crate::net::{self as tls, BoxedIo, TlsError};
use crate::store::file::{
    self as storage, encode_rows, BetStore, Durability, Pending, Sequence, StorageError,
};
use crate::wire::{
    status_replies, winners_replies, ErrorCode, FrameError, Reply, Request, ServerCodec,
};

/// Read buffer of a connection: room for two full frames, so that an
/// agency's window of batches is read with fewer syscalls than one each.
/// Not more: with a thousand agencies connected, each KiB here is a MiB of
/// the central's memory.
const READ_BUFFER: usize = 16 * 1024;

/// How long shutdown waits for connections to finish what they started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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

/// Why the central could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The bets file cannot be read or repaired.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The secrets cannot be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The draw record exists but cannot be read.
    #[error("draw record {path}: {source}")]
    DrawRecord {
        /// The record.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves agencies on `listener` until `shutdown` is cancelled, then closes
/// everything in order.
///
/// On start it repairs the bets file if a crash left a torn row, rebuilds how
/// many bets each agency has stored (where their uploads resume), and reads
/// back the draw record if the draw already happened.
///
/// # Errors
/// The bets file, the draw record, the secrets or the TLS material cannot be
/// read.
pub async fn run(
    listener: TcpListener,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let settings = Arc::new(Settings {
        frame_timeout: config.frame_deadline(),
        idle_timeout: config.idle_deadline(),
        secrets: config.load_secrets()?,
        tls: if config.tls_enabled() {
            Some(tls::acceptor(&config.tls_cert, &config.tls_key)?)
        } else {
            None
        },
    });
    let recovered = {
        let path = config.storage.clone();
        tokio::task::spawn_blocking(move || storage::recover(&path))
            .await
            .expect("recovery does not panic")?
    };
    info!(
        action = action::RECOVER,
        result = result::SUCCESS,
        path = %config.storage.display(),
        rows = recovered.rows,
        agencies = recovered.per_agency.len(),
        truncated_bytes = recovered.truncated_bytes
    );
    let record = config.draw_record_path();
    let draw = Draw::load(&record).map_err(|source| ServerError::DrawRecord {
        path: record.clone(),
        source,
    })?;
    if let Some(draw) = &draw {
        info!(
            action = action::DRAW_RECORD,
            result = result::SUCCESS,
            path = %record.display(),
            drawn_at = draw.drawn_at.as_str(),
            bets = draw.bets
        );
    }
    let durability = if config.sync {
        Durability::Sync
    } else {
        Durability::NoSync
    };
    let (store, writer) = BetStore::open(&config.storage, durability);
    let lottery = Lottery::new(
        config.agencies,
        config.winning_number,
        config.storage.clone(),
        record,
        recovered.per_agency,
        draw,
    );
    let tracker = TaskTracker::new();
    // Connections hang off their own token, cancelled only once the
    // listener is closed: no connection is told to stop while new ones could
    // still arrive, and the log shows the listener closing first.
    let connections = CancellationToken::new();
    // Cancelled only if connections outlive the grace period.
    let hard_stop = CancellationToken::new();
    let local = listener.local_addr().ok();
    info!(
        action = action::LISTEN,
        result = result::SUCCESS,
        address = %local.map_or_else(|| "?".to_string(), |a| a.to_string()),
        tls = settings.tls.is_some(),
        secrets = settings.secrets.len(),
        max_connections = config.max_connections
    );

    let accept_loop = Listener {
        listener,
        store,
        lottery,
        tracker: tracker.clone(),
        shutdown: shutdown.clone(),
        connections: connections.clone(),
        hard_stop: hard_stop.clone(),
        limit: Arc::new(Semaphore::new(config.max_connections)),
        settings,
    }
    .run();
    if crate::task::spawn_named("listener", accept_loop)
        .await
        .is_err()
    {
        error!(
            action = action::CLOSE_LISTENER,
            result = result::FAIL,
            reason = "the accept loop panicked"
        );
    }
    info!(action = action::CLOSE_LISTENER, result = result::SUCCESS);
    connections.cancel();

    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        // A peer that stopped reading can hold a reply write forever. Drop
        // such handlers: what they had not acknowledged yet is not lost to
        // anyone, and the process must still exit in time.
        warn!(
            action = action::SHUTDOWN,
            result = result::IN_PROGRESS,
            reason = "abandoning connections still busy after the grace period",
            tasks = tracker.len()
        );
        hard_stop.cancel();
        tracker.wait().await;
    }
    // Every handler's store clone is gone, so the writer drains, flushes and
    // closes the file, then ends.
    if let Err(e) = writer.await {
        error!(action = action::CLOSE_BETS_FILE, result = result::FAIL, error = %e);
    }
    Ok(())
}

/// The accept loop.
struct Listener {
    /// The bound socket; dropped (closed) when the loop ends.
    listener: TcpListener,
    /// Cloned into every handler; the writer closes the file after the last.
    store: BetStore,
    /// Shared lottery state.
    lottery: Lottery,
    /// Tracks every handler so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled on shutdown: stops the accept loop.
    shutdown: CancellationToken,
    /// Parent of every handler's token; cancelled after the listener closes.
    connections: CancellationToken,
    /// Drops handlers outright once the grace period is over.
    hard_stop: CancellationToken,
    /// One permit per connection served: the connection limit.
    limit: Arc<Semaphore>,
    /// Timeouts, secrets and TLS, shared by every connection.
    settings: Arc<Settings>,
}

/// What every connection needs to know about the central's policy.
struct Settings {
    /// Time to complete a frame once started, and the TLS handshake.
    frame_timeout: Duration,
    /// Time a connection may wait with no request.
    idle_timeout: Duration,
    /// Agency secrets; empty when authentication is off.
    secrets: BTreeMap<AgencyId, String>,
    /// TLS, when on.
    tls: Option<TlsAcceptor>,
}

impl Listener {
    /// Accepts until shutdown; returning drops (closes) the listening socket.
    async fn run(self) {
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
                        self.tracker
                            .spawn(refuse_busy(socket, self.settings.frame_timeout));
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
    store: BetStore,
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
        Handler {
            framed: Framed::with_capacity(io, ServerCodec::new(), READ_BUFFER),
            peer: self.peer,
            agency: None,
            authenticated: self.settings.secrets.is_empty(),
            announced: false,
            store: self.store,
            in_flight: VecDeque::new(),
            sequence: Sequence::new(),
            lottery: self.lottery,
            shutdown: self.shutdown,
            settings: self.settings,
        }
        .run()
        .await;
    }
}

/// Serves one agency connection.
struct Handler {
    /// The connection with our codec: requests in, replies out.
    framed: Framed<BoxedIo, ServerCodec>,
    /// The agency's address, for logs.
    peer: SocketAddr,
    /// The agency this connection speaks for, fixed by its first message.
    agency: Option<AgencyId>,
    /// The connection presented its agency's secret (or none is needed).
    authenticated: bool,
    /// This connection already announced that its agency finished.
    announced: bool,
    /// Where batches go.
    store: BetStore,
    /// Batches handed to the writer and not yet answered, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Keeps this connection's batches in order in the bets file.
    sequence: Sequence,
    /// Shared state and the draw.
    lottery: Lottery,
    /// This connection's token, a child of the server's.
    shutdown: CancellationToken,
    /// Timeouts and secrets.
    settings: Arc<Settings>,
}

/// Most batches one connection may have at the writer at once; the next
/// frame is read only when one of them is answered.
const MAX_IN_FLIGHT: usize = 64;

/// A batch at the writer, waiting for its rows to be stored.
struct InFlight {
    agency: AgencyId,
    /// Bets in the batch, as sent.
    count: usize,
    /// Bets it adds (a resent batch may overlap what is stored).
    new: u64,
    /// The new bets, kept for their DEBUG lines only when DEBUG is on.
    logged: Option<Bets>,
    stored: Pending,
}

/// What the central does with a batch, given what it holds.
enum Intake {
    /// Store it from its `skip`-th bet on.
    Store { skip: usize },
    /// Every bet of it is stored already: acknowledge it again.
    AlreadyStored { stored: u64 },
    /// Refuse it.
    Refuse(LotteryError),
}

/// The oldest in-flight batch's outcome; never resolves when there is none.
async fn oldest(in_flight: &mut VecDeque<InFlight>) -> Result<(), StorageError> {
    match in_flight.front_mut() {
        Some(batch) => (&mut batch.stored).await,
        None => std::future::pending().await,
    }
}

/// What the connection does after a message.
enum Next {
    Continue,
    Close,
}

impl Handler {
    async fn run(mut self) {
        let outcome = self.serve().await;
        // Batches already at the writer are stored whatever happened to the
        // connection: count them before the agency can connect again, or
        // its next session would resume too early and store them twice.
        self.settle().await;
        if let Some(agency) = self.agency {
            self.lottery.release(agency).await;
        }
        if let Err(e) = outcome {
            warn!(action = action::CONNECTION, result = result::FAIL, peer = %self.peer, error = %e);
        }
        if self.shutdown.is_cancelled() {
            info!(
                action = action::CLOSE_CONNECTION,
                result = result::SUCCESS,
                peer = %self.peer,
                agency = self.agency.unwrap_or(0)
            );
        }
        // Dropping `self` closes the socket.
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
            let look_again = deadline.min(Instant::now() + frame_timeout);
            // Race the read against shutdown and the clock only between
            // requests. `Framed::next` is cancel-safe: a half-read frame stays
            // buffered, and is dropped unacknowledged if we hang up.
            let frame = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    // Whatever was read is stored and answered.
                    self.drain().await?;
                    return Ok(());
                }
                outcome = oldest(&mut self.in_flight) => {
                    self.acknowledge(outcome).await?;
                    continue;
                }
                frame = self.framed.next(), if self.in_flight.len() < MAX_IN_FLIGHT => frame,
                _ = tokio::time::sleep_until(look_again.into()) => {
                    if Instant::now() < deadline || !self.in_flight.is_empty() {
                        continue;
                    }
                    return self.time_out(partial.is_some()).await;
                }
            };
            // Replies go out in request order: only batches are pipelined,
            // so anything else waits for the batches before it.
            if !matches!(frame, Some(Ok(Ok(Request::Batch { .. })))) {
                self.drain().await?;
            }
            let next = match frame {
                None => return Ok(()),
                Some(Err(e)) => {
                    if let FrameError::TooLarge(_) = e {
                        // The stream is unusable, but the peer can still be
                        // told why before we hang up.
                        let _ = self
                            .reply_error(ErrorCode::FrameTooLarge, e.to_string())
                            .await;
                    }
                    return Err(e);
                }
                Some(Ok(Err(e))) => {
                    warn!(
                        action = action::APUESTA_RECIBIDA,
                        result = result::FAIL,
                        cantidad = 0,
                        peer = %self.peer,
                        code = %e.code(),
                        reason = %e
                    );
                    self.reply_error(e.code(), e.to_string()).await?;
                    Next::Continue
                }
                Some(Ok(Ok(Request::Hello { agency, secret }))) => {
                    self.handle_hello(agency, secret).await?
                }
                // Probes and operator views: no personal data, no agency,
                // no secret needed.
                Some(Ok(Ok(Request::Ping))) => {
                    let pong = Reply::Success {
                        message: "pong".into(),
                        stored: None,
                    };
                    self.framed.send(&pong).await?;
                    Next::Continue
                }
                Some(Ok(Ok(Request::Status))) => {
                    let (agencies, drawn, states) = self.lottery.status().await;
                    for reply in status_replies(agencies, drawn, &states) {
                        self.framed.feed(&reply).await?;
                    }
                    self.framed.flush().await?;
                    Next::Continue
                }
                Some(Ok(Ok(_))) if !self.authenticated => self.unauthenticated().await?,
                Some(Ok(Ok(Request::Batch { first, bets }))) => {
                    self.handle_batch(first, bets).await?
                }
                Some(Ok(Ok(Request::Finished { agency }))) => self.handle_finished(agency).await?,
            };
            if let Next::Close = next {
                return Ok(());
            }
            last_request = Instant::now();
        }
    }

    /// Ends a connection that sat idle, or that started a frame and did not
    /// finish it in time (a slow or stalled sender).
    async fn time_out(&mut self, mid_frame: bool) -> Result<(), FrameError> {
        let (reason, limit) = if mid_frame {
            ("frame not completed in time", self.settings.frame_timeout)
        } else {
            ("idle for too long", self.settings.idle_timeout)
        };
        let reason = format!("{reason} ({}s)", limit.as_secs());
        if mid_frame {
            warn!(
                action = action::CONNECTION,
                result = result::FAIL,
                peer = %self.peer,
                code = %ErrorCode::Timeout,
                reason = reason.as_str()
            );
        } else {
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

    /// Refuses a request from a connection that has not authenticated, and
    /// hangs up.
    async fn unauthenticated(&mut self) -> Result<Next, FrameError> {
        let reason = "this central requires HELLO with the agency's SECRET first".to_string();
        warn!(
            action = action::CONNECTION,
            result = result::FAIL,
            peer = %self.peer,
            code = %ErrorCode::Unauthenticated,
            reason = reason.as_str()
        );
        self.reply_error(ErrorCode::Unauthenticated, reason).await?;
        Ok(Next::Close)
    }

    /// Binds the connection to `agency` on its first message and checks that
    /// later messages speak for the same one.
    async fn bind_agency(&mut self, agency: AgencyId) -> Result<(), LotteryError> {
        match self.agency {
            Some(a) if a == agency => Ok(()),
            Some(bound) => Err(LotteryError::OtherAgency {
                bound,
                claimed: agency,
            }),
            None => {
                self.lottery.claim(agency).await?;
                self.agency = Some(agency);
                Ok(())
            }
        }
    }

    async fn handle_hello(
        &mut self,
        agency: AgencyId,
        secret: Option<String>,
    ) -> Result<Next, FrameError> {
        let refusal = match self.settings.secrets.get(&agency) {
            Some(expected) => {
                let presented = secret.as_deref().unwrap_or("");
                (!constant_time_eq(presented.as_bytes(), expected.as_bytes())).then(|| {
                    let reason = format!("wrong or missing SECRET for agency {agency}");
                    (ErrorCode::Unauthenticated, reason, Next::Close)
                })
            }
            // Secrets are on, and this agency has none: it cannot get in.
            None if !self.settings.secrets.is_empty() => {
                let reason = format!("no secret is configured for agency {agency}");
                Some((ErrorCode::Unauthenticated, reason, Next::Close))
            }
            None => None,
        };
        let refusal = match refusal {
            Some(r) => Some(r),
            None => self
                .bind_agency(agency)
                .await
                .err()
                .map(|e| (e.code(), e.to_string(), Next::Continue)),
        };
        if let Some((code, reason, next)) = refusal {
            warn!(
                action = action::CONNECTION,
                result = result::FAIL,
                agency,
                peer = %self.peer,
                code = %code,
                reason = reason.as_str()
            );
            self.reply_error(code, reason).await?;
            return Ok(next);
        }
        self.authenticated = true;
        let stored = self.lottery.stored(agency).await;
        let reply = Reply::Success {
            message: format!("agency {agency}: resume from bet {stored}"),
            stored: Some(stored),
        };
        self.framed.send(&reply).await?;
        Ok(Next::Continue)
    }

    /// Checks a batch and hands it to the writer; its acknowledgement is
    /// sent when the writer answers, while later frames are read.
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
        if let Err(e) = self.bind_agency(agency).await {
            self.drain().await?;
            return self.reject(count, e.code(), e.to_string()).await;
        }
        if self.in_flight.is_empty() && self.sequence.is_broken() {
            // Every batch after the failed one has been answered: start over.
            self.sequence = Sequence::new();
        }
        let mut intake = self.intake(agency, first, count).await;
        if !matches!(intake, Intake::Store { .. }) {
            // Refusals and repeats are answered in order, and against what
            // is really stored: settle the batches in flight first.
            self.drain().await?;
            intake = self.intake(agency, first, count).await;
        }
        let skip = match intake {
            Intake::Store { skip } => skip,
            Intake::AlreadyStored { stored } => {
                info!(
                    action = action::APUESTA_RECIBIDA,
                    result = result::SUCCESS,
                    cantidad = count,
                    already_stored = count
                );
                let reply = Reply::Success {
                    message: format!("already stored {count} bets"),
                    stored: Some(stored),
                };
                self.framed.send(&reply).await?;
                return Ok(Next::Continue);
            }
            Intake::Refuse(e) => return self.reject(count, e.code(), e.to_string()).await,
        };

        let mut rows = Vec::with_capacity((count - skip) * 64);
        encode_rows(bets.iter().skip(skip), &mut rows);
        let stored = match self.store.submit(rows, &self.sequence).await {
            Ok(stored) => stored,
            Err(e) => {
                self.drain().await?;
                return self
                    .reject(count, ErrorCode::StorageFailed, e.to_string())
                    .await;
            }
        };
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            let mut new = Bets::new();
            new.extend(bets.iter().skip(skip));
            new
        });
        self.in_flight.push_back(InFlight {
            agency,
            count,
            new: (count - skip) as u64,
            logged,
            stored,
        });
        Ok(Next::Continue)
    }

    /// Where a batch starting at `first` stands against the bets the central
    /// holds for `agency`, counting those still at the writer.
    ///
    /// A batch that says where it starts is stored only from the first bet
    /// the central does not hold yet: a batch resent after a lost
    /// acknowledgement is acknowledged again, never stored twice. This
    /// connection is the only one for the agency, so the count moves only
    /// through it.
    async fn intake(&mut self, agency: AgencyId, first: Option<u64>, count: usize) -> Intake {
        let at_writer = self.in_flight.iter().map(|b| b.new).sum::<u64>();
        let (held, open) = self.lottery.intake(agency).await;
        let expected = held + at_writer;
        let skip = match first {
            None => 0,
            Some(first) if first > expected => {
                return Intake::Refuse(LotteryError::OutOfOrder {
                    agency,
                    first,
                    stored: expected,
                })
            }
            Some(first) => usize::try_from(expected - first)
                .unwrap_or(usize::MAX)
                .min(count),
        };
        if skip == count {
            return Intake::AlreadyStored { stored: expected };
        }
        match open {
            Ok(()) => Intake::Store { skip },
            Err(e) => Intake::Refuse(e),
        }
    }

    /// Answers the oldest batch in flight, whose outcome is `outcome`, and
    /// every later one already answered by the writer, in one write.
    async fn acknowledge(&mut self, outcome: Result<(), StorageError>) -> Result<(), FrameError> {
        use futures::FutureExt;
        let mut outcome = Some(outcome);
        while let Some(done) = outcome.take() {
            self.acknowledge_one(done).await?;
            outcome = match self.in_flight.front_mut() {
                Some(next) => (&mut next.stored).now_or_never(),
                None => None,
            };
        }
        self.framed.flush().await
    }

    /// Counts the oldest batch in flight as stored (or not), logs it, and
    /// queues its reply.
    async fn acknowledge_one(
        &mut self,
        outcome: Result<(), StorageError>,
    ) -> Result<(), FrameError> {
        let batch = self
            .in_flight
            .pop_front()
            .expect("invariant: an outcome is for the oldest batch in flight");
        let count = batch.count;
        if let Err(e) = outcome {
            warn!(
                action = action::APUESTA_RECIBIDA,
                result = result::FAIL,
                cantidad = count,
                peer = %self.peer,
                code = %ErrorCode::StorageFailed,
                reason = %e
            );
            let reply = Reply::Error {
                code: ErrorCode::StorageFailed,
                message: e.to_string(),
            };
            return self.framed.feed(&reply).await;
        }
        let total = self.lottery.add_stored(batch.agency, batch.new).await;
        info!(
            action = action::APUESTA_RECIBIDA,
            result = result::SUCCESS,
            cantidad = count
        );
        for b in batch.logged.iter().flat_map(Bets::iter) {
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
        };
        self.framed.feed(&reply).await
    }

    /// Waits for every batch in flight and answers each.
    async fn drain(&mut self) -> Result<(), FrameError> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        while !self.in_flight.is_empty() {
            let outcome = oldest(&mut self.in_flight).await;
            self.acknowledge_one(outcome).await?;
        }
        self.framed.flush().await
    }

    /// Waits for every batch in flight and counts those stored, without
    /// answering: the connection is gone or going.
    async fn settle(&mut self) {
        while let Some(batch) = self.in_flight.pop_front() {
            if batch.stored.await.is_ok() {
                self.lottery.add_stored(batch.agency, batch.new).await;
            }
        }
    }

    async fn reject(
        &mut self,
        count: usize,
        code: ErrorCode,
        reason: String,
    ) -> Result<Next, FrameError> {
        warn!(
            action = action::APUESTA_RECIBIDA,
            result = result::FAIL,
            cantidad = count,
            peer = %self.peer,
            code = %code,
            reason = reason.as_str()
        );
        self.reply_error(code, reason).await?;
        Ok(Next::Continue)
    }

    async fn handle_finished(&mut self, agency: AgencyId) -> Result<Next, FrameError> {
        if let Err(e) = self.bind_agency(agency).await {
            return self.refuse_finish(agency, e.code(), e.to_string()).await;
        }
        if self.announced {
            let reason =
                format!("agency {agency} already announced it finished on this connection");
            return self
                .refuse_finish(agency, ErrorCode::AgencyFinished, reason)
                .await;
        }
        if let Err(e) = self.lottery.finish(agency).await {
            return self.refuse_finish(agency, e.code(), e.to_string()).await;
        }
        self.announced = true;
        // Hold the agency here until the draw, or until shutdown.
        let Some(draw) = self.lottery.wait_for_draw(&self.shutdown).await else {
            return Ok(Next::Close);
        };
        let winners = draw.winners_of(agency);
        for reply in winners_replies(winners) {
            self.framed.feed(&reply).await?;
        }
        self.framed.flush().await?;
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
        warn!(
            action = action::AGENCIA_FINALIZADA,
            result = result::FAIL,
            agency,
            peer = %self.peer,
            code = %code,
            reason = reason.as_str()
        );
        self.reply_error(code, reason).await?;
        Ok(Next::Continue)
    }

    async fn reply_error(&mut self, code: ErrorCode, message: String) -> Result<(), FrameError> {
        self.framed.send(&Reply::Error { code, message }).await
    }
}

/// Compares secrets in time that depends only on their lengths, so timing
/// does not tell an attacker how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
