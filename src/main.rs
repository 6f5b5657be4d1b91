//! The `lottery` binary: parses the command line, loads the configuration,
//! starts logging, and runs one of the subcommands.
//!
//! Exit codes: 0 success (also after a graceful shutdown), 1 a runtime error,
//! 2 a usage or configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use lottery::config::{Config, ConfigError, LogLevel, Role};
use lottery::logging::{self, action, result, LogFormat};
use lottery::tools::gen_data::{self, GenOptions};
use lottery::{agency, server, shutdown, tools::demo};

/// Bet collection for a national lottery: a central server, betting agencies,
/// and the draw.
#[derive(Debug, Parser)]
#[command(name = "lottery", version)]
struct Cli {
    /// Configuration file; a missing file means defaults.
    #[arg(
        long,
        global = true,
        env = "LOTTERY_CONFIG",
        default_value = "config.toml"
    )]
    config: PathBuf,

    /// text (the contract's lines) or json [log.format].
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the central: collect bets, draw once every agency finished.
    Server(ServerArgs),
    /// Run one agency: upload its data file, then report its winners.
    Agency(AgencyArgs),
    /// Run the central and N agencies on this machine and print the winners.
    Demo(DemoArgs),
    /// Write deterministic synthetic agency-{N}.csv files.
    GenData(GenDataArgs),
    /// Check that the central answers (exit 0) or not (exit 1).
    Health(ProbeArgs),
    /// Show bets held per agency, who finished, and whether the draw is done.
    Status(ProbeArgs),
    /// Print the per-agency winners table from the draw record.
    Winners(WinnersArgs),
    /// Write a compose file for the central and N agencies.
    Compose(ComposeArgs),
    /// Load test: K agencies x M bets against a real server process.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
