//! Operator tools: the health probe, the live status view, and the winners
//! table read back from the recorded draw (the draw record, or the
//! database's tables).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

use crate::close::SalesClose;
use crate::config::{AgencyConfig, ServerConfig};
use crate::store::file::load_record;
use crate::store::{self, Draw, Storage};
use crate::tls::{self, BoxedIo};
use crate::wire::{AgencyCodec, FrameError};
use crate::wire::{AgencyState, ErrorCode, Reply, Request};

/// Where the central is and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port`.
    pub address: String,
    /// The agency's TLS settings (CA, server name, client certificate),
    /// when the central speaks TLS.
    pub tls: Option<AgencyConfig>,
    /// How long the whole exchange may take.
    pub timeout: Duration,
    /// Opens an operator session first, when the central requires
    /// secrets: `operator` in the central's secrets (`server.secrets_file`).
    pub operator_secret: Option<String>,
}

impl Target {
    /// `address`, else the agency's configured central (the first of a
    /// list: a probe asks one central), over TLS when the agency is
    /// configured for it; `timeout` at least one second.
    pub fn for_agency(agency: &AgencyConfig, address: Option<String>, timeout: Duration) -> Target {
        let address = address.unwrap_or_else(|| agency.server_address.first().to_string());
        let tls = (!agency.tls_ca.as_os_str().is_empty()).then(|| agency.clone());
        Target {
            address,
            tls,
            timeout: timeout.max(Duration::from_secs(1)),
            operator_secret: None,
        }
    }
}

/// Where the probed address comes from, for messages.
const ADDRESS_FROM: &str =
    "the address is --address, else the first of agency.server_address (CLI_SERVER_ADDRESS)";

/// A connection to the central, opened as the operator's session when
/// `target` has the operator's secret (as `status` and `close` need it
/// where secrets are configured).
async fn operator_session(target: &Target) -> anyhow::Result<Framed<BoxedIo, AgencyCodec>> {
    let mut framed = connect(target).await?;
    if let Some(secret) = &target.operator_secret {
        let hello = Request::OperatorHello {
            secret: Some(secret.clone()),
        };
        framed.send(&hello).await?;
        match next_reply(&mut framed).await? {
            Reply::Success { .. } => {}
            Reply::Error { code, message } => {
                anyhow::bail!("the central refused the operator secret: {code}: {message}")
            }
            other => return Err(unexpected("HELLO", other)),
        }
    }
    Ok(framed)
}

async fn connect(target: &Target) -> anyhow::Result<Framed<BoxedIo, AgencyCodec>> {
    let stream = TcpStream::connect(&target.address).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the central at {}: {e}; {}; {ADDRESS_FROM}",
            target.address,
            crate::agency::unreachable_hint(&e)
        )
    })?;
    stream.set_nodelay(true)?;
    let io: BoxedIo = match &target.tls {
        None => Box::new(stream),
        Some(agency) => {
            // The certificate's name follows the address actually probed.
            let tls = crate::agency::client_tls(agency, &target.address)?.expect("tls_ca is set");
            tls.connect(stream).await?
        }
    };
    Ok(Framed::new(io, AgencyCodec::new()))
}

/// The next reply, refusals included: the caller knows which refusals it
/// can act on (see [`unexpected`] for the rest).
async fn next_reply(framed: &mut Framed<BoxedIo, AgencyCodec>) -> anyhow::Result<Reply> {
    match framed.next().await {
        Some(Ok(Ok(reply))) => Ok(reply),
        Some(Ok(Err(e))) => anyhow::bail!("unreadable reply: {e}"),
        Some(Err(FrameError::TlsRecord)) => anyhow::bail!(tls::central_speaks_tls()),
        Some(Err(e)) => Err(e.into()),
        None => anyhow::bail!("the central closed the connection"),
    }
}

/// A reply the exchange cannot go on with: a refusal said as the central
/// said it, anything else shown as it came.
fn unexpected(answering: &str, reply: Reply) -> anyhow::Error {
    match reply {
        Reply::Error { code, message } => anyhow::anyhow!("the central refused: {code}: {message}"),
        other => anyhow::anyhow!("unexpected answer to {answering}: {other:?}"),
    }
}

