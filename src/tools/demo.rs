//! The whole lottery on one machine: generate data (unless given), start the
//! central on a free loopback port, run every agency against it, and report
//! each agency's winners and the throughput.
//!
//! Everything runs in this process under one token tree: the server and each
//! agency get a child token, and a drop guard cancels them all if the demo
//! ends early (an agency failed, or a signal arrived).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::agency::AgencyReport;
use crate::config::{AgencyConfig, ServerConfig};
use crate::server;
use crate::store::Storage;
use crate::tools::gen_data::GenOptions;
use crate::tools::launch::{self, Fleet, RunSecrets, WorkDir};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of agencies.
    pub agencies: u32,
    /// Existing `agency-{N}.csv` files; generated when `None`.
    pub data_dir: Option<PathBuf>,
    /// Where the bets file (and generated data) go; a temporary directory,
    /// removed afterwards, when `None`.
    pub work_dir: Option<PathBuf>,
    /// How generated data is made (its `agencies` is overridden).
    pub generate: GenOptions,
    /// The winning number.
    pub winning_number: u16,
    /// Most bets per batch.
    pub batch_max_amount: usize,
    /// Sync the bets file before each acknowledgement.
    pub sync: bool,
    /// Batches each agency keeps in flight.
    pub window: usize,
}

/// What the demo measured.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// One report per agency, in agency order.
    pub agencies: Vec<AgencyReport>,
    /// From the first connection to the last agency's winners.
    pub elapsed: Duration,
    /// The bets file, when it was kept (a `work_dir` was given).
    pub bets_file: Option<PathBuf>,
    /// Where the data is, unless it was generated into a temporary directory
    /// that is gone by now.
    pub data_dir: Option<PathBuf>,
}

impl DemoOutcome {
    /// Bets stored by all agencies.
    pub fn total_bets(&self) -> u64 {
        self.agencies.iter().map(|a| a.bets).sum()
    }

    /// Bets per second over the whole run.
    pub fn bets_per_second(&self) -> f64 {
        self.total_bets() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs the demo. Returns `Ok(None)` if `shutdown` fired first.
///
/// # Errors
/// Data generation, the server, or any agency failed.
pub async fn run(
    opts: DemoOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<DemoOutcome>> {
    if opts.agencies == 0 {
        bail!("the demo needs at least one agency");
    }
    let work_dir = WorkDir::new(opts.work_dir.as_deref())?;
    let data_dir = match &opts.data_dir {
        Some(dir) => dir.clone(),
        None => {
            let dir = work_dir.path().join("data");
            let gen = GenOptions {
                agencies: opts.agencies,
                winning_number: opts.winning_number,
                ..opts.generate.clone()
            };
            launch::generate(&dir, gen).await?;
            dir
        }
    };
    let (storage, draw_record) = work_dir.fresh_storage()?;
    // Authenticated like any documented run: fresh secrets, in memory only.
    let secrets = RunSecrets::generate(opts.agencies);
    let server_config = ServerConfig {
        secrets: secrets.table(),
        port: 0,
        listen_backlog: opts.agencies.max(5),
        agencies: opts.agencies,
        storage: Storage::File(storage.clone()),
        winning_number: opts.winning_number,
        sync: opts.sync,
        draw_record,
        // Every agency connects from loopback, all at once: room for all
        // of them while they authenticate, from one address and in all
        // (half the connection limit at most is kept for authenticated
        // ones).
        max_unauthenticated_per_address: (opts.agencies as usize).max(32),
        max_connections: (2 * (opts.agencies as usize + 64)).max(1024),
        ..ServerConfig::default()
    };
    let listener = server::bind_addr(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        server_config.listen_backlog,
    )
    .context("binding a loopback port")?;
    let address = listener.local_addr()?;

    // Cancels every child if we leave early for any reason.
    let root = shutdown.child_token();
    let _guard = root.clone().drop_guard();
    let server_token = root.child_token();
    let server_task = tokio::spawn({
        let token = server_token.clone();
        async move { server::run_on(listener, &server_config, token).await }
    });

    let started = Instant::now();
    let template = AgencyConfig {
        batch_max_amount: opts.batch_max_amount,
        window: opts.window,
        seal_file: work_dir.seal_file(),
        ..AgencyConfig::default()
    };
    let reports = Fleet::start(
        opts.agencies,
        &template,
        &[address],
        &data_dir,
        &secrets,
        &root,
    )
    .join()
    .await?;
    let elapsed = started.elapsed();
    server_token.cancel();
    server_task.await.context("the server task panicked")??;
    let Some(reports) = reports else {
        return Ok(None);
    };
    Ok(Some(DemoOutcome {
        agencies: reports,
        elapsed,
        bets_file: opts.work_dir.as_ref().map(|_| storage),
        data_dir: (opts.data_dir.is_some() || opts.work_dir.is_some()).then_some(data_dir),
    }))
}

/// Renders the per-agency winners table and the summary.
pub fn render(outcome: &DemoOutcome) -> String {
    use std::fmt::Write;
    const SHOWN: usize = 5;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6}  {:>10}  {:>7}  winning documents",
        "agency", "bets", "winners"
    );
    for a in &outcome.agencies {
        let mut docs = a
            .winners
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if a.winners.len() > SHOWN {
            let _ = write!(docs, ", … (+{})", a.winners.len() - SHOWN);
        }
        if docs.is_empty() {
            docs.push('-');
        }
        let _ = writeln!(
            out,
            "{:>6}  {:>10}  {:>7}  {docs}",
            a.agency,
            a.bets,
            a.winners.len()
        );
    }
    let winners: usize = outcome.agencies.iter().map(|a| a.winners.len()).sum();
    let _ = writeln!(
        out,
        "{:>6}  {:>10}  {:>7}",
        "total",
        outcome.total_bets(),
        winners
    );
    let _ = writeln!(
        out,
        "{} agencies stored {} bets in {:.2} s: {:.0} bets/s",
        outcome.agencies.len(),
        outcome.total_bets(),
        outcome.elapsed.as_secs_f64(),
        outcome.bets_per_second()
    );
    if let Some(dir) = &outcome.data_dir {
        let _ = writeln!(out, "data: {}", dir.display());
    }
    if let Some(path) = &outcome.bets_file {
        let _ = writeln!(out, "bets file: {}", path.display());
    }
    out
}
