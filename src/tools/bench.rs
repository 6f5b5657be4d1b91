//! The load tool (`lottery bench`): K agencies × M bets over loopback against
//! a real `lottery server` process, reporting throughput, acknowledgement
//! latency, the draw's time and the server's peak memory.
//!
//! The server runs as a child process of this same binary, so its memory is
//! measured alone; the agencies run in this process, one task each.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use crate::config::AgencyConfig;
use crate::logging::{action, result};
use crate::tools::gen_data::GenOptions;
use crate::tools::launch::{self, Fleet, RunSecrets, WorkDir};
use crate::wire::ErrorCode;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Agencies (K).
    pub agencies: u32,
    /// Bets per agency (M).
    pub bets_per_agency: u64,
    /// Acknowledge without syncing (reported as such).
    pub no_sync: bool,
    /// Batches each agency keeps in flight.
    pub window: usize,
    /// Most bets per batch.
    pub batch_max_amount: usize,
    /// Keep data and the bets file here; a temporary directory otherwise.
    pub work_dir: Option<PathBuf>,
    /// Store into this (a PostgreSQL URL, whose database must hold no
    /// earlier round) instead of a fresh bets file in the work directory.
    pub storage: Option<String>,
    /// Centrals sharing `storage` (1 without it), agency `i` on central
    /// `(i - 1) mod centrals`.
    pub centrals: u32,
    /// Run each central with its admin listener on, and scrape its
    /// `/metrics` every second during the load.
    pub admin: bool,
}

/// What was measured.
#[derive(Debug, Clone)]
pub struct BenchReport {
    /// The options it ran with.
    pub options: BenchOptions,
    /// Bets acknowledged in all.
    pub bets: u64,
    /// From the first connection to the last agency's winners.
    pub elapsed: Duration,
    /// Median batch acknowledgement latency.
    pub p50: Duration,
    /// 99th percentile batch acknowledgement latency.
    pub p99: Duration,
    /// The draw's tally, as the central that drew logged it.
    pub draw: Duration,
    /// The largest peak resident memory of a central, in KiB.
    pub server_peak_rss_kib: u64,
    /// CPU time the centrals used during the run.
    pub server_cpu: Cpu,
    /// CPU time the agencies (this process) used during the run.
    pub agencies_cpu: Cpu,
    /// Sessions the agencies needed beyond one each. A healthy run needs
    /// none: every one is a connection that ended early and was retried.
    pub reconnects: u64,
    /// Connections the server refused with a code an agency retries
    /// (`AGENCY_BUSY`, `SERVER_BUSY`), as it logged them. Not failures of
    /// the run, but never expected in a healthy one: with no reconnect
    /// beside them, they came from a client that is not this bench's.
    pub refused: Vec<String>,
    /// Scrapes of `/metrics` answered during the load (with `admin`).
    pub scrapes: u64,
}

impl BenchReport {
    /// Renders the report.
    pub fn render(&self) -> String {
        let o = &self.options;
        let per_bet = |cpu: Duration| cpu.as_secs_f64() * 1e6 / self.bets.max(1) as f64;
        format!(
            "{} agencies x {} bets, window {}, {}{}\n\
             {} bets in {:.2} s: {:.0} bets/s\n\
             batch acknowledgement latency: p50 {:.2} ms, p99 {:.2} ms\n\
             draw: {} ms\n\
             server peak RSS: {:.1} MiB\n\
             CPU: central {:.2} s, agencies {:.2} s ({:.2} µs per bet in all)\n\
             CPU per bet: central {:.2} µs user + {:.2} system, agencies {:.2} user + {:.2} system\n\
             reconnects: {}, refused connections (retried): {}\n{}{}",
            o.agencies,
            o.bets_per_agency,
            o.window,
            if o.centrals > 1 {
                format!("{} centrals, ", o.centrals)
            } else {
                String::new()
            },
            match (o.no_sync, o.storage.is_some()) {
                (true, false) => "NO SYNC (acknowledged from the page cache; not durable)",
                (true, true) => "NO SYNC (synchronous_commit off; not durable)",
                (false, false) => "durable acknowledgements (fdatasync)",
                (false, true) => "durable acknowledgements (PostgreSQL, synchronous commit)",
            },
            self.bets,
            self.elapsed.as_secs_f64(),
            self.bets as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.draw.as_millis(),
            self.server_peak_rss_kib as f64 / 1024.0,
            self.server_cpu.total().as_secs_f64(),
            self.agencies_cpu.total().as_secs_f64(),
            per_bet(self.server_cpu.total() + self.agencies_cpu.total()),
            per_bet(self.server_cpu.user),
            per_bet(self.server_cpu.system),
            per_bet(self.agencies_cpu.user),
            per_bet(self.agencies_cpu.system),
            self.reconnects,
            self.refused.len(),
            self.refused
                .iter()
                .map(|line| format!("refused: {line}\n"))
                .collect::<String>(),
            if o.admin {
                format!(
                    "admin listener on: {} scrapes of /metrics answered\n",
                    self.scrapes
                )
            } else {
                String::new()
            },
        )
    }
}

