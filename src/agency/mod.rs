//! One betting agency: streams its data file to the central in batches,
//! announces that it finished, and waits for its winners.
//!
//! A reader thread turns the CSV file into batches (never holding the whole
//! file); the async side sends each batch, waits for its acknowledgement,
//! then sends the next. Batches hold at most `batch_max_amount` bets and are
//! cut early so each fits in one frame.
//!
//! The upload survives the central: each connection opens with `HELLO`, the
//! central answers how many of this agency's bets it holds, and the agency
//! continues from the next bet of its file. Every batch says where it starts
//! (`FIRST`), so a batch resent after a lost acknowledgement is not stored
//! twice. When the connection breaks the agency reconnects with backoff, and
//! gives up only after `reconnect_timeout` seconds without progress.
//!
//! `server_address` may list several centrals sharing one database. The
//! agency stays on the one that answers and, when its connection fails,
//! moves on to the next in the list, where `HELLO` tells it what *that*
//! central holds: resuming there is as safe as on the same central
//! (`Centrals`).

mod mismatches;
mod reader;
mod records;
mod seal;
mod session;

use std::fs::File;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::tls::{self, BoxedIo, ClientTls, TlsError};
use crate::wire::{ErrorCode, FrameError};

use session::{session, Protocol, SessionEnd};

/// First wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What a completed agency run learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyReport {
    /// The agency.
    pub agency: AgencyId,
    /// Bets the central holds for this agency at the end (all of its file).
    pub bets: u64,
    /// Batches sent by this run.
    pub batches: u64,
    /// Connections this run needed beyond the first.
    pub reconnects: u64,
    /// This agency's winner documents, as the central sent them.
    pub winners: Vec<String>,
    /// Microseconds from sending each batch to its acknowledgement.
    pub ack_latencies_us: Vec<u32>,
    /// Sales closed before the central stored the whole data file: the
    /// winners are over the `bets` it stored, of this many in the file.
    pub closed_short: Option<u64>,
    /// The bets the central held for this agency when this run first asked
    /// (`HELLO`): 0 when the round began anew for it.
    pub held_at_start: Option<u64>,
}

/// Why an agency run failed.
#[derive(Debug, thiserror::Error)]
pub enum AgencyError {
    /// The data file cannot be opened.
    #[error("cannot open data file {path}: {source}")]
    OpenData {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line of the data file is not a valid bet.
    #[error("{path}, line {line}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The central cannot be reached (retried).
    #[error("cannot connect to {address}: {source}; {}", unreachable_hint(.source))]
    Connect {
        /// The configured address.
        address: String,
        /// The last error.
        source: std::io::Error,
    },
    /// No progress for the configured time: the last retryable error.
    #[error("gave up after {}s without progress; last error: {last}", .after.as_secs())]
    GaveUp {
        /// How long it tried.
        after: Duration,
        /// The last error seen.
        last: String,
    },
    /// The central refused a batch.
    #[error("the central rejected the batch starting at {path} line {line}: {code}: {message}")]
    Rejected {
        /// The data file.
        path: PathBuf,
        /// Line of the batch's first bet.
        line: u64,
        /// The central's code.
        code: ErrorCode,
        /// The central's reason.
        message: String,
    },
    /// The central refused to open a session or take the announcement.
    #[error("the central refused: {code}: {message}{}", refusal_hint(*.code))]
    Refused {
        /// The central's code.
        code: ErrorCode,
        /// The central's reason.
        message: String,
    },
    /// The central's receipt does not match the data file (before
    /// resuming, or with the winners): exit code 3.
    #[error("{0}")]
    Receipt(String),
    /// The seal kept from an earlier run cannot be read back: nothing to
    /// compare this run's with.
    #[error(
        "cannot read the seal kept in {}: {reason}; it was left as it is (restore it, or move \
         it aside to keep this run's seal instead)",
        .path.display()
    )]
    KeptSeal {
        /// The kept file (`agency.seal_file`).
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Sales closed before the central stored the whole data file: the
    /// winners are over the bets stored (exit code 4).
    #[error(
        "sales closed before all of {} was stored: the draw counted {stored} of its {in_file} \
         bets, and its {winners} winner(s) are over those {stored}",
        .path.display()
    )]
    SalesClosed {
        /// The data file.
        path: PathBuf,
        /// Bets the central stored, and drew over.
        stored: u64,
        /// Bets in the data file.
        in_file: u64,
        /// Winners among the stored bets.
        winners: usize,
    },
    /// The central hung up.
    #[error("the central closed the connection while {0}")]
    Closed(&'static str),
    /// The central did not answer in time.
    #[error("{}", no_reply(during, *after, *silent))]
    NoReply {
        /// What the agency was waiting for.
        during: &'static str,
        /// The deadline that ran out.
        after: Duration,
        /// Nothing came since the request (else the central had sent
        /// still-waiting frames, and then stopped).
        silent: bool,
    },
    /// Speaking the reference protocol, the agency got an acknowledgement
    /// only this project's central sends: it switches back.
    #[error("the central acknowledged with STORED: it speaks the resumable protocol after all")]
    ResumableAfterAll,
    /// A connection or a write made no progress in time.
    #[error("no progress for {}s while {during}", .after.as_secs())]
    Stalled {
        /// What the agency was doing.
        during: &'static str,
        /// The deadline that ran out.
        after: Duration,
    },
    /// The central left `HELLO` unanswered: the run falls back to the
    /// reference protocol.
    #[error("the central at {address} did not answer HELLO within {}s", .after.as_secs())]
    HelloUnanswered {
        /// The central's address.
        address: String,
        /// The deadline that ran out.
        after: Duration,
    },
    /// The central answered something this agency cannot use.
    #[error("unexpected reply from the central: {0}")]
    UnexpectedReply(String),
    /// A TLS record arrived where a frame header should be.
    #[error("{}", tls::central_speaks_tls())]
    SpeaksTls,
    /// The socket or framing failed.
    #[error(transparent)]
    Frame(FrameError),
    /// The secret file cannot be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS could not be set up (a bad CA file or server name).
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The TLS handshake failed: the central's certificate is not trusted,
    /// or does not name it.
    #[error("TLS handshake with {address} failed: {reason}")]
    Handshake {
        /// The central's address.
        address: String,
        /// Why, in the agency's settings' terms. Part of the message and
        /// not a `source`, so an error chain does not print it twice.
        reason: std::io::Error,
    },
}

