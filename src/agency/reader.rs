//! The agency's data file, read on a blocking thread into whole batch
//! frames: each line checked as a bet and encoded straight into its frame.

use std::fs::File;
use std::ops::ControlFlow;
use std::path::Path;

use tokio::sync::mpsc;

use super::mismatches;
use super::records::Records;
use super::AgencyError;
use crate::model::{AgencyId, BetRef, Today};
use crate::receipt::Receipt;
use crate::wire::BatchBuilder;

/// A batch read from the data file, already encoded as its frame.
#[derive(Debug)]
pub(super) struct Batch {
    /// The whole frame, ready to send.
    pub frame: bytes::Bytes,
    /// Bets in it.
    pub count: u64,
    /// Position of the first bet among the file's bets (0-based).
    pub first: u64,
    /// Line of the first bet in the data file.
    pub first_line: u64,
    /// Each bet's document and number, kept only when DEBUG is on, for the
    /// per-bet lines logged once the batch is acknowledged.
    pub logged: Option<Vec<(String, u16)>>,
}

/// What the reader hands the session: a batch, or why it stopped.
pub(super) type Read = Result<Batch, AgencyError>;

/// Batches waiting for the session, at most: the reader works ahead of the
/// connection by this much.
const READ_AHEAD: usize = 8;

/// The reader's end of the channel to the session, with the session's end.
pub(super) fn handoff() -> (Handoff, mpsc::Receiver<Read>) {
    let (tx, rx) = mpsc::channel(READ_AHEAD);
    (Handoff::new(tx), rx)
}

/// The reader's end of the channel to the session: hands batches over a
/// few at a time.
///
/// The reader is much faster than the connection, so it spends most of an
/// upload waiting for room in the channel. Handed over one at a time, each
/// batch the session took woke the reader's thread to make one more, which
/// then slept again: two `futex` calls and two context switches a batch
/// (docs/PERFORMANCE.md, "Where the system calls go"). Here the reader
/// keeps its finished batches until it has a group, then waits for room
/// for the whole group at once: it is woken once a group, and the session
/// still has the rest of the channel to send meanwhile.
///
/// Order is kept: an error goes after every batch read before it, and
/// whatever is still held is handed over before the end of the file's
/// receipt ([`Handoff::flush`]) and, failing that, when this is dropped.
#[derive(Debug)]
pub(super) struct Handoff {
    tx: mpsc::Sender<Read>,
    /// Finished batches not handed over yet, oldest first.
    held: std::cell::RefCell<Vec<Batch>>,
    /// How many make a group: half the channel, so that the session keeps
    /// the other half while the reader makes the next group.
    group: usize,
}

/// The session is gone: nothing more is read for it.
#[derive(Debug)]
pub(super) struct Gone;

impl Handoff {
    pub(super) fn new(tx: mpsc::Sender<Read>) -> Handoff {
        let group = (tx.max_capacity() / 2).max(1);
        Handoff {
            tx,
            held: std::cell::RefCell::new(Vec::with_capacity(group)),
            group,
        }
    }

    /// Hands over `read`: a batch joins the group (the group goes once
    /// full); an error goes at once, after every batch held.
    fn hand_over(&self, read: Read) -> Result<(), Gone> {
        match read {
            Ok(batch) => {
                let full = {
                    let mut held = self.held.borrow_mut();
                    held.push(batch);
                    held.len() >= self.group
                };
                if full {
                    self.flush()?;
                }
                Ok(())
            }
            Err(error) => {
                self.flush()?;
                self.tx.blocking_send(Err(error)).map_err(|_| Gone)
            }
        }
    }

