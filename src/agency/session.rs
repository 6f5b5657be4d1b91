//! One connection of an agency: open a session with `HELLO`, keep a window
//! of batches in flight from where the central stands, announce the end,
//! collect the winners; or, with a central of the design's reference
//! protocol, the same without `HELLO`, `FIRST` or a window.
//!
//! Every request has a reply deadline ([`Deadlines`]), so a central that
//! stops answering ends the connection instead of hanging the agency.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::mismatches;
use super::reader::{self, read_batches, Batch, Resume};
use super::seal::{self, Outcome, Refusal};
use super::{AgencyError, AgencyReport, Link};
use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::receipt::{Digest, Receipt, Sealed};
use crate::tls::BoxedIo;
use crate::wire::{
    AgencyCodec, ErrorCode, Finish, FrameError, MessageError, RawFrame, Reply, Request,
    STILL_WAITING_EVERY,
};

/// Bytes of frames buffered before a write is forced.
const WRITE_BUFFER: usize = 128 * 1024;

/// Which protocol a connection speaks. The run chooses it before each
/// connection: [`Protocol::Resumable`] until a central leaves `HELLO`
/// unanswered, [`Protocol::Reference`] from then on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    /// This project's: `HELLO` learns where to resume, each batch says
    /// where it starts (`FIRST`), a window of batches is in flight, and the
    /// central sends still-waiting frames while the draw is pending.
    Resumable,
    /// The design's reference central's: no `HELLO` (it ignores it), no
    /// `FIRST`, one batch at a time, each acknowledged, then
    /// `ACTION:FINISH_BETTING`, the only spelling it knows. It sends nothing
    /// while the draw is pending, so that wait has its own deadline.
    Reference,
}

impl Protocol {
    /// Batches kept in flight.
    fn window(self, config: &AgencyConfig) -> usize {
        match self {
            // The configuration bounds it (1..=the central's in-flight limit).
            Protocol::Resumable => config.window,
            Protocol::Reference => 1,
        }
    }

    /// The spelling of the "finished" announcement.
    fn finish(self) -> Finish {
        match self {
            Protocol::Resumable => Finish::BettingFinished,
            Protocol::Reference => Finish::FinishBetting,
        }
    }
}

/// How long the agency waits for each reply, from the configuration.
struct Deadlines {
    /// For the answer to `HELLO`: short, as silence is how a reference
    /// central answers it.
    hello: Duration,
    /// For a batch's acknowledgement.
    reply: Duration,
    /// After a still-waiting frame, for the next frame: never less than two
    /// of the central's intervals, so one late frame is not fatal.
    still_waiting: Duration,
    /// For the winners from a central that sends no still-waiting frames.
    draw: Duration,
}

impl Deadlines {
    fn of(config: &AgencyConfig) -> Deadlines {
        let reply = config.reply_deadline();
        Deadlines {
            hello: config.hello_deadline(),
            reply,
            still_waiting: reply.max(2 * STILL_WAITING_EVERY),
            draw: config.draw_deadline(),
        }
    }
}

/// How a session ended without an error.
pub(super) enum SessionEnd {
    /// The winners arrived.
    Done,
    /// Shutdown was requested.
    Cancelled,
}