fn no_reply(during: &str, after: Duration, silent: bool) -> String {
    let after = after.as_secs();
    if silent {
        format!("the central sent nothing for {after}s while {during}")
    } else {
        format!("the central stopped saying it is still working ({after}s without a word) while {during}")
    }
}

impl From<FrameError> for AgencyError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TlsRecord => AgencyError::SpeaksTls,
            e => AgencyError::Frame(e),
        }
    }
}

/// What the agency's operator can change about a refusal, when the cause is
/// on the agency's side.
fn refusal_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Unauthenticated => {
            "; check this agency's credentials: its secret (agency.secret or \
             agency.secret_file: CLI_SECRET, CLI_SECRET_FILE; `lottery secrets` writes one \
             per agency) or, under mutual TLS, its certificate (agency.tls_cert)"
        }
        _ => "",
    }
}

impl AgencyError {
    /// Whether a new connection may fix it: the central was down or went
    /// away, the agency is still held by a connection the central has not
    /// seen close yet, or storage failed for a moment.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgencyError::Connect { .. }
            | AgencyError::Closed(_)
            | AgencyError::NoReply { .. }
            | AgencyError::Stalled { .. }
            | AgencyError::ResumableAfterAll
            | AgencyError::HelloUnanswered { .. } => true,
            // A TLS refusal (a wrong certificate) says what to change.
            AgencyError::Frame(FrameError::Io(e)) => !tls::is_refusal(e),
            AgencyError::Frame(FrameError::Truncated(_)) => true,
            AgencyError::Rejected { code, .. } | AgencyError::Refused { code, .. } => matches!(
                code,
                ErrorCode::StorageFailed
                    | ErrorCode::OutOfOrder
                    | ErrorCode::AgencyBusy
                    | ErrorCode::ServerBusy
                    | ErrorCode::Timeout
                    // This address is locked out for a while (another
                    // client behind it guessed secrets): try again later.
                    | ErrorCode::AuthThrottled
            ),
            _ => false,
        }
    }
}

/// Runs one agency to completion. Returns `Ok(None)` when `shutdown` fired
/// first (everything closed and logged), `Ok(Some(report))` once it has its
/// winners.
///
/// # Errors
/// See [`AgencyError`]: bad data, a refusing central, or no progress for
/// `reconnect_timeout` seconds.
pub async fn run(
    config: &AgencyConfig,
    shutdown: CancellationToken,
) -> Result<Option<AgencyReport>, AgencyError> {
    run_with_progress(config, shutdown, None).await
}