    /// Hands over every batch held, waiting for room for all of them.
    fn flush(&self) -> Result<(), Gone> {
        let mut held = self.held.borrow_mut();
        if held.is_empty() {
            return Ok(());
        }
        // On the reader's own thread, outside the runtime: the wait for
        // room blocks it, as `blocking_send` does.
        let permits =
            futures::executor::block_on(self.tx.reserve_many(held.len())).map_err(|_| Gone)?;
        for (permit, batch) in permits.zip(held.drain(..)) {
            permit.send(Ok(batch));
        }
        Ok(())
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Sends the bets read before a bad line (they are good, and a later run
/// resumes after them), then the error.
fn fail(tx: &Handoff, batch: Batch, error: AgencyError) {
    if batch.count > 0 && tx.hand_over(Ok(batch)).is_err() {
        return;
    }
    let _ = tx.hand_over(Err(error));
}

/// Where the reader starts, and what it checks before it sends anything.
#[derive(Debug)]
pub(super) struct Resume {
    /// Bets the central holds: skipped.
    pub skip: u64,
    /// The central's receipt for them (none from a central that sends no
    /// digest).
    pub held: Option<Receipt>,
    /// Whether each frame says where its batch starts (`FIRST`).
    pub say_first: bool,
}

/// Reads the data file into batches on a blocking thread, skipping the
/// first `from.skip` bets (the central holds them). Each frame says where
/// its batch starts (`FIRST`) when `from.say_first` is set (a reference
/// central does not know the key). Stops at the first bad line (sending its
/// error) or when the receiver is gone.
///
/// Every bet read goes into the file's receipt. Before anything is sent,
/// the receipt of the first `skip` bets must be `from.held`, the central's
/// from `HELLO` (when it sent one): when it is not (an earlier round's
/// bets, another agency's file, an edited file), nothing is sent and the
/// error says so. At the end of the file the whole file's receipt goes to
/// `whole`, for the winners' check.
pub(super) fn read_batches(
    path: &Path,
    agency: AgencyId,
    max: usize,
    from: Resume,
    tx: &Handoff,
    whole: tokio::sync::oneshot::Sender<Receipt>,
) {
    let Resume {
        skip,
        held,
        say_first,
    } = from;
    let mut file_receipt = Receipt::empty(agency);
    let check = |file_receipt: &Receipt| match held {
        Some(held) => mismatches::check_prefix(path, agency, held, file_receipt),
        None => Ok(()),
    };
    let mismatch = |reason: String| {
        let _ = tx.hand_over(Err(AgencyError::Receipt(reason)));
    };
    if skip == 0 {
        if let Err(reason) = check(&file_receipt) {
            return mismatch(reason);
        }
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(source) => {
            let _ = tx.hand_over(Err(AgencyError::OpenData {
                path: path.to_path_buf(),
                source,
            }));
            return;
        }
    };
    let mut records = Records::new(file);
    let log_bets = tracing::enabled!(tracing::Level::DEBUG);
    let new_batch = |first: u64, first_line: u64| {
        (
            BatchBuilder::new(say_first.then_some(first)),
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
    // The batch being built, finished, for a bad line's `fail`.
    let take =
        |current: &mut (BatchBuilder, Batch)| finish(std::mem::replace(current, new_batch(0, 0)));
    let mut today = Today::now();
    let mut position = 0u64;
    let data_error = |line: u64, reason: String| AgencyError::Data {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let read = records.for_each(|record| {
        let line = record.line;
        let Some(fields) = record.fields else {
            let reason = "not valid UTF-8".to_string();
            fail(tx, take(&mut current), data_error(line, reason));
            return ControlFlow::Break(());
        };
        let last = fields.len().saturating_sub(1);
        let last_field = fields.get(last);
        let last_field = last_field.strip_suffix('\r').unwrap_or(last_field);
        if fields.len() == 1 && last_field.is_empty() {
            return ControlFlow::Continue(()); // a blank CRLF line
        }
        position += 1;
        if position <= skip {
            // The central already holds this bet: not sent, but counted in
            // the receipt the central's must equal. A line that is not a
            // valid bet cannot be one the central holds.
            let bet = (fields.len() == 5)
                .then(|| {
                    BetRef::check(
                        agency,
                        fields.get(0),
                        fields.get(1),
                        fields.get(2),
                        fields.get(3),
                        last_field,
                        today,
                    )
                    .ok()
                })
                .flatten();
            let Some(bet) = bet else {
                if held.is_some() {
                    mismatch(mismatches::not_a_bet(path, agency, skip, line));
                    return ControlFlow::Break(());
                }
                return ControlFlow::Continue(());
            };
            file_receipt.push_bet(&bet);
            if position == skip {
                if let Err(reason) = check(&file_receipt) {
                    mismatch(reason);
                    return ControlFlow::Break(());
                }
            }
            return ControlFlow::Continue(());
        }
        if fields.len() != 5 {
            let reason = format!(
                "expected 5 fields (first_name,last_name,document,birthdate,number), found {}",
                fields.len()
            );
            fail(tx, take(&mut current), data_error(line, reason));
            return ControlFlow::Break(());
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
            Err(e) => {
                fail(tx, take(&mut current), data_error(line, e.to_string()));
                return ControlFlow::Break(());
            }
        };
        file_receipt.push_bet(&bet);
        // Encoded straight into the frame: no copy of the bet in between. A
        // line without `\` or `|` has nothing to escape.
        let plain = fields.plain();
        let push = |builder: &mut BatchBuilder| match plain {
            true => builder.push_plain(bet),
            false => builder.push(bet),
        };
        let full = current.0.count() == max;
        if full || !push(&mut current.0) {
            let next = new_batch(position - 1, line);
            let batch = finish(std::mem::replace(&mut current, next));
            if batch.count > 0 && tx.hand_over(Ok(batch)).is_err() {
                return ControlFlow::Break(());
            }
            today = Today::now();
            if !push(&mut current.0) {
                let reason = "the bet is too large to fit in one frame".to_string();
                fail(tx, take(&mut current), data_error(line, reason));
                return ControlFlow::Break(());
            }
        }
        if current.0.count() == 1 {
            current.1.first_line = line;
        }
        if let Some(logged) = &mut current.1.logged {
            logged.push((bet.document.to_string(), bet.number));
        }
        ControlFlow::Continue(())
    });
    match read {
        Ok(ControlFlow::Continue(())) => {}
        Ok(ControlFlow::Break(())) => return,
        Err(e) => {
            let line = records.record_line();
            return fail(tx, finish(current), data_error(line, e.to_string()));
        }
    }
    if position < skip {
        // The central holds more of this agency's bets than the file has.
        if let Err(reason) = check(&file_receipt) {
            return mismatch(reason);
        }
    }
    if current.0.count() > 0 && tx.hand_over(Ok(finish(current))).is_err() {
        return;
    }
    // Every batch is the session's before the file's receipt is.
    if tx.flush().is_err() {
        return;
    }
    let _ = whole.send(file_receipt);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Request, ServerCodec, MAX_FRAME_LEN};
    use tokio_util::codec::Decoder;

    fn batches_of(text: &str, max: usize) -> Vec<Result<Batch, AgencyError>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv");
        std::fs::write(&path, text).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let tx = Handoff::new(tx);
        let (whole, _) = tokio::sync::oneshot::channel();
        let from = Resume {
            skip: 0,
            held: Some(Receipt::empty(1)),
            say_first: true,
        };
        read_batches(&path, 1, max, from, &tx, whole);
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

    /// `lines` good bets, one a line.
    fn good_lines(lines: u64) -> String {
        (0..lines)
            .map(|i| format!("Ana,Pérez,{},1999-03-17,{}\n", 10_000_000 + i, i % 10_000))
            .collect()
    }

    #[test]
    fn every_batch_is_handed_over_in_order_before_the_file_s_receipt() {
        // 23 batches of one bet: not a whole number of groups of 2.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv");
        std::fs::write(&path, good_lines(23)).unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let tx = Handoff::new(tx);
        let (whole, receipt) = tokio::sync::oneshot::channel();
        let from = Resume {
            skip: 0,
            held: None,
            say_first: true,
        };
        std::thread::scope(|s| {
            // The reader hands the handoff back instead of dropping it, so
            // that its drop cannot hand over what it still held at the end:
            // only the flush before the file's receipt may.
            let reader = s.spawn(move || {
                read_batches(&path, 1, 1, from, &tx, whole);
                tx
            });
            let mut firsts = Vec::new();
            // Taken one at a time, so the reader keeps waiting for room.
            while firsts.len() < 20 {
                firsts.push(rx.blocking_recv().unwrap().unwrap().first);
            }
            let receipt = receipt.blocking_recv().expect("the file's receipt");
            assert_eq!(receipt.count, 23);
            // The receipt came after every batch.
            while let Ok(batch) = rx.try_recv() {
                firsts.push(batch.unwrap().first);
            }
            assert_eq!(firsts, (0..23).collect::<Vec<u64>>());
            drop(reader.join().unwrap());
        });
    }

    #[test]
    fn a_bad_line_s_error_comes_after_every_batch_before_it() {
        let mut text = good_lines(9);
        text.push_str("Bob,Lee,2,1999-02-30,6\n");
        let (tx, mut rx) = mpsc::channel(4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agency-1.csv");
        std::fs::write(&path, text).unwrap();
        let from = Resume {
            skip: 0,
            held: None,
            say_first: true,
        };
        let reader = std::thread::spawn(move || {
            let (whole, _) = tokio::sync::oneshot::channel();
            read_batches(&path, 1, 2, from, &Handoff::new(tx), whole);
        });
        let mut firsts = Vec::new();
        let error = loop {
            match rx.blocking_recv().expect("an error at the end") {
                Ok(batch) => firsts.push((batch.first, batch.count)),
                Err(e) => break e,
            }
        };
        reader.join().unwrap();
        assert_eq!(firsts, [(0, 2), (2, 2), (4, 2), (6, 2), (8, 1)]);
        assert!(error.to_string().contains("line 10: NACIMIENTO"), "{error}");
        assert!(rx.blocking_recv().is_none());
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
