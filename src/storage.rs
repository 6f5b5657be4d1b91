//! The bets file: append-only CSV, one row per stored bet,
//! `agency,first_name,last_name,document,birthdate,number`.
//!
//! One writer task owns the file. Connections hand it whole batches, already
//! encoded as CSV rows, and wait for its answer; the writer appends every
//! batch that is waiting with one `write` each and one `fdatasync` for the
//! group, then answers them all. A batch is therefore written whole, never
//! interleaved with another, and acknowledged only once its rows are on
//! stable storage. [`recover`] repairs the file after a crash.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::logging::{action, result};
use crate::model::{AgencyId, Bet};

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

/// Encodes bets as CSV rows of the bets file, minimal quoting.
pub fn encode_rows(bets: &[Bet], dst: &mut Vec<u8>) {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(dst);
    let mut agency = itoa::Buffer::new();
    let mut number = itoa::Buffer::new();
    for b in bets {
        // Writing to a Vec cannot fail.
        w.write_record([
            agency.format(b.agency).as_bytes(),
            b.first_name.as_bytes(),
            b.last_name.as_bytes(),
            b.document.as_bytes(),
            b.birthdate.as_bytes(),
            number.format(b.number).as_bytes(),
        ])
        .expect("writing CSV to memory");
    }
    w.flush().expect("writing CSV to memory");
}

struct Append {
    rows: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// A cheap, cloneable handle to the bets file's writer task.
#[derive(Debug, Clone)]
pub struct BetStore {
    tx: mpsc::Sender<Append>,
    path: PathBuf,
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
    /// Spawns the writer task for the bets file at `path`. The file is opened
    /// (and created) by the writer when the first batch arrives, and again
    /// after a failure, so a storage problem fails batches instead of the
    /// server. The returned handle resolves once every [`BetStore`] clone is
    /// dropped and the file is flushed and closed.
    pub fn open(path: &Path, durability: Durability) -> (BetStore, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = Writer {
            path: path.to_path_buf(),
            file: None,
            durability,
            poisoned: None,
        };
        let task = crate::task::spawn_named("bets writer", write_loop(writer, rx));
        (
            BetStore {
                tx,
                path: path.to_path_buf(),
            },
            task,
        )
    }

    /// The bets file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends pre-encoded CSV rows as one unit and waits until they are in
    /// the file (and on stable storage, with [`Durability::Sync`]).
    ///
    /// # Errors
    /// The write or sync failed (nothing of `rows` is acknowledged, and
    /// nothing of it stays in the file), or the writer has stopped.
    pub async fn append(&self, rows: Vec<u8>) -> Result<(), StorageError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Append { rows, done })
            .await
            .map_err(|_| StorageError::Closed)?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(StorageError::Write {
                path: self.path.clone(),
                reason,
            }),
            Err(_) => Err(StorageError::Closed),
        }
    }
}

async fn write_loop(writer: Writer, mut rx: mpsc::Receiver<Append>) {
    let mut writer = Some(writer);
    let mut group = Vec::new();
    // Group commit: every batch waiting when the writer comes round shares
    // one sync. Under load the groups grow by themselves.
    while rx.recv_many(&mut group, QUEUE_DEPTH).await > 0 {
        let mut w = writer
            .take()
            .expect("invariant: the writer is returned after every group");
        let rows: Vec<Vec<u8>> = group
            .iter_mut()
            .map(|a| std::mem::take(&mut a.rows))
            .collect();
        // File I/O blocks; keep it off the runtime's worker threads.
        let (w, outcomes) = crate::task::spawn_blocking_named("bets write", move || {
            let outcomes = w.write_group(&rows);
            (w, outcomes)
        })
        .await
        .expect("the bets file writer does not panic");
        for (append, outcome) in group.drain(..).zip(outcomes) {
            if let Err(reason) = &outcome {
                error!(action = action::STORE, result = result::FAIL, path = %w.path.display(), reason = reason.as_str());
            }
            // A connection that went away no longer needs its answer.
            let _ = append.done.send(outcome);
        }
        writer = Some(w);
    }
    let w = writer
        .take()
        .expect("invariant: the writer is back after the last group");
    let path = w.path.clone();
    match tokio::task::spawn_blocking(move || w.close()).await {
        Ok(Ok(())) => info!(
            action = action::CLOSE_BETS_FILE,
            result = result::SUCCESS,
            path = %path.display()
        ),
        Ok(Err(e)) => error!(
            action = action::CLOSE_BETS_FILE,
            result = result::FAIL,
            path = %path.display(),
            error = %e
        ),
        Err(e) => error!(action = action::CLOSE_BETS_FILE, result = result::FAIL, error = %e),
    }
}

/// The writer's side of the bets file. Lives on the writer task and moves
/// to the blocking pool for each group.
struct Writer {
    path: PathBuf,
    /// The open file and the identity (device, inode) it had when opened.
    file: Option<(File, (u64, u64))>,
    durability: Durability,
    /// Set when a failed sync could not be rolled back: the file's contents
    /// are then unknown, and only a restart (which recovers from the file)
    /// may accept bets again.
    poisoned: Option<String>,
}

