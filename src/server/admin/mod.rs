//! The admin listener: a port of its own (`server.admin_address`, off by
//! default), never the agencies', serving operators and their tools over
//! HTTP/1.1: `/metrics` (Prometheus), the status page `/` (and its live
//! part, `/live`), and the probes `/healthz` and `/readyz`.
//!
//! The pages ask for the operator's secret (as a bearer token, or as the
//! password of basic authentication, any user name) whenever the central
//! has secrets; the probes never do. It starts before the store opens, so a
//! probe can tell "alive, still opening" (`/readyz` 503) from "dead";
//! ready means the store is open and the agencies' port is listening.

pub mod metrics;
mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::logging::{action, result};
use crate::lottery::Lottery;
use crate::store::SharedStore;

pub use metrics::Metrics;

/// What the pages show once the central is ready.
#[derive(Debug)]
pub struct Live {
    /// The lottery's state.
    pub lottery: Lottery,
    /// The counters.
    pub metrics: Arc<Metrics>,
    /// Where the bets are.
    pub store: StoreView,
}

/// The store, as the status page shows it.
#[derive(Debug)]
pub enum StoreView {
    /// The bets file, at this path.
    File(String),
    /// A database, shared with any other centrals.
    Database {
        /// Its URL, without the password.
        url: String,
        /// The store, asked which server its writer reached.
        store: Arc<dyn SharedStore>,
    },
}

/// Shared by every request.
#[derive(Debug)]
struct Shared {
    /// Set once: the store is open and the agencies' port listens.
    live: OnceLock<Live>,
    /// Set when shutdown starts: `/readyz` answers 503 from then on.
    stopping: AtomicBool,
    /// What the pages require.
    access: Access,
}

/// Who may read the pages.
#[derive(Debug)]
enum Access {
    /// The central has no secrets at all: anyone who reaches the port.
    Open,
    /// Whoever presents the operator's secret.
    Operator(String),
    /// The central has agencies' secrets but no operator's: nobody.
    Closed,
}

/// The admin listener, running.
#[derive(Debug)]
pub struct Admin {
    shared: Arc<Shared>,
    /// Stops the server; cancelled on drop too, so an early return of the
    /// central leaves nothing serving.
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The content type of `/metrics`: OpenMetrics text, which Prometheus reads.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Admin {
    /// Binds `address` and serves it. `operator` is the operator's secret;
    /// `secrets` whether the central has any secrets at all. Logs where it
    /// listens, with a WARN when it is reachable beyond this machine and
    /// open to anyone.
    ///
    /// # Errors
    /// The address cannot be bound.
    pub fn start(
        address: SocketAddr,
        operator: Option<String>,
        secrets: bool,
    ) -> std::io::Result<Admin> {
        let socket = std::net::TcpListener::bind(address)?;
        socket.set_nonblocking(true)?;
        let listener = TcpListener::from_std(socket)?;
        let local = listener.local_addr()?;
        let access = match (operator, secrets) {
            (Some(secret), _) => Access::Operator(secret),
            (None, false) => Access::Open,
            (None, true) => Access::Closed,
        };
        let guarded = !matches!(access, Access::Open);
        if guarded || local.ip().is_loopback() {
            info!(
                action = action::ADMIN,
                result = result::SUCCESS,
                address = %local,
                operator_secret = matches!(access, Access::Operator(_))
            );
        } else {
            warn!(
                action = action::ADMIN,
                result = result::SUCCESS,
                address = %local,
                operator_secret = false,
                message = "the admin listener is reachable beyond this machine and asks for no \
                           secret: anyone who reaches it sees the metrics and the status page; \
                           give the central an operator secret (`operator` in \
                           server.secrets_file; lottery secrets writes one), or bind it to \
                           127.0.0.1"
            );
        }
        let shared = Arc::new(Shared {
            live: OnceLock::new(),
            stopping: AtomicBool::new(false),
            access,
        });
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/", get(status::page))
            .route("/live", get(status::part))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = crate::task::spawn_named("admin", async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(e) = served {
                error!(action = action::CLOSE_ADMIN, result = result::FAIL, error = %e);
            }
        });
        Ok(Admin {
            shared,
            stop,
            task: Some(task),
        })
    }

    /// The central is ready: the pages show `live` from now on.
    pub fn ready(&self, live: Live) {
        let _ = self.shared.live.set(live);
    }

    /// Shutdown has started: `/readyz` turns 503 at once, the pages keep
    /// answering until [`Admin::close`].
    pub fn stopping(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
    }

    /// Stops serving (requests under way finish) and says so.
    pub async fn close(mut self) {
        self.stopping();
        self.stop.cancel();
        if let Some(mut task) = self.task.take() {
            // A client that keeps a connection open must not hold shutdown.
            if tokio::time::timeout(std::time::Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        info!(action = action::CLOSE_ADMIN, result = result::SUCCESS);
    }
}

/// Alive: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready: the store is open, the agencies' port listens, and shutdown has
/// not started.
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.stopping.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match shared.live.get() {
        Some(_) => "ready\n".into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: the store is not open yet\n",
        )
            .into_response(),
    }
}

/// The Prometheus metrics.
async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let live = match shared.guard(&headers) {
        Ok(live) => live,
        Err(refusal) => return refusal.into_response(),
    };
    let body = live.metrics.render(&live.lottery);
    ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response()
}

impl Shared {
    /// The live state, for a request that presents what the pages require;
    /// otherwise why not.
    fn guard(&self, headers: &HeaderMap) -> Result<&Live, Refusal> {
        match &self.access {
            Access::Open => {}
            Access::Closed => return Err(Refusal::Closed),
            Access::Operator(secret) => {
                if !presented(headers).is_some_and(|given| same(given.as_bytes(), secret)) {
                    return Err(Refusal::Unauthorized);
                }
            }
        }
        self.live.get().ok_or(Refusal::Starting)
    }
}

/// Why a page is not shown.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// The central has agencies' secrets but no operator's.
    Closed,
    /// The operator's secret is missing or wrong.
    Unauthorized,
    /// The store is not open yet.
    Starting,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Closed => (
                StatusCode::FORBIDDEN,
                "this central has agencies' secrets but no operator secret, so its pages are \
                 closed to everyone: add `operator` to server.secrets_file\n",
            )
                .into_response(),
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"lottery central\", charset=\"UTF-8\"",
                )],
                "the operator's secret is required: as a bearer token, or as the password of \
                 basic authentication (any user name)\n",
            )
                .into_response(),
            Refusal::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: the store is not open yet\n",
            )
                .into_response(),
        }
    }
}

/// The secret a request presents: `Bearer SECRET`, or basic
/// authentication's password.
fn presented(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_string());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text
            .split_once(':')
            .map(|(_, password)| password.to_string());
    }
    None
}

/// Compares secrets in time that depends only on their lengths.
fn same(given: &[u8], secret: &str) -> bool {
    let secret = secret.as_bytes();
    given.len() == secret.len()
        && given
            .iter()
            .zip(secret)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn the_secret_comes_as_a_bearer_token_or_a_basic_password() {
        assert_eq!(presented(&with("Bearer s3cret")).as_deref(), Some("s3cret"));
        // "ops:s3cret"
        assert_eq!(
            presented(&with("Basic b3BzOnMzY3JldA==")).as_deref(),
            Some("s3cret")
        );
        assert_eq!(presented(&with("Digest x")), None);
        assert_eq!(presented(&HeaderMap::new()), None);
        assert!(same(b"s3cret", "s3cret"));
        assert!(!same(b"s3creT", "s3cret"));
        assert!(!same(b"s3cre", "s3cret"));
    }
}
