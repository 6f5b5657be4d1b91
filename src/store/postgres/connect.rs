//! Reaching the database: one connection opened and prepared for its job,
//! and the patient wait for the database at start.

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use tracing::{error, info, warn};

use super::error::{describe, ConnectError};
use crate::logging::{action, result};
use crate::store::{Durability, PgTarget};

/// How long one attempt to connect may take before it counts as failed.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection whose other end vanished (a central or a database cut off
/// by the network, its host gone without closing anything) is given up on
/// after about 15 s by both ends: TCP keepalives after 5 s of silence, every
/// 2 s, 3 unanswered; and 15 s for data sent and never acknowledged.
///
/// Both ends matter. The central learns that its group failed, answers
/// `STORAGE_FAILED` and connects again, instead of waiting forever on a
/// reply. The database's backend, waiting for a vanished central's next
/// message inside a group's transaction, aborts it and releases the rows
/// it locked: without that, every other central's group for those agencies
/// would wait on the lock for as long as the server's own keepalives allow
/// (two hours by default), and the agencies could finish nowhere.
pub(super) const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
pub(super) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
pub(super) const KEEPALIVE_RETRIES: u32 = 3;
pub(super) const UNACKNOWLEDGED_LIMIT: Duration = Duration::from_secs(15);

/// The connection settings of every connection a central or a tool opens
/// to `target`: its URL's, plus the time limits above on both ends.
pub(super) fn client_config(target: &PgTarget) -> tokio_postgres::Config {
    let mut config = target.config().clone();
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_application_name().is_none() {
        config.application_name("lottery");
    }
    config
        .keepalives(true)
        .keepalives_idle(KEEPALIVE_IDLE)
        .keepalives_interval(KEEPALIVE_INTERVAL)
        .keepalives_retries(KEEPALIVE_RETRIES)
        .tcp_user_timeout(UNACKNOWLEDGED_LIMIT);
    // The backend's side, as session settings sent with the login (any
    // `options` of the URL are kept, before these).
    let server = format!(
        "-c tcp_keepalives_idle={} -c tcp_keepalives_interval={} -c tcp_keepalives_count={} \
         -c tcp_user_timeout={}",
        KEEPALIVE_IDLE.as_secs(),
        KEEPALIVE_INTERVAL.as_secs(),
        KEEPALIVE_RETRIES,
        UNACKNOWLEDGED_LIMIT.as_millis()
    );
    let options = match config.get_options() {
        Some(given) if !given.is_empty() => format!("{given} {server}"),
        _ => server,
    };
    config.options(&options);
    config
}

/// The first wait between attempts to reach the database at start; each
/// failure doubles it, up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(200);
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What every connection sets up before its first statement.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionSettings {
    /// Whether a commit waits for its WAL to reach stable storage.
    pub(super) durability: Durability,
}

/// Why a connection was refused before the server was asked anything more:
/// the database asks for something the URL does not give (a password), as
/// an operator needs it said; `None` for any other failure.
pub(super) fn configuration_error(e: &tokio_postgres::Error) -> Option<String> {
    // tokio-postgres's configuration errors have no kind to match on; their
    // text starts with this.
    if !e.to_string().starts_with("invalid configuration") {
        return None;
    }
    let cause = std::error::Error::source(e).map(ToString::to_string);
    if cause.as_deref() != Some("password missing") {
        return Some(format!("{e}: {}", cause.unwrap_or_default()));
    }
    let pgpassword = if std::env::var_os("PGPASSWORD").is_some() {
        " (PGPASSWORD is set, but this program reads neither it nor ~/.pgpass)"
    } else {
        " (this program reads neither PGPASSWORD nor ~/.pgpass)"
    };
    Some(format!(
        "the database asks for a password and the storage URL gives none{pgpassword}: put it \
         in the URL, postgres://USER:PASSWORD@HOST/DB or ?password=PASSWORD"
    ))
}

/// Whether a failed connection attempt is worth repeating (see
/// [`ConnectError::retry`]).
pub(super) fn worth_retrying(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(code) => {
            *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                // Class 08: connection exceptions.
                || code.code().starts_with("08")
        }
    }
}

/// Opens one connection to `target` and prepares it for `session`.
pub(crate) async fn connect(
    target: &PgTarget,
    settings: ConnectionSettings,
) -> Result<Client, ConnectError> {
    let config = client_config(target);
    let failed = |e: tokio_postgres::Error| match configuration_error(&e) {
        Some(reason) => ConnectError {
            retry: false,
            configuration: true,
            reason,
        },
        None => ConnectError {
            retry: worth_retrying(&e),
            configuration: false,
            reason: describe(&e),
        },
    };
    let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
    let shown = target.to_string();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            warn!(
                action = action::DATABASE_CONNECT,
                result = result::FAIL,
                storage = shown.as_str(),
                error = describe(&e).as_str(),
                state = "lost"
            );
        }
    });
    // Whatever the database's default: a batch is acknowledged only once
    // its commit is on disk (unless durability was turned off on purpose).
    let commit = match settings.durability {
        Durability::Sync => "on",
        Durability::NoSync => "off",
    };
    client
        .batch_execute(&format!("SET synchronous_commit = {commit}"))
        .await
        .map_err(failed)?;
    Ok(client)
}

/// `host:port,…/dbname`: where the database is, for messages (never the
/// password).
pub(super) fn where_(target: &PgTarget) -> String {
    format!(
        "{}/{}",
        target.hosts(),
        target.config().get_dbname().unwrap_or("")
    )
}

/// Connects, retrying with doubling waits until `patience` runs out; logs
/// each failed attempt as `in_progress` so an operator sees what it waits
/// for. A refused login is not retried.
/// Why [`reach`] gave up.
pub(super) enum Unreached {
    /// The configuration lacks what the database asks for.
    Configuration(String),
    /// Refused, or unreachable for the whole patience.
    Failed(String),
}

pub(super) async fn reach(
    target: &PgTarget,
    settings: ConnectionSettings,
    patience: Duration,
) -> Result<Client, Unreached> {
    let deadline = Instant::now() + patience;
    let mut backoff = FIRST_BACKOFF;
    let mut attempt = 1u32;
    loop {
        match connect(target, settings).await {
            Ok(client) => {
                info!(
                    action = action::DATABASE_CONNECT,
                    result = result::SUCCESS,
                    storage = %target,
                    attempt
                );
                return Ok(client);
            }
            Err(ConnectError {
                reason: why,
                retry,
                configuration,
            }) => {
                let now = Instant::now();
                if !retry {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    if configuration {
                        return Err(Unreached::Configuration(why));
                    }
                    return Err(Unreached::Failed(format!("refused the connection: {why}")));
                }
                if now >= deadline {
                    error!(
                        action = action::DATABASE_CONNECT,
                        result = result::FAIL,
                        storage = %target,
                        attempt,
                        error = why.as_str()
                    );
                    return Err(Unreached::Failed(format!(
                        "unreachable for {} s ({attempt} attempts): {why}",
                        patience.as_secs()
                    )));
                }
                let wait = backoff.min(deadline - now);
                warn!(
                    action = action::DATABASE_CONNECT,
                    result = result::IN_PROGRESS,
                    storage = %target,
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    error = why.as_str()
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}
