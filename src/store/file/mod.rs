//! The bets file: append-only CSV, one row per stored bet,
//! `agency,first_name,last_name,document,birthdate,number`.
//!
//! One writer thread owns the file. Connections hand it whole batches,
//! already encoded as CSV rows, and go on reading while it works; the
//! writer appends every batch that is waiting with one `writev` and one
//! `fdatasync` for the group, then answers them all. A batch is therefore
//! written whole, never interleaved with another, and acknowledged only once
//! its rows are on stable storage. [`recover`] repairs the file after a
//! crash.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::logging::{action, result};
use crate::model::{AgencyId, BetRef};

/// How many batches may wait for the writer before senders wait too.
const QUEUE_DEPTH: usize = 1024;

/// A failure of the bets file.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Opening, writing or flushing failed.
    #[error("bets file {path}: {source}")]
    Io {
        /// The bets file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A stored row cannot be read back.
    #[error("bets file {path}, row {row}: {reason}")]
    Corrupt {
        /// The bets file.
        path: PathBuf,
        /// 1-based row number.
        row: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Writing or syncing failed; nothing of the batch was kept.
    #[error("bets file {path}: {reason}")]
    Write {
        /// The bets file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The writer has stopped (the server is shutting down).
    #[error("the bets file is closed")]
    Closed,
}

/// Encodes bets as CSV rows of the bets file, quoting only the fields that
/// need it (those holding `,`, `"`, CR or LF; a `"` inside is doubled).
///
/// Written by hand rather than through the `csv` writer: this runs for every
/// stored bet on the central's hot path, and nearly every field is plain
/// text copied as is. The `csv` reader reads it back (see [`scan`]).
pub fn encode_rows<'a>(bets: impl IntoIterator<Item = BetRef<'a>>, dst: &mut Vec<u8>) {
    let mut digits = itoa::Buffer::new();
    for b in bets {
        dst.extend_from_slice(digits.format(b.agency).as_bytes());
        for field in [b.first_name, b.last_name, b.document, b.birthdate] {
            dst.push(b',');
            push_field(dst, field.as_bytes());
        }
        dst.push(b',');
        dst.extend_from_slice(digits.format(b.number).as_bytes());
        dst.push(b'\n');
    }
}

fn push_field(dst: &mut Vec<u8>, field: &[u8]) {
    if !field
        .iter()
        .any(|&c| matches!(c, b',' | b'"' | b'\r' | b'\n'))
    {
        dst.extend_from_slice(field);
        return;
    }
    dst.push(b'"');
    for part in field.split_inclusive(|&c| c == b'"') {
        dst.extend_from_slice(part);
        if part.last() == Some(&b'"') {
            dst.push(b'"');
        }
    }
    dst.push(b'"');
}

/// The batches of one connection. The writer stores them in the order they
/// were submitted, and once one fails it fails every later one without
/// writing it: a connection keeps several batches in flight, and a batch
/// stored after a lost one would leave a gap in the agency's bets.
#[derive(Debug, Clone, Default)]
pub struct Sequence(Arc<AtomicBool>);

impl Sequence {
    /// A sequence with nothing failed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a batch of it failed (and every later one fails too).
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn mark_broken(&self) {
        self.0.store(true, Ordering::Release);
    }
}

struct Append {
    rows: Vec<u8>,
    sequence: Sequence,
    done: oneshot::Sender<Result<(), String>>,
}

/// A cheap, cloneable handle to the bets file's writer.
#[derive(Debug, Clone)]
pub struct BetStore {
    tx: mpsc::Sender<Append>,
    path: Arc<Path>,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("bytes", &self.rows.len())
            .finish()
    }
}

/// Whether an acknowledgement waits for the rows to reach stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fdatasync` once per group of batches before any of them is
    /// acknowledged: an acknowledged bet survives a crash of the machine.
    Sync,
    /// Acknowledge once the rows are in the operating system's page cache:
    /// they survive a crash of the server process, not of the machine. For
    /// measurements and throwaway runs.
    NoSync,
}

impl BetStore {
    /// Starts the writer for the bets file at `path`, on a thread of its own
    /// (file I/O blocks; it must not hold up the runtime's workers, and one
    /// long-lived thread avoids a hand-off to the blocking pool per group).
    /// The file is opened (and created) when the first batch arrives, and
    /// again after a failure, so a storage problem fails batches instead of
    /// the server. The returned handle resolves once every [`BetStore`]
    /// clone is dropped and the file is flushed and closed.
    pub fn open(path: &Path, durability: Durability) -> (BetStore, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            path: path.to_path_buf(),
            file: None,
            durability,
            poisoned: None,
        };
        let task = crate::task::spawn_blocking_named("bets writer", move || write_loop(writer, rx));
        (
            BetStore {
                tx,
                path: Arc::from(path),
            },
            task,
        )
    }

    /// The bets file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands pre-encoded CSV rows to the writer as one unit, after the
    /// earlier batches of `sequence`, and returns at once (or when the
    /// writer's queue has room): await the returned [`Pending`] for the
    /// outcome.
    ///
    /// # Errors
    /// The writer has stopped.
    pub async fn submit(
        &self,
        rows: Vec<u8>,
        sequence: &Sequence,
    ) -> Result<Pending, StorageError> {
        let (done, answer) = oneshot::channel();
        let append = Append {
            rows,
            sequence: sequence.clone(),
            done,
        };
        self.tx
            .send(append)
            .await
            .map_err(|_| StorageError::Closed)?;
        Ok(Pending {
            answer,
            path: self.path.clone(),
        })
    }

    /// Appends pre-encoded CSV rows as one unit and waits until they are in
    /// the file (and on stable storage, with [`Durability::Sync`]).
    ///
    /// # Errors
    /// The write or sync failed (nothing of `rows` is acknowledged, and
    /// nothing of it stays in the file), or the writer has stopped.
    pub async fn append(&self, rows: Vec<u8>) -> Result<(), StorageError> {
        self.submit(rows, &Sequence::new()).await?.await
    }
}