fn no_answer(target: &Target) -> anyhow::Error {
    anyhow::anyhow!(
        "the central at {} did not answer within {} s: is that the central's address, \
         and is it serving? {ADDRESS_FROM}; --timeout waits longer",
        target.address,
        target.timeout.as_secs()
    )
}

/// Whether `reply` refuses a connection for its authentication: from a
/// central that requires secrets, to a probe that has none (or a wrong one).
fn refused_for_authentication(reply: &Reply) -> bool {
    matches!(
        reply,
        Reply::Error {
            code: ErrorCode::Unauthenticated | ErrorCode::AuthThrottled,
            ..
        }
    )
}

/// Sends `PING` (in an operator session, when the target has the
/// operator's secret) and expects `pong`.
///
/// A central that requires secrets answers a probe without a good one
/// `UNAUTHENTICATED` (or `AUTH_THROTTLED`): that too proves it up, since it
/// accepted the connection, read a whole frame, parsed it and answered in
/// protocol; and a health check that needs no secret can be run by anything
/// (the compose health check, a load balancer) without handing it one.
///
/// # Errors
/// The central is unreachable, slow, or answers something else.
pub async fn health(target: &Target) -> anyhow::Result<()> {
    let exchange = async {
        let mut framed = connect(target).await?;
        if let Some(secret) = &target.operator_secret {
            let hello = Request::OperatorHello {
                secret: Some(secret.clone()),
            };
            framed.send(&hello).await?;
            match next_reply(&mut framed).await? {
                Reply::Success { .. } => {}
                reply if refused_for_authentication(&reply) => return Ok(()),
                other => return Err(unexpected("HELLO", other)),
            }
        }
        framed.send(&Request::Ping).await?;
        match next_reply(&mut framed).await? {
            Reply::Success { message, .. } if message == "pong" => Ok(()),
            reply if refused_for_authentication(&reply) => Ok(()),
            other => Err(unexpected("PING", other)),
        }
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .map_err(|_| no_answer(target))?
}

/// The central's view: agencies configured, whether drawn, per-agency state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    /// Agencies configured.
    pub agencies: u32,
    /// The draw is done.
    pub drawn: bool,
    /// Agencies that hold bets or have finished.
    pub states: Vec<AgencyState>,
    /// The close of sales, once they are closed.
    pub close: Option<SalesClose>,
}

