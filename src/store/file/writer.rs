//! The bets file's writer: one thread owns the file. Connections hand it
//! whole batches, already encoded as rows, and go on reading while it
//! works; it appends every batch that is waiting with one `writev` and one
//! sync for the group (group commit), then answers them all. A batch is
//! written whole, never interleaved with another, and acknowledged only
//! after the sync that covers it.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use super::StorageError;
use crate::close::SalesClose;
use crate::logging::{action, result};
use crate::store::{Backend, ClosedRound, Durability, Sequence, StoreMetrics};

/// The step that puts a group's rows on stable storage before any of its
/// batches is answered: [`File::sync_data`], or a stand-in in tests that
/// must see it fail or record when it ran.
type SyncStep = Box<dyn FnMut(&File) -> io::Result<()> + Send>;

/// How many batches may wait for the writer before senders wait too.
const QUEUE_DEPTH: usize = 1024;

struct Append {
    rows: Vec<u8>,
    sequence: Sequence,
    done: oneshot::Sender<Result<(), Refusal>>,
}

/// Why the writer did not store a batch.
#[derive(Debug)]
enum Refusal {
    /// Writing or syncing failed, or an earlier batch of its sequence did.
    Failed(String),
    /// Sales closed before the writer came to it.
    SalesClosed(SalesClose),
}

/// What the writer is asked, in the order asked.
#[derive(Debug)]
enum Job {
    /// Store a batch.
    Append(Append),
    /// Close sales after every batch queued before: keep `close` at the
    /// path given, then refuse every later batch.
    CloseSales {
        close: ClosedRound,
        keep_at: PathBuf,
        done: oneshot::Sender<Result<ClosedRound, String>>,
    },
    /// Flush and close the file, and end.
    Shutdown,
}

/// A cheap, cloneable handle to the bets file's writer.
#[derive(Debug, Clone)]
pub struct BetStore {
    /// What the writer is asked, in order.
    tx: mpsc::Sender<Job>,
    path: Arc<Path>,
    /// The writer's commit measurements.
    metrics: StoreMetrics,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("bytes", &self.rows.len())
            .finish()
    }
}

impl BetStore {
    /// Starts the writer for the bets file at `path`, on a thread of its own
    /// (file I/O blocks; it must not hold up the runtime's workers, and one
    /// long-lived thread avoids a hand-off to the blocking pool per group).
    /// The file is opened (and created) when the first batch arrives, and
    /// again after a failure, so a storage problem fails batches instead of
    /// the server. The returned handle resolves once every [`BetStore`]
    /// clone is dropped and the file is flushed and closed.
    pub fn start(path: &Path, durability: Durability) -> (BetStore, tokio::task::JoinHandle<()>) {
        Self::start_closed(path, durability, None)
    }

    /// As [`BetStore::start`], on a round whose sales `closed` already (a
    /// restart after a close): every batch is refused.
    pub fn start_closed(
        path: &Path,
        durability: Durability,
        closed: Option<ClosedRound>,
    ) -> (BetStore, tokio::task::JoinHandle<()>) {
        let sync: Option<SyncStep> = match durability {
            Durability::Sync => Some(Box::new(File::sync_data)),
            Durability::NoSync => None,
        };
        Self::start_with(path, sync, closed)
    }

    /// As [`BetStore::start`] with [`Durability::Sync`], syncing each group
    /// through `sync` instead of [`File::sync_data`].
    #[cfg(test)]
    fn start_with_sync(
        path: &Path,
        sync: impl FnMut(&File) -> io::Result<()> + Send + 'static,
    ) -> (BetStore, tokio::task::JoinHandle<()>) {
        Self::start_with(path, Some(Box::new(sync)), None)
    }

    fn start_with(
        path: &Path,
        sync: Option<SyncStep>,
        closed: Option<ClosedRound>,
    ) -> (BetStore, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let metrics = StoreMetrics::default();
        let writer = Writer {
            path: path.to_path_buf(),
            file: None,
            sync,
            poisoned: None,
            closed,
            metrics: metrics.clone(),
        };
        let task = crate::task::spawn_blocking_named("bets writer", move || write_loop(writer, rx));
        (
            BetStore {
                tx,
                path: Arc::from(path),
                metrics,
            },
            task,
        )
    }

