//! Watching for a draw recorded by another central (or for every agency
//! finished with none recorded).

use std::time::Duration;

use futures::TryStreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use crate::store::Watched;

use super::connect::client_config;
use super::record::load_draw;
use super::PgError;
use super::{PostgresStore, DRAW_CHANNEL, FINISHED_COUNT};

/// How often a central looks for a draw recorded elsewhere, should a
/// notification be missed (a listening connection lost and reopened).
pub(super) const DRAW_POLL: Duration = Duration::from_secs(2);

impl PostgresStore {
    /// Listens on [`DRAW_CHANNEL`] and looks at `draw` on each notification
    /// and every [`DRAW_POLL`]; returns the draw once it is recorded, or
    /// [`Watched::AllFinished`] once every one of `agencies` has finished
    /// and still no draw is recorded.
    pub(super) async fn watch_draw(&self, agencies: u32) -> Result<Watched, PgError> {
        let config = client_config(&self.target);
        let (client, mut connection) = config.connect(NoTls).await.map_err(PgError::from)?;
        let (tx, mut notified) = mpsc::unbounded_channel();
        // The connection must be polled for its notifications to arrive.
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.try_next().await.transpose() {
                if message.is_err() || tx.send(()).is_err() {
                    break;
                }
            }
        });
        let _stop = AbortOnDrop(driver);
        client
            .batch_execute(&format!("LISTEN {DRAW_CHANNEL}"))
            .await
            .map_err(PgError::from)?;
        loop {
            // Listening before looking: a draw recorded in between is seen.
            let recorded: bool = client
                .query_one("SELECT EXISTS (SELECT 1 FROM draw)", &[])
                .await
                .map_err(PgError::from)?
                .get(0);
            if recorded {
                let mut reader = self.side_connection().await.map_err(|e| e.to_string())?;
                if let Some(draw) = load_draw(&self.target, &mut reader)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    return Ok(Watched::Recorded(draw));
                }
            } else {
                let finished: i64 = client
                    .query_one(FINISHED_COUNT, &[&(agencies as i32)])
                    .await
                    .map_err(PgError::from)?
                    .get(0);
                if finished == i64::from(agencies) {
                    return Ok(Watched::AllFinished);
                }
            }
            tokio::select! {
                woken = notified.recv() => {
                    if woken.is_none() {
                        return Err(PgError::NotDone("the listening connection closed"));
                    }
                }
                () = tokio::time::sleep(DRAW_POLL) => {}
            }
        }
    }
}

/// Aborts a task when dropped.
pub(super) struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
