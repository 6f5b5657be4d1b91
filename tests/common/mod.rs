//! Helpers shared by the integration tests: running the real binary and
//! waiting on its log lines, and an independent oracle for the expected
//! stored rows and winners.
#![allow(dead_code)] // each test file uses its own subset

pub mod admin;
pub mod docker;
pub mod pg;
pub mod raw;

#[allow(unused_imports)] // not every test file drives a connection by hand
pub use raw::Raw;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limit for a whole run a test waits on (an agency's upload, a draw): a
/// hung test fails within it, saying what it waited for. The suite's
/// largest runs take a few seconds on a loaded two-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Limit for one step: a log line that follows what the test just did.
pub const STEP: Duration = Duration::from_secs(15);

/// Limit for an upload of `bets` bets in all: [`STEP`], plus 1 s for every
/// 5000 bets (a debug build stores well over 20 000 a second even on a
/// loaded machine).
pub fn upload_limit(bets: u64) -> Duration {
    STEP + Duration::from_millis(bets / 5)
}

/// How long a process's output may take to reach the end once it exited.
const DRAIN: Duration = Duration::from_secs(5);

/// A running `lottery` process whose stdout lines are collected.
pub struct Proc {
    pub pid: u32,
    /// The command, as failure messages name it.
    what: String,
    lines: mpsc::Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    exit: mpsc::Receiver<ExitStatus>,
    stderr: Arc<Mutex<String>>,
    /// One message from each of the stdout and stderr readers at end of
    /// stream: the process can exit before its last lines are read.
    drained: mpsc::Receiver<()>,
}

pub fn lottery() -> Command {
    lottery_under(&[])
}

/// `lottery`, run by `wrapper` (a program and its arguments, the lottery
/// binary's path then its own arguments after them): `strace`, say. The
/// environment is [`lottery`]'s.
/// Runs `cmd` (a central) and expects it to refuse to serve: exit 1
/// before it listens. Returns what it said on stderr.
pub fn refused_start(cmd: Command) -> String {
    let proc = Proc::spawn(cmd);
    let status = proc.wait_exit(STEP);
    assert_eq!(
        status.code(),
        Some(1),
        "{}\n{}",
        proc.output(),
        proc.stderr()
    );
    assert!(
        !proc.output().contains("action: listen"),
        "{}",
        proc.output()
    );
    proc.stderr()
}

/// The `lottery` binary under test: cargo's, or a copy named by
/// `LOTTERY_TEST_BIN` (a test run as another user copies it where that user
/// can reach it).
pub fn lottery_bin() -> std::ffi::OsString {
    std::env::var_os("LOTTERY_TEST_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_lottery").into())
}

pub fn lottery_under(wrapper: &[&str]) -> Command {
    let bin = lottery_bin();
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(bin);
            cmd
        }
        None => Command::new(bin),
    };
    clean_env(&mut cmd);
    cmd
}

/// Another build of `lottery` (the tokio-console one, say), run at `bin`
/// with [`lottery`]'s environment.
pub fn lottery_at(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    clean_env(&mut cmd);
    cmd
}