/// The server child. Stopped as an operator would (SIGTERM, so it closes
/// the bets file and logs its shutdown), and killed only if it does not
/// exit within [`STOP_PATIENCE`].
struct ServerProcess {
    child: Child,
    /// Failure events, kept as they are read.
    fails: Arc<Mutex<Fails>>,
    /// The `listen` event, once it arrives.
    milestones: std::sync::mpsc::Receiver<serde_json::Value>,
}

/// The server's `result: fail` events, told apart.
#[derive(Debug, Default)]
struct Fails {
    /// Refusals an agency retries by design (`AGENCY_BUSY`, `SERVER_BUSY`).
    refused: Vec<String>,
    /// Anything else: the run failed.
    failed: Vec<String>,
}

/// Codes the server refuses a connection with that an agency answers by
/// connecting again: the agency is still held by a connection the server
/// has not seen close yet, or the server is at its connection limit.
const RETRIED_REFUSALS: [ErrorCode; 2] = [ErrorCode::AgencyBusy, ErrorCode::ServerBusy];

/// How long a stopping server may take before it is killed.
const STOP_PATIENCE: Duration = Duration::from_secs(10);

/// How long the server may take to listen, and to log the draw once the
/// last agency has its winners.
const MILESTONE_PATIENCE: Duration = Duration::from_secs(30);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + STOP_PATIENCE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the next event on `events`, which must be `action`.
fn milestone(
    events: &std::sync::mpsc::Receiver<serde_json::Value>,
    action: &str,
) -> anyhow::Result<serde_json::Value> {
    let event = events
        .recv_timeout(MILESTONE_PATIENCE)
        .with_context(|| format!("the server did not log {action}"))?;
    anyhow::ensure!(
        event["action"] == action,
        "expected the server's {action} event, got {event}"
    );
    Ok(event)
}

/// Starts a server on a free port, logging JSON lines so its events are
/// read as data rather than parsed out of text, and returns it with the
/// loopback address it listens on. Its `sorteo` event goes to `draws`.
fn start_server(
    dir: &Path,
    opts: &BenchOptions,
    secrets: &RunSecrets,
    draws: std::sync::mpsc::Sender<serde_json::Value>,
) -> anyhow::Result<(
    ServerProcess,
    std::net::SocketAddr,
    Option<std::net::SocketAddr>,
)> {
    let secrets_file = dir.join("secrets.toml");
    std::fs::write(&secrets_file, secrets.to_toml())
        .with_context(|| format!("writing {}", secrets_file.display()))?;
    let exe = std::env::current_exe().context("locating this binary")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "server",
        "--port",
        "0",
        "--agencies",
        &opts.agencies.to_string(),
        "--log-format",
        "json",
        "--log-level",
        "INFO",
    ])
    .arg("--storage")
    .arg(
        opts.storage
            .as_ref()
            .map_or_else(|| dir.join("bets.csv").into_os_string(), Into::into),
    )
    // Defaults, whatever config.toml the working directory holds: an empty
    // file that exists (a missing one named here would be warned about).
    .env("LOTTERY_CONFIG", "/dev/null")
    .env("SERVER_LISTEN_BACKLOG", "4096")
    .env("SERVER_SECRETS_FILE", &secrets_file)
    // Every agency connects from loopback, all at once: room for all of
    // them while they authenticate, from one address and in all (half the
    // connection limit at most is kept for authenticated ones).
    .env(
        "SERVER_MAX_CONNECTIONS",
        (2 * (opts.agencies as usize + 64)).to_string(),
    )
    .env(
        "SERVER_MAX_UNAUTHENTICATED_PER_ADDRESS",
        (opts.agencies as usize + 64).to_string(),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if opts.no_sync {
        cmd.arg("--no-sync");
    }
    if opts.admin {
        cmd.env("SERVER_ADMIN_ADDRESS", "127.0.0.1:0");
    }
    let mut child = cmd.spawn().context("starting the server")?;
    let stdout = child.stdout.take().expect("piped");
    let fails = Arc::new(Mutex::new(Fails::default()));
    let (tx, milestones) = std::sync::mpsc::channel();
    {
        let fails = fails.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if event["result"] == result::FAIL {
                    let mut fails = fails.lock().unwrap_or_else(|p| p.into_inner());
                    let retried = RETRIED_REFUSALS
                        .iter()
                        .any(|code| event["code"] == code.as_str());
                    if retried {
                        fails.refused.push(line);
                    } else {
                        fails.failed.push(line);
                    }
                } else if event["action"] == action::LISTEN || event["action"] == action::ADMIN {
                    // Keep only what the report needs; per-batch events are many.
                    let _ = tx.send(event);
                } else if event["action"] == action::SORTEO {
                    let _ = draws.send(event);
                }
            }
        });
    }
    let server = ServerProcess {
        child,
        fails,
        milestones,
    };
    let admin = if opts.admin {
        let event = milestone(&server.milestones, action::ADMIN)?;
        Some(
            event["address"]
                .as_str()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .context("no address in the admin event")?,
        )
    } else {
        None
    };
    let listen = milestone(&server.milestones, action::LISTEN)?;
    let port = listen["address"]
        .as_str()
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .context("no address in the listen event")?
        .port();
    Ok((
        server,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
    ))
}