/// A submitted batch: resolves once its rows are stored (or not).
#[derive(Debug)]
pub struct Pending {
    answer: oneshot::Receiver<Result<(), String>>,
    path: Arc<Path>,
}

impl std::future::Future for Pending {
    type Output = Result<(), StorageError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| match answer {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(StorageError::Write {
                    path: self.path.to_path_buf(),
                    reason,
                }),
                Err(_) => Err(StorageError::Closed),
            })
    }
}

/// Most batches written together: one `writev` takes at most 1024 buffers.
const MAX_GROUP: usize = 512;

fn write_loop(mut writer: Writer, mut rx: mpsc::Receiver<Append>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // Group commit: every batch waiting when the writer comes round shares
    // one write and one sync. Under load the groups grow by themselves.
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(append) => group.push(append),
                Err(_) => break,
            }
        }
        let outcomes = writer.write_group(&group);
        for (append, outcome) in group.drain(..).zip(outcomes) {
            if let Err(reason) = &outcome {
                append.sequence.mark_broken();
                error!(action = action::STORE, result = result::FAIL, path = %writer.path.display(), reason = reason.as_str());
            }
            // A connection that went away no longer needs its answer.
            let _ = append.done.send(outcome);
        }
    }
    let path = writer.path.clone();
    match writer.close() {
        Ok(()) => info!(
            action = action::CLOSE_BETS_FILE,
            result = result::SUCCESS,
            path = %path.display()
        ),
        Err(e) => error!(
            action = action::CLOSE_BETS_FILE,
            result = result::FAIL,
            path = %path.display(),
            error = %e
        ),
    }
}

/// The writer's side of the bets file, owned by the writer thread.
struct Writer {
    path: PathBuf,
    /// The open file, the identity (device, inode) it had when opened, and
    /// its length: where the next group starts, and where a failed group is
    /// cut back to.
    file: Option<(File, (u64, u64), u64)>,
    durability: Durability,
    /// Set when a failed sync could not be rolled back: the file's contents
    /// are then unknown, and only a restart (which recovers from the file)
    /// may accept bets again.
    poisoned: Option<String>,
}

