//! The bets file: append-only CSV, one row per stored bet,
//! `agency,first_name,last_name,document,birthdate,number`.
//!
//! One writer task owns the file. Connections hand it whole batches, already
//! encoded as CSV rows, and wait for its answer; the writer appends every
//! batch that is waiting with one `write` each and one flush for the group,
//! then answers them all. A batch is therefore written whole and never
//! interleaved with another, and it is acknowledged only once its rows are
//! in the file.

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
    done: oneshot::Sender<io::Result<()>>,
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

impl BetStore {
    /// Opens (creating if needed) the bets file for appending and spawns its
    /// writer task. The returned handle resolves once every [`BetStore`]
    /// clone is dropped and the file is flushed and closed.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn open(path: &Path) -> Result<(BetStore, tokio::task::JoinHandle<()>), StorageError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| StorageError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let writer = tokio::spawn(write_loop(file, path.to_path_buf(), rx));
        Ok((
            BetStore {
                tx,
                path: path.to_path_buf(),
            },
            writer,
        ))
    }

    /// The bets file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends pre-encoded CSV rows as one unit and waits until they are in
    /// the file.
    ///
    /// # Errors
    /// The write failed (nothing of `rows` is acknowledged), or the writer
    /// has stopped.
    pub async fn append(&self, rows: Vec<u8>) -> Result<(), StorageError> {
        let (done, answer) = oneshot::channel();
        self.tx
            .send(Append { rows, done })
            .await
            .map_err(|_| StorageError::Closed)?;
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(StorageError::Io {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(StorageError::Closed),
        }
    }
}

async fn write_loop(file: File, path: PathBuf, mut rx: mpsc::Receiver<Append>) {
    let mut file = Some(file);
    let mut group = Vec::new();
    while rx.recv_many(&mut group, QUEUE_DEPTH).await > 0 {
        let f = file
            .take()
            .expect("invariant: the file is returned after every group");
        let rows: Vec<Vec<u8>> = group
            .iter_mut()
            .map(|a| std::mem::take(&mut a.rows))
            .collect();
        // File I/O blocks; keep it off the runtime's worker threads.
        let (f, outcomes) = tokio::task::spawn_blocking(move || {
            let mut f = f;
            let outcomes = write_group(&mut f, &rows);
            (f, outcomes)
        })
        .await
        .expect("the bets file writer does not panic");
        file = Some(f);
        for (append, outcome) in group.drain(..).zip(outcomes) {
            // A connection that went away no longer needs its answer.
            let _ = append.done.send(outcome);
        }
    }
    let f = file
        .take()
        .expect("invariant: the file is back after the last group");
    let closed = tokio::task::spawn_blocking(move || {
        let mut f = f;
        f.flush()
    })
    .await;
    match closed {
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

/// Appends each batch with one `write_all`. A batch whose write fails is
/// answered with the error; the file is cut back to where that batch began,
/// so a failed batch never leaves a partial row behind.
fn write_group(f: &mut File, batches: &[Vec<u8>]) -> Vec<io::Result<()>> {
    batches
        .iter()
        .map(|rows| {
            let before = f.metadata().map(|m| m.len());
            let outcome = f.write_all(rows).and_then(|()| f.flush());
            if outcome.is_err() {
                if let Ok(len) = before {
                    let _ = f.set_len(len);
                }
            }
            outcome
        })
        .collect()
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
        let (store, writer) = BetStore::open(&path).unwrap();
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
}