/// One connection: open a session, upload from where the central stands,
/// announce the end, collect the winners.
#[allow(clippy::too_many_arguments)] // one call site, each argument distinct
pub(super) async fn session(
    config: &AgencyConfig,
    protocol: Protocol,
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
    let deadlines = Deadlines::of(config);
    let stream = tokio::select! {
        biased;
        _ = shutdown.cancelled() => return Ok(SessionEnd::Cancelled),
        stream = within(deadlines.reply, "connecting (TCP and TLS handshakes)", link.connect()) => stream?,
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
        deadlines,
    };
    let write = conn.deadlines.reply;

    let (stored, held) = match protocol {
        Protocol::Resumable => {
            let hello = Request::Hello {
                agency: config.id,
                secret: link.secret.map(str::to_string),
            };
            within(write, "sending HELLO", conn.framed.send(&hello)).await?;
            let hello = conn.deadlines.hello;
            let reply = match conn.reply("waiting for the answer to HELLO", hello).await {
                Ok(Some(reply)) => reply,
                Ok(None) => return Ok(SessionEnd::Cancelled),
                // Silence, not even a still-waiting frame: how the
                // reference central answers a message it does not know.
                Err(AgencyError::NoReply { silent: true, .. }) => {
                    return Err(AgencyError::HelloUnanswered {
                        address: address.to_string(),
                        after: hello,
                    })
                }
                Err(e) => return Err(e),
            };
            let held = match reply {
                Reply::Success { stored, digest, .. } => held_receipt(stored, digest),
                Reply::Error { code, message } => {
                    return Err(AgencyError::Refused { code, message })
                }
                other => return Err(AgencyError::UnexpectedReply(format!("{other:?}"))),
            };
            *progressed = true;
            held
        }
        // No way to ask (nor a receipt to check): go on after what this
        // run saw acknowledged.
        Protocol::Reference => (report.bets, None),
    };
    report.bets = stored;
    if protocol == Protocol::Resumable {
        report.held_at_start.get_or_insert(stored);
    }
    publish(stored);

    // The reader starts from the first bet the central does not hold. It
    // stops when `batches` is dropped, whichever way this function ends.
    // It also checks the central's receipt against the file before it
    // reads on (see `read_batches`), and hands over the whole file's.
    let (tx, mut batches) = reader::handoff();
    let (whole, file_receipt) = tokio::sync::oneshot::channel();
    {
        let (id, max, path) = (config.id, config.batch_max_amount, path.to_path_buf());
        let from = Resume {
            skip: stored,
            held,
            say_first: protocol == Protocol::Resumable,
        };
        tokio::task::spawn_blocking(move || read_batches(&path, id, max, from, &tx, whole));
    }
    // Keep up to `window` batches in flight: the central answers them in
    // order, so the oldest unanswered batch is always the next reply's. A
    // refusal of one batch makes every later one in flight start past the
    // central's count, so those are refused too (`OUT_OF_ORDER`), never
    // stored out of order.
    let window = protocol.window(config);
    let mut in_flight: VecDeque<(Batch, Instant)> = VecDeque::with_capacity(window);
    let mut reader_done = false;
    let mut data_error = None;
    // Sales closed under this upload: the rest of the file is not stored.
    let mut closed = false;
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
            let frame = RawFrame(batch.frame.clone());
            within(write, SENDING_BATCHES, conn.framed.feed(frame)).await?;
            in_flight.push_back((batch, Instant::now()));
            sent = true;
        }
        if sent {
            // A write is not cancel-safe, so it is never raced against
            // shutdown; it is short, as the socket is writable or gone, and
            // bounded for a central that stops reading (the connection is
            // then dropped, half-written frame and all).
            let flush = SinkExt::<RawFrame>::flush(&mut conn.framed);
            within(write, SENDING_BATCHES, flush).await?;
        }
        let Some((batch, sent_at)) = in_flight.pop_front() else {
            // The reader is done and every batch is answered.
            if let Some(e) = data_error {
                return Err(e);
            }
            break;
        };
        let during = "waiting for a batch acknowledgement";
        let Some(reply) = conn.reply(during, conn.deadlines.reply).await? else {
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
                if protocol == Protocol::Reference && stored.is_some() {
                    // Only this project's central says `STORED`: it was
                    // slow to answer HELLO, not a reference central. Resume
                    // properly on a new connection before sending more
                    // batches without `FIRST`.
                    return Err(AgencyError::ResumableAfterAll);
                }
                for (dni, numero) in batch.logged.iter().flatten() {
                    debug!(
                        action = action::APUESTA_ENVIADA,
                        result = result::SUCCESS,
                        dni = dni.as_str(),
                        numero
                    );
                }
            }
            Reply::Error {
                code: ErrorCode::BettingClosed,
                message,
            } => {
                warn!(
                    action = action::CIERRE,
                    result = result::IN_PROGRESS,
                    stored = report.bets,
                    line = batch.first_line,
                    message = message.as_str()
                );
                // The batches after it are refused too: read their answers,
                // then ask for the winners over what was stored.
                let during = "reading the answers after the close of sales";
                for _ in in_flight.drain(..) {
                    let Some(reply) = conn.reply(during, conn.deadlines.reply).await? else {
                        return Ok(SessionEnd::Cancelled);
                    };
                    if !matches!(reply, Reply::Error { .. }) {
                        return Err(AgencyError::UnexpectedReply(format!("{reply:?}")));
                    }
                }
                closed = true;
                break;
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
    // The reader stops once its batches are no longer taken.
    drop(batches);

    let finished = Request::Finished {
        agency: config.id,
        spelling: protocol.finish(),
    };
    let during = "announcing that the agency finished";
    within(write, during, conn.framed.send(&finished)).await?;
    // Our central sends a still-waiting frame every few seconds until the
    // draw, each restarting the deadline; the reference central is silent
    // until it answers, however long the other agencies take.
    let draw_deadline = match protocol {
        Protocol::Resumable => conn.deadlines.still_waiting,
        Protocol::Reference => conn.deadlines.draw,
    };
    let mut winners = Vec::new();
    loop {
        let Some(reply) = conn.reply("waiting for the draw", draw_deadline).await? else {
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
                    let anew = report.held_at_start == Some(0);
                    if closed {
                        report.closed_short =
                            check_closed(config, path, report.bets, sealed, anew).await?;
                    } else {
                        check_winners(path, &config.seal_path(), file_receipt, sealed, anew)
                            .await?;
                    }
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

/// Says that the kept seal was an earlier round's and is replaced.
fn new_round_seal(kept_in: &Path) {
    info!(
        action = action::SEAL_FILE,
        result = result::SUCCESS,
        state = "new_round",
        path = %kept_in.display(),
        message = "the central held none of this file's bets when this run began: a new round, \
                   whose seal replaces the earlier round's"
    );
}

/// Checks the receipt the winners came with against the whole data file's
/// (the reader's, complete once every batch was answered), and the seal
/// against the one kept at `kept_in` from an earlier run over the same
/// bets (keeping it when there is none), then logs the seal, which every
/// agency of the round can publish and compare.
async fn check_winners(
    path: &Path,
    kept_in: &Path,
    file_receipt: tokio::sync::oneshot::Receiver<Receipt>,
    sealed: Option<Sealed>,
    uploaded_anew: bool,
) -> Result<(), AgencyError> {
    let Some(sealed) = sealed else {
        return Ok(()); // a central that seals nothing
    };
    let file = file_receipt.await.map_err(|_| {
        AgencyError::Receipt(
            "the data file's receipt is missing: it was not read to its end".into(),
        )
    })?;
    mismatches::check_sealed(path, &file, &sealed).map_err(AgencyError::Receipt)?;
    keep_seal(kept_in, file, sealed.seal, uploaded_anew).await
}

/// Compares the round's `seal` with the one kept at `kept_in` for the bets
/// of `receipt` (keeping it when none was, or when the run uploaded them
/// anew into a new round), says what became of the kept file, and logs the
/// seal, which every agency of the round can publish and compare.
async fn keep_seal(
    kept_in: &Path,
    receipt: Receipt,
    seal: Digest,
    uploaded_anew: bool,
) -> Result<(), AgencyError> {
    let outcome = {
        let kept_in = kept_in.to_path_buf();
        tokio::task::spawn_blocking(move || {
            seal::compare_and_keep(&kept_in, &receipt, seal, uploaded_anew)
        })
        .await
        .expect("keeping the seal does not panic")
    };
    match outcome {
        Ok(Outcome::NotKept(reason)) => warn!(
            action = action::SEAL_FILE,
            result = result::FAIL,
            path = %kept_in.display(),
            error = reason.as_str(),
            message = "the seal cannot be kept, so a later run cannot compare its seal with this \
                       one: set agency.seal_file (CLI_SEAL_FILE) to a writable place"
        ),
        Ok(Outcome::Same | Outcome::Kept) => {}
        Ok(Outcome::NewRound) => new_round_seal(kept_in),
        Err(Refusal::Differs(why)) => return Err(AgencyError::Receipt(why)),
        Err(Refusal::Unreadable(path, reason)) => {
            return Err(AgencyError::KeptSeal { path, reason })
        }
    }
    info!(
        action = action::SEAL,
        result = result::SUCCESS,
        seal = %seal,
        bets = receipt.count,
        digest = %receipt.digest,
        seal_file = %kept_in.display()
    );
    Ok(())
}

/// The check of winners drawn after sales closed under this agency's
/// upload: the receipt the central sealed (its `stored` bets) must be that
/// of the first bets of the data file, which is read through again; the
/// seal is kept and logged as [`check_winners`] does. Returns the bets in
/// the file when the central stored fewer (the agency exits 4), `None` when
/// every one was stored after all.
async fn check_closed(
    config: &AgencyConfig,
    path: &Path,
    stored: u64,
    sealed: Option<Sealed>,
    uploaded_anew: bool,
) -> Result<Option<u64>, AgencyError> {
    let skip = sealed.map_or(stored, |s| s.receipt.count);
    let (tx, mut rx) = reader::handoff();
    let (whole, file_receipt) = tokio::sync::oneshot::channel();
    {
        let (id, max, path) = (config.id, config.batch_max_amount, path.to_path_buf());
        let from = Resume {
            skip,
            held: sealed.map(|s| s.receipt),
            say_first: true,
        };
        tokio::task::spawn_blocking(move || read_batches(&path, id, max, from, &tx, whole));
    }
    while let Some(batch) = rx.recv().await {
        batch?;
    }
    let file = file_receipt.await.map_err(|_| {
        AgencyError::Receipt(
            "the data file's receipt is missing: it was not read to its end".into(),
        )
    })?;
    if let Some(sealed) = sealed {
        keep_seal(
            &config.seal_path(),
            sealed.receipt,
            sealed.seal,
            uploaded_anew,
        )
        .await?;
    }
    if file.count <= skip {
        return Ok(None);
    }
    warn!(
        action = action::CIERRE,
        result = result::SUCCESS,
        acknowledged = stored,
        stored = skip,
        bets_in_file = file.count,
        message = "sales closed before this agency's whole file was stored: its winners are \
                   over the bets stored"
    );
    Ok(Some(file.count))
}

/// What the agency does while its batches are written.
const SENDING_BATCHES: &str = "sending batches (the central stopped reading)";

/// Runs a write, or the connection's setup, with a deadline: a central that
/// stops taking bytes ends the connection instead of hanging the agency.
/// Cancelling a write half-way is safe here, as the connection is dropped
/// with it.
async fn within<T, E: Into<AgencyError>>(
    limit: Duration,
    during: &'static str,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, AgencyError> {
    match tokio::time::timeout(limit, work).await {
        Ok(done) => done.map_err(Into::into),
        Err(_) => Err(AgencyError::Stalled {
            during,
            after: limit,
        }),
    }
}

/// The framed socket of one session, with shutdown-aware reads that each
/// have a deadline.
struct Connection<'a> {
    framed: Framed<BoxedIo, AgencyCodec>,
    shutdown: &'a CancellationToken,
    address: &'a str,
    deadlines: Deadlines,
}

impl Connection<'_> {
    /// The next answer, or `None` when shutdown came first (the connection
    /// is then closed and logged). It must come within `deadline`; each
    /// still-waiting frame of the central on the way restarts the clock,
    /// with [`Deadlines::still_waiting`]. `Framed::next` is cancel-safe.
    async fn reply(
        &mut self,
        during: &'static str,
        deadline: Duration,
    ) -> Result<Option<Reply>, AgencyError> {
        let mut limit = deadline;
        let mut silent = true;
        loop {
            let reply = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => {
                    self.log_close();
                    return Ok(None);
                }
                reply = tokio::time::timeout(limit, self.framed.next()) => reply,
            };
            let Ok(reply) = reply else {
                return Err(AgencyError::NoReply {
                    during,
                    after: limit,
                    silent,
                });
            };
            match read_reply(reply, during)? {
                Reply::Waiting { message } => {
                    debug!(
                        action = action::WAITING,
                        result = result::IN_PROGRESS,
                        server_address = self.address,
                        message = message.as_str()
                    );
                    silent = false;
                    limit = self.deadlines.still_waiting;
                }
                reply => return Ok(Some(reply)),
            }
        }
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
