//! One betting agency: streams its data file to the central in batches,
//! announces that it finished, and waits for its winners.
//!
//! A reader thread turns the CSV file into batches (never holding the whole
//! file); the async side sends each batch, waits for its acknowledgement,
//! then sends the next. Batches hold at most `batch_max_amount` bets and are
//! cut early so each fits in one frame.

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

use crate::codec::{AgencyCodec, FrameError};
use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::model::{AgencyId, Bet};
use crate::protocol::{encoded_bet_len, BatchSizer, ErrorCode, MessageError, Reply, Request};

/// How long the agency keeps retrying while the central is not reachable.
pub const CONNECT_PATIENCE: Duration = Duration::from_secs(60);
/// Batches read ahead of the one being sent.
const READ_AHEAD: usize = 4;

/// What a completed agency run learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgencyReport {
    /// The agency.
    pub agency: AgencyId,
    /// Bets sent and acknowledged.
    pub bets: u64,
    /// Batches sent.
    pub batches: u64,
    /// This agency's winner documents, as the central sent them.
    pub winners: Vec<String>,
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
    /// The central never became reachable.
    #[error("could not connect to {address} within {}s: {source}", CONNECT_PATIENCE.as_secs())]
    Connect {
        /// The configured address.
        address: String,
        /// The last error.
        source: std::io::Error,
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
    /// The central refused the announcement that betting finished.
    #[error("the central refused the end of betting: {code}: {message}")]
    FinishRefused {
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
}

/// A batch read from the data file.
#[derive(Debug)]
struct Batch {
    bets: Vec<Bet>,
    /// Line of the first bet in the data file.
    first_line: u64,
}

/// Runs one agency to completion. Returns `Ok(None)` when `shutdown` fired
/// first (everything closed and logged), `Ok(Some(report))` once it has its
/// winners.
///
/// # Errors
/// See [`AgencyError`]: bad data, an unreachable or refusing central.
pub async fn run(
    config: &AgencyConfig,
    shutdown: CancellationToken,
) -> Result<Option<AgencyReport>, AgencyError> {
    let path = config.data_path();
    let file = File::open(&path).map_err(|source| AgencyError::OpenData {
        path: path.clone(),
        source,
    })?;
    let (tx, mut batches) = mpsc::channel(READ_AHEAD);
    let reader = {
        let (id, max, path) = (config.id, config.batch_max_amount, path.clone());
        tokio::task::spawn_blocking(move || read_batches(file, &path, id, max, &tx))
    };

    let outcome = upload(config, &path, &mut batches, &shutdown).await;
    // Closing the receiver stops the reader at its next batch.
    drop(batches);
    let _ = reader.await;
    if outcome.as_ref().is_ok_and(Option::is_none) {
        info!(action = action::CLOSE_DATA_FILE, result = result::SUCCESS, path = %path.display());
    }
    outcome
}

async fn upload(
    config: &AgencyConfig,
    path: &Path,
    batches: &mut mpsc::Receiver<Result<Batch, AgencyError>>,
    shutdown: &CancellationToken,
) -> Result<Option<AgencyReport>, AgencyError> {
    let Some(stream) = connect(&config.server_address, shutdown).await? else {
        return Ok(None);
    };
    let mut framed = Framed::new(stream, AgencyCodec::new());
    let mut report = AgencyReport {
        agency: config.id,
        bets: 0,
        batches: 0,
        winners: Vec::new(),
    };

    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(closed_by_shutdown(framed, config)),
            next = batches.recv() => next,
        };
        let Some(batch) = next else { break };
        let batch = batch?;
        let first_line = batch.first_line;
        let request = Request::Batch(batch.bets);
        // A send is not cancel-safe, so it is never raced against shutdown;
        // it is short, as the socket is writable or the peer is gone.
        framed.send(&request).await?;
        let reply = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(closed_by_shutdown(framed, config)),
            reply = framed.next() => reply,
        };
        let Request::Batch(bets) = request else {
            unreachable!("built as a batch above")
        };
        match read_reply(reply, "waiting for a batch acknowledgement")? {
            Reply::Stored { .. } => {
                report.bets += bets.len() as u64;
                report.batches += 1;
                if tracing::enabled!(tracing::Level::DEBUG) {
                    for b in &bets {
                        debug!(
                            action = action::APUESTA_ENVIADA,
                            result = result::SUCCESS,
                            dni = b.document.as_str(),
                            numero = b.number
                        );
                    }
                }
            }
            Reply::Error { code, message } => {
                return Err(AgencyError::Rejected {
                    path: path.to_path_buf(),
                    line: first_line,
                    code,
                    message,
                })
            }
            other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
        }
    }

    framed
        .send(&Request::Finished { agency: config.id })
        .await?;
    loop {
        let reply = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(closed_by_shutdown(framed, config)),
            reply = framed.next() => reply,
        };
        match read_reply(reply, "waiting for the draw")? {
            Reply::Winners { documents, more } => {
                report.winners.extend(documents);
                if !more {
                    break;
                }
            }
            Reply::Error { code, message } => {
                return Err(AgencyError::FinishRefused { code, message })
            }
            other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
        }
    }
    info!(
        action = action::CONSULTA_GANADORES,
        result = result::SUCCESS,
        cant_ganadores = report.winners.len()
    );
    Ok(Some(report))
}