/// Scrapes `/metrics` at each of `admins` every second until aborted,
/// as Prometheus would (but more often), counting the answers in `scrapes`.
async fn scrape(
    admins: Vec<std::net::SocketAddr>,
    operator: String,
    scrapes: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.tick().await;
    loop {
        every.tick().await;
        scrape_once(&admins, &operator, &scrapes).await;
    }
}

/// One scrape of each of `admins`.
async fn scrape_once(
    admins: &[std::net::SocketAddr],
    operator: &str,
    scrapes: &std::sync::atomic::AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for admin in admins {
        let Ok(mut stream) = tokio::net::TcpStream::connect(admin).await else {
            continue;
        };
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {admin}\r\nAuthorization: Bearer {operator}\r\n\
             Connection: close\r\n\r\n"
        );
        let mut answer = Vec::new();
        if stream.write_all(request.as_bytes()).await.is_ok()
            && stream.read_to_end(&mut answer).await.is_ok()
            && answer.starts_with(b"HTTP/1.1 200")
        {
            scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time a process used, split as the kernel counts it: in its own code
/// (user) and in the kernel on its behalf (system: system calls, page
/// faults). The split says whether a cost is ours to cut or the syscalls'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cpu {
    /// Time in the process's own code.
    pub user: Duration,
    /// Time in the kernel on its behalf.
    pub system: Duration,
}

impl Cpu {
    /// User and system together.
    pub fn total(self) -> Duration {
        self.user + self.system
    }

    /// What was used since `before` (zero for a part that went backwards,
    /// as for a process that was replaced).
    fn since(self, before: Cpu) -> Cpu {
        Cpu {
            user: self.user.saturating_sub(before.user),
            system: self.system.saturating_sub(before.system),
        }
    }
}

impl std::ops::Add for Cpu {
    type Output = Cpu;
    fn add(self, other: Cpu) -> Cpu {
        Cpu {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

impl std::iter::Sum for Cpu {
    fn sum<I: Iterator<Item = Cpu>>(iter: I) -> Cpu {
        iter.fold(Cpu::default(), std::ops::Add::add)
    }
}

/// CPU time process `pid` (or `self`) has used so far, from
/// `/proc/PID/stat`; zero for a process that is gone.
fn cpu_time(pid: &str) -> Cpu {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_cpu(&s))
        .unwrap_or_default()
}

/// utime and stime of a `/proc/PID/stat` line, in clock ticks of 10 ms
/// (Linux's `USER_HZ`, 100 on every architecture it exposes to user space).
fn parse_cpu(stat: &str) -> Option<Cpu> {
    // Fields after the command name, which is in parentheses and may hold
    // spaces and parentheses itself: utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(") ")?.1;
    let mut fields = rest.split(' ').skip(11);
    let mut ticks = || -> Option<Duration> {
        let t: u64 = fields.next()?.parse().ok()?;
        Some(Duration::from_millis(t * 10))
    };
    Some(Cpu {
        user: ticks()?,
        system: ticks()?,
    })
}

fn percentile(sorted: &[u32], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Duration::from_micros(u64::from(sorted[i]))
}

/// Runs the load and measures it. Progress goes to stderr once a second.
///
/// # Errors
/// Data generation, the server, or an agency failed.
pub async fn run(opts: BenchOptions, shutdown: CancellationToken) -> anyhow::Result<BenchReport> {
    let dir = WorkDir::new(opts.work_dir.as_deref())?;
    let data = dir.path().join("data");
    eprintln!(
        "bench: generating {} x {} bets in {}",
        opts.agencies,
        opts.bets_per_agency,
        data.display()
    );
    let gen = GenOptions {
        agencies: opts.agencies,
        bets_per_agency: opts.bets_per_agency,
        ..GenOptions::default()
    };
    launch::generate(&data, gen).await?;
    dir.fresh_storage()?;
    // Measured as it is run: authenticated.
    let secrets = RunSecrets::generate(opts.agencies);
    let (draws_tx, draws) = std::sync::mpsc::channel();
    let mut servers = Vec::new();
    let mut addresses = Vec::new();
    let mut admins = Vec::new();
    for _ in 0..opts.centrals.max(1) {
        let (server, address, admin) = start_server(dir.path(), &opts, &secrets, draws_tx.clone())?;
        servers.push(server);
        addresses.push(address);
        admins.extend(admin);
    }
    let server_cpu = |servers: &[ServerProcess]| -> Cpu {
        servers
            .iter()
            .map(|s| cpu_time(&s.child.id().to_string()))
            .sum()
    };

    let total = u64::from(opts.agencies) * opts.bets_per_agency;
    let root = shutdown.child_token();
    let _guard = root.clone().drop_guard();
    let (server_cpu_before, own_cpu_before) = (server_cpu(&servers), cpu_time("self"));
    let started = Instant::now();
    let template = AgencyConfig {
        batch_max_amount: opts.batch_max_amount,
        window: opts.window,
        seal_file: dir.seal_file(),
        ..AgencyConfig::default()
    };
    let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Once before the load (so a run of any length scrapes each central),
    // then every second during it.
    scrape_once(&admins, &secrets.operator, &scrapes).await;
    let scraper = tokio::spawn(scrape(admins, secrets.operator.clone(), scrapes.clone()));
    let fleet = Fleet::start(opts.agencies, &template, &addresses, &data, &secrets, &root);
    let progress = fleet.progress();
    let ticker = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            let held: u64 = progress.iter().map(|rx| *rx.borrow()).sum();
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "bench: {held}/{total} bets acknowledged ({:.0}%), {:.0} bets/s",
                held as f64 * 100.0 / total.max(1) as f64,
                held as f64 / secs
            );
        }
    });
    let joined = fleet.join().await;
    ticker.abort();
    scraper.abort();
    let Some(reports) = joined? else {
        bail!("interrupted");
    };
    let elapsed = started.elapsed();

    let peak = servers
        .iter()
        .map(|s| peak_rss_kib(s.child.id()))
        .max()
        .unwrap_or(0);
    let server_cpu = server_cpu(&servers).since(server_cpu_before);
    let agencies_cpu = cpu_time("self").since(own_cpu_before);
    // The draw's event may still be on its way through the pipe. With
    // several centrals, one of them draws.
    let drawn = milestone(&draws, action::SORTEO)?;
    let mut refused = Vec::new();
    for server in &servers {
        let fails = server.fails.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fail) = fails.failed.first() {
            bail!("a server reported a failure: {fail}");
        }
        refused.extend(fails.refused.iter().cloned());
    }
    let draw = drawn["millis"]
        .as_u64()
        .map(Duration::from_millis)
        .context("no millis in the draw's event")?;
    let mut latencies: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.ack_latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let bets = reports.iter().map(|r| r.bets).sum();
    if bets != total {
        bail!("{bets} bets acknowledged, {total} expected");
    }
    Ok(BenchReport {
        options: opts,
        bets,
        elapsed,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        draw,
        server_peak_rss_kib: peak,
        server_cpu,
        agencies_cpu,
        reconnects: reports.iter().map(|r| r.reconnects).sum(),
        refused,
        scrapes: scrapes.load(std::sync::atomic::Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime ...
        let stat = "4242 (tokio (rt) worker) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    1234 56 7 8 20 0 3 0 100 0 0";
        assert_eq!(
            parse_cpu(stat),
            Some(Cpu {
                user: Duration::from_millis(12_340),
                system: Duration::from_millis(560),
            })
        );
        assert_eq!(parse_cpu("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn cpu_since_an_earlier_reading_never_goes_below_zero() {
        let later = Cpu {
            user: Duration::from_millis(300),
            system: Duration::from_millis(100),
        };
        let earlier = Cpu {
            user: Duration::from_millis(100),
            system: Duration::from_millis(200),
        };
        assert_eq!(
            later.since(earlier),
            Cpu {
                user: Duration::from_millis(200),
                system: Duration::ZERO,
            }
        );
        assert_eq!((later + earlier).total(), Duration::from_millis(700));
    }
}