/// [`run`], publishing on `progress` how many of this agency's bets the
/// central holds, after every acknowledgement (for a progress bar).
///
/// # Errors
/// As [`run`].
pub async fn run_with_progress(
    config: &AgencyConfig,
    shutdown: CancellationToken,
    progress: Option<tokio::sync::watch::Sender<u64>>,
) -> Result<Option<AgencyReport>, AgencyError> {
    let path = config.data_path();
    // Fail at once on a missing file, before bothering the central.
    File::open(&path).map_err(|source| AgencyError::OpenData {
        path: path.clone(),
        source,
    })?;
    let secret = config.load_secret()?;
    let mut centrals = Centrals::new(config)?;
    let mut report = AgencyReport {
        agency: config.id,
        bets: 0,
        batches: 0,
        reconnects: 0,
        winners: Vec::new(),
        ack_latencies_us: Vec::new(),
        closed_short: None,
        held_at_start: None,
    };
    let mut backoff = FIRST_BACKOFF;
    let mut last_progress = Instant::now();
    let mut sessions = 0u64;
    // Chosen once per connection; it only ever moves to the reference
    // protocol, when a central leaves HELLO unanswered.
    let mut protocol = Protocol::Resumable;
    // Once a central has answered HELLO, it is this project's: a later
    // silent HELLO is that central stalled (its database failing over, say),
    // never a reference central, and the agency keeps resuming.
    let mut answered_hello = false;
    loop {
        let mut progressed = false;
        let link = centrals.link(secret.as_deref());
        let outcome = session(
            config,
            protocol,
            &link,
            &path,
            &shutdown,
            &mut report,
            &mut progressed,
            progress.as_ref(),
        )
        .await;
        sessions += 1;
        answered_hello |= progressed;
        match outcome {
            Ok(SessionEnd::Done) => {
                report.reconnects = sessions - 1;
                info!(
                    action = action::CONSULTA_GANADORES,
                    result = result::SUCCESS,
                    cant_ganadores = report.winners.len()
                );
                return Ok(Some(report));
            }
            Ok(SessionEnd::Cancelled) => {
                info!(action = action::CLOSE_DATA_FILE, result = result::SUCCESS, path = %path.display());
                return Ok(None);
            }
            // With several centrals, a silent HELLO is a hung central, not
            // a reference one (that cannot share a database with others):
            // it is left for the next below, as any failed connection, and
            // resuming stays on, so nothing is sent without FIRST.
            Err(AgencyError::HelloUnanswered { after, .. })
                if protocol == Protocol::Resumable && !centrals.several() && !answered_hello =>
            {
                // Not a failure: this is how the design's reference central
                // answers a message it does not know. Speak its protocol
                // on a fresh connection, at once.
                protocol = Protocol::Reference;
                warn!(
                    action = action::PROTOCOL,
                    result = result::SUCCESS,
                    server_address = centrals.current(),
                    protocol = "reference",
                    message = %format!(
                        "the central did not answer HELLO within {}s: taking it for the design's \
                         reference central; resuming is off (one batch at a time, no FIRST; a batch \
                         whose acknowledgement is lost may be stored twice, and a restarted agency \
                         sends its bets again)",
                        after.as_secs()
                    )
                );
            }
            Err(AgencyError::ResumableAfterAll) if protocol == Protocol::Reference => {
                // Our central, slow to answer HELLO (a long recovery, an
                // overloaded machine): back to HELLO and FIRST at once.
                protocol = Protocol::Resumable;
                warn!(
                    action = action::PROTOCOL,
                    result = result::SUCCESS,
                    server_address = centrals.current(),
                    protocol = "resumable",
                    message = "the central acknowledged a batch with STORED, which only this \
                               project's central sends: it was slow to answer HELLO, not a \
                               reference central; resuming is on again (the one batch sent \
                               without FIRST was stored as it came)"
                );
            }
            Err(e) if e.is_retryable() => {
                if progressed {
                    last_progress = Instant::now();
                    backoff = FIRST_BACKOFF;
                    centrals.progressed();
                }
                // Patience counts over every central: time without
                // progress anywhere, not per address.
                let patience = config.reconnect_patience();
                if last_progress.elapsed() >= patience {
                    let mut last = e.to_string();
                    if protocol == Protocol::Reference {
                        last.push_str(
                            " (speaking the reference protocol: it had not answered HELLO either)",
                        );
                    }
                    if centrals.several() {
                        last.push_str(&format!(
                            " (every central was tried in turn: {})",
                            config.server_address
                        ));
                    }
                    return Err(AgencyError::GaveUp {
                        after: patience,
                        last,
                    });
                }
                let what = if sessions == 1 && !progressed {
                    action::CONNECT
                } else {
                    action::RECONNECT
                };
                let failed = centrals.current().to_string();
                let wait = centrals.move_on();
                info!(
                    action = what,
                    result = result::IN_PROGRESS,
                    server_address = failed.as_str(),
                    attempt = sessions,
                    reason = %e,
                    next_address = centrals.current()
                );
                if wait {
                    tokio::select! {
                        _ = shutdown.cancelled() => {
                            info!(action = action::CLOSE_DATA_FILE, result = result::SUCCESS, path = %path.display());
                            return Ok(None);
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The centrals of `server_address`, each with its TLS settings (the
/// certificate's name is the host actually dialled), and which one the
/// agency is on.
///
/// A failed connection moves to the next central at once: another may well
/// be up. Only when every central has failed since the last progress does
/// the agency wait (the run's backoff) before the next round, so a cluster
/// that is down is not hammered, and one central is retried as before.
struct Centrals {
    /// Address and TLS, in the configured order.
    list: Vec<(String, Option<ClientTls>)>,
    /// Index of the central to use next.
    current: usize,
    /// Failures since the last progress.
    failures: usize,
}

impl Centrals {
    fn new(config: &AgencyConfig) -> Result<Centrals, AgencyError> {
        let list = config
            .server_address
            .as_slice()
            .iter()
            .map(|address| Ok((address.clone(), client_tls(config, address)?)))
            .collect::<Result<Vec<_>, TlsError>>()?;
        Ok(Centrals {
            list,
            current: 0,
            failures: 0,
        })
    }

    /// How to reach the current central.
    fn link<'a>(&'a self, secret: Option<&'a str>) -> Link<'a> {
        let (address, tls) = &self.list[self.current];
        Link {
            address,
            secret,
            tls: tls.as_ref(),
        }
    }

    /// The current central's address.
    fn current(&self) -> &str {
        &self.list[self.current].0
    }

    /// Whether there is more than one central to move to.
    fn several(&self) -> bool {
        self.list.len() > 1
    }

    /// The current central made progress: a later failure starts a new
    /// round from the next central.
    fn progressed(&mut self) {
        self.failures = 0;
    }

    /// The current central failed: moves to the next one. True when every
    /// central has now failed since the last progress, so the caller
    /// waits before trying again.
    fn move_on(&mut self) -> bool {
        self.current = (self.current + 1) % self.list.len();
        self.failures += 1;
        self.failures % self.list.len() == 0
    }
}

/// How to reach the central: where, with which secret, over TLS or not.
pub(super) struct Link<'a> {
    address: &'a str,
    secret: Option<&'a str>,
    tls: Option<&'a ClientTls>,
}

impl Link<'_> {
    /// Connects (and completes the TLS handshake when on).
    async fn connect(&self) -> Result<BoxedIo, AgencyError> {
        let stream =
            TcpStream::connect(self.address)
                .await
                .map_err(|source| AgencyError::Connect {
                    address: self.address.to_string(),
                    source,
                })?;
        // Each frame leaves in one write; never hold it back for Nagle.
        stream.set_nodelay(true).map_err(FrameError::Io)?;
        match self.tls {
            None => Ok(Box::new(stream)),
            Some(tls) => tls
                .connect(stream)
                .await
                .map_err(|reason| AgencyError::Handshake {
                    address: self.address.to_string(),
                    reason,
                }),
        }
    }
}

/// TLS as the agency's settings ask for it, to dial `address` (the
/// certificate's name follows the address actually dialled): `None` when
/// `agency.tls_ca` is not set. Also the operator tools' way to dial.
///
/// # Errors
/// A file cannot be read, or the server name is not valid.
pub(crate) fn client_tls(
    config: &AgencyConfig,
    address: &str,
) -> Result<Option<ClientTls>, TlsError> {
    if config.tls_ca.as_os_str().is_empty() {
        return Ok(None);
    }
    let identity = (!config.tls_cert.as_os_str().is_empty())
        .then_some((config.tls_cert.as_path(), config.tls_key.as_path()));
    ClientTls::new(&config.tls_ca, &config.tls_name(address), identity).map(Some)
}

/// What to check when the central cannot be reached, by how connecting
/// failed: the agency's and the operator tools' messages end with it, so a
/// bare "Connection refused" never leaves an operator guessing.
pub(crate) fn unreachable_hint(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => {
            "nothing listens there: is the central running, and on this port? (its `listen` \
             log line shows its address)"
        }
        ErrorKind::TimedOut | ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
            "no answer from that host: is the address right, and the host reachable?"
        }
        _ => "is the address right?",
    }
}