/// The environment every `lottery` a test runs gets.
fn clean_env(cmd: &mut Command) {
    // Never pick up a config.toml from the working tree: an empty file
    // (defaults) that exists, so the config line reads `config_file:
    // /dev/null` and no warning says a named file is missing.
    cmd.env("LOTTERY_CONFIG", "/dev/null");
    for var in [
        "SERVER_PORT",
        "SERVER_LISTEN_BACKLOG",
        "SERVER_AGENCIES",
        "SERVER_STORAGE",
        "SERVER_WINNING_NUMBER",
        "CLI_ID",
        "CLI_SERVER_ADDRESS",
        "CLI_DATA_FILE",
        "CLI_BATCH_MAXAMOUNT",
        "LOGGING_LEVEL",
        "CLI_LOG_LEVEL",
    ] {
        cmd.env_remove(var);
    }
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let what = describe(&cmd);
        let mut child: Child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lottery");
        let pid = child.id();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let (drained_tx, drained) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let drained_out = drained_tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                log2.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
            let _ = drained_out.send(());
        });
        let err = Arc::new(Mutex::new(String::new()));
        let err2 = err.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut e = err2.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
            let _ = drained_tx.send(());
        });
        let (etx, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let status = child.wait().expect("wait for lottery");
            let _ = etx.send(status);
        });
        Proc {
            pid,
            what,
            lines,
            log,
            exit,
            stderr: err,
            drained,
        }
    }

    /// Waits up to [`STEP`] for a stdout line containing `needle` and
    /// returns it.
    pub fn wait_for(&self, needle: &str) -> String {
        self.wait_for_within(needle, STEP)
    }

    /// Waits up to `limit` for a stdout line containing `needle`.
    pub fn wait_for_within(&self, needle: &str, limit: Duration) -> String {
        self.wait_until(&format!("containing {needle:?}"), limit, |line| {
            line.contains(needle)
        })
    }

    /// Waits up to `limit` in all for a stdout line that `matches`; the
    /// panic names the line as `what` ("containing …").
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let started = Instant::now();
        let deadline = started + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return line,
                Ok(_) => {}
                Err(e) => panic!(
                    "{}: no line {what} after {:.1?} ({}); output so far:\n{}\nstderr:\n{}",
                    self.what,
                    started.elapsed(),
                    match e {
                        mpsc::RecvTimeoutError::Timeout => format!("limit {limit:?}"),
                        mpsc::RecvTimeoutError::Disconnected => "its output ended".to_string(),
                    },
                    self.output(),
                    self.stderr()
                ),
            }
        }
    }

    /// Sends `signal` to the process; false if it has already exited.
    pub fn try_signal(&self, signal: nix::sys::signal::Signal) -> bool {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal).is_ok()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), signal).expect("kill");
    }

    /// Waits for the process to exit, within `limit`, and for its output to
    /// be read to the end.
    pub fn wait_exit(&self, limit: Duration) -> ExitStatus {
        match self.exit.recv_timeout(limit) {
            Ok(status) => {
                for _ in 0..2 {
                    // Ends when the pipes close, which exit does; the limit
                    // only guards against a grandchild holding them open.
                    let _ = self.drained.recv_timeout(DRAIN);
                }
                status
            }
            Err(_) => {
                self.signal(nix::sys::signal::Signal::SIGKILL);
                panic!(
                    "{} did not exit within {limit:?} (killed); output:\n{}\nstderr:\n{}",
                    self.what,
                    self.output(),
                    self.stderr()
                )
            }
        }
    }

    /// All stdout so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// All stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Stdout lines so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// `lottery <args>`, with the agency's id when the environment gives it.
