//! Starting the central and agencies, shared by every program that does:
//! the `server` and `agency` subcommands (with their contract log lines),
//! and the scratch directory, data and in-process agencies that `demo` and
//! `bench` both need.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::agency::{self, AgencyError, AgencyReport};
use crate::config::{AgencyConfig, Config, ConfigFile, OPERATOR_KEY};
use crate::logging::{action, result};
use crate::model::AgencyId;
use crate::server;
use crate::tools::gen_data::{self, GenOptions, Generated};
use crate::tools::progress;

/// `lottery server`: logs the contract's config line (then the other
/// settings, and the configuration file read, after the contract's fields), binds, serves until
/// `shutdown`, and logs the shutdown.
///
/// # Errors
/// The port cannot be bound, or the server failed.
pub async fn serve(
    config: &Config,
    file: &ConfigFile,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let s = &config.server;
    info!(
        action = action::CONFIG,
        result = result::SUCCESS,
        port = s.port,
        listen_backlog = s.listen_backlog,
        logging_level = %config.log.level,
        agencies = s.agencies,
        storage = %s.storage,
        winning_number = s.winning_number,
        sync = s.sync,
        draw_record = %s.draw_record_shown(),
        close_at = %s.close_at.0.map_or_else(|| "none".to_string(), |_| s.close_at.show()),
        config_file = %file
    );
    server::run(s, shutdown).await?;
    info!(action = action::SHUTDOWN, result = result::SUCCESS);
    Ok(())
}

/// `lottery agency`: logs the contract's config line, uploads the data file
/// (with a progress bar when a person watches), and writes the winners to
/// `winners_out` when given.
///
/// # Errors
/// The agency failed, or `winners_out` cannot be written.
pub async fn agency(
    config: &Config,
    file: &ConfigFile,
    winners_out: Option<&Path>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let a = &config.agency;
    info!(
        action = action::CONFIG,
        result = result::SUCCESS,
        client_id = a.id,
        server_address = a.server_address.as_str(),
        batch_max_amount = a.batch_max_amount,
        log_level = %config.log.level,
        data_file = %a.data_path().display(),
        config_file = %file
    );
    let (sender, bar) = progress::start(&a.data_path(), config.log.format).unzip();
    let outcome = agency::run_with_progress(a, shutdown, sender).await;
    if let Some(bar) = bar {
        // The sender is gone with the run, so the bar has drawn its last.
        let _ = bar.await;
    }
    let Some(report) = outcome? else {
        info!(action = action::SHUTDOWN, result = result::SUCCESS);
        return Ok(());
    };
    if let Some(path) = winners_out {
        let mut text = report.winners.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(in_file) = report.closed_short {
        return Err(agency::AgencyError::SalesClosed {
            path: a.data_path(),
            stored: report.bets,
            in_file,
            winners: report.winners.len(),
        }
        .into());
    }
    Ok(())
}

/// A new random secret: 32 bytes from the operating system's generator
/// (through `rand`'s thread generator, reseeded from it), as 64 hex digits,
/// so it survives any file, variable or TOML string unescaped.
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh secret for each agency of a run, and one for the operator: the
/// tools that start a central and its agencies themselves (`demo`,
/// `bench`) never run it open.
#[derive(Debug, Clone)]
pub struct RunSecrets {
    /// Per agency.
    pub agencies: BTreeMap<AgencyId, String>,
    /// For an operator session.
    pub operator: String,
}

impl RunSecrets {
    /// Secrets for agencies `1..=agencies`.
    pub fn generate(agencies: u32) -> RunSecrets {
        RunSecrets {
            agencies: (1..=agencies).map(|id| (id, new_secret())).collect(),
            operator: new_secret(),
        }
    }

    /// As `server.secrets` holds them.
    pub fn table(&self) -> BTreeMap<String, String> {
        let mut table: BTreeMap<String, String> = self
            .agencies
            .iter()
            .map(|(id, secret)| (id.to_string(), secret.clone()))
            .collect();
        table.insert(OPERATOR_KEY.into(), self.operator.clone());
        table
    }

    /// As a `server.secrets_file` holds them.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table()).expect("a table of strings is TOML")
    }
}