impl Writer {
    /// Appends the group's batches with one `writev`, then syncs once.
    /// Batches of a broken [`Sequence`] are failed without being written.
    fn write_group(&mut self, group: &[Append]) -> Vec<Result<(), String>> {
        let all = |reason: &str| group.iter().map(|_| Err(reason.to_string())).collect();
        if let Some(reason) = &self.poisoned {
            return all(reason);
        }
        let durability = self.durability;
        let (file, len) = match self.file_checked() {
            Ok(f) => f,
            Err(reason) => return all(&reason),
        };
        let mut outcomes: Vec<Result<(), String>> = group
            .iter()
            .map(|a| {
                if a.sequence.is_broken() {
                    Err("an earlier batch of this connection was not stored".to_string())
                } else {
                    Ok(())
                }
            })
            .collect();
        let rows: Vec<&[u8]> = group
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.is_ok())
            .map(|(a, _)| a.rows.as_slice())
            .collect();
        if rows.is_empty() {
            return outcomes;
        }
        match append_group(file, *len, &rows, durability) {
            Ok(written) => *len += written,
            Err((reason, poison)) => {
                for o in outcomes.iter_mut().filter(|o| o.is_ok()) {
                    *o = Err(reason.clone());
                }
                if poison.is_some() {
                    self.poisoned = poison;
                }
            }
        }
        outcomes
    }

    /// The open file and its length, opening it if needed, after checking
    /// that the path still names it. A bets file that was replaced or
    /// removed under us is refused rather than silently written to (its
    /// writes would be lost) or recreated empty (the counts would be wrong).
    fn file_checked(&mut self) -> Result<(&mut File, &mut u64), String> {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
        match (&self.file, on_disk) {
            (Some((_, id, _)), Ok(now)) if *id == now => {}
            (Some(_), Ok(_)) | (Some(_), Err(_)) => {
                return Err(format!(
                    "{} is no longer the file this server opened (replaced or removed); \
                     put it back to go on",
                    self.path.display()
                ))
            }
            (None, _) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)
                    .map_err(|e| format!("cannot open {}: {e}", self.path.display()))?;
                let meta = file
                    .metadata()
                    .map_err(|e| format!("cannot inspect {}: {e}", self.path.display()))?;
                if !meta.is_file() {
                    return Err(format!("{} is not a regular file", self.path.display()));
                }
                self.file = Some((file, (meta.dev(), meta.ino()), meta.len()));
            }
        }
        let (file, _, len) = self.file.as_mut().expect("opened above");
        Ok((file, len))
    }

    fn close(self) -> io::Result<()> {
        match self.file {
            Some((mut f, _, _)) => {
                f.flush()?;
                if self.durability == Durability::Sync {
                    f.sync_all()?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Appends `rows` (the file is `len` bytes long) with one `writev` (more if
/// the kernel takes part of it), then syncs. Returns the bytes written; on a
/// failure, cuts the file back to `len` so no part of the group stays, and
/// says why, with a reason to refuse all further writes when even that
/// failed.
fn append_group(
    file: &mut File,
    len: u64,
    rows: &[&[u8]],
    durability: Durability,
) -> Result<u64, (String, Option<String>)> {
    let undo = |file: &mut File, what: String| {
        // After a failed write or fsync the kernel may have dropped dirty
        // pages: nothing of the group is known to be durable. Take all of it
        // back out so that a retry cannot duplicate it.
        match file.set_len(len).and_then(|()| file.sync_data()) {
            Ok(()) => (what, None),
            Err(undo) => {
                let poison = format!(
                    "{what}, and could not be undone ({undo}); restart the server to recover"
                );
                (what, Some(poison))
            }
        }
    };
    let mut slices: Vec<IoSlice<'_>> = rows.iter().map(|r| IoSlice::new(r)).collect();
    let total: usize = rows.iter().map(|r| r.len()).sum();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(undo(file, "write failed: the disk took no bytes".into())),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(undo(file, format!("write failed: {e}"))),
        }
    }
    if durability == Durability::Sync {
        if let Err(e) = file.sync_data() {
            return Err(undo(file, format!("sync failed: {e}")));
        }
    }
    Ok(total as u64)
}

/// What [`recover`] found in the bets file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Complete rows kept.
    pub rows: u64,
    /// Rows per agency: the position in its data file to resume from.
    pub per_agency: BTreeMap<AgencyId, u64>,
    /// Bytes of a torn last row that were cut off.
    pub truncated_bytes: u64,
}

/// Largest tail that [`recover`] treats as a torn write. Anything longer
/// that does not parse is damage from elsewhere, and the server refuses to
/// start rather than cut it off.
const MAX_TORN_TAIL: u64 = 64 * 1024;

/// Checks the bets file on start: keeps every complete row, cuts off a torn
/// last row (left by a crash in the middle of a write), and counts the rows
/// of each agency. A missing file is an empty one.
///
/// # Errors
/// The file cannot be read or cut, or it is damaged before its tail.
pub fn recover(path: &Path) -> Result<Recovered, StorageError> {
    let io_err = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Recovered::default()),
        Err(e) => return Err(io_err(e)),
    };
    let len = file.metadata().map_err(io_err)?.len();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_reader(BufReader::with_capacity(1 << 16, file));
    let mut found = Recovered::default();
    let mut record = csv::ByteRecord::new();
    // End offsets of the last two complete rows, and the last row's agency.
    let (mut good_end, mut prev_end, mut last_agency) = (0u64, 0u64, None);
    let mut bad = None;
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                bad = Some(e.to_string());
                break;
            }
        }
        let agency = match check_row(&record) {
            Ok(agency) => agency,
            Err(reason) => {
                bad = Some(reason);
                break;
            }
        };
        prev_end = good_end;
        good_end = reader.position().byte();
        last_agency = Some(agency);
        found.rows += 1;
        *found.per_agency.entry(agency).or_default() += 1;
    }
    // A row is complete only with its newline: a crash can leave a last row
    // that parses but lacks it (its number cut short, say).
    if let Some(agency) = last_agency {
        if !ends_with_newline(path, good_end).map_err(io_err)? {
            good_end = prev_end;
            found.rows -= 1;
            *found.per_agency.entry(agency).or_default() -= 1;
        }
    }
    let tail = len - good_end;
    if tail > MAX_TORN_TAIL {
        return Err(StorageError::Corrupt {
            path: path.to_path_buf(),
            row: found.rows + 1,
            reason: format!(
                "{} ({tail} bytes follow the last good row; a torn write is never that long)",
                bad.unwrap_or_else(|| "unreadable".into())
            ),
        });
    }
    if tail > 0 {
        let f = OpenOptions::new().write(true).open(path).map_err(io_err)?;
        f.set_len(good_end).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        found.truncated_bytes = tail;
    }
    found.per_agency.retain(|_, n| *n > 0);
    Ok(found)
}

/// A stored row: six fields, an agency id and a number.
fn check_row(record: &csv::ByteRecord) -> Result<AgencyId, String> {
    if record.len() != 6 {
        return Err(format!("{} fields instead of 6", record.len()));
    }
    let num = |i: usize| -> Option<u32> { std::str::from_utf8(&record[i]).ok()?.parse().ok() };
    match (num(0), num(5)) {
        (Some(agency), Some(number)) if agency >= 1 && number <= 9999 => Ok(agency),
        _ => Err("agency or number is not a number".to_string()),
    }
}

fn ends_with_newline(path: &Path, end: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    if end == 0 {
        return Ok(true);
    }
    let mut byte = [0u8];
    File::open(path)?.read_exact_at(&mut byte, end - 1)?;
    Ok(byte[0] == b'\n')
}

/// Streams the bets file back, calling `each` for every stored bet, without
/// holding the file in memory.
///
/// This is the draw's whole cost, so it reads the file in large blocks and
/// finds rows with the byte scanner: a row without a `"` (nearly all of
/// them) is cut at its commas; a row with quoted fields (a name holding a
/// comma, a quote or a line break, which may span lines) goes through CSV's
/// own parser.
///
/// # Errors
/// The file cannot be read, or a row is not a valid bet.
pub fn scan(path: &Path, mut each: impl FnMut(StoredBet<'_>)) -> Result<u64, StorageError> {
    let Some(mut file) = open_existing(path)? else {
        return Ok(0);
    };
    match scan_part(&mut file, 0, None, &mut each) {
        Ok(part) => Ok(part.rows),
        Err(fail) => Err(fail.into_error(path, 0)),
    }
}

/// What the draw needs from the bets file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Rows (bets) in the file.
    pub rows: u64,
    /// Bets per agency.
    pub per_agency: BTreeMap<AgencyId, u64>,
    /// Each agency's winning documents, in the order they were stored.
    pub winners: HashMap<AgencyId, Vec<String>>,
}

