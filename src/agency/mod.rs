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

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::model::{AgencyId, BetRef, Today};
use crate::net::{self as tls, BoxedIo, TlsError};
use crate::wire::{
    AgencyCodec, BatchBuilder, ErrorCode, FrameError, MessageError, RawFrame, Reply, Request,
};

/// Bytes of frames buffered before a write is forced.
const WRITE_BUFFER: usize = 128 * 1024;
/// Batches read ahead of the one being sent.
const READ_AHEAD: usize = 4;
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
    #[error("cannot connect to {address}: {source}")]
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
    #[error("the central refused: {code}: {message}")]
    Refused {
        /// The central's code.
        code: ErrorCode,
        /// The central's reason.
        message: String,
    },
    /// The central hung up.
    #[error("the central closed the connection while {0}")]
    Closed(&'static str),
    /// The central answered something this agency cannot use.
    #[error("unexpected reply from the central: {0}")]
    UnexpectedReply(String),
    /// The socket or framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The secret file cannot be read.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// TLS could not be set up (a bad CA file or server name).
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    /// The TLS handshake failed: the central's certificate is not trusted,
    /// or does not name it.
    #[error("TLS handshake with {address} failed: {source}")]
    Handshake {
        /// The central's address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}

impl AgencyError {
    /// Whether a new connection may fix it: the central was down or went
    /// away, the agency is still held by a connection the central has not
    /// seen close yet, or storage failed for a moment.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgencyError::Connect { .. } | AgencyError::Closed(_) => true,
            AgencyError::Frame(FrameError::Io(_) | FrameError::Truncated(_)) => true,
            AgencyError::Rejected { code, .. } | AgencyError::Refused { code, .. } => matches!(
                code,
                ErrorCode::StorageFailed
                    | ErrorCode::OutOfOrder
                    | ErrorCode::AgencyBusy
                    | ErrorCode::ServerBusy
                    | ErrorCode::Timeout
            ),
            _ => false,
        }
    }
}

/// A batch read from the data file, already encoded as its frame.
#[derive(Debug)]
struct Batch {
    /// The whole frame, ready to send.
    frame: bytes::Bytes,
    /// Bets in it.
    count: u64,
    /// Position of the first bet among the file's bets (0-based).
    first: u64,
    /// Line of the first bet in the data file.
    first_line: u64,
    /// Each bet's document and number, kept only when DEBUG is on, for the
    /// per-bet lines logged once the batch is acknowledged.
    logged: Option<Vec<(String, u16)>>,
}

