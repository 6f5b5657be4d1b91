//! The `lottery` binary: parses the command line, loads the configuration,
//! starts logging, and runs one of the subcommands.
//!
//! The flags that set configuration are not declared here: they come from
//! the settings table in `lottery::config` (`config::add_flags`), so each
//! setting's flag, variable and key stay one declaration.
//!
//! Exit codes: 0 success (also after a graceful shutdown), 1 a runtime error
//! (and `verify` finding a difference), 2 a usage or configuration error, 3
//! an agency whose data file does not match what the central holds.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use lottery::agency::AgencyError;
use lottery::config::{self, Config, ConfigFile, Role};
use lottery::logging::{self, action, result, LogLevel};
use lottery::shutdown;
use lottery::tools::gen_data::GenOptions;
use lottery::tools::{bench, compose, demo, launch, ops, verify};

/// How long the runtime's blocking threads get to finish once the command
/// has returned. With the grace period and the store's close deadline, this
/// bounds a central's shutdown (see `server.shutdown_grace`).
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(1);

/// Bet collection for a national lottery: a central server, betting agencies,
/// and the draw. Flags that set configuration also show its key and variable.
#[derive(Debug, Parser)]
#[command(name = "lottery", version)]
struct Cli {
    /// Configuration file. A missing ./config.toml means defaults; so does
    /// a missing file named here or in LOTTERY_CONFIG, with a warning.
    #[arg(
        long,
        global = true,
        env = "LOTTERY_CONFIG",
        default_value = "./config.toml"
    )]
    config: PathBuf,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the central: collect bets, draw once every agency finished.
    Server,
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
    /// Close sales now: later batches are refused and the draw runs over
    /// the bets stored (an operator's; exit 1 if refused).
    Close(CloseArgs),
    /// Print the per-agency winners table of the recorded draw (the draw
    /// record, or the database's tables draw and draw_agencies).
    Winners(WinnersArgs),
    /// Recompute counts, digests, the seal and the winners from the stored
    /// bets and compare them with the draw record (exit 0 agree, 1 differ).
    Verify(VerifyArgs),
    /// Keep the drawn round's bets and record aside (named by round and
    /// seal) so the central starts the next round empty; run it with the
    /// central stopped.
    NewRound,
    /// Write a compose file for the central and N agencies (and its secrets).
    Compose(ComposeArgs),
    /// Write a secret per agency, the operator's, and the central's file of
    /// them all (existing secrets are kept).
    Secrets(SecretsArgs),
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
    /// Store into this PostgreSQL database (a libpq URL; its database must
    /// hold no earlier round) rather than a fresh bets file.
    #[arg(long)]
    storage: Option<String>,
    /// Centrals sharing the database named by --storage, agency i on
    /// central (i - 1) mod K.
    #[arg(long, default_value_t = 1, requires = "storage")]
    centrals: u32,
    /// Run each central with its admin listener on (loopback, a free
    /// port), and scrape its /metrics every second during the load.
    #[arg(long)]
    admin: bool,

    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// A seal published for this round (64 hex digits: the one the agencies
    /// logged and kept): it must be the one the stored bets give.
    #[arg(long, value_name = "HEX")]
    seal: Option<lottery::receipt::Digest>,
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
struct CloseArgs {
    #[command(flatten)]
    probe: ProbeArgs,
    /// Why sales close (required; logged by the central and kept with the
    /// close, at most 200 bytes).
    #[arg(long)]
    reason: String,
}