impl Writer {
    /// Appends each batch with one `write_all`, then syncs once for the group.
    fn write_group(&mut self, batches: &[Vec<u8>]) -> Vec<Result<(), String>> {
        let all = |reason: String| batches.iter().map(|_| Err(reason.clone())).collect();
        if let Some(reason) = &self.poisoned {
            return all(reason.clone());
        }
        let durability = self.durability;
        let file = match self.file_checked() {
            Ok(f) => f,
            Err(reason) => return all(reason),
        };
        let (outcomes, poison) = append_group(file, batches, durability);
        if poison.is_some() {
            self.poisoned = poison;
        }
        outcomes
    }

    /// The open file, opening it if needed, after checking that the path
    /// still names it. A bets file that was replaced or removed under us is
    /// refused rather than silently written to (its writes would be lost)
    /// or recreated empty (the counts would be wrong).
    fn file_checked(&mut self) -> Result<&mut File, String> {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()));
        match (&self.file, on_disk) {
            (Some((_, id)), Ok(now)) if *id == now => {}
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
                self.file = Some((file, (meta.dev(), meta.ino())));
            }
        }
        Ok(&mut self.file.as_mut().expect("opened above").0)
    }

    fn close(self) -> io::Result<()> {
        match self.file {
            Some((mut f, _)) => {
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

/// Appends each batch with one `write_all`, then syncs once for the group.
/// Returns each batch's outcome, and a reason to refuse all further writes
/// when a failure could not be undone.
fn append_group(
    file: &mut File,
    batches: &[Vec<u8>],
    durability: Durability,
) -> (Vec<Result<(), String>>, Option<String>) {
    let all = |reason: String| batches.iter().map(|_| Err(reason.clone())).collect();
    let group_start = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => return (all(format!("cannot read the file size: {e}")), None),
    };
    let mut poison = None;
    let mut outcomes: Vec<Result<(), String>> = Vec::with_capacity(batches.len());
    for rows in batches {
        let before = file.metadata().map(|m| m.len());
        match file.write_all(rows) {
            Ok(()) => outcomes.push(Ok(())),
            Err(e) => {
                // Cut the partial batch off so no half row stays behind.
                if let Err(cut) = before.and_then(|len| file.set_len(len)) {
                    poison = Some(format!(
                        "a failed write could not be undone ({cut}); restart the server to recover"
                    ));
                }
                outcomes.push(Err(format!("write failed: {e}")));
            }
        }
    }
    if durability == Durability::Sync && outcomes.iter().any(Result::is_ok) {
        if let Err(e) = file.sync_data() {
            // After a failed fsync the kernel may have dropped the dirty
            // pages: nothing of the group is known to be durable. Take the
            // whole group back out so that a retry cannot duplicate it.
            if let Err(undo) = file.set_len(group_start).and_then(|()| file.sync_data()) {
                poison = Some(format!(
                    "sync failed ({e}) and could not be undone ({undo}); restart the server to recover"
                ));
            }
            return (all(format!("sync failed: {e}")), poison);
        }
    }
    (outcomes, poison)
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
/// # Errors
/// The file cannot be read, or a row is not a valid bet.
pub fn scan(path: &Path, mut each: impl FnMut(StoredBet<'_>)) -> Result<u64, StorageError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(StorageError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(BufReader::with_capacity(1 << 16, file));
    let mut record = csv::ByteRecord::new();
    let mut rows = 0u64;
    let corrupt = |row: u64, reason: String| StorageError::Corrupt {
        path: path.to_path_buf(),
        row,
        reason,
    };
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => return Err(corrupt(rows + 1, e.to_string())),
        }
        rows += 1;
        if record.len() != 6 {
            return Err(corrupt(
                rows,
                format!("{} fields instead of 6", record.len()),
            ));
        }
        let num = |i: usize| -> Option<u32> { std::str::from_utf8(&record[i]).ok()?.parse().ok() };
        let (Some(agency), Some(number)) = (num(0), num(5)) else {
            return Err(corrupt(rows, "agency or number is not a number".into()));
        };
        let document = std::str::from_utf8(&record[3])
            .map_err(|_| corrupt(rows, "document is not UTF-8".into()))?;
        each(StoredBet {
            agency,
            document,
            number,
        });
    }
    Ok(rows)
}

/// The parts of a stored bet the draw needs, borrowed from the reader.
#[derive(Debug, Clone, Copy)]
pub struct StoredBet<'a> {
    /// The agency that took it.
    pub agency: AgencyId,
    /// The document (DNI).
    pub document: &'a str,
    /// The number bet on.
    pub number: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

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
        encode_rows(&bets[..2], &mut rows);
        store.append(rows).await.unwrap();
        let mut rows = Vec::new();
        encode_rows(&bets[2..], &mut rows);
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
        let mut seen = Vec::new();
        let n = scan(&path, |b| {
            seen.push((b.agency, b.document.to_string(), b.number))
        })
        .unwrap();
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
        encode_rows(&[bet(1, "Ana", "Pérez", "1", "5")], &mut rows);
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
    async fn an_unopenable_path_fails_batches_without_stopping_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where a directory should be: ENOTDIR, even for root.
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let path = dir.path().join("plain").join("bets.csv");
        let (store, writer) = BetStore::open(&path, Durability::Sync);
        let mut rows = Vec::new();
        encode_rows(&[bet(1, "Ana", "Pérez", "1", "5")], &mut rows);
        for _ in 0..2 {
            let err = store.append(rows.clone()).await.unwrap_err();
            assert!(err.to_string().contains("cannot open"), "{err}");
        }
        drop(store);
        writer.await.unwrap();
    }
}