/// Where a tool keeps its data and bets file: the given directory, or a
/// temporary one removed when this is dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl WorkDir {
    /// Uses `given` (created if missing), else a new temporary directory.
    ///
    /// # Errors
    /// The directory cannot be created.
    pub fn new(given: Option<&Path>) -> anyhow::Result<WorkDir> {
        if let Some(dir) = given {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            return Ok(WorkDir {
                path: dir.to_path_buf(),
                _temp: None,
            });
        }
        let temp = tempfile::tempdir().context("creating a temporary directory")?;
        Ok(WorkDir {
            path: temp.path().to_path_buf(),
            _temp: Some(temp),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bets file and the draw record in it, with any left by a previous
    /// run removed: their bets must not count in this draw.
    ///
    /// # Errors
    /// An old file exists but cannot be removed.
    pub fn fresh_storage(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let storage = self.path.join("bets.csv");
        let record = self.path.join("bets.draw.toml");
        for path in [&storage, &record] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing the old {}", path.display()))
                }
                _ => {}
            }
        }
        // Each run is a round of its own: the seals its agencies keep must
        // not be compared with a previous run's (another winning number,
        // say), nor be written beside data that may be someone else's.
        let seals = self.path.join("seals");
        match std::fs::remove_dir_all(&seals) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing the old {}", seals.display()))
            }
            _ => {}
        }
        std::fs::create_dir_all(&seals).with_context(|| format!("creating {}", seals.display()))?;
        Ok((storage, record))
    }

    /// Where this run's agencies keep their seals (`agency.seal_file`):
    /// a folder [`WorkDir::fresh_storage`] empties.
    pub fn seal_file(&self) -> String {
        self.path
            .join("seals")
            .join("agency-{id}.csv.seal")
            .to_string_lossy()
            .into_owned()
    }
}

/// Writes synthetic data into `dir`, off the runtime's threads.
///
/// # Errors
/// Bad options, or the files cannot be written.
pub async fn generate(dir: &Path, opts: GenOptions) -> anyhow::Result<Vec<Generated>> {
    let target = dir.to_path_buf();
    tokio::task::spawn_blocking(move || gen_data::generate(&target, &opts))
        .await?
        .with_context(|| format!("writing data into {}", dir.display()))
}

type Outcome = (AgencyId, Result<Option<AgencyReport>, AgencyError>);

/// Agencies `1..=n` running in this process against one central or
/// several, each reading `agency-{id}.csv` from one directory.
#[derive(Debug)]
pub struct Fleet {
    tasks: JoinSet<Outcome>,
    progress: Vec<watch::Receiver<u64>>,
}

impl Fleet {
    /// Starts agencies `1..=agencies`, each as `template` with its own id,
    /// data file in `data_dir` and secret from `secrets`, under a child of
    /// `shutdown`; agency `id` talks to `centrals[(id - 1) % len]`.
    ///
    /// # Panics
    /// If `centrals` is empty.
    pub fn start(
        agencies: u32,
        template: &AgencyConfig,
        centrals: &[SocketAddr],
        data_dir: &Path,
        secrets: &RunSecrets,
        shutdown: &CancellationToken,
    ) -> Fleet {
        let data_file = data_dir
            .join("agency-{id}.csv")
            .to_string_lossy()
            .into_owned();
        let mut tasks = JoinSet::new();
        let mut progress = Vec::new();
        for id in 1..=agencies {
            let config = AgencyConfig {
                id,
                server_address: centrals[(id as usize - 1) % centrals.len()].into(),
                data_file: data_file.clone(),
                secret: secrets.agencies.get(&id).cloned().unwrap_or_default(),
                ..template.clone()
            };
            let (tx, rx) = watch::channel(0u64);
            progress.push(rx);
            let token = shutdown.child_token();
            let task = async move {
                (
                    id,
                    agency::run_with_progress(&config, token, Some(tx)).await,
                )
            };
            #[cfg(tokio_unstable)]
            tasks
                .build_task()
                .name(&format!("agency {id}"))
                .spawn(task)
                .expect("the runtime accepts new tasks");
            #[cfg(not(tokio_unstable))]
            tasks.spawn(task);
        }
        Fleet { tasks, progress }
    }

    /// Bets the central holds, summed over the agencies, as each publishes.
    pub fn progress(&self) -> Vec<watch::Receiver<u64>> {
        self.progress.clone()
    }

    /// Waits for every agency. `Ok(None)` when any was cancelled; the
    /// reports otherwise, in agency order.
    ///
    /// # Errors
    /// The first agency that failed (the others are aborted).
    pub async fn join(mut self) -> anyhow::Result<Option<Vec<AgencyReport>>> {
        let mut reports = Vec::new();
        let mut cancelled = false;
        while let Some(joined) = self.tasks.join_next().await {
            let (id, outcome) = joined.context("an agency task panicked")?;
            match outcome.with_context(|| format!("agency {id}"))? {
                Some(report) => reports.push(report),
                None => cancelled = true,
            }
        }
        reports.sort_by_key(|r| r.agency);
        Ok((!cancelled).then_some(reports))
    }
}