#[derive(Debug, Args)]
struct WinnersArgs {
    /// A draw record file to read instead of the draw server.storage keeps
    /// (server.draw_record or the one beside the bets file, or the
    /// database's tables).
    #[arg(long)]
    record: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ComposeArgs {
    /// Number of agencies (containers client1 … clientN).
    #[arg(long, default_value_t = 5)]
    agencies: u32,
    /// Where to write; `-` for standard output. The secrets it mounts are
    /// written (or completed) in `secrets/` beside it (`./secrets` for `-`).
    #[arg(long, default_value = "compose.yaml")]
    out: PathBuf,
    /// Store the bets in a PostgreSQL service (named volume, health check,
    /// password in secrets/postgres.secret) instead of a bets file.
    #[arg(long)]
    postgres: bool,
    /// Number of centrals (central-1 … central-K), agencies spread over
    /// them; more than one needs --postgres (they share its database).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    centrals: u32,
}

#[derive(Debug, Args)]
struct SecretsArgs {
    /// Number of agencies.
    #[arg(long, default_value_t = 5)]
    agencies: u32,
    /// The directory to write them into (made private to its owner).
    #[arg(long, default_value = compose::SECRETS_DIR)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct AgencyArgs {
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
}

#[derive(Debug, Args)]
struct GenDataArgs {
    /// Directory to write agency-{N}.csv into.
    #[arg(long, default_value = ".data")]
    out: PathBuf,
    /// Bets per agency.
    #[arg(long, default_value_t = 10_000)]
    bets_per_agency: u64,
    /// Seed: the same seed gives the same files.
    #[arg(long, default_value_t = 7574)]
    seed: u64,
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

/// The command line: the declared subcommands, the settings' flags, and the
/// help of the flags whose setting's own help reads wrong on them.
fn command() -> clap::Command {
    // The setting describes `server.sync` itself; the flag turns it off.
    let no_sync = "Acknowledge batches without syncing the bets file first (no `fdatasync`; \
                   with a database, `synchronous_commit` off): only for measurements. \
                   [server.sync = false, SERVER_SYNC]";
    config::add_flags(Cli::command())
        .mut_subcommand("server", |c| c.mut_arg("server.sync", |a| a.help(no_sync)))
        .mut_subcommand("demo", |c| c.mut_arg("server.sync", |a| a.help(no_sync)))
        // gen-data writes one file per agency; the draw's count is the server's.
        .mut_subcommand("gen-data", |c| {
            c.mut_arg("server.agencies", |a| {
                a.help(
                    "Number of files to write, agency-1.csv to agency-N.csv. \
                     [server.agencies, SERVER_AGENCIES]",
                )
            })
        })
}

fn main() -> ExitCode {
    let matches = command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Compose(args) = &cli.command {
        if args.centrals > 1 && !args.postgres {
            // Each central of the file layout owns its bets file: two would
            // each hold part of an agency's bets, and each run its own draw.
            let mut cmd = command();
            cmd.build();
            let compose = cmd.find_subcommand_mut("compose").expect("declared");
            compose
                .error(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--centrals above 1 needs --postgres: several centrals must share one \
                     database (a bets file belongs to one central)",
                )
                .exit();
        }
    }
    let (_, flags) = matches.subcommand().expect("clap requires a subcommand");
    let role = match cli.command {
        Command::Agency(_) => Role::Agency,
        _ => Role::Server,
    };
    let loaded = Config::load_reporting(&cli.config, role, |k| std::env::var(k).ok(), Some(flags));
    let (mut config, file) = match loaded {
        Ok(loaded) => loaded,
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
    // Whichever way `main` ends, the log lines still held are written.
    let _flush = logging::FlushOnDrop;
    warn_if_named_file_missing(&matches, &file);
    if matches!(cli.command, Command::Server) {
        // Before anything is opened: connections over what the open-files
        // limit allows must get SERVER_BUSY, not hang.
        if let Err(e) = lottery::server::fit_open_files(&mut config.server) {
            eprintln!("lottery: configuration error: {e}");
            return ExitCode::from(2);
        }
        // A configured agency without a secret while others have one is a
        // configuration error, not a runtime one: say so before starting.
        if let Err(e) = config.server.load_secrets() {
            eprintln!("lottery: configuration error: {e}");
            return ExitCode::from(2);
        }
    }
    // The same for an agency whose secret file cannot be read.
    if matches!(cli.command, Command::Agency(_)) {
        if let Err(e) = config.agency.load_secret() {
            eprintln!("lottery: configuration error: {e}");
            return ExitCode::from(2);
        }
    }

    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if matches!(cli.command, Command::Server) {
        // The server writes nothing to stdout but its log, and logs a line
        // a batch: its workers write their lines when they run out of work.
        logging::flush_when_idle(&mut runtime);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lottery: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(run(cli.command, config, file));
    // Dropping the runtime would wait for every blocking thread, and one
    // stuck in storage (a hung disk or network file system) would then hold
    // the exit forever: give them a moment, then leave without them.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_fatal(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// A missing `./config.toml` is the contract's "defaults"; a file the
/// operator named (`--config`, `LOTTERY_CONFIG`) and that is not there is a
/// mistake (a typo, a volume not mounted) that would otherwise pass in
/// silence, the program running on settings nobody chose.
fn warn_if_named_file_missing(matches: &clap::ArgMatches, file: &ConfigFile) {
    let ConfigFile::Missing(path) = file else {
        return;
    };
    let named_by = match matches.value_source("config") {
        Some(ValueSource::CommandLine) => "--config",
        Some(ValueSource::EnvVariable) => "LOTTERY_CONFIG",
        _ => return,
    };
    warn!(
        action = action::CONFIG_FILE,
        result = result::FAIL,
        path = %path.display(),
        reason = %format!(
            "the configuration file named by {named_by} does not exist; running on defaults, \
             environment and flags"
        )
    );
}

/// Says once why the program stopped.
///
/// Two readers want it: log tooling, which reads stdout and parses the
/// `action: exit | result: fail` line, and a person, who reads
/// `lottery: error: …` on stderr. When the two streams go to different
/// places (a log file or pipe for stdout, a terminal for stderr), each gets
/// its own. When they go to the same place, one line is enough: in a
/// terminal a person reads it, so the plain message (multi-line parts, such
/// as a TOML error's `^^^` marker, intact); anywhere else (`2>&1` into a
/// file, the journal) tooling reads it, so the log line.
fn report_fatal(e: &anyhow::Error) {
    use std::io::IsTerminal;
    let message = logging::error_chain(e.as_ref());
    let shared = same_destination();
    let terminal = std::io::stdout().is_terminal();
    // (log line, plain message)
    let (log_line, plain) = match (shared, terminal) {
        (false, _) => (true, true),
        (true, true) => (false, true),
        (true, false) => (true, false),
    };
    if log_line {
        error!(
            action = action::EXIT,
            result = result::FAIL,
            error = message.as_str()
        );
    }
    if plain {
        eprintln!("lottery: error: {message}");
    }
}

/// Whether stdout and stderr are the same open file (one terminal, or one
/// file or pipe through `2>&1`). Unknown counts as different: then both
/// lines are written, which loses nothing.
fn same_destination() -> bool {
    use std::os::fd::{AsFd, BorrowedFd};
    use std::os::unix::fs::MetadataExt;
    fn identity(fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
        let file = std::fs::File::from(fd.try_clone_to_owned().ok()?);
        let meta = file.metadata().ok()?;
        Some((meta.dev(), meta.ino()))
    }
    match (
        identity(std::io::stdout().as_fd()),
        identity(std::io::stderr().as_fd()),
    ) {
        (Some(out), Some(err)) => out == err,
        _ => false,
    }
}

async fn run(command: Command, config: Config, file: ConfigFile) -> anyhow::Result<()> {
    let token = CancellationToken::new();
    shutdown::cancel_on_signal(token.clone()).context("installing signal handlers")?;
    match command {
        Command::Server => launch::serve(&config, &file, token).await,
        Command::Agency(args) => {
            launch::agency(&config, &file, args.winners_out.as_deref(), token).await
        }
        Command::Demo(args) => {
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
                sync: config.server.sync,
                window: config.agency.window,
            };
            match demo::run(opts, token).await? {
                Some(outcome) => print!("{}", demo::render(&outcome)),
                None => info!(action = action::SHUTDOWN, result = result::SUCCESS),
            }
            Ok(())
        }
        Command::GenData(args) => {
            let opts = GenOptions {
                agencies: config.server.agencies,
                bets_per_agency: args.bets_per_agency,
                seed: args.seed,
                winning_number: config.server.winning_number,
                winner_share: args.winner_share,
                tricky_share: args.tricky_share,
                crlf: args.crlf,
            };
            for g in launch::generate(&args.out, opts).await? {
                println!(
                    "{}: {} bets, {} on the winning number",
                    g.path.display(),
                    g.bets,
                    g.winners
                );
            }
            Ok(())
        }
        Command::Health(args) => {
            ops::health(&probe_target(&config, args)?).await?;
            println!("ok");
            Ok(())
        }
        Command::Status(args) => {
            let view = ops::status(&probe_target(&config, args)?).await?;
            print!("{}", ops::render_status(&view));
            Ok(())
        }
        Command::Close(args) => {
            let answer = ops::close(&probe_target(&config, args.probe)?, &args.reason).await?;
            println!("{answer}");
            Ok(())
        }
        Command::Winners(args) => {
            print!(
                "{}",
                ops::winners(&config.server, args.record.as_deref()).await?
            );
            Ok(())
        }
        Command::Verify(args) => {
            let verified = verify::verify(&config.server, args.seal).await?;
            print!("{}", verified.report);
            // Exit 1 all the same: no record agrees with the bets.
            anyhow::ensure!(
                !verified.undrawn,
                "the round is not drawn yet: there is no draw record to verify"
            );
            let n = verified.differences.len();
            anyhow::ensure!(
                n == 0,
                "the stored bets do not match what was checked against them ({n} difference{}, \
                 each on a `differs:` line)",
                if n == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Command::NewRound => {
            print!("{}", verify::new_round(&config.server).await?);
            info!(action = action::NEW_ROUND, result = result::SUCCESS);
            Ok(())
        }
        Command::Bench(args) => {
            let opts = bench::BenchOptions {
                agencies: args.agencies,
                bets_per_agency: args.bets_per_agency,
                no_sync: args.no_sync,
                window: config.agency.window,
                batch_max_amount: config.agency.batch_max_amount,
                work_dir: args.work_dir,
                storage: args.storage,
                centrals: args.centrals,
                admin: args.admin,
            };
            anyhow::ensure!(opts.centrals >= 1, "--centrals must be at least 1");
            print!("{}", bench::run(opts, token).await?.render());
            Ok(())
        }
        Command::Secrets(args) => {
            anyhow::ensure!(args.agencies >= 1, "--agencies must be at least 1");
            let central = compose::write_secrets(&args.dir, args.agencies)?;
            println!(
                "{}: the central's (SERVER_SECRETS_FILE); {}: agency N's (CLI_SECRET_FILE)",
                central.display(),
                args.dir.join("agency-N.secret").display()
            );
            Ok(())
        }
        Command::Compose(args) => {
            anyhow::ensure!(args.agencies >= 1, "--agencies must be at least 1");
            let text = if args.postgres {
                compose::render_postgres(args.agencies, args.centrals)
            } else {
                compose::render(args.agencies)
            };
            let beside = match args.out.parent() {
                Some(dir) if args.out.as_os_str() != "-" => dir.to_path_buf(),
                _ => PathBuf::new(),
            };
            let secrets = beside.join(compose::SECRETS_DIR);
            let central = compose::write_secrets(&secrets, args.agencies)?;
            eprintln!("secrets: {} (never commit it)", central.display());
            if args.postgres {
                let password = compose::write_postgres_secret(&secrets)?;
                eprintln!(
                    "database password: {} (never commit it)",
                    password.display()
                );
            }
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

/// The exit code of a failed command: 3 when the central does not hold
/// exactly the agency's file (its winners are not valid), 4 when sales
/// closed before the agency's whole file was stored (its winners are over
/// what was), 2 when the
/// storage URL lacks what the database asks for, else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    use lottery::server::ServerError;
    use lottery::store::StorageError;
    match e.downcast_ref::<AgencyError>() {
        Some(AgencyError::Receipt(_)) => return 3,
        Some(AgencyError::SalesClosed { .. }) => return 4,
        _ => {}
    }
    // A storage URL that lacks what the database asks for is found only
    // once the database is asked: still the configuration's error.
    let storage =
        e.downcast_ref::<StorageError>()
            .or_else(|| match e.downcast_ref::<ServerError>() {
                Some(ServerError::Storage(storage)) => Some(storage),
                _ => None,
            });
    if let Some(ServerError::CloseAtPast { .. }) = e.downcast_ref::<ServerError>() {
        return 2;
    }
    match storage {
        Some(StorageError::DatabaseConfig { .. }) => 2,
        _ => 1,
    }
}

/// Where `health` and `status` go, and the operator's secret when the
/// central's secrets (`server.secrets_file`) hold one: on the central's own
/// host (or container) the probes then need nothing more.
fn probe_target(config: &Config, args: ProbeArgs) -> anyhow::Result<ops::Target> {
    let mut target = ops::Target::for_agency(
        &config.agency,
        args.address,
        std::time::Duration::from_secs(args.timeout),
    );
    target.operator_secret = config
        .server
        .read_secrets()
        .context("reading the operator's secret")?
        .operator;
    Ok(target)
}