impl Tally {
    fn add(&mut self, bet: StoredBet<'_>, winning: u32) {
        *self.per_agency.entry(bet.agency).or_default() += 1;
        if bet.number == winning {
            let document = String::from_utf8_lossy(bet.document).into_owned();
            self.winners.entry(bet.agency).or_default().push(document);
        }
    }

    /// Adds what a later part of the file holds.
    fn extend(&mut self, later: Tally) {
        self.rows += later.rows;
        for (agency, n) in later.per_agency {
            *self.per_agency.entry(agency).or_default() += n;
        }
        for (agency, documents) in later.winners {
            self.winners.entry(agency).or_default().extend(documents);
        }
    }
}

/// Files smaller than this are tallied by one thread.
const SPLIT_ABOVE: u64 = 8 << 20;

/// Tallies the bets file for a draw of `winning`: bets per agency, and
/// each agency's winners in file order.
///
/// A large file is read by two threads at once, one from each half: the
/// draw runs while the agencies wait, and the central's other core would
/// otherwise sit idle. The second half starts after the first line end past
/// the middle; as a quoted name may hold a line break, that is only a guess
/// at a row boundary, which the first thread confirms by ending exactly
/// there. When it does not (the middle fell inside such a name), the second
/// thread's work is dropped and the first reads on to the end alone.
///
/// # Errors
/// As [`scan`].
pub fn tally(path: &Path, winning: u32) -> Result<Tally, StorageError> {
    let Some(mut file) = open_existing(path)? else {
        return Ok(Tally::default());
    };
    let io_err = |source| StorageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    let split = if len > SPLIT_ABOVE {
        row_start_after(&file, len / 2).map_err(io_err)?
    } else {
        None
    };
    let tally_part = |file: &mut File, from: u64, stop_at: Option<u64>| {
        let mut tally = Tally::default();
        let part = scan_part(file, from, stop_at, &mut |bet| tally.add(bet, winning))?;
        tally.rows = part.rows;
        Ok::<_, ScanFail>((tally, part.end))
    };
    let Some(split) = split else {
        let (tally, _) = tally_part(&mut file, 0, None).map_err(|f| f.into_error(path, 0))?;
        return Ok(tally);
    };
    std::thread::scope(|scope| {
        let second = scope.spawn(|| {
            let mut file = File::open(path).map_err(ScanFail::Io)?;
            tally_part(&mut file, split, None)
        });
        let (mut tally, end) =
            tally_part(&mut file, 0, Some(split)).map_err(|f| f.into_error(path, 0))?;
        let second = second.join().expect("the draw's scan does not panic");
        if end == split {
            match second {
                Ok((later, _)) => tally.extend(later),
                Err(fail) => return Err(fail.into_error(path, tally.rows)),
            }
        } else {
            // The guess fell inside a row: read on from where the first
            // half really ended.
            let (later, _) =
                tally_part(&mut file, end, None).map_err(|f| f.into_error(path, tally.rows))?;
            tally.extend(later);
        }
        Ok(tally)
    })
}

/// Where the first line after byte `from` starts, if there is one.
fn row_start_after(file: &File, from: u64) -> io::Result<Option<u64>> {
    use std::os::unix::fs::FileExt;
    let mut window = vec![0u8; 64 * 1024];
    let n = file.read_at(&mut window, from)?;
    Ok(memchr::memchr(b'\n', &window[..n]).map(|at| from + at as u64 + 1))
}

/// The bets file, or `None` when there is none yet.
fn open_existing(path: &Path) -> Result<Option<File>, StorageError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StorageError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Why a part of a scan failed; rows count from the part's start.
enum ScanFail {
    Io(io::Error),
    Corrupt(u64, String),
}

impl ScanFail {
    /// The error, for a part that starts after `rows_before` rows.
    fn into_error(self, path: &Path, rows_before: u64) -> StorageError {
        match self {
            ScanFail::Io(source) => StorageError::Io {
                path: path.to_path_buf(),
                source,
            },
            ScanFail::Corrupt(row, reason) => StorageError::Corrupt {
                path: path.to_path_buf(),
                row: rows_before + row,
                reason,
            },
        }
    }
}

/// What a scanned part of the file held.
struct Part {
    rows: u64,
    /// Where the part ended: the file offset after its last row.
    end: u64,
}

