//! One connection of an agency: open a session with `HELLO`, keep a window
//! of batches in flight from where the central stands, announce the end,
//! collect the winners.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Instant;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::reader::{read_batches, Batch};
use super::{AgencyError, AgencyReport, Link};
use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::net::BoxedIo;
use crate::receipt::{self, Digest, Receipt, Sealed};
use crate::wire::{AgencyCodec, FrameError, MessageError, RawFrame, Reply, Request};

/// Bytes of frames buffered before a write is forced.
const WRITE_BUFFER: usize = 128 * 1024;
/// Batches read ahead of the one being sent.
const READ_AHEAD: usize = 4;

/// How a session ended without an error.
pub(super) enum SessionEnd {
    /// The winners arrived.
    Done,
    /// Shutdown was requested.
    Cancelled,
}

/// One connection: open a session, upload from where the central stands,
/// announce the end, collect the winners.
pub(super) async fn session(
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
    let (stored, held) = match reply {
        Reply::Success { stored, digest, .. } => held_receipt(stored, digest),
        Reply::Error { code, message } => return Err(AgencyError::Refused { code, message }),
        other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
    };
    *progressed = true;
    report.bets = stored;
    publish(stored);

    // The reader starts from the first bet the central does not hold. It
    // stops when `batches` is dropped, whichever way this function ends.
    // It also checks the central's receipt against the file before it
    // reads on (see `read_batches`), and hands over the whole file's.
    let (tx, mut batches) = mpsc::channel(READ_AHEAD);
    let (whole, file_receipt) = tokio::sync::oneshot::channel();
    {
        let (id, max, path) = (config.id, config.batch_max_amount, path.to_path_buf());
        tokio::task::spawn_blocking(move || read_batches(&path, id, max, stored, held, &tx, whole));
    }
    // Keep up to `window` batches in flight: the central answers them in
    // order, so the oldest unanswered batch is always the next reply's. A
    // refusal of one batch makes every later one in flight start past the
    // central's count, so those are refused too (`OUT_OF_ORDER`), never
    // stored out of order.
    // The configuration bounds it (1..=the central's in-flight limit).
    let window = config.window;
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
            Reply::Winners {
                documents,
                more,
                sealed,
            } => {
                winners.extend(documents);
                if !more {
                    check_winners(path, file_receipt, sealed).await?;
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

/// Where the upload resumes, and the central's receipt to check the file
/// against (none from a central that sends no digest).
fn held_receipt(stored: Option<u64>, digest: Option<Digest>) -> (u64, Option<Receipt>) {
    let count = stored.unwrap_or(0);
    (count, digest.map(|digest| Receipt { count, digest }))
}

/// Checks the receipt the winners came with against the whole data file's
/// (the reader's, complete once every batch was answered) and logs the
/// seal, which every agency of the round can publish and compare.
async fn check_winners(
    path: &Path,
    file_receipt: tokio::sync::oneshot::Receiver<Receipt>,
    sealed: Option<Sealed>,
) -> Result<(), AgencyError> {
    let Some(sealed) = sealed else {
        return Ok(()); // a central that seals nothing
    };
    let file = file_receipt.await.map_err(|_| {
        AgencyError::Receipt(
            "the data file's receipt is missing: it was not read to its end".into(),
        )
    })?;
    receipt::check_sealed(path, &file, &sealed).map_err(AgencyError::Receipt)?;
    info!(
        action = action::SEAL,
        result = result::SUCCESS,
        seal = %sealed.seal,
        bets = file.count,
        digest = %file.digest
    );
    Ok(())
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