/// How a session ended without an error.
enum SessionEnd {
    /// The winners arrived.
    Done,
    /// Shutdown was requested.
    Cancelled,
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
    let tls = if config.tls_ca.as_os_str().is_empty() {
        None
    } else {
        Some(tls::connector(&config.tls_ca, &config.tls_name())?)
    };
    let link = Link {
        address: &config.server_address,
        secret: secret.as_deref(),
        tls: tls.as_ref(),
    };
    let mut report = AgencyReport {
        agency: config.id,
        bets: 0,
        batches: 0,
        reconnects: 0,
        winners: Vec::new(),
        ack_latencies_us: Vec::new(),
    };
    let mut backoff = FIRST_BACKOFF;
    let mut last_progress = Instant::now();
    let mut sessions = 0u64;
    loop {
        let mut progressed = false;
        let outcome = session(
            config,
            &link,
            &path,
            &shutdown,
            &mut report,
            &mut progressed,
            progress.as_ref(),
        )
        .await;
        sessions += 1;
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
            Err(e) if e.is_retryable() => {
                if progressed {
                    last_progress = Instant::now();
                    backoff = FIRST_BACKOFF;
                }
                let patience = config.reconnect_patience();
                if last_progress.elapsed() >= patience {
                    return Err(AgencyError::GaveUp {
                        after: patience,
                        last: e.to_string(),
                    });
                }
                let what = if sessions == 1 && !progressed {
                    action::CONNECT
                } else {
                    action::RECONNECT
                };
                info!(
                    action = what,
                    result = result::IN_PROGRESS,
                    server_address = config.server_address.as_str(),
                    attempt = sessions,
                    reason = %e
                );
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        info!(action = action::CLOSE_DATA_FILE, result = result::SUCCESS, path = %path.display());
                        return Ok(None);
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// How to reach the central: where, with which secret, over TLS or not.
struct Link<'a> {
    address: &'a str,
    secret: Option<&'a str>,
    tls: Option<&'a (
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
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
            Some((connector, name)) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|source| AgencyError::Handshake {
                        address: self.address.to_string(),
                        source,
                    })?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// One connection: open a session, upload from where the central stands,
/// announce the end, collect the winners.
async fn session(
    config: &AgencyConfig,
    link: &Link<'_>,
    path: &Path,
    shutdown: &CancellationToken,
    report: &mut AgencyReport,
    progressed: &mut bool,
    progress: Option<&tokio::sync::watch::Sender<u64>>,
) -> Result<SessionEnd, AgencyError> {
    let publish = |held: u64| {
        if let Some(p) = progress {
            p.send_replace(held);
        }
    };
    let address = link.address;
    let stream = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Ok(SessionEnd::Cancelled),
        stream = link.connect() => stream?,
    };
    info!(
        action = action::CONNECT,
        result = result::SUCCESS,
        server_address = address
    );
    let mut conn = Connection {
        framed: {
            let mut framed = Framed::new(stream, AgencyCodec::new());
            // A window of frames is written with one syscall: the default
            // boundary (8 KiB) would flush before every frame.
            framed.set_backpressure_boundary(WRITE_BUFFER);
            framed
        },
        shutdown,
        address,
    };

    conn.framed
        .send(&Request::Hello {
            agency: config.id,
            secret: link.secret.map(str::to_string),
        })
        .await?;
    let Some(reply) = conn.reply("opening the session").await? else {
        return Ok(SessionEnd::Cancelled);
    };
    let stored = match reply {
        Reply::Success { stored, .. } => stored.unwrap_or(0),
        Reply::Error { code, message } => return Err(AgencyError::Refused { code, message }),
        other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
    };
    *progressed = true;
    report.bets = stored;
    publish(stored);

    // The reader starts from the first bet the central does not hold. It
    // stops when `batches` is dropped, whichever way this function ends.
    let (tx, mut batches) = mpsc::channel(READ_AHEAD);
    {
        let (id, max, path) = (config.id, config.batch_max_amount, path.to_path_buf());
        tokio::task::spawn_blocking(move || read_batches(&path, id, max, stored, &tx));
    }
    // Keep up to `window` batches in flight: the central answers them in
    // order, so the oldest unanswered batch is always the next reply's. A
    // refusal of one batch makes every later one in flight start past the
    // central's count, so those are refused too (`OUT_OF_ORDER`), never
    // stored out of order.
    let window = config.window.max(1);
    let mut in_flight: VecDeque<(Batch, Instant)> = VecDeque::with_capacity(window);
    let mut reader_done = false;
    let mut data_error = None;
    loop {
        // Fill the window with whatever the reader has ready; wait for it
        // only when nothing is in flight.
        let mut sent = false;
        while in_flight.len() < window && !reader_done {
            let next = match batches.try_recv() {
                Ok(batch) => Some(batch),
                Err(mpsc::error::TryRecvError::Disconnected) => None,
                Err(mpsc::error::TryRecvError::Empty) if !in_flight.is_empty() || sent => break,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(conn.close()),
                    next = batches.recv() => next,
                },
            };
            let batch = match next {
                Some(Ok(batch)) => batch,
                // A bad line: what was read before it is still sent and
                // answered, then the error ends the run.
                Some(Err(e)) => {
                    data_error = Some(e);
                    reader_done = true;
                    break;
                }
                None => {
                    reader_done = true;
                    break;
                }
            };
            // Queued, not yet written: the burst leaves in one flush below.
            conn.framed.feed(RawFrame(batch.frame.clone())).await?;
            in_flight.push_back((batch, Instant::now()));
            sent = true;
        }
        if sent {
            // A write is not cancel-safe, so it is never raced against
            // shutdown; it is short, as the socket is writable or gone.
            SinkExt::<RawFrame>::flush(&mut conn.framed).await?;
        }
        let Some((batch, sent_at)) = in_flight.pop_front() else {
            // The reader is done and every batch is answered.
            if let Some(e) = data_error {
                return Err(e);
            }
            break;
        };
        let Some(reply) = conn.reply("waiting for a batch acknowledgement").await? else {
            return Ok(SessionEnd::Cancelled);
        };
        match reply {
            Reply::Success { stored, .. } => {
                let latency = sent_at.elapsed().as_micros();
                report
                    .ack_latencies_us
                    .push(u32::try_from(latency).unwrap_or(u32::MAX));
                *progressed = true;
                report.batches += 1;
                report.bets = stored.unwrap_or(batch.first + batch.count);
                publish(report.bets);
                for (dni, numero) in batch.logged.iter().flatten() {
                    debug!(
                        action = action::APUESTA_ENVIADA,
                        result = result::SUCCESS,
                        dni = dni.as_str(),
                        numero
                    );
                }
            }
            Reply::Error { code, message } => {
                return Err(AgencyError::Rejected {
                    path: path.to_path_buf(),
                    line: batch.first_line,
                    code,
                    message,
                })
            }
            other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    conn.framed
        .send(&Request::Finished { agency: config.id })
        .await?;
    let mut winners = Vec::new();
    loop {
        let Some(reply) = conn.reply("waiting for the draw").await? else {
            return Ok(SessionEnd::Cancelled);
        };
        match reply {
            Reply::Winners { documents, more } => {
                winners.extend(documents);
                if !more {
                    break;
                }
            }
            Reply::Error { code, message } => return Err(AgencyError::Refused { code, message }),
            other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
        }
    }
    report.winners = winners;
    Ok(SessionEnd::Done)
}

/// The framed socket of one session, with shutdown-aware reads.
struct Connection<'a> {
    framed: Framed<BoxedIo, AgencyCodec>,
    shutdown: &'a CancellationToken,
    address: &'a str,
}

impl Connection<'_> {
    /// The next reply, or `None` when shutdown came first (the connection
    /// is then closed and logged). `Framed::next` is cancel-safe.
    async fn reply(&mut self, during: &'static str) -> Result<Option<Reply>, AgencyError> {
        let reply = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {
                self.log_close();
                return Ok(None);
            }
            reply = self.framed.next() => reply,
        };
        read_reply(reply, during).map(Some)
    }

    fn close(self) -> SessionEnd {
        self.log_close();
        SessionEnd::Cancelled
    }

    fn log_close(&self) {
        info!(
            action = action::CLOSE_CONNECTION,
            result = result::SUCCESS,
            server_address = self.address
        );
    }
}