fn describe(cmd: &Command) -> String {
    let mut what = String::from("lottery");
    for arg in cmd.get_args() {
        what.push(' ');
        what.push_str(&arg.to_string_lossy());
    }
    for (key, value) in cmd.get_envs() {
        if let (Some("CLI_ID"), Some(value)) = (key.to_str(), value) {
            what.push_str(&format!(" (CLI_ID={})", value.to_string_lossy()));
        }
    }
    what
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Never leave a server behind when a test fails half-way.
        if self.exit.try_recv().is_err() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A `lottery server` on the port the kernel gave it, storing into
/// `storage`.
pub struct Server {
    pub proc: Proc,
    pub port: u16,
}

impl Server {
    /// On port 0: the kernel picks a free port, read back from the
    /// server's `listen` line.
    pub fn start(storage: &Path, agencies: u32, winning_number: u16) -> Server {
        let mut cmd = lottery();
        cmd.arg("server")
            .env("SERVER_PORT", "0")
            .env("SERVER_AGENCIES", agencies.to_string())
            .env("SERVER_STORAGE", storage)
            .env("SERVER_WINNING_NUMBER", winning_number.to_string());
        Self::spawn(cmd)
    }

    /// Runs a `lottery server` command and waits until it listens.
    pub fn spawn(cmd: Command) -> Server {
        let proc = Proc::spawn(cmd);
        let line = proc.wait_for("action: listen | result: success");
        let port = line
            .split(" | ")
            .find_map(|field| field.strip_prefix("address: "))
            .and_then(|addr| addr.rsplit(':').next())
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        Server { proc, port }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A loopback port this test holds without listening on it: connecting to
/// it is refused, and while this lives the kernel gives it to no socket
/// that binds port 0, in this process or any other.
///
/// Never find a free port, release it and use it later: in between, any
/// server on the machine that binds port 0 can be given it, and then this
/// test's agencies upload into that server, or its own agencies are
/// refused as `AGENCY_BUSY` because ours hold their ids.
pub struct HeldPort {
    _socket: tokio::net::TcpSocket,
    pub port: u16,
}

impl HeldPort {
    pub fn new() -> HeldPort {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Lets a server (which binds with SO_REUSEADDR) take this port on
        // purpose while it is held; a bind to port 0 still never gets it.
        socket.set_reuseaddr(true).unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let port = socket.local_addr().unwrap().port();
        HeldPort {
            _socket: socket,
            port,
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A stable address for agencies in front of a server that restarts: each
/// connection is forwarded to the server's current address, or closed at
/// once while there is none. The listener lives as long as the relay, so
/// its port is never free for another process to take, and each server
/// binds port 0 like any other.
pub struct Relay {
    pub address: String,
    upstream: Arc<Mutex<Option<String>>>,
}

impl Relay {
    pub fn start(upstream: &str) -> Relay {
        Self::with_budget(upstream, None)
    }

    /// A relay that dies mid-upload at a point fixed in advance: it
    /// forwards the first `bytes` bytes its clients send, then cuts every
    /// connection (as a central that dies would) and refuses new ones from
    /// then on. A byte count rather than a moment, so the cut falls
    /// inside the upload however fast or slow the machine is.
    pub fn cutting_after(upstream: &str, bytes: u64) -> Relay {
        Self::with_budget(upstream, Some(bytes))
    }

    fn with_budget(upstream: &str, budget: Option<u64>) -> Relay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let upstream = Arc::new(Mutex::new(Some(upstream.to_string())));
        let current = upstream.clone();
        // Bytes still to forward from clients, over all connections.
        let budget = Arc::new(Mutex::new(budget));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let target = current.lock().unwrap().clone();
                let Some(server) = target.and_then(|t| std::net::TcpStream::connect(t).ok()) else {
                    continue; // dropped: the agency sees the connection close
                };
                let (from, to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (budget, current) = (budget.clone(), current.clone());
                std::thread::spawn(move || {
                    forward_within(from, to, &budget);
                    // Out of budget: nothing is forwarded any more.
                    if budget.lock().unwrap().is_some_and(|left| left == 0) {
                        *current.lock().unwrap() = None;
                    }
                });
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Relay { address, upstream }
    }

    /// Forwards new connections to `upstream`, or refuses them (`None`).
    pub fn point_at(&self, upstream: Option<&str>) {
        *self.upstream.lock().unwrap() = upstream.map(str::to_string);
    }
}

/// Copies `from` to `to` while `budget` (when limited) lasts, then closes
/// both, as a direct connection to a dead server would be.
fn forward_within(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    budget: &Mutex<Option<u64>>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        let (n, spent) = {
            let mut left = budget.lock().unwrap();
            match left.as_mut() {
                None => (n, false),
                Some(left) => {
                    let n = n.min(usize::try_from(*left).unwrap_or(usize::MAX));
                    *left -= n as u64;
                    (n, *left == 0)
                }
            }
        };
        if to.write_all(&buf[..n]).is_err() || spent {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// Starts `lottery agency` number `id` against `address`.
pub fn start_agency(id: u32, address: &str, data_file: &Path, winners_out: &Path) -> Proc {
    Proc::spawn(agency_command(id, address, data_file, winners_out))
}

/// The command line of `lottery agency` number `id`.
pub fn agency_command(id: u32, address: &str, data_file: &Path, winners_out: &Path) -> Command {
    let mut cmd = lottery();
    cmd.arg("agency")
        .env("CLI_ID", id.to_string())
        .env("CLI_SERVER_ADDRESS", address)
        .env("CLI_DATA_FILE", data_file)
        .arg("--winners-out")
        .arg(winners_out);
    // The agency keeps its seal beside its data file, but the real data
    // belong to this checkout's neighbours, not to a test: the seal goes
    // beside the test's winners there.
    if data_file.parent() == Some(real_data_dir().as_path()) {
        let mut kept = winners_out.as_os_str().to_owned();
        kept.push(".seal");
        cmd.env("CLI_SEAL_FILE", kept);
    }
    cmd
}

/// One bet as stored: agency, first, last, document, birthdate, number.
pub type Row = [String; 6];

/// What the data files say should happen, computed independently of the
/// project's own parsing.
pub struct Expected {
    /// Per agency, its rows in file order.
    pub rows: BTreeMap<u32, Vec<Row>>,
    /// Per agency, winner documents in file order.
    pub winners: BTreeMap<u32, Vec<String>>,
}

pub fn data_file(dir: &Path, agency: u32) -> PathBuf {
    dir.join(format!("agency-{agency}.csv"))
}

/// The agencies' data files `lottery gen-data` writes for `options`, in a
/// temporary folder of their own (see [`data_file`]).
pub fn gen_data(options: lottery::tools::gen_data::GenOptions) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    lottery::tools::gen_data::generate(dir.path(), &options).unwrap();
    dir
}

/// `count` lines of an agency's data file, each a bet of Ana Pérez born
/// 1999-03-17 with document `10000000 + i` on `number(i)`, ended by `eol`.
pub fn ana_bets(count: u32, number: impl Fn(u32) -> u32, eol: &str) -> String {
    (0..count)
        .map(|i| format!("Ana,Pérez,{},1999-03-17,{}{eol}", 10_000_000 + i, number(i)))
        .collect()
}

pub fn expected(dir: &Path, agencies: u32, winning_number: u16) -> Expected {
    let mut rows = BTreeMap::new();
    let mut winners = BTreeMap::new();
    for agency in 1..=agencies {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(data_file(dir, agency))
            .unwrap();
        let mut list = Vec::new();
        let mut won = Vec::new();
        for r in reader.records() {
            let r = r.unwrap();
            let number: u16 = r[4].parse().unwrap();
            if number == winning_number {
                won.push(r[2].to_string());
            }
            list.push([
                agency.to_string(),
                r[0].to_string(),
                r[1].to_string(),
                r[2].to_string(),
                r[3].to_string(),
                number.to_string(),
            ]);
        }
        rows.insert(agency, list);
        winners.insert(agency, won);
    }
    Expected { rows, winners }
}

/// The receipt of agency `agency`'s whole data file, from the rows a
/// standard CSV reader gives (the oracle), chained with `lottery::receipt`.
pub fn file_receipt(expected: &Expected, agency: u32) -> lottery::receipt::Receipt {
    let mut receipt = lottery::receipt::Receipt::empty(agency);
    for row in &expected.rows[&agency] {
        let texts = [&row[1], &row[2], &row[3], &row[4]].map(|t| t.as_bytes());
        receipt.push(texts, row[5].parse().unwrap());
    }
    receipt
}

/// What `lottery winners` prints for a round of agencies `1..=agencies`
/// holding `expected`'s whole files, drawn with `winning_number` at
/// `drawn_at` (which only the store knows): counts, winners and the seal
/// all come from the data files.
pub fn expected_winners_table(
    expected: &Expected,
    agencies: u32,
    winning_number: u16,
    drawn_at: &str,
) -> String {
    let receipts: BTreeMap<u32, lottery::receipt::Receipt> = (1..=agencies)
        .map(|a| (a, file_receipt(expected, a)))
        .collect();
    let seal = lottery::receipt::seal(winning_number, agencies, &receipts);
    let total: usize = expected.rows.values().map(Vec::len).sum();
    let mut table = format!(
        "draw of {drawn_at} (winning number {winning_number}), {total} bets, seal {seal}\n\
         agency        bets  winners  winning documents\n"
    );
    for agency in 1..=agencies {
        let winners = &expected.winners[&agency];
        let documents = if winners.is_empty() {
            "-".to_string()
        } else {
            winners.join(", ")
        };
        table += &format!(
            "{agency:>6}  {:>10}  {:>7}  {documents}\n",
            expected.rows[&agency].len(),
            winners.len()
        );
    }
    table
}

/// The bets file, read with a standard CSV reader, grouped by agency in
/// file order.
pub fn stored(path: &Path) -> BTreeMap<u32, Vec<Row>> {
    let mut out: BTreeMap<u32, Vec<Row>> = BTreeMap::new();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap();
    for r in reader.records() {
        let r = r.unwrap();
        assert_eq!(r.len(), 6, "stored row {r:?}");
        let row: Row = std::array::from_fn(|i| r[i].to_string());
        out.entry(row[0].parse().unwrap()).or_default().push(row);
    }
    out
}

pub fn read_winners(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Where the real agency files are, if this checkout has them beside it.
/// When it does not, says that `test` is skipped (see [`skipped`]).
pub fn real_data(test: &str) -> Option<PathBuf> {
    let dir = real_data_dir();
    let found = (1..=5).all(|i| data_file(&dir, i).is_file());
    if !found {
        skipped(
            test,
            &format!("no agency-{{1..5}}.csv in {}", dir.display()),
        );
    }
    found.then_some(dir)
}

/// Where the real agency files would be.
fn real_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Says, where whoever runs `cargo test` sees it, that `test` did not run
/// its checks, and why: it still reports `ok`, so without this line a
/// missing input would pass in silence. libtest captures what the
/// `print!`/`eprint!` macros write from a passing test, but not writes to
/// the stderr handle itself, so this one shows under a plain `cargo test`.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