    /// The bets file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The writer's commit measurements.
    pub fn metrics(&self) -> StoreMetrics {
        self.metrics.clone()
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
            .send(Job::Append(append))
            .await
            .map_err(|_| StorageError::Closed(Backend::File))?;
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

    /// Asks the writer to store every batch submitted before, then flush and
    /// close the file and end; later batches fail with
    /// [`StorageError::Closed`].
    pub async fn close(&self) {
        // Already closed is fine: the writer is gone either way.
        let _ = self.tx.send(Job::Shutdown).await;
    }

    /// Closes sales once every batch submitted before is stored (or
    /// refused): the writer keeps `close` at `keep_at` (atomically, synced)
    /// and from then on refuses every batch with
    /// [`StorageError::SalesClosed`]. A batch is therefore either stored
    /// before the close or refused after it, never both. Returns the close
    /// in force: `close`, or the earlier one if sales were closed already.
    ///
    /// # Errors
    /// The close could not be kept (nothing changed), or the writer has
    /// stopped.
    pub async fn close_sales(
        &self,
        close: ClosedRound,
        keep_at: PathBuf,
    ) -> Result<ClosedRound, StorageError> {
        let (done, answer) = oneshot::channel();
        let job = Job::CloseSales {
            close,
            keep_at: keep_at.clone(),
            done,
        };
        self.tx
            .send(job)
            .await
            .map_err(|_| StorageError::Closed(Backend::File))?;
        match answer.await {
            Ok(Ok(close)) => Ok(close),
            Ok(Err(reason)) => Err(StorageError::Write {
                path: keep_at,
                reason,
            }),
            Err(_) => Err(StorageError::Closed(Backend::File)),
        }
    }
}

/// A submitted batch: resolves once its rows are stored (or not).
#[derive(Debug)]
pub struct Pending {
    answer: oneshot::Receiver<Result<(), Refusal>>,
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
                Ok(Err(Refusal::Failed(reason))) => Err(StorageError::Write {
                    path: self.path.to_path_buf(),
                    reason,
                }),
                Ok(Err(Refusal::SalesClosed(close))) => Err(StorageError::SalesClosed(close)),
                Err(_) => Err(StorageError::Closed(Backend::File)),
            })
    }
}

/// Most batches written together: one `writev` takes at most 1024 buffers.
const MAX_GROUP: usize = 512;

