//! [`FileStore`]: the bets file and its draw record behind the storage seam.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::{encode_rows, recover, save_record, tally, BetStore};
use crate::logging::{action, result};
use crate::model::{AgencyId, Bets};
use crate::receipt::{Receipt, Recomputed};
use crate::store::Durability;
use crate::store::{ClosedRound, Draw, Sequence, StorageError, Store, Stored, Tally};

/// The bets file (written by one writer thread) and the draw record.
#[derive(Debug)]
pub struct FileStore {
    writer: BetStore,
    /// The writer thread; taken by [`Store::close`].
    thread: Mutex<Option<JoinHandle<()>>>,
    record: PathBuf,
    /// Where the close of sales is kept (see [`super::save_close`]).
    close: PathBuf,
    /// Held while the store is open (see [`super::lock`]).
    _lock: super::lock::FileLock,
}

impl FileStore {
    /// Recovers the bets file at `bets` (cutting a torn last row), logs
    /// what it found, and starts its writer. Returns the store and the bets
    /// held per agency.
    ///
    /// # Errors
    /// The file cannot be read or repaired.
    pub async fn open(
        bets: &Path,
        record: &Path,
        durability: Durability,
    ) -> Result<(FileStore, BTreeMap<AgencyId, Receipt>), StorageError> {
        // Before recovery, which may cut the file.
        let lock = super::lock::lock(
            bets,
            "stop it, or give this central a server.storage of its own",
        )?;
        let recovered = {
            let path = bets.to_path_buf();
            tokio::task::spawn_blocking(move || recover(&path))
                .await
                .expect("recovery does not panic")?
        };
        info!(
            action = action::RECOVER,
            result = result::SUCCESS,
            path = %bets.display(),
            rows = recovered.rows,
            agencies = recovered.receipts.len(),
            truncated_bytes = recovered.truncated_bytes
        );
        let close = bets.with_extension("close.toml");
        let closed = super::load_close(&close).map_err(|source| StorageError::Io {
            path: close.clone(),
            source,
        })?;
        let (writer, thread) = BetStore::start_closed(bets, durability, closed);
        let store = FileStore {
            writer,
            thread: Mutex::new(Some(thread)),
            record: record.to_path_buf(),
            close,
            _lock: lock,
        };
        Ok((store, recovered.receipts))
    }
}

impl Store for FileStore {
    fn describe(&self) -> String {
        self.writer.path().display().to_string()
    }

    fn metrics(&self) -> crate::store::StoreMetrics {
        self.writer.metrics()
    }

    fn submit<'a>(
        &'a self,
        bets: &Bets,
        skip: usize,
        sequence: &Sequence,
        // Recomputed from the file when it is opened.
        _receipt: Receipt,
    ) -> BoxFuture<'a, Result<Stored, StorageError>> {
        // Encoded here, on the connection's own task: the rows of many
        // connections are built in parallel, and the writer thread only
        // writes.
        let mut rows = Vec::with_capacity(bets.len().saturating_sub(skip) * 64);
        encode_rows(bets.iter_bytes().skip(skip), &mut rows);
        let sequence = sequence.clone();
        async move {
            let pending = self.writer.submit(rows, &sequence).await?;
            Ok(pending.boxed())
        }
        .boxed()
    }

    fn tally(&self, winning_number: u16) -> BoxFuture<'_, Result<Tally, StorageError>> {
        let path = self.writer.path().to_path_buf();
        async move {
            crate::task::spawn_blocking_named("draw", move || {
                tally(&path, u32::from(winning_number))
            })
            .await
            .expect("the draw's scan does not panic")
        }
        .boxed()
    }

    fn recompute(&self, winning_number: u16) -> BoxFuture<'_, Result<Recomputed, StorageError>> {
        let path = self.writer.path().to_path_buf();
        async move {
            tokio::task::spawn_blocking(move || super::recompute(&path, winning_number))
                .await
                .expect("reading the bets back does not panic")
        }
        .boxed()
    }

    fn load_draw(&self) -> BoxFuture<'_, Result<Option<Draw>, StorageError>> {
        let (bets, record) = (self.writer.path().to_path_buf(), self.record.clone());
        async move {
            // Checked against the ledger of sealed rounds: a sealed round's
            // record that is missing or replaced is refused, not redrawn.
            tokio::task::spawn_blocking(move || super::rounds::load_checked(&bets, &record, true))
                .await
                .expect("reading the record does not panic")
        }
        .boxed()
    }

    fn save_draw<'a>(&'a self, draw: &'a Draw) -> BoxFuture<'a, Result<(), StorageError>> {
        let (path, draw) = (self.record.clone(), draw.clone());
        let bets = self.writer.path().to_path_buf();
        async move {
            tokio::task::spawn_blocking(move || {
                // The record first: a crash before the ledger leaves a
                // record the next start adds to the ledger.
                save_record(&draw, &path).map_err(|source| StorageError::Io { path, source })?;
                super::rounds::seal_round(&bets, &draw)
            })
            .await
            .expect("writing the record does not panic")
        }
        .boxed()
    }

    fn close_sales<'a>(
        &'a self,
        close: &'a ClosedRound,
    ) -> BoxFuture<'a, Result<(ClosedRound, bool), StorageError>> {
        async move {
            // The writer orders it among the batches and keeps it.
            let kept = self
                .writer
                .close_sales(close.clone(), self.close.clone())
                .await?;
            let this = kept.close == close.close;
            Ok((kept, this))
        }
        .boxed()
    }

    fn load_close(&self) -> BoxFuture<'_, Result<Option<ClosedRound>, StorageError>> {
        let path = self.close.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                super::load_close(&path).map_err(|source| StorageError::Io { path, source })
            })
            .await
            .expect("reading the close does not panic")
        }
        .boxed()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        async move {
            self.writer.close().await;
            let thread = self.thread.lock().expect("not poisoned").take();
            if let Some(thread) = thread {
                if let Err(e) = thread.await {
                    error!(action = action::CLOSE_BETS_FILE, result = result::FAIL, error = %e);
                }
            }
        }
        .boxed()
    }
}
