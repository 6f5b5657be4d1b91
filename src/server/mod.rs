//! The central: `listener.rs` accepts agencies and spawns one task per
//! connection (`handler/`); handlers hand batches to the
//! [`Store`] through their connection's session
//! (`intake.rs`, which owns the agency's claim and the batches in flight)
//! and meet at the lottery's shared state for the draw.
//!
//! Shutdown: the caller cancels the token. The accept loop stops and the
//! listener closes; each handler, cancelled through its child token, answers
//! the batches it has already read (so whatever was acknowledged is stored)
//! and closes; then the store flushes and closes.

pub mod admin;
mod guard;
mod handler;
mod intake;
mod listener;
mod strangers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::close::ClosedBy;
use crate::config::{ConfigError, Secrets, ServerConfig};
use crate::logging::{action, result};
use crate::lottery::Lottery;
use crate::model::AgencyId;
use crate::receipt::{differences, served_differences, Receipt};
use crate::store::{self, Draw, Opened, StorageError, Store};
use crate::tls::{ServerTls, TlsError};

use admin::Admin;

use listener::reserve;
pub use listener::{bind, bind_addr, fit_open_files, MIN_CONNECTIONS, RESERVED_FILES};

/// How long shutdown waits for the store to flush and close once every
/// connection is gone, before giving up on it.
pub const STORE_CLOSE_DEADLINE: Duration = Duration::from_secs(2);

/// Why the central could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The port cannot be bound (in use, or privileged).
    #[error("cannot listen on port {port}: {error}{}", bind_hint(error))]
    Bind {
        /// `server.port`.
        port: u16,
        /// Why: shown in this error's own message, so not a `source` (an
        /// error chain would say it twice).
        error: std::io::Error,
    },
    /// The store cannot be opened, or what it holds is damaged.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The secrets cannot be loaded.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The admin listener's address cannot be bound.
    #[error(
        "cannot listen on server.admin_address {address}: {error}; choose another \
         (SERVER_ADMIN_ADDRESS, --admin-address), or leave it empty to keep the admin \
         listener off"
    )]
    Admin {
        /// `server.admin_address`.
        address: std::net::SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The draw record of a finished round, or the receipts kept for
    /// agencies that resume, do not match the stored bets (or the
    /// configuration): the central refuses to serve them.
    #[error(
        "the draw record {record} (with the receipts agencies resume from) does not match the \
         stored bets, so the central refuses to serve it: {}; `lottery verify` shows the same \
         check",
        differences.join("; ")
    )]
    RecordMismatch {
        /// The record.
        record: String,
        /// Every difference found.
        differences: Vec<String>,
    },
    /// `server.close_at` is already past, and the round is neither
    /// closed nor drawn: a configuration error.
    #[error(
        "server.close_at (SERVER_CLOSE_AT, --close-at) is {close_at}, already past (now {now}): \
         set a time to come, or leave it empty and close with `lottery close`"
    )]
    CloseAtPast {
        /// The setting.
        close_at: String,
        /// The clock at start.
        now: String,
    },
}

/// What to do about a port that cannot be bound.
fn bind_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another program (another central?) listens there: stop it, or give this \
             central another server.port (SERVER_PORT, --port)"
        }
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need privileges: choose another server.port (SERVER_PORT, --port)"
        }
        _ => "",
    }
}

/// What every connection needs to know about the central's policy.
struct Settings {
    /// Time to complete a frame once started, and the TLS handshake.
    frame_timeout: Duration,
    /// Time a connection may wait with no request.
    idle_timeout: Duration,
    /// Time a new connection has to authenticate.
    auth_timeout: Duration,
    /// Connections that have not authenticated yet, within their caps.
    strangers: strangers::Strangers,
    /// Agency and operator secrets; no agency secrets when authentication
    /// is off.
    secrets: Secrets,
    /// Failed authentications per peer address: lockouts and their
    /// summary lines.
    guard: guard::Guard,
    /// Largest frame read from a peer, header included (`server.max_frame`).
    max_frame: usize,
    /// TLS, when on (with client certificates, when required).
    tls: Option<ServerTls>,
    /// What `/metrics` shows; counted whether or not the admin listener is
    /// on (atomics, once per batch).
    metrics: Arc<admin::Metrics>,
}