/// Scans rows from file offset `from` (which must start a row) until the
/// end of the file, or until a row would start at or past `stop_at`.
fn scan_part(
    file: &mut File,
    from: u64,
    stop_at: Option<u64>,
    each: &mut dyn FnMut(StoredBet<'_>),
) -> Result<Part, ScanFail> {
    use std::io::{Read, Seek};
    let mut buf = vec![0u8; SCAN_BLOCK];
    file.seek(io::SeekFrom::Start(from)).map_err(ScanFail::Io)?;
    // `base` is the file offset of `buf[0]`.
    let (mut start, mut filled, mut eof, mut base) = (0usize, 0usize, false, from);
    let mut rows = 0u64;
    let mut quoted = csv_core::Reader::new();
    let mut scratch = (Vec::new(), [0usize; 8]);
    // Where every `,`, `\n` and `"` of the buffer is, found once per read;
    // `mark` is the first one at or after `start`.
    let mut marks: Vec<u32> = Vec::new();
    let (mut marked, mut mark) = (0, 0);
    loop {
        if stop_at.is_some_and(|stop| base + start as u64 >= stop) {
            break;
        }
        // A whole row from `start`, or (at the end) whatever is left.
        // Most rows: one pass finds the line's end and its commas.
        let mut commas = [0usize; 5];
        let plain = plain_row(&buf, &marks[..marked], &mut mark, start, &mut commas);
        let found = match plain {
            Some(PlainRow { len, commas: 5 }) => {
                let row = &buf[start..start + len];
                start += len + 1;
                let mut fields = [&b""[..]; 6];
                let mut from = 0;
                for (slot, &comma) in fields.iter_mut().zip(&commas) {
                    *slot = &row[from..comma];
                    from = comma + 1;
                }
                fields[5] = row[from..].strip_suffix(b"\r").unwrap_or(&row[from..]);
                rows += 1;
                each(stored_bet(&fields).map_err(|reason| ScanFail::Corrupt(rows, reason))?);
                continue;
            }
            // Blank lines, rows with quotes or the wrong field count, and
            // the last row: the general path below.
            Some(_) => complete_row(&buf[start..filled]),
            None => None,
        };
        if let Some((len, _)) = found {
            // The general path takes the row: skip its marks.
            while marks[..marked]
                .get(mark)
                .is_some_and(|&m| (m as usize) < start + len)
            {
                mark += 1;
            }
        }
        let (row_len, has_quotes) = match found {
            Some(found) => found,
            None if !eof => {
                // Keep the partial row, make room after it, read on.
                buf.copy_within(start..filled, 0);
                filled -= start;
                base += start as u64;
                start = 0;
                if filled == buf.len() {
                    buf.resize(buf.len() * 2, 0); // a row longer than a block
                }
                let n = file.read(&mut buf[filled..]).map_err(ScanFail::Io)?;
                filled += n;
                eof = n == 0;
                // Zeroed room grows with the buffer only, and is reused.
                marks.resize(buf.len(), 0);
                marked = marks
                    .iter_mut()
                    .zip(memchr::memchr3_iter(b',', b'\n', b'"', &buf[..filled]))
                    .map(|(mark, at)| *mark = at as u32)
                    .count();
                mark = 0;
                continue;
            }
            None if start == filled => break,
            None => (filled - start, true),
        };
        let row = &buf[start..start + row_len];
        start += row_len;
        let row = row.strip_suffix(b"\n").unwrap_or(row);
        let row = row.strip_suffix(b"\r").unwrap_or(row);
        if row.is_empty() {
            continue; // the CSV reader skips blank lines too
        }
        rows += 1;
        let mut fields = [&b""[..]; 6];
        let count = if has_quotes {
            split_quoted(row, &mut fields, &mut quoted, &mut scratch)
        } else {
            split_plain(row, &mut fields)
        };
        if count != 6 {
            return Err(ScanFail::Corrupt(
                rows,
                format!("{count} fields instead of 6"),
            ));
        }
        each(stored_bet(&fields).map_err(|reason| ScanFail::Corrupt(rows, reason))?);
    }
    Ok(Part {
        rows,
        end: base + start as u64,
    })
}

/// Bytes the draw's scan reads at a time.
const SCAN_BLOCK: usize = 256 << 10;

/// Length of the first complete row of `bytes`, its `\n` included, and
/// whether it holds a `"`: the first line when it holds none or an even
/// number of them, else as many lines as it takes for the quotes to pair up
/// (a quoted field holding a line break).
fn complete_row(bytes: &[u8]) -> Option<(usize, bool)> {
    let end = memchr::memchr(b'\n', bytes)?;
    if memchr::memchr(b'"', &bytes[..end]).is_none() {
        return Some((end + 1, false));
    }
    let mut open = false;
    let mut from = 0;
    loop {
        let end = from + memchr::memchr(b'\n', &bytes[from..])?;
        let quotes = memchr::memchr_iter(b'"', &bytes[from..end]).count();
        open ^= quotes % 2 == 1;
        if !open {
            return Some((end + 1, true));
        }
        from = end + 1;
    }
}

/// A line without quotes: its length (without the `\n`) and its commas.
struct PlainRow {
    len: usize,
    commas: usize,
}

/// The row at `start`, read from the buffer's `marks` (the positions of
/// its `,`, `\n` and `"`) from index `mark` on, noting where its first five
/// commas are (relative to `start`). `None` without a whole line; `commas`
/// is not 5 when the line is not a plain six-field row (reported as 0 when
/// it holds a `"`). Advances `mark` past the line.
fn plain_row(
    buf: &[u8],
    marks: &[u32],
    mark: &mut usize,
    start: usize,
    commas: &mut [usize; 5],
) -> Option<PlainRow> {
    let mut found = 0;
    for (k, &m) in marks.iter().enumerate().skip(*mark) {
        let at = m as usize;
        if at < start {
            continue; // behind a row the general path took
        }
        match buf[at] {
            b',' => {
                if let Some(slot) = commas.get_mut(found) {
                    *slot = at - start;
                }
                found += 1;
            }
            b'\n' => {
                *mark = k + 1;
                return Some(PlainRow {
                    len: at - start,
                    commas: found,
                });
            }
            // Quoted fields: not plain; the general path takes the row.
            _ => {
                return Some(PlainRow {
                    len: at - start,
                    commas: 0,
                })
            }
        }
    }
    None
}

/// The bet a stored row's six fields hold, or why they hold none.
fn stored_bet<'a>(fields: &[&'a [u8]; 6]) -> Result<StoredBet<'a>, String> {
    let (Some(agency), Some(number)) = (small_number(fields[0]), small_number(fields[5])) else {
        return Err("agency or number is not a number".into());
    };
    let document = fields[3];
    if !is_document(document) {
        return Err("document is not a number".into());
    }
    Ok(StoredBet {
        agency,
        document,
        number,
    })
}