fn read_reply(
    reply: Option<Result<Result<Reply, MessageError>, FrameError>>,
    during: &'static str,
) -> Result<Reply, AgencyError> {
    match reply {
        None => Err(AgencyError::Closed(during)),
        Some(Err(e)) => Err(e.into()),
        Some(Ok(Err(e))) => Err(AgencyError::UnexpectedReply(e.to_string())),
        Some(Ok(Ok(reply))) => Ok(reply),
    }
}

/// Sends the bets read before a bad line (they are good, and a later run
/// resumes after them), then the error.
fn fail(tx: &mpsc::Sender<Result<Batch, AgencyError>>, batch: Batch, error: AgencyError) {
    if batch.count > 0 && tx.blocking_send(Ok(batch)).is_err() {
        return;
    }
    let _ = tx.blocking_send(Err(error));
}

/// The fields of one data file record, without allocating for the usual
/// five (more are an error, reported by their count).
#[derive(Default)]
struct Fields<'a> {
    first: [&'a str; 5],
    len: usize,
}

impl<'a> Fields<'a> {
    /// Field `i`, or `""` past the end.
    fn get(&self, i: usize) -> &'a str {
        self.first
            .get(i)
            .filter(|_| i < self.len)
            .copied()
            .unwrap_or("")
    }
}

impl<'a> FromIterator<&'a str> for Fields<'a> {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut fields = Fields::default();
        for f in iter {
            if let Some(slot) = fields.first.get_mut(fields.len) {
                *slot = f;
            }
            fields.len += 1;
        }
        fields
    }
}