/// Asks the central for its status (all frames of it).
///
/// # Errors
/// The central is unreachable, slow, or answers something else.
pub async fn status(target: &Target) -> anyhow::Result<StatusView> {
    let exchange = async {
        let mut framed = operator_session(target).await?;
        framed.send(&Request::Status).await?;
        let mut view = StatusView {
            agencies: 0,
            drawn: false,
            states: Vec::new(),
            close: None,
        };
        loop {
            match next_reply(&mut framed).await? {
                Reply::Status {
                    agencies,
                    drawn,
                    states,
                    close,
                    more,
                } => {
                    view.agencies = agencies;
                    view.drawn = drawn;
                    view.close = close;
                    view.states.extend(states);
                    if !more {
                        return Ok(view);
                    }
                }
                Reply::Error {
                    code: ErrorCode::Unauthenticated,
                    message,
                } => anyhow::bail!(
                    "the central requires authentication ({message}): give `lottery status` \
                     the operator's secret, `operator = \"…\"` in the file SERVER_SECRETS_FILE \
                     names (server.secrets_file), as on the central"
                ),
                other => return Err(unexpected("STATUS", other)),
            }
        }
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .map_err(|_| no_answer(target))?
}

/// Closes sales now (`CLOSE`, in an operator session when the target has
/// the operator's secret), for `reason`; returns the central's answer.
///
/// # Errors
/// The central is unreachable or slow, or refuses: sales closed already,
/// the round drawn, no operator session where secrets are required.
pub async fn close(target: &Target, reason: &str) -> anyhow::Result<String> {
    let exchange = async {
        let mut framed = operator_session(target).await?;
        let request = Request::Close {
            reason: reason.to_string(),
        };
        framed.send(&request).await?;
        match next_reply(&mut framed).await? {
            Reply::Success { message, .. } => Ok(message),
            Reply::Error {
                code: ErrorCode::Unauthenticated,
                message,
            } => anyhow::bail!(
                "the central requires the operator's secret to close sales ({message}): \
                 `operator = \"…\"` in the file SERVER_SECRETS_FILE names \
                 (server.secrets_file), as on the central"
            ),
            other => Err(unexpected("CLOSE", other)),
        }
    };
    tokio::time::timeout(target.timeout, exchange)
        .await
        .map_err(|_| no_answer(target))?
}

/// Renders a status view as a table, every configured agency listed.
pub fn render_status(view: &StatusView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>6}  {:>10}  state", "agency", "bets held");
    let mut total = 0;
    for agency in 1..=view.agencies {
        let state = view.states.iter().find(|s| s.agency == agency);
        let held = state.map_or(0, |s| s.held);
        total += held;
        let label = match state {
            Some(s) if s.finished => "finished",
            // Sales closed before it finished: its bets held are all it has.
            _ if view.close.is_some() => "closed",
            Some(s) if s.held > 0 => "uploading",
            _ => "waiting",
        };
        let _ = writeln!(out, "{agency:>6}  {held:>10}  {label}");
    }
    let finished = view.states.iter().filter(|s| s.finished).count();
    let _ = writeln!(out, "{:>6}  {total:>10}", "total");
    match &view.close {
        Some(close) => {
            let _ = writeln!(out, "{close}");
        }
        None if !view.drawn => {
            let _ = writeln!(out, "sales open");
        }
        None => {}
    }
    let _ = writeln!(
        out,
        "{finished} of {} agencies finished; draw {}",
        view.agencies,
        if view.drawn { "done" } else { "pending" }
    );
    out
}

/// The per-agency winners table of the recorded draw: from the draw record
/// at `record` when one is named, else from where `server.storage` keeps
/// the draw (the draw record beside the bets file, checked against its
/// ledger, or the database's tables `draw` and `draw_agencies`), read as
/// `lottery verify` reads it. Read only: nothing is created, migrated or
/// repaired.
///
/// # Errors
/// No draw is recorded there yet, or it cannot be read (a sealed round's
/// record missing or replaced included), or the database cannot be
/// reached.
pub async fn winners(config: &ServerConfig, record: Option<&Path>) -> anyhow::Result<String> {
    let (draw, missing) = match record {
        Some(path) => (
            load_record(path)
                .with_context(|| format!("reading the draw record {}", path.display()))?,
            format!("no draw record at {}", path.display()),
        ),
        None => (
            store::Reader::open(&config.store_options())
                .await?
                .load_draw()
                .await?,
            match &config.storage {
                Storage::File(_) => format!("no draw record at {}", config.draw_record_shown()),
                // Shown without its password.
                Storage::Postgres(_) => format!(
                    "no draw recorded in the database {} (tables draw and draw_agencies)",
                    config.storage
                ),
            },
        ),
    };
    let Some(draw) = draw else {
        anyhow::bail!("{missing}: the draw has not happened yet");
    };
    Ok(render_winners(&draw))
}

/// Renders the per-agency winners table of a recorded draw, whichever
/// store recorded it.
pub fn render_winners(draw: &Draw) -> String {
    let mut agencies: Vec<u32> = draw.receipts.keys().copied().collect();
    agencies.extend(draw.winners.keys().copied());
    agencies.sort_unstable();
    agencies.dedup();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "draw of {} (winning number {}), {} bets, seal {}",
        draw.drawn_at, draw.winning_number, draw.bets, draw.seal
    );
    let _ = writeln!(
        out,
        "{:>6}  {:>10}  {:>7}  winning documents",
        "agency", "bets", "winners"
    );
    for agency in agencies {
        let winners = draw.winners_of(agency);
        let bets = draw.receipt_of(agency).count;
        let docs = if winners.is_empty() {
            "-".to_string()
        } else {
            winners.join(", ")
        };
        let _ = writeln!(out, "{agency:>6}  {bets:>10}  {:>7}  {docs}", winners.len());
    }
    out
}