fn closed_by_shutdown(
    framed: Framed<TcpStream, AgencyCodec>,
    config: &AgencyConfig,
) -> Option<AgencyReport> {
    drop(framed);
    info!(
        action = action::CLOSE_CONNECTION,
        result = result::SUCCESS,
        server_address = config.server_address.as_str()
    );
    None
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

/// Connects to the central, retrying with backoff while it is not up yet.
/// Returns `Ok(None)` if `shutdown` fires first.
async fn connect(
    address: &str,
    shutdown: &CancellationToken,
) -> Result<Option<TcpStream>, AgencyError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 1u32;
    loop {
        let attempt_result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(None),
            r = TcpStream::connect(address) => r,
        };
        match attempt_result {
            Ok(stream) => {
                // Each frame leaves in one write; never hold it back for Nagle.
                stream.set_nodelay(true).map_err(FrameError::Io)?;
                info!(
                    action = action::CONNECT,
                    result = result::SUCCESS,
                    server_address = address
                );
                return Ok(Some(stream));
            }
            Err(source) if started.elapsed() >= CONNECT_PATIENCE => {
                return Err(AgencyError::Connect {
                    address: address.to_string(),
                    source,
                })
            }
            Err(e) => {
                info!(
                    action = action::CONNECT,
                    result = result::IN_PROGRESS,
                    server_address = address,
                    attempt,
                    reason = %e
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
        }
    }
}

/// Sends the bets read before a bad line (they are good, and an agency that
/// resumes later need not send them again), then the error.
fn fail(tx: &mpsc::Sender<Result<Batch, AgencyError>>, batch: Batch, error: AgencyError) {
    if !batch.bets.is_empty() && tx.blocking_send(Ok(batch)).is_err() {
        return;
    }
    let _ = tx.blocking_send(Err(error));
}

/// Reads the data file into batches on a blocking thread. Stops at the
/// first bad line (sending its error) or when the receiver is gone.
fn read_batches(
    file: File,
    path: &Path,
    agency: AgencyId,
    max: usize,
    tx: &mpsc::Sender<Result<Batch, AgencyError>>,
) {
    // Records end at `\n`, and a `\r` before it is dropped by hand below: the
    // csv crate's own CRLF handling reports line numbers one short after
    // every CRLF, and errors must name the right line.
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_reader(BufReader::with_capacity(1 << 16, file));
    let agency_text = agency.to_string();
    let mut record = csv::StringRecord::new();
    let mut sizer = BatchSizer::default();
    let mut batch = Batch {
        bets: Vec::with_capacity(max.min(1024)),
        first_line: 0,
    };
    let data_error = |line: u64, reason: String| AgencyError::Data {
        path: path.to_path_buf(),
        line,
        reason,
    };
    loop {
        let line = reader.position().line();
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                let reason = match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
                    _ => e.to_string(),
                };
                return fail(tx, batch, data_error(line, reason));
            }
        }
        let line = record.position().map_or(line, |p| p.line());
        let last = record.len().saturating_sub(1);
        let last_field = record.get(last).unwrap_or("");
        let last_field = last_field.strip_suffix('\r').unwrap_or(last_field);
        if record.len() == 1 && last_field.is_empty() {
            continue; // a blank CRLF line
        }
        if record.len() != 5 {
            let reason = format!(
                "expected 5 fields (first_name,last_name,document,birthdate,number), found {}",
                record.len()
            );
            return fail(tx, batch, data_error(line, reason));
        }
        let bet = match Bet::from_fields(
            &agency_text,
            &record[0],
            &record[1],
            &record[2],
            &record[3],
            last_field,
        ) {
            Ok(bet) => bet,
            Err(e) => {
                return fail(tx, batch, data_error(line, e.to_string()));
            }
        };
        let len = encoded_bet_len(&bet);
        if !BatchSizer::default().fits(len) {
            let reason = "the bet is too large to fit in one frame".to_string();
            return fail(tx, batch, data_error(line, reason));
        }
        if sizer.count() == max || !sizer.fits(len) {
            let full = std::mem::replace(
                &mut batch,
                Batch {
                    bets: Vec::with_capacity(max.min(1024)),
                    first_line: line,
                },
            );
            if tx.blocking_send(Ok(full)).is_err() {
                return;
            }
            sizer.reset();
        }
        if sizer.count() == 0 {
            batch.first_line = line;
        }
        sizer.add(len);
        batch.bets.push(bet);
    }
    if !batch.bets.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{to_payload, MAX_PAYLOAD_LEN};

    fn batches_of(text: &str, max: usize) -> Vec<Result<Batch, AgencyError>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv");
        std::fs::write(&path, text).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        read_batches(File::open(&path).unwrap(), &path, 1, max, &tx);
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
            assert!(b.bets.len() <= 70);
            assert_eq!(b.first_line, line);
            let payload = to_payload(&Request::Batch(b.bets.clone()));
            assert!(payload.len() <= MAX_PAYLOAD_LEN);
            line += b.bets.len() as u64;
            total += b.bets.len();
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