fn write_loop(mut writer: Writer, mut rx: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut closing = false;
    // Group commit: every batch waiting when the writer comes round shares
    // one write and one sync. Under load the groups grow by themselves. A
    // close of sales ends the group: the batches before it are stored and
    // answered first, and only then is the close kept.
    let mut next = rx.blocking_recv();
    loop {
        let mut close_sales = None;
        match next.take() {
            None | Some(Job::Shutdown) => break,
            Some(Job::CloseSales {
                close,
                keep_at,
                done,
            }) => close_sales = Some((close, keep_at, done)),
            Some(Job::Append(first)) => {
                group.push(first);
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Job::Append(append)) => group.push(append),
                        Ok(Job::Shutdown) => {
                            closing = true;
                            break;
                        }
                        Ok(Job::CloseSales {
                            close,
                            keep_at,
                            done,
                        }) => {
                            close_sales = Some((close, keep_at, done));
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        if !group.is_empty() {
            let started = std::time::Instant::now();
            let outcomes = writer.write_group(&group);
            writer
                .metrics
                .commit_seconds
                .observe(started.elapsed().as_secs_f64());
            writer.metrics.group_batches.observe(group.len() as f64);
            for (append, outcome) in group.drain(..).zip(outcomes) {
                if let Err(refusal) = &outcome {
                    append.sequence.mark_broken();
                    if let Refusal::Failed(reason) = refusal {
                        error!(action = action::STORE, result = result::FAIL, path = %writer.path.display(), reason = reason.as_str());
                    }
                }
                // A connection that went away no longer needs its answer.
                let _ = append.done.send(outcome);
            }
        }
        if let Some((close, keep_at, done)) = close_sales {
            let _ = done.send(writer.close_sales(close, &keep_at));
        }
        if closing {
            break;
        }
        next = rx.blocking_recv();
    }
    // Whatever is still queued was submitted after the close: dropping it
    // answers it `Closed`.
    rx.close();
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
    /// Syncs a group before it is answered; `None` for
    /// [`Durability::NoSync`].
    sync: Option<SyncStep>,
    /// Set when a failed sync could not be rolled back: the file's contents
    /// are then unknown, and only a restart (which recovers from the file)
    /// may accept bets again.
    poisoned: Option<String>,
    /// Sales are closed: every batch is refused.
    closed: Option<ClosedRound>,
    /// Each group's commit time and size.
    metrics: StoreMetrics,
}

impl Writer {
    /// Appends the group's batches with one `writev`, then syncs once.
    /// Batches of a broken [`Sequence`] are failed without being written.
    fn write_group(&mut self, group: &[Append]) -> Vec<Result<(), Refusal>> {
        if let Some(close) = &self.closed {
            return group
                .iter()
                .map(|_| Err(Refusal::SalesClosed(close.close.clone())))
                .collect();
        }
        let all = |reason: &str| {
            group
                .iter()
                .map(|_| Err(Refusal::Failed(reason.to_string())))
                .collect()
        };
        if let Some(reason) = &self.poisoned {
            return all(reason);
        }
        let (file, len) = match Self::file_checked(&self.path, &mut self.file) {
            Ok(f) => f,
            Err(reason) => return all(&reason),
        };
        let mut outcomes: Vec<Result<(), Refusal>> = group
            .iter()
            .map(|a| {
                if a.sequence.is_broken() {
                    Err(Refusal::Failed(
                        "an earlier batch of this connection was not stored".to_string(),
                    ))
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
        match append_group(file, *len, &rows, self.sync.as_mut()) {
            Ok(written) => *len += written,
            Err((reason, poison)) => {
                for o in outcomes.iter_mut().filter(|o| o.is_ok()) {
                    *o = Err(Refusal::Failed(reason.clone()));
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
    /// (Borrows the file slot alone, so the sync step stays usable.)
    fn file_checked<'f>(
        path: &Path,
        slot: &'f mut Option<(File, (u64, u64), u64)>,
    ) -> Result<(&'f mut File, &'f mut u64), String> {
        use std::os::unix::fs::MetadataExt;
        let on_disk = std::fs::metadata(path).map(|m| (m.dev(), m.ino()));
        match (&*slot, on_disk) {
            (Some((_, id, _)), Ok(now)) if *id == now => {}
            (Some(_), Ok(_)) | (Some(_), Err(_)) => {
                return Err(format!(
                    "{} is no longer the file this server opened (replaced or removed); \
                     put it back to go on",
                    path.display()
                ))
            }
            (None, _) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let meta = file
                    .metadata()
                    .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
                if !meta.is_file() {
                    return Err(format!("{} is not a regular file", path.display()));
                }
                *slot = Some((file, (meta.dev(), meta.ino()), meta.len()));
            }
        }
        let (file, _, len) = slot.as_mut().expect("opened above");
        Ok((file, len))
    }

    /// Closes sales: every batch before is answered already; keeps
    /// `close` at `keep_at` for good, and refuses every batch from now on.
    /// Sales closed already: the earlier close, unchanged.
    fn close_sales(&mut self, close: ClosedRound, keep_at: &Path) -> Result<ClosedRound, String> {
        if let Some(earlier) = &self.closed {
            return Ok(earlier.clone());
        }
        super::record::save_close(&close, keep_at)
            .map_err(|e| format!("cannot keep the close of sales: {e}"))?;
        self.closed = Some(close.clone());
        Ok(close)
    }

    fn close(self) -> io::Result<()> {
        match self.file {
            Some((mut f, _, _)) => {
                f.flush()?;
                if self.sync.is_some() {
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
    sync: Option<&mut SyncStep>,
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
    // Durable before acknowledged: the caller answers the group only after
    // this returns, and a failure here answers every batch of it Err.
    if let Some(sync) = sync {
        if let Err(e) = sync(file) {
            return Err(undo(file, format!("sync failed: {e}")));
        }
    }
    Ok(total as u64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::model::Bet;
    use crate::store::file::encode_rows;
    use crate::store::file::row::tests::{bet, scanned};

    #[tokio::test]
    async fn rows_round_trip_through_csv() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let bets = [
            bet(1, "Santiago Lionel", "Lorca", "30904465", "7574"),
            bet(2, "Pérez, Ana", "O\"Neil", "1", "0"),
            bet(3, "a|b:c\\d", "Ñandú", "0012", "9999"),
        ];
        let (store, writer) = BetStore::start(&path, Durability::Sync);
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

    #[tokio::test]
    async fn a_replaced_file_fails_batches_until_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let aside = dir.path().join("aside.csv");
        let (store, writer) = BetStore::start(&path, Durability::Sync);
        let rows = one_row(1);
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
        let (store, writer) = BetStore::start(&path, Durability::Sync);
        let (pipelined, other) = (Sequence::new(), Sequence::new());
        store
            .submit(one_row(1), &pipelined)
            .await
            .unwrap()
            .await
            .unwrap();

        // The second batch fails; the third, already in flight behind it,
        // must not be stored after the gap even though the file is back.
        std::fs::rename(&path, &aside).unwrap();
        std::fs::create_dir(&path).unwrap();
        let second = store.submit(one_row(2), &pipelined).await.unwrap();
        assert!(second.await.is_err());
        std::fs::remove_dir(&path).unwrap();
        std::fs::rename(&aside, &path).unwrap();
        let third = store.submit(one_row(3), &pipelined).await.unwrap();
        let err = third.await.unwrap_err();
        assert!(err.to_string().contains("earlier batch"), "{err}");
        assert!(pipelined.is_broken());
        // Other connections are not held back.
        store
            .submit(one_row(4), &other)
            .await
            .unwrap()
            .await
            .unwrap();
        drop(store);
        writer.await.unwrap();
        let docs: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| l.split(',').nth(3).unwrap().to_string())
            .collect();
        assert_eq!(docs, ["1", "4"]);
    }

    #[tokio::test]
    async fn an_unopenable_path_fails_batches_without_stopping_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        // A regular file where a directory should be: ENOTDIR, even for root.
        std::fs::write(dir.path().join("plain"), "").unwrap();
        let path = dir.path().join("plain").join("bets.csv");
        let (store, writer) = BetStore::start(&path, Durability::Sync);
        let rows = one_row(1);
        for _ in 0..2 {
            let err = store.append(rows.clone()).await.unwrap_err();
            assert!(err.to_string().contains("cannot open"), "{err}");
        }
        drop(store);
        writer.await.unwrap();
    }

    /// What the writer and the batches' owners did, in order.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        /// A group was synced with the file this long.
        Synced(u64),
        /// Batch `i` was answered Ok.
        Answered(usize),
    }

    fn one_row(doc: usize) -> Vec<u8> {
        let mut rows = Vec::new();
        let doc = doc.to_string();
        encode_rows([bet(1, "Ana", "Pérez", &doc, "5").as_ref()], &mut rows);
        rows
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_answer_comes_after_the_sync_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = events.clone();
        let (store, writer) = BetStore::start_with_sync(&path, move |file| {
            // Slow, so that an answer sent before the sync would be seen
            // (and recorded) by its owner before the sync is.
            std::thread::sleep(std::time::Duration::from_millis(5));
            file.sync_data()?;
            let len = file.metadata()?.len();
            log.lock().unwrap().push(Event::Synced(len));
            Ok(())
        });
        let mut tasks = Vec::new();
        for i in 0..40 {
            let (store, log) = (store.clone(), events.clone());
            tasks.push(tokio::spawn(async move {
                store.append(one_row(1_000 + i)).await.unwrap();
                log.lock().unwrap().push(Event::Answered(i));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(store);
        writer.await.unwrap();

        let file = std::fs::read(&path).unwrap();
        let events = events.lock().unwrap().clone();
        for i in 0..40 {
            // Where batch i's row ends in the file: its group's sync must
            // have covered it before its answer.
            let row = one_row(1_000 + i);
            let end = file
                .windows(row.len())
                .position(|w| w == row)
                .expect("every acknowledged row is in the file")
                + row.len();
            let answered = events
                .iter()
                .position(|e| *e == Event::Answered(i))
                .unwrap();
            let synced = events
                .iter()
                .position(|e| matches!(e, Event::Synced(len) if *len >= end as u64));
            assert!(
                synced.is_some_and(|s| s < answered),
                "batch {i} answered before the sync of its row: {events:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_sync_answers_every_batch_of_its_group_err_and_cuts_them_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bets.csv");
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fail = failing.clone();
        let (store, writer) = BetStore::start_with_sync(&path, move |file| {
            if fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(io::Error::other("injected sync failure"));
            }
            file.sync_data()
        });
        store.append(one_row(1)).await.unwrap();

        failing.store(true, std::sync::atomic::Ordering::SeqCst);
        // Many batches at once, so that groups hold several of them.
        let mut pending = Vec::new();
        for i in 0..40 {
            pending.push(
                store
                    .submit(one_row(100 + i), &Sequence::new())
                    .await
                    .unwrap(),
            );
        }
        for (i, p) in pending.into_iter().enumerate() {
            let err = p
                .await
                .expect_err("no batch of a failed sync is acknowledged");
            assert!(
                err.to_string().contains("injected sync failure"),
                "{i}: {err}"
            );
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            one_row(1),
            "rows cut back out"
        );

        // The writer goes on once syncing works again.
        failing.store(false, std::sync::atomic::Ordering::SeqCst);
        store.append(one_row(2)).await.unwrap();
        drop(store);
        writer.await.unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            [one_row(1), one_row(2)].concat()
        );
    }
}