/// Compares a finished round's record with the stored bets (their
/// receipts and winners for the recorded number, recomputed from the bets
/// as stored, never from what the store counted) and with the configuration,
/// and the receipts the store will serve to agencies that resume (`served`,
/// kept apart from the bets by a database) with the same bets: every
/// difference, empty when they agree.
async fn check_record(
    config: &ServerConfig,
    store: &dyn Store,
    draw: &Draw,
    served: &BTreeMap<AgencyId, Receipt>,
) -> Result<Vec<String>, StorageError> {
    let found = store.recompute(draw.winning_number).await?;
    let mut differences = differences(
        draw.claimed(),
        &found,
        config.agencies,
        config.winning_number,
    );
    differences.extend(served_differences(
        store.served_from(),
        served,
        &found,
        config.agencies,
    ));
    Ok(differences)
}

/// Opens the store, then listens on `server.port` and serves agencies until
/// `shutdown` is cancelled, then closes everything in order.
///
/// On start it binds the port, so that a port in use is said before
/// anything is opened or created. Then it opens the store (repairing a
/// torn last row of the bets file, or waiting for the database), learns
/// what each agency has stored (where their uploads resume), and checks the
/// draw record if the draw already happened. Only then does it listen:
/// while a large bets file is recovered or the database is waited for, an
/// agency's connection is refused and it retries, rather than being
/// accepted by the kernel and left unanswered, which is how the design's
/// reference central answers `HELLO` and would make our agency fall back
/// to that protocol.
///
/// # Errors
/// The store, the draw record, the secrets or the TLS material cannot be
/// read, or the port cannot be bound.
pub async fn run(config: &ServerConfig, shutdown: CancellationToken) -> Result<(), ServerError> {
    let bind_error = |error| ServerError::Bind {
        port: config.port,
        error,
    };
    let socket = reserve(config).map_err(bind_error)?;
    // Up before the store opens: its probes tell "opening" from "dead".
    let admin = match config.admin_address.0 {
        Some(_) => start_admin(config, &config.load_secrets()?)?,
        None => None,
    };
    let options = config.store_options();
    let opened = tokio::select! {
        biased;
        // Signalled while still opening: nothing was served, nothing to
        // close but what the store opened (dropped with the future).
        _ = shutdown.cancelled() => return Ok(()),
        opened = store::open(&options) => opened?,
    };
    let listener = match socket.listen(config.listen_backlog) {
        Ok(listener) => listener,
        Err(error) => {
            close_store(opened.store.as_ref()).await;
            return Err(bind_error(error));
        }
    };
    serve(listener, config, opened, shutdown, admin).await
}

/// Starts the admin listener when `server.admin_address` names one.
fn start_admin(config: &ServerConfig, secrets: &Secrets) -> Result<Option<Admin>, ServerError> {
    let Some(address) = config.admin_address.0 else {
        return Ok(None);
    };
    let secrets_configured = secrets.required() || secrets.operator.is_some();
    Admin::start(address, secrets.operator.clone(), secrets_configured)
        .map(Some)
        .map_err(|error| ServerError::Admin { address, error })
}

/// [`run`] on a port the caller bound already (the demo and the tests bind
/// port 0 and hand the address to their agencies first).
///
/// # Errors
/// As [`run`].
pub async fn run_on(
    listener: TcpListener,
    config: &ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let opened = store::open(&config.store_options()).await?;
    run_with_store(listener, config, opened, shutdown).await
}

/// [`run`] over a store the caller has opened (another backend, or a test
/// double): the same central, from loading the secrets to closing the
/// store, which it does on every return.
///
/// # Errors
/// The draw record, the secrets or the TLS material cannot be read.
pub async fn run_with_store(
    listener: TcpListener,
    config: &ServerConfig,
    opened: Opened,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    serve(listener, config, opened, shutdown, None).await
}