struct BenchArgs {
    /// Agencies (K).
    #[arg(long, default_value_t = 5)]
    agencies: u32,
    /// Bets per agency (M).
    #[arg(long, default_value_t = 200_000)]
    bets_per_agency: u64,
    /// Acknowledge without syncing, for comparison (reported as such).
    #[arg(long)]
    no_sync: bool,
    /// Batches each agency keeps in flight [agency.window].
    #[arg(long)]
    window: Option<usize>,
    /// Keep the data and the bets file here.
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ProbeArgs {
    /// The central's host:port [agency.server_address].
    #[arg(long)]
    address: Option<String>,
    /// Seconds to wait for the answer.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

#[derive(Debug, Args)]
struct WinnersArgs {
    /// The draw record [server.draw_record, or beside server.storage].
    #[arg(long)]
    record: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ComposeArgs {
    /// Number of agencies (containers client1 … clientN).
    #[arg(long, default_value_t = 5)]
    agencies: u32,
    /// Where to write; `-` for standard output.
    #[arg(long, default_value = "compose.yaml")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct ServerArgs {
    /// TCP port to listen on [server.port].
    #[arg(long)]
    port: Option<u16>,
    /// Backlog of the listening socket [server.listen_backlog].
    #[arg(long)]
    listen_backlog: Option<u32>,
    /// Agencies that must finish before the draw [server.agencies].
    #[arg(long)]
    agencies: Option<u32>,
    /// The bets file [server.storage].
    #[arg(long)]
    storage: Option<PathBuf>,
    /// The winning number [server.winning_number].
    #[arg(long)]
    winning_number: Option<u16>,
    /// Acknowledge batches without syncing the bets file (measurements only)
    /// [server.sync = false].
    #[arg(long)]
    no_sync: bool,
    /// Where the draw's outcome is recorded [server.draw_record].
    #[arg(long)]
    draw_record: Option<PathBuf>,
    /// DEBUG, INFO, WARN or ERROR [log.level].
    #[arg(long)]
    log_level: Option<LogLevel>,
}

#[derive(Debug, Args)]
struct AgencyArgs {
    /// This agency's number [agency.id].
    #[arg(long)]
    id: Option<u32>,
    /// The central's host:port [agency.server_address].
    #[arg(long)]
    server_address: Option<String>,
    /// The data file; {id} is replaced [agency.data_file].
    #[arg(long)]
    data_file: Option<String>,
    /// Most bets per batch [agency.batch_max_amount].
    #[arg(long)]
    batch_max_amount: Option<usize>,
    /// Seconds without progress before giving up [agency.reconnect_timeout].
    #[arg(long)]
    reconnect_timeout: Option<u64>,
    /// Batches kept in flight ahead of their acknowledgements [agency.window].
    #[arg(long)]
    window: Option<usize>,
    /// DEBUG, INFO, WARN or ERROR [log.level].
    #[arg(long)]
    log_level: Option<LogLevel>,
    /// Also write the winners' documents to this file, one per line.
    #[arg(long)]
    winners_out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// Number of agencies.
    #[arg(long, default_value_t = 5)]
    agencies: u32,
    /// Bets per agency, for generated data.
    #[arg(long, default_value_t = 20_000)]
    bets_per_agency: u64,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 7574)]
    seed: u64,
    /// Share of generated bets on the winning number.
    #[arg(long, default_value_t = 0.0002)]
    winner_share: f64,
    /// Use the agency-{N}.csv files in this directory instead of generating.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep the bets file (and generated data) here instead of a temporary
    /// directory.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Log level of the server and agencies (WARN keeps the table readable).
    #[arg(long, default_value = "WARN")]
    log_level: LogLevel,
    /// Acknowledge batches without syncing the bets file.
    #[arg(long)]
    no_sync: bool,
    /// Batches each agency keeps in flight [agency.window].
    #[arg(long)]
    window: Option<usize>,
}

#[derive(Debug, Args)]
struct GenDataArgs {
    /// Directory to write agency-{N}.csv into.
    #[arg(long, default_value = ".data")]
    out: PathBuf,
    /// Number of agencies [server.agencies].
    #[arg(long)]
    agencies: Option<u32>,
    /// Bets per agency.
    #[arg(long, default_value_t = 10_000)]
    bets_per_agency: u64,
    /// Seed: the same seed gives the same files.
    #[arg(long, default_value_t = 7574)]
    seed: u64,
    /// The winning number [server.winning_number].
    #[arg(long)]
    winning_number: Option<u16>,
    /// Share of bets on the winning number.
    #[arg(long, default_value_t = 0.0002)]
    winner_share: f64,
    /// Share of bets whose names hold | : \ , or ".
    #[arg(long, default_value_t = 0.0)]
    tricky_share: f64,
    /// End lines with CRLF.
    #[arg(long)]
    crlf: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let role = match cli.command {
        Command::Agency(_) => Role::Agency,
        _ => Role::Server,
    };
    let config = match load_config(&cli, role) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lottery: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let level = match &cli.command {
        Command::Demo(args) => args.log_level,
        // The agencies' own lines would drown the report.
        Command::Bench(_) => LogLevel::Warn,
        _ => config.log.level,
    };
    logging::init(level, config.log.format);

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lottery: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(action = "exit", result = result::FAIL, error = %format!("{e:#}"));
            eprintln!("lottery: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Defaults < file < environment < flags.
fn load_config(cli: &Cli, role: Role) -> Result<Config, ConfigError> {
    let mut config = Config::load(&cli.config, role, |k| std::env::var(k).ok())?;
    match &cli.command {
        Command::Server(a) => {
            let s = &mut config.server;
            overlay(&mut s.port, a.port);
            overlay(&mut s.listen_backlog, a.listen_backlog);
            overlay(&mut s.agencies, a.agencies);
            overlay(&mut s.storage, a.storage.clone());
            overlay(&mut s.winning_number, a.winning_number);
            overlay(&mut s.draw_record, a.draw_record.clone());
            if a.no_sync {
                s.sync = false;
            }
            overlay(&mut config.log.level, a.log_level);
        }
        Command::Agency(a) => {
            let c = &mut config.agency;
            overlay(&mut c.id, a.id);
            overlay(&mut c.server_address, a.server_address.clone());
            overlay(&mut c.data_file, a.data_file.clone());
            overlay(&mut c.batch_max_amount, a.batch_max_amount);
            overlay(&mut c.reconnect_timeout, a.reconnect_timeout);
            overlay(&mut c.window, a.window);
            overlay(&mut config.log.level, a.log_level);
        }
        Command::GenData(a) => {
            overlay(&mut config.server.agencies, a.agencies);
            overlay(&mut config.server.winning_number, a.winning_number);
        }
        Command::Demo(_)
        | Command::Health(_)
        | Command::Status(_)
        | Command::Winners(_)
        | Command::Compose(_)
        | Command::Bench(_) => {}
    }
    overlay(&mut config.log.format, cli.log_format);
    config.validate()?;
    Ok(config)
}

fn overlay<T>(slot: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = v;
    }
}

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    match command {
        Command::Server(_) => run_server(config, token).await,
        Command::Agency(args) => run_agency(config, args, token).await,
        Command::Demo(args) => run_demo(config, args, token).await,
        Command::GenData(args) => run_gen_data(config, args).await,
        Command::Health(args) => {
            lottery::tools::ops::health(&probe_target(&config, &args)).await?;
            println!("ok");
            Ok(())
        }
        Command::Status(args) => {
            let view = lottery::tools::ops::status(&probe_target(&config, &args)).await?;
            print!("{}", lottery::tools::ops::render_status(&view));
            Ok(())
        }
        Command::Winners(args) => {
            let record = args
                .record
                .unwrap_or_else(|| config.server.draw_record_path());
            print!("{}", lottery::tools::ops::winners_table(&record)?);
            Ok(())
        }
        Command::Bench(args) => {
            let opts = lottery::tools::bench::BenchOptions {
                agencies: args.agencies,
                bets_per_agency: args.bets_per_agency,
                no_sync: args.no_sync,
                window: args.window.unwrap_or(config.agency.window),
                batch_max_amount: config.agency.batch_max_amount,
                work_dir: args.work_dir,
            };
            let report = lottery::tools::bench::run(opts, token).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Compose(args) => {
            anyhow::ensure!(args.agencies >= 1, "--agencies must be at least 1");
            let text = lottery::tools::compose::render(args.agencies);
            if args.out.as_os_str() == "-" {
                print!("{text}");
            } else {
                std::fs::write(&args.out, text)
                    .with_context(|| format!("writing {}", args.out.display()))?;
            }
            Ok(())
        }
    }
}

/// Where the probes go: `--address`, else the agency's configured central,
/// over TLS when the agency is configured for it.
fn probe_target(config: &Config, args: &ProbeArgs) -> lottery::tools::ops::Target {
    let address = args
        .address
        .clone()
        .unwrap_or_else(|| config.agency.server_address.clone());
    let tls = (!config.agency.tls_ca.as_os_str().is_empty()).then(|| {
        let agency = lottery::config::AgencyConfig {
            server_address: address.clone(),
            ..config.agency.clone()
        };
        (config.agency.tls_ca.clone(), agency.tls_name())
    });
    lottery::tools::ops::Target {
        address,
        tls,
        timeout: std::time::Duration::from_secs(args.timeout.max(1)),
    }
}

async fn run_server(config: Config, token: CancellationToken) -> anyhow::Result<()> {
    let s = &config.server;
    info!(
        action = action::CONFIG,
        result = result::SUCCESS,
        port = s.port,
        listen_backlog = s.listen_backlog,
        logging_level = %config.log.level,
        agencies = s.agencies,
        storage = %s.storage.display(),
        winning_number = s.winning_number,
        sync = s.sync,
        draw_record = %s.draw_record_path().display()
    );
    let listener = server::bind(s).with_context(|| format!("binding port {}", s.port))?;
    server::run(listener, s, token).await?;
    info!(action = action::SHUTDOWN, result = result::SUCCESS);
    Ok(())
}

async fn run_agency(
    config: Config,
    args: AgencyArgs,
    token: CancellationToken,
) -> anyhow::Result<()> {
    let a = &config.agency;
    info!(
        action = action::CONFIG,
        result = result::SUCCESS,
        client_id = a.id,
        server_address = a.server_address.as_str(),
        batch_max_amount = a.batch_max_amount,
        log_level = %config.log.level,
        data_file = %a.data_path().display()
    );
    // A progress bar when a person is watching; plain log lines otherwise.
    use std::io::IsTerminal;
    let (progress, bar) = if std::io::stdout().is_terminal() && config.log.format == LogFormat::Text
    {
        let total = count_bets(&a.data_path());
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        (Some(tx), Some(tokio::spawn(show_progress(total, rx))))
    } else {
        (None, None)
    };
    let outcome = agency::run_with_progress(a, token, progress).await;
    if let Some(bar) = bar {
        let _ = bar.await;
    }
    match outcome? {
        Some(report) => {
            if let Some(path) = args.winners_out {
                let mut text = report.winners.join("\n");
                if !text.is_empty() {
                    text.push('\n');
                }
                std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        None => info!(action = action::SHUTDOWN, result = result::SUCCESS),
    }
    Ok(())
}

/// Bets in a data file (its non-blank lines), for the progress bar's total.
fn count_bets(path: &std::path::Path) -> u64 {
    use std::io::BufRead;
    std::fs::File::open(path)
        .map(|f| {
            std::io::BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .count() as u64
        })
        .unwrap_or(0)
}

/// Draws bets held of total, rate and ETA until the agency run ends (the
/// sender is dropped).
async fn show_progress(total: u64, mut held: tokio::sync::watch::Receiver<u64>) {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} bets  {per_sec}  ETA {eta}")
            .expect("a valid template"),
    );
    while held.changed().await.is_ok() {
        bar.set_position(*held.borrow());
    }
    bar.finish();
}

async fn run_demo(config: Config, args: DemoArgs, token: CancellationToken) -> anyhow::Result<()> {
    let opts = demo::DemoOptions {
        agencies: args.agencies,
        data_dir: args.data_dir,
        work_dir: args.work_dir,
        generate: GenOptions {
            bets_per_agency: args.bets_per_agency,
            seed: args.seed,
            winner_share: args.winner_share,
            ..GenOptions::default()
        },
        winning_number: config.server.winning_number,
        batch_max_amount: config.agency.batch_max_amount,
        sync: config.server.sync && !args.no_sync,
        window: args.window.unwrap_or(config.agency.window),
    };
    match demo::run(opts, token).await? {
        Some(outcome) => print!("{}", demo::render(&outcome)),
        None => info!(action = action::SHUTDOWN, result = result::SUCCESS),
    }
    Ok(())
}

async fn run_gen_data(config: Config, args: GenDataArgs) -> anyhow::Result<()> {
    let opts = GenOptions {
        agencies: config.server.agencies,
        bets_per_agency: args.bets_per_agency,
        seed: args.seed,
        winning_number: config.server.winning_number,
        winner_share: args.winner_share,
        tricky_share: args.tricky_share,
        crlf: args.crlf,
    };
    let out = args.out.clone();
    let generated = tokio::task::spawn_blocking(move || gen_data::generate(&out, &opts))
        .await?
        .with_context(|| format!("writing data into {}", args.out.display()))?;
    for g in generated {
        println!(
            "{}: {} bets, {} on the winning number",
            g.path.display(),
            g.bets,
            g.winners
        );
    }
    Ok(())
}