/// Reads the data file into batches on a blocking thread, skipping the
/// first `skip` bets (the central holds them). Stops at the first bad line
/// (sending its error) or when the receiver is gone.
fn read_batches(
    path: &Path,
    agency: AgencyId,
    max: usize,
    skip: u64,
    tx: &mpsc::Sender<Result<Batch, AgencyError>>,
) {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(source) => {
            let _ = tx.blocking_send(Err(AgencyError::OpenData {
                path: path.to_path_buf(),
                source,
            }));
            return;
        }
    };
    // Records end at `\n`, and a `\r` before it is dropped by hand below: the
    // csv crate's own CRLF handling reports line numbers one short after
    // every CRLF, and errors must name the right line.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_reader(BufReader::with_capacity(1 << 16, file));
    let mut record = csv::ByteRecord::new();
    let log_bets = tracing::enabled!(tracing::Level::DEBUG);
    let new_batch = |first: u64, first_line: u64| {
        (
            BatchBuilder::new(Some(first)),
            Batch {
                frame: bytes::Bytes::new(),
                count: 0,
                first,
                first_line,
                logged: log_bets.then(Vec::new),
            },
        )
    };
    let finish = |(builder, mut batch): (BatchBuilder, Batch)| {
        batch.count = builder.count() as u64;
        batch.frame = builder.finish();
        batch
    };
    let mut current = new_batch(skip, 0);
    let mut today = Today::now();
    let mut position = 0u64;
    let data_error = |line: u64, reason: String| AgencyError::Data {
        path: path.to_path_buf(),
        line,
        reason,
    };
    loop {
        let line = reader.position().line();
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                return fail(tx, finish(current), data_error(line, e.to_string()));
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        // The record's text is checked once, whole (with the SIMD checker),
        // and each field is then a slice of it that must start and end on
        // character boundaries.
        let Ok(text) = simdutf8::basic::from_utf8(record.as_slice()) else {
            let reason = "not valid UTF-8".to_string();
            return fail(tx, finish(current), data_error(line, reason));
        };
        let field = |i: usize| record.range(i).and_then(|r| text.get(r));
        let Some(fields) = (0..record.len()).map(field).collect::<Option<Fields<'_>>>() else {
            let reason = "not valid UTF-8".to_string();
            return fail(tx, finish(current), data_error(line, reason));
        };
        let last = record.len().saturating_sub(1);
        let last_field = fields.get(last);
        let last_field = last_field.strip_suffix('\r').unwrap_or(last_field);
        if record.len() == 1 && last_field.is_empty() {
            continue; // a blank CRLF line
        }
        position += 1;
        if position <= skip {
            continue; // the central already holds this bet
        }
        if record.len() != 5 {
            let reason = format!(
                "expected 5 fields (first_name,last_name,document,birthdate,number), found {}",
                record.len()
            );
            return fail(tx, finish(current), data_error(line, reason));
        }
        let bet = match BetRef::check(
            agency,
            fields.get(0),
            fields.get(1),
            fields.get(2),
            fields.get(3),
            last_field,
            today,
        ) {
            Ok(bet) => bet,
            Err(e) => return fail(tx, finish(current), data_error(line, e.to_string())),
        };
        // Encoded straight into the frame: no copy of the bet in between.
        let full = current.0.count() == max;
        if full || !current.0.push(bet) {
            let next = new_batch(position - 1, line);
            let batch = finish(std::mem::replace(&mut current, next));
            if batch.count > 0 && tx.blocking_send(Ok(batch)).is_err() {
                return;
            }
            today = Today::now();
            if !current.0.push(bet) {
                let reason = "the bet is too large to fit in one frame".to_string();
                return fail(tx, finish(current), data_error(line, reason));
            }
        }
        if current.0.count() == 1 {
            current.1.first_line = line;
        }
        if let Some(logged) = &mut current.1.logged {
            logged.push((bet.document.to_string(), bet.number));
        }
    }
    if current.0.count() > 0 {
        let _ = tx.blocking_send(Ok(finish(current)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ServerCodec, MAX_FRAME_LEN};
    use tokio_util::codec::Decoder;

    fn batches_of(text: &str, max: usize) -> Vec<Result<Batch, AgencyError>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv");
        std::fs::write(&path, text).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        read_batches(&path, 1, max, 0, &tx);
        drop(tx);
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(b);
        }
        out
    }

    #[test]
    fn batches_respect_count_and_frame_size() {
        let mut text = String::new();
        for i in 0..500 {
            // Long names make the frame limit bite before the count does.
            text.push_str(&format!(
                "{},Pérez|Núñez,{},1999-03-17,{}\r\n",
                "Ñ".repeat(40),
                10_000_000 + i,
                i
            ));
        }
        let batches = batches_of(&text, 70);
        let mut line = 1;
        let mut total = 0;
        for b in &batches {
            let b = b.as_ref().unwrap();
            assert!(b.count <= 70);
            assert_eq!(b.first_line, line);
            assert_eq!(b.first, line - 1);
            assert!(b.frame.len() <= MAX_FRAME_LEN);
            // The frame is what the central reads: these very bets.
            let mut wire = bytes::BytesMut::from(&b.frame[..]);
            let decoded = ServerCodec::new().decode(&mut wire).unwrap().unwrap();
            let Ok(Request::Batch { first, bets }) = decoded else {
                panic!("not a batch: {decoded:?}");
            };
            assert_eq!(first, Some(b.first));
            assert_eq!(bets.len() as u64, b.count);
            for (k, bet) in bets.iter().enumerate() {
                assert_eq!(bet.document, (10_000_000 + b.first + k as u64).to_string());
                assert_eq!(bet.last_name, "Pérez|Núñez");
            }
            line += b.count;
            total += b.count;
        }
        assert_eq!(total, 500);
        assert!(
            batches.len() > 500 / 70 + 1,
            "frame size cut some batches early"
        );
    }

    #[test]
    fn bad_line_names_file_and_line() {
        let text = "Ana,Pérez,1,1999-03-17,5\nBob,Lee,2,1999-02-30,6\n";
        let batches = batches_of(text, 70);
        let err = batches.into_iter().find_map(Result::err).unwrap();
        let msg = err.to_string();
        assert!(msg.contains("agency-1.csv, line 2: NACIMIENTO"), "{msg}");

        let err = batches_of("Ana,Pérez,1,1999-03-17\n", 70)
            .pop()
            .unwrap()
            .unwrap_err();
        assert!(
            err.to_string().contains("line 1: expected 5 fields"),
            "{err}"
        );
    }
}