/// Whether a stored document is as the central stores them: 1 to 10 ASCII
/// digits (checked here instead of as UTF-8, which costs a call per row).
fn is_document(field: &[u8]) -> bool {
    (1..=crate::model::MAX_DOCUMENT_LEN).contains(&field.len())
        && field.iter().all(u8::is_ascii_digit)
}

/// A decimal number of one to nine digits, as the agency and number fields
/// of a stored row are.
fn small_number(field: &[u8]) -> Option<u32> {
    if field.is_empty() || field.len() > 9 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(field.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

/// Splits a row without quotes at its commas into at most six fields;
/// returns how many it has.
fn split_plain<'a>(row: &'a [u8], fields: &mut [&'a [u8]; 6]) -> usize {
    let mut count = 0;
    let mut from = 0;
    for comma in memchr::memchr_iter(b',', row) {
        if let Some(slot) = fields.get_mut(count) {
            *slot = &row[from..comma];
        }
        count += 1;
        from = comma + 1;
    }
    if let Some(slot) = fields.get_mut(count) {
        *slot = &row[from..];
    }
    count + 1
}

/// Splits a row with quoted fields into at most six fields through `quoted`
/// (CSV's own parser, reused from row to row), unquoted into `scratch`;
/// returns how many it has.
fn split_quoted<'a>(
    row: &'a [u8],
    fields: &mut [&'a [u8]; 6],
    quoted: &mut csv_core::Reader,
    scratch: &'a mut (Vec<u8>, [usize; 8]),
) -> usize {
    let (out, ends) = scratch;
    // Unquoting only shortens a field, and the parser stops at the row's
    // end: the row's length is room enough.
    out.resize(row.len() + 1, 0);
    let (mut read, mut written, mut count) = (0, 0, 0);
    loop {
        // The empty input after the row tells the parser the row ended.
        let input = &row[read..];
        let (outcome, nin, nout, nend) =
            quoted.read_record(input, &mut out[written..], &mut ends[count..]);
        read += nin;
        written += nout;
        count += nend;
        match outcome {
            csv_core::ReadRecordResult::InputEmpty if input.is_empty() => break,
            csv_core::ReadRecordResult::InputEmpty => {}
            csv_core::ReadRecordResult::Record | csv_core::ReadRecordResult::End => break,
            // More than eight fields, or (impossible) more output than input.
            csv_core::ReadRecordResult::OutputEndsFull | csv_core::ReadRecordResult::OutputFull => {
                quoted.reset();
                return ends.len() + 1;
            }
        }
    }
    quoted.reset();
    let out: &'a [u8] = out;
    let mut from = 0;
    for (slot, &end) in fields.iter_mut().zip(ends.iter().take(count)) {
        *slot = &out[from..end];
        from = end;
    }
    count
}

/// The parts of a stored bet the draw needs, borrowed from the reader.
#[derive(Debug, Clone, Copy)]
pub struct StoredBet<'a> {
    /// The agency that took it.
    pub agency: AgencyId,
    /// The document (DNI): 1 to 10 ASCII digits.
    pub document: &'a [u8],
    /// The number bet on.
    pub number: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Bet;

    /// Every bet [`scan`] reads back: (agency, document, number).
    fn scanned(path: &Path) -> (u64, Vec<(u32, String, u32)>) {
        let mut seen = Vec::new();
        let n = scan(path, |b| {
            let document = String::from_utf8(b.document.to_vec()).unwrap();
            seen.push((b.agency, document, b.number));
        })
        .unwrap();
        (n, seen)
    }

    fn bet(agency: u32, first: &str, last: &str, doc: &str, n: &str) -> Bet {
        Bet::from_fields(&agency.to_string(), first, last, doc, "1999-03-17", n).unwrap()
    }

    #[tokio::test]
    async fn rows_round_trip_through_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let bets = [
            bet(1, "Santiago Lionel", "Lorca", "30904465", "7574"),
            bet(2, "Pérez, Ana", "O\"Neil", "1", "0"),
            bet(3, "a|b:c\\d", "Ñandú", "0012", "9999"),
        ];
        let (store, writer) = BetStore::open(&path, Durability::Sync);
        let mut rows = Vec::new();
        encode_rows(bets[..2].iter().map(Bet::as_ref), &mut rows);
        store.append(rows).await.unwrap();
        let mut rows = Vec::new();
        encode_rows(bets[2..].iter().map(Bet::as_ref), &mut rows);
        store.append(rows).await.unwrap();
        drop(store);
        writer.await.unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "1,Santiago Lionel,Lorca,30904465,1999-03-17,7574\n\
             2,\"Pérez, Ana\",\"O\"\"Neil\",1,1999-03-17,0\n\
             3,a|b:c\\d,Ñandú,0012,1999-03-17,9999\n"
        );
        let (n, seen) = scanned(&path);
        assert_eq!(n, 3);
        assert_eq!(
            seen,
            vec![
                (1, "30904465".to_string(), 7574),
                (2, "1".to_string(), 0),
                (3, "0012".to_string(), 9999)
            ]
        );
    }

    #[test]
    fn scan_reads_every_row_back_across_blocks_and_quoting() {
        // Enough rows to cross several read blocks, with names that need
        // quoting (some spanning lines) among plain ones.
        let names = [
            "Ana",
            "Pérez, Ana",
            "say \"hi\"",
            "two\nlines",
            "cr\r\nlf",
            "\"",
            ",",
            "Ñandú",
        ];
        let mut bets = crate::model::Bets::new();
        let mut expected = Vec::new();
        for i in 0..60_000u32 {
            let (first, last) = (names[i as usize % 8], names[(i as usize / 8) % 8]);
            let doc = format!("{}", 10_000_000 + i);
            let number = (i * 7919 % 10_000).to_string();
            let agency = 1 + i % 7;
            bets.push_fields(
                &agency.to_string(),
                first,
                last,
                &doc,
                "1999-03-17",
                &number,
            )
            .unwrap();
            expected.push((agency, doc, i * 7919 % 10_000));
        }
        let mut body = Vec::new();
        encode_rows(bets.iter(), &mut body);
        assert!(body.len() > 2 * SCAN_BLOCK);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, &body).unwrap();

        let (n, seen) = scanned(&path);
        assert_eq!(n, 60_000);
        assert_eq!(seen, expected);
        // And the csv crate reads the same rows.
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(&body[..]);
        let theirs: Vec<(u32, String, u32)> = reader
            .records()
            .map(|r| {
                let r = r.unwrap();
                (
                    r[0].parse().unwrap(),
                    r[3].to_string(),
                    r[5].parse().unwrap(),
                )
            })
            .collect();
        assert_eq!(theirs, expected);
    }

    #[test]
    fn scan_takes_a_last_row_without_newline_and_skips_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(
            &path,
            "1,A,B,7,1999-03-17,5\r\n\n2,\"x,\"\"y\",C,8,1999-03-17,6",
        )
        .unwrap();
        let (n, seen) = scanned(&path);
        assert_eq!(n, 2);
        assert_eq!(seen, [(1, "7".into(), 5), (2, "8".into(), 6)]);
        std::fs::write(&path, "1,A,B,7,1999-03-17,5\n1,\"A,B,7,1999-03-17,5\n").unwrap();
        let err = scan(&path, |_| {}).unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }

    /// A bets file over the split threshold: `rows` rows, with a row whose
    /// quoted name holds many line breaks at row `tricky_at`.
    fn big_file(path: &Path, rows: u32, tricky_at: Option<u32>) -> Tally {
        let tricky = "x\n".repeat(3000);
        let mut body = Vec::new();
        let mut expected = Tally::default();
        for i in 0..rows {
            let doc = (10_000_000 + i).to_string();
            let agency = 1 + i % 3;
            let number = if i % 1000 == 7 {
                7574
            } else {
                (i % 9999) as u16
            };
            let first = if Some(i) == tricky_at {
                tricky.as_str()
            } else {
                "Ana"
            };
            let bet = BetRef {
                agency,
                first_name: first,
                last_name: "Pérez, Núñez",
                document: &doc,
                birthdate: "1999-03-17",
                number,
            };
            encode_rows([bet], &mut body);
            expected.rows += 1;
            expected.add(
                StoredBet {
                    agency,
                    document: doc.as_bytes(),
                    number: u32::from(number),
                },
                7574,
            );
        }
        std::fs::write(path, &body).unwrap();
        assert!(body.len() as u64 > SPLIT_ABOVE);
        expected
    }

    #[test]
    fn tally_in_two_halves_matches_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        // A tricky row far from the middle: the split is taken.
        let expected = big_file(&path, 200_000, Some(10));
        assert_eq!(tally(&path, 7574).unwrap(), expected);

        // A tricky row right at the middle, its line breaks around the
        // first line end past it: the guess is wrong and must be dropped.
        big_file(&path, 200_000, None);
        let len = std::fs::metadata(&path).unwrap().len();
        let middle_row = {
            let body = std::fs::read(&path).unwrap();
            body[..len as usize / 2]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u32
        };
        let expected = big_file(&path, 200_000, Some(middle_row - 1));
        let len = std::fs::metadata(&path).unwrap().len();
        let split = row_start_after(&File::open(&path).unwrap(), len / 2)
            .unwrap()
            .unwrap();
        let body = std::fs::read(&path).unwrap();
        assert_eq!(
            body[..split as usize]
                .iter()
                .filter(|&&b| b == b'"')
                .count()
                % 2,
            1,
            "the guessed split is inside the quoted name"
        );
        assert_eq!(tally(&path, 7574).unwrap(), expected);
    }

    #[test]
    fn tally_names_a_corrupt_row_in_the_second_half_by_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        big_file(&path, 200_000, Some(10));
        let mut body = std::fs::read(&path).unwrap();
        body.extend_from_slice(b"1,A,B,notadocument,1999-03-17,5\n");
        std::fs::write(&path, &body).unwrap();
        let err = tally(&path, 7574).unwrap_err().to_string();
        assert!(err.contains("row 200001"), "{err}");
    }

    #[test]
    fn scan_of_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(scan(&dir.path().join("none.csv"), |_| {}).unwrap(), 0);
    }

    #[test]
    fn scan_reports_the_corrupt_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, "1,A,B,1,1999-03-17,5\n1,A,B\n").unwrap();
        let err = scan(&path, |_| {}).unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
    }

    const GOOD: &str = "1,Ana,Pérez,1,1999-03-17,5\n2,\"B, b\",C,2,1999-03-17,7574\n";

    fn recovered(body: &[u8]) -> (Result<Recovered, StorageError>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        std::fs::write(&path, body).unwrap();
        let r = recover(&path);
        (r, std::fs::read(&path).unwrap())
    }

    #[test]
    fn recover_keeps_complete_rows_and_counts_agencies() {
        let (r, after) = recovered(GOOD.as_bytes());
        let r = r.unwrap();
        assert_eq!(after, GOOD.as_bytes());
        assert_eq!(r.rows, 2);
        assert_eq!(r.per_agency, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(r.truncated_bytes, 0);
    }

    #[test]
    fn recover_cuts_a_torn_row_at_every_length() {
        // A third row torn at every byte: whatever is left of it goes, the
        // first two rows stay.
        let third = "3,\"Juan\nCarlos\",Núñez,30904465,1999-03-17,7574\n";
        for cut in 1..third.len() {
            let mut body = GOOD.as_bytes().to_vec();
            body.extend_from_slice(&third.as_bytes()[..cut]);
            let (r, after) = recovered(&body);
            let r = r.unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            assert_eq!(after, GOOD.as_bytes(), "cut at {cut}");
            assert_eq!(r.rows, 2);
            assert_eq!(r.truncated_bytes, cut as u64);
            assert_eq!(r.per_agency.get(&3), None);
        }
    }

    #[test]
    fn recover_refuses_damage_before_the_tail() {
        let mut body = b"1,A,B,1,1999-03-17,5\ngarbage\n".to_vec();
        for _ in 0..2_000 {
            body.extend_from_slice(GOOD.as_bytes());
        }
        let (r, after) = recovered(&body);
        let err = r.unwrap_err();
        assert!(err.to_string().contains("row 2"), "{err}");
        assert_eq!(after, body, "nothing is cut when refusing");
    }

    #[tokio::test]
    async fn a_replaced_file_fails_batches_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let aside = dir.path().join("aside.csv");
        let (store, writer) = BetStore::open(&path, Durability::Sync);
        let mut rows = Vec::new();
        encode_rows([bet(1, "Ana", "Pérez", "1", "5").as_ref()], &mut rows);
        store.append(rows.clone()).await.unwrap();

        std::fs::rename(&path, &aside).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = store.append(rows.clone()).await.unwrap_err();
        assert!(err.to_string().contains("no longer the file"), "{err}");

        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        store.append(rows.clone()).await.unwrap();
        drop(store);
        writer.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[tokio::test]
    async fn after_a_failed_batch_the_rest_of_its_sequence_fails_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let aside = dir.path().join("aside.csv");
        let (store, writer) = BetStore::open(&path, Durability::Sync);
        let row = |doc: &str| {
            let mut rows = Vec::new();
            encode_rows([bet(1, "Ana", "Pérez", doc, "5").as_ref()], &mut rows);
            rows
        };
        let (pipelined, other) = (Sequence::new(), Sequence::new());
        store
            .submit(row("1"), &pipelined)
            .await
            .unwrap()
            .await
            .unwrap();

        // The second batch fails; the third, already in flight behind it,
        // must not be stored after the gap even though the file is back.
        std::fs::rename(&path, &aside).unwrap();
        std::fs::create_dir(&path).unwrap();
        let second = store.submit(row("2"), &pipelined).await.unwrap();
        assert!(second.await.is_err());
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        let third = store.submit(row("3"), &pipelined).await.unwrap();
        let err = third.await.unwrap_err();
        assert!(err.to_string().contains("earlier batch"), "{err}");
        assert!(pipelined.is_broken());
        // Other connections are not held back.
        store.submit(row("4"), &other).await.unwrap().await.unwrap();
        drop(store);
        writer.await.unwrap();
        let docs: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| l.split(',').nth(3).unwrap().to_string())
            .collect();
        assert_eq!(docs, ["1", "4"]);
    }

    #[test]
    fn rows_quote_only_what_needs_it() {
        let mut rows = Vec::new();
        let b = bet(12, "say \"hi\"", "a,b\r\nc", "7", "42");
        encode_rows([b.as_ref()], &mut rows);
        assert_eq!(
            String::from_utf8(rows.clone()).unwrap(),
            "12,\"say \"\"hi\"\"\",\"a,b\r\nc\",7,1999-03-17,42\n"
        );
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(&rows[..]);
        let record = reader.records().next().unwrap().unwrap();
        assert_eq!(&record[1], "say \"hi\"");
        assert_eq!(&record[2], "a,b\r\nc");
    }

    #[tokio::test]
    async fn an_unopenable_path_fails_batches_without_stopping_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where a directory should be: ENOTDIR, even for root.
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let path = dir.path().join("plain").join("bets.csv");
        let (store, writer) = BetStore::open(&path, Durability::Sync);
        let mut rows = Vec::new();
        encode_rows([bet(1, "Ana", "Pérez", "1", "5").as_ref()], &mut rows);
        for _ in 0..2 {
            let err = store.append(rows.clone()).await.unwrap_err();
            assert!(err.to_string().contains("cannot open"), "{err}");
        }
        drop(store);
        writer.await.unwrap();
    }
}