/// [`run_with_store`], with the admin listener when [`run`] started it
/// already (otherwise started here, when configured).
async fn serve(
    listener: TcpListener,
    config: &ServerConfig,
    opened: Opened,
    shutdown: CancellationToken,
    admin: Option<Admin>,
) -> Result<(), ServerError> {
    let store = opened.store;
    let settings = match load_settings(config, &store) {
        Ok(settings) => Arc::new(settings),
        Err(e) => {
            close_store(store.as_ref()).await;
            return Err(e);
        }
    };
    let admin = match admin {
        Some(admin) => Some(admin),
        None => match start_admin(config, &settings.secrets) {
            Ok(admin) => admin,
            Err(e) => {
                close_store(store.as_ref()).await;
                return Err(e);
            }
        },
    };
    announce_authentication(config, &settings.secrets);
    let draw = match store.load_draw().await {
        Ok(draw) => draw,
        Err(e) => {
            close_store(store.as_ref()).await;
            return Err(e.into());
        }
    };
    if let Some(draw) = &draw {
        // Recomputed from the bets, never trusted: a record edited (or a
        // row added or changed) after the draw is refused here.
        let differences = match check_record(config, store.as_ref(), draw, &opened.stored).await {
            Ok(differences) => differences,
            Err(e) => {
                close_store(store.as_ref()).await;
                return Err(e.into());
            }
        };
        if !differences.is_empty() {
            close_store(store.as_ref()).await;
            return Err(ServerError::RecordMismatch {
                record: config.draw_record_shown(),
                differences,
            });
        }
        info!(
            action = action::VERIFY,
            result = result::SUCCESS,
            seal = %draw.seal,
            bets = draw.bets,
            record = %config.draw_record_shown()
        );
        // Not `sorteo`: that is logged once, by the central that drew. A
        // WARN, because an operator who meant to start a new round is about
        // to serve an old one.
        warn!(
            action = action::DRAW_RECORD,
            result = result::SUCCESS,
            state = "already_drawn",
            drawn_at = draw.drawn_at.as_str(),
            bets = draw.bets,
            winning_number = draw.winning_number,
            record = %config.draw_record_shown(),
            storage = %store.describe(),
            seal = %draw.seal,
            message = "this round is already drawn: the central only serves its winners and \
                       refuses new bets; to start a new round, stop the central and run \
                       `lottery new-round` (it keeps this round's files, named by round and seal)"
        );
    }
    let closed = match store.load_close().await {
        Ok(closed) => closed,
        Err(e) => {
            close_store(store.as_ref()).await;
            return Err(e.into());
        }
    };
    if let (Some(at), None, None) = (config.close_at.0, &closed, &draw) {
        let now = chrono::Utc::now();
        if at <= now {
            close_store(store.as_ref()).await;
            return Err(ServerError::CloseAtPast {
                close_at: config.close_at.show(),
                now: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            });
        }
    }
    let drawn = draw.is_some();
    let lottery = Lottery::new(
        config.agencies,
        config.winning_number,
        store.clone(),
        opened.stored,
        draw,
    );
    if let Some(closed) = closed {
        if !drawn {
            // Closed before a restart, not drawn yet: the draw runs now.
            warn!(
                action = action::CIERRE,
                result = result::SUCCESS,
                state = "closed_before_start",
                by = %closed.close.by,
                at = closed.close.at.as_str(),
                reason = closed.close.reason.as_str(),
                message = "sales were closed before this start and the round is not drawn: \
                           drawing now over the bets stored"
            );
        }
        lottery.closed_by_store(closed, false);
    }
    // Ready before the `listen` line: a probe that follows the log never
    // sees a central that says it listens yet answers not ready.
    if let Some(admin) = &admin {
        admin.ready(admin::Live {
            lottery: lottery.clone(),
            metrics: settings.metrics.clone(),
            store: match store.clone().into_shared() {
                Some(shared) => admin::StoreView::Database {
                    url: store.describe(),
                    store: shared,
                },
                None => admin::StoreView::File(store.describe()),
            },
        });
    }

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
        client_certificates = settings
            .tls
            .as_ref()
            .is_some_and(ServerTls::requires_client_certificates),
        secrets = settings.secrets.agencies.len(),
        max_connections = config.max_connections,
        max_unauthenticated = settings.strangers.total().min(config.max_connections),
        max_unauthenticated_per_address = config.max_unauthenticated_per_address
    );

    // Summary lines of failed authentications, until the last connection
    // is gone (then whatever is left is logged).
    let reports_done = CancellationToken::new();
    let reports = tokio::spawn({
        let guard = settings.guard.clone();
        let done = reports_done.clone();
        async move { guard.report_until(done).await }
    });
    // Which agencies a waiting draw waits for, once a minute, until the
    // draw or shutdown.
    let draw_waiting = tokio::spawn({
        let lottery = lottery.clone();
        let done = reports_done.clone();
        async move {
            lottery
                .report_waiting(crate::lottery::DRAW_WAITING_EVERY, done)
                .await
        }
    });
    // Sales close by themselves at `server.close_at`, if set and not
    // closed yet.
    let close_timer = config.close_at.0.map(|at| {
        let lottery = lottery.clone();
        let done = reports_done.clone();
        let shown = config.close_at.show();
        tokio::spawn(async move { close_at(lottery, at, shown, done).await })
    });
    let accept_loop = listener::Listener {
        listener,
        store: store.clone(),
        lottery: lottery.clone(),
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
    if let Some(admin) = &admin {
        admin.stopping();
    }
    connections.cancel();

    tracker.close();
    let grace_ends = tokio::time::Instant::now() + config.shutdown_deadline();
    if tokio::time::timeout_at(grace_ends, tracker.wait())
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
    reports_done.cancel();
    let _ = reports.await;
    // Aborted, not awaited: its look at a hung database must not hold
    // shutdown.
    draw_waiting.abort();
    if let Some(timer) = close_timer {
        timer.abort();
    }
    // A draw under way is recorded and published before the store closes,
    // within what is left of the grace period; one abandoned after it left
    // either its whole record or none (the record is written atomically),
    // and a restart serves or runs it.
    if tokio::time::timeout_at(grace_ends, lottery.close())
        .await
        .is_err()
    {
        warn!(
            action = action::SHUTDOWN,
            result = result::IN_PROGRESS,
            reason = "abandoning the draw still under way after the grace period"
        );
    }
    // Every handler is gone: the store takes what they submitted, flushes
    // and closes.
    close_store(store.as_ref()).await;
    if let Some(admin) = admin {
        admin.close().await;
    }
    Ok(())
}

/// Closes sales at `at` (`server.close_at`, `shown` as set), unless they
/// are closed or drawn by then, or `done` fires first. A close the store
/// could not keep is tried again every second.
async fn close_at(
    lottery: Lottery,
    at: chrono::DateTime<chrono::Utc>,
    shown: String,
    done: CancellationToken,
) {
    loop {
        // Tokio's clock is monotonic; the setting is wall-clock time: wake
        // at the time it names, looking again if woken early.
        let wait = (at - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            break;
        }
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    loop {
        if lottery.closed().is_some() || lottery.draw().is_some() {
            return;
        }
        let reason = format!("server.close_at = {shown}");
        match lottery
            .close_sales(ClosedBy::CloseAt, reason, "server.close_at")
            .await
        {
            // Closed (or closed first by another central, or drawn).
            Ok(_) | Err(crate::lottery::LotteryError::CloseRefused(_)) => return,
            // Logged by the lottery; tried again.
            Err(_) => {}
        }
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Closes the store, giving up after [`STORE_CLOSE_DEADLINE`] so that
/// storage stuck in a system call cannot hold the process past its grace
/// period. Giving up loses nothing acknowledged: a batch is acknowledged
/// only once stored (and synced, unless syncing is off).
async fn close_store(store: &dyn Store) {
    if tokio::time::timeout(STORE_CLOSE_DEADLINE, store.close())
        .await
        .is_err()
    {
        error!(
            action = store.close_action(),
            result = result::FAIL,
            reason = %format!(
                "the store did not close within {} s; giving up on it (everything acknowledged was already stored)",
                STORE_CLOSE_DEADLINE.as_secs()
            ),
            store = %store.describe()
        );
    }
}

/// Says at start how connections authenticate: a WARN when any agency can
/// act without a secret (anyone who reaches the port can then upload its
/// bets, announce it finished and read its winners). Not a `fail` line:
/// nothing went wrong, but an operator must know.
fn announce_authentication(config: &ServerConfig, secrets: &Secrets) {
    let open = config.agencies_without_secret(secrets);
    if open.is_empty() {
        info!(
            action = action::AUTH,
            result = result::SUCCESS,
            state = "required",
            agencies = config.agencies,
            client_certificates = config.requires_client_certificates(),
            operator_session = secrets.operator.is_some()
        );
        return;
    }
    let ids: Vec<String> = open.iter().map(ToString::to_string).collect();
    warn!(
        action = action::AUTH,
        result = result::SUCCESS,
        state = "off",
        agencies_without_secret = ids.join(","),
        message = "anyone who reaches this port can upload bets for these agencies, announce \
                   them finished and read their winners; give every agency a secret \
                   (server.secrets_file; lottery compose writes one)"
    );
}

/// Timeouts, secrets and TLS, from the configuration.
fn load_settings(config: &ServerConfig, store: &Arc<dyn Store>) -> Result<Settings, ServerError> {
    let shared = store.clone().into_shared();
    Ok(Settings {
        metrics: Arc::new(admin::Metrics::new(
            store.as_ref(),
            shared
                .as_ref()
                .map(|s| s.as_ref() as &dyn store::SharedStore),
        )),
        frame_timeout: config.frame_deadline(),
        idle_timeout: config.idle_deadline(),
        auth_timeout: config.auth_deadline(),
        strangers: strangers::Strangers::new(
            config.max_unauthenticated_per_address,
            strangers::cap(config.max_connections, config.agencies),
        ),
        max_frame: config.max_frame,
        secrets: config.load_secrets()?,
        guard: guard::Guard::default(),
        tls: if config.tls_enabled() {
            let client_ca = config.requires_client_certificates();
            Some(ServerTls::new(
                &config.tls_cert,
                &config.tls_key,
                client_ca.then_some(config.tls_client_ca.as_path()),
            )?)
        } else {
            None
        },
    })
}
