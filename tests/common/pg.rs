//! A throwaway PostgreSQL cluster for the tests of the PostgreSQL store:
//! `initdb` in a temporary directory, the server on a free loopback port,
//! stopped by its pid when the cluster is dropped.
//!
//! The server refuses to run as root, so under root `initdb` and `postgres`
//! run as the `postgres` user (set on the child process itself, so the pid
//! we hold is the postmaster's own), in directories handed to it. Anyone
//! else runs the cluster as themselves, and nothing of theirs changes
//! hands. On a machine without the server binaries the
//! tests that need one say on the terminal that they skipped (libtest
//! captures `eprintln!` of a passing test, so this writes to the stderr
//! descriptor directly), and fail instead when `LOTTERY_REQUIRE_POSTGRES=1`
//! (as `.ci/run` sets it), so CI never passes by skipping.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Where Debian's PostgreSQL 15 puts its server binaries;
/// `LOTTERY_PG_BIN` names another directory.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Set to `1` to make a missing PostgreSQL a failure rather than a skip.
pub const REQUIRE_VAR: &str = "LOTTERY_REQUIRE_POSTGRES";

/// How long the server may take to accept connections after a start (a
/// crash recovery included) on a loaded machine.
const READY: Duration = Duration::from_secs(60);

/// The superuser the tests connect as (trust authentication on loopback).
pub const SUPERUSER: &str = "postgres";

/// A running (or stopped, between [`PgCluster::stop`] and
/// [`PgCluster::start_again`]) PostgreSQL cluster of its own.
pub struct PgCluster {
    /// Holds the data directory and the socket directory; removed on drop,
    /// after the server is stopped.
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// The `postgres` user's uid and gid when the tests run as root;
    /// `None`: the cluster runs as the user running the tests.
    owner: Option<(u32, u32)>,
    pub port: u16,
    server: Option<Child>,
    /// The server's log lines, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

/// The server binaries, or why they cannot be used.
fn binaries() -> Result<PathBuf, String> {
    let bin = std::env::var_os("LOTTERY_PG_BIN")
        .map_or_else(|| PathBuf::from(DEFAULT_BIN), PathBuf::from);
    for tool in ["initdb", "postgres"] {
        if !bin.join(tool).is_file() {
            return Err(format!("{} not found", bin.join(tool).display()));
        }
    }
    Ok(bin)
}

/// The uid and gid of the `postgres` user, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&"postgres") && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
        .ok_or_else(|| "no postgres user in /etc/passwd".to_string())
}

/// Whether this process runs as root (`/proc/self` belongs to the
/// effective user).
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `cmd`, to run as `owner` when there is one.
fn run_as(cmd: &mut Command, owner: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// Hands a directory this test made to `owner`, when there is one (only
/// under root: see the module's header).
fn hand_over(dir: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown to postgres");
    }
}

impl PgCluster {
    /// Starts a fresh cluster for `test`, or returns `None` after saying on
    /// the terminal that `test` was skipped because PostgreSQL is missing.
    ///
    /// # Panics
    /// PostgreSQL is missing and [`REQUIRE_VAR`] is `1`, or the cluster does
    /// not start.
    pub fn start_or_skip(test: &str) -> Option<PgCluster> {
        let found = binaries().and_then(|bin| {
            let owner = if running_as_root() {
                Some(postgres_user()?)
            } else {
                None
            };
            Ok((bin, owner))
        });
        let (bin, owner) = match found {
            Ok(found) => found,
            Err(why) => {
                if std::env::var(REQUIRE_VAR).as_deref() == Ok("1") {
                    panic!("{test}: PostgreSQL is required ({REQUIRE_VAR}=1) but {why}");
                }
                // Straight to the descriptor: libtest swallows eprintln!
                // of a test that passes.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED {test}: PostgreSQL is not installed here ({why}); \
                     set {REQUIRE_VAR}=1 to make this a failure"
                );
                return None;
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("lottery-pg-")
            .tempdir()
            .expect("temporary directory");
        hand_over(dir.path(), owner);
        let data = dir.path().join("data");
        let status = run_as(&mut Command::new(bin.join("initdb")), owner)
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("run initdb");
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let mut cluster = PgCluster {
            dir,
            bin,
            owner,
            port: 0,
            server: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        // The server cannot be handed a bound socket: pick a port the kernel
        // says is free and try again on the rare race for it.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            cluster.port = port;
            if cluster.launch() {
                return Some(cluster);
            }
        }
        panic!("PostgreSQL did not start:\n{}", cluster.log());
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server on [`PgCluster::port`] and waits until it accepts
    /// connections; false when it exited first (its port was taken).
    fn launch(&mut self) -> bool {
        let mut child = run_as(&mut Command::new(self.bin.join("postgres")), self.owner)
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=40",
            ])
            .args([
                "-c",
                "shared_buffers=32MB",
                "-c",
                "log_min_messages=warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postgres");
        let (tx, ready) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // A hot standby says "ready to accept read-only connections".
                if line.contains("ready to accept") {
                    let _ = tx.send(true);
                }
                log.lock().unwrap().push(line);
            }
            let _ = tx.send(false);
        });
        let ok = ready.recv_timeout(READY).unwrap_or(false);
        if ok {
            self.server = Some(child);
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
        ok
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The libpq URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` and returns its URL.
    pub fn create_db(&self, db: &str) -> String {
        self.query("postgres", &format!("CREATE DATABASE {db}"));
        self.url(db)
    }

    /// Runs `sql` (one or more statements) in `db` and returns every row
    /// of the last result, each value as text (`None` for NULL).
    pub fn query(&self, db: &str, sql: &str) -> Vec<Vec<Option<String>>> {
        let url = self.url(db);
        let sql = sql.to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
            let connection = tokio::spawn(connection);
            let messages = client
                .simple_query(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            drop(client);
            let _ = connection.await;
            let mut rows = Vec::new();
            for message in messages {
                match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => rows.push(
                        (0..row.len())
                            .map(|i| row.get(i).map(str::to_string))
                            .collect(),
                    ),
                    tokio_postgres::SimpleQueryMessage::CommandComplete(_) => {}
                    _ => {}
                }
            }
            rows
        })
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Stops the server with `signal` (SIGINT: a fast shutdown; SIGQUIT:
    /// an immediate one, as after a crash; SIGKILL) and waits for it.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) {
        let Some(child) = self.server.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let (tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = tx.send(child.wait());
        });
        if exited.recv_timeout(READY).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = exited.recv_timeout(READY);
        }
    }

    /// A fast shutdown.
    pub fn stop(&mut self) {
        self.stop_with(nix::sys::signal::Signal::SIGINT);
    }

    /// Starts the stopped server again on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.server.is_none(), "the server still runs");
        assert!(self.launch(), "PostgreSQL did not restart:\n{}", self.log());
    }

    /// A streaming standby of this running cluster, named `standby1` to
    /// it, on its own free port (`pg_basebackup -R`: a copy of the data
    /// directory that follows the primary's WAL). initdb's `trust` pg_hba
    /// already lets replication connect from 127.0.0.1.
    pub fn standby(&self) -> PgCluster {
        let dir = tempfile::Builder::new()
            .prefix("lottery-pg-standby-")
            .tempdir()
            .expect("temporary directory");
        hand_over(dir.path(), self.owner);
        let data = dir.path().join("data");
        let out = run_as(
            &mut Command::new(self.bin.join("pg_basebackup")),
            self.owner,
        )
        .arg("-D")
        .arg(&data)
        .args(["-R", "-X", "stream", "-h", "127.0.0.1", "-p"])
        .arg(self.port.to_string())
        // A fast checkpoint: the default spreads it over minutes.
        .args(["-U", SUPERUSER, "--no-sync", "-c", "fast"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run pg_basebackup");
        assert!(
            out.status.success(),
            "pg_basebackup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The name the primary's synchronous_standby_names waits for; the
        // last setting in the file wins over the one `-R` wrote.
        let mut auto = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .expect("postgresql.auto.conf");
        writeln!(
            auto,
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER} application_name=standby1'",
            self.port
        )
        .unwrap();
        let mut standby = PgCluster {
            dir,
            bin: self.bin.clone(),
            owner: self.owner,
            port: 0,
            server: None,
            log: Arc::new(Mutex::new(Vec::new())),
        };
        for _ in 0..5 {
            standby.port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            if standby.launch() {
                return standby;
            }
        }
        panic!("the standby did not start:\n{}", standby.log());
    }

    /// Makes every commit here wait for `standby1` (set after the base
    /// backup, so a promoted standby does not wait for a standby of its
    /// own), then waits until the standby streams as the synchronous one.
    pub fn wait_for_sync_standby(&self) {
        self.query(
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = 'standby1'",
        );
        self.query("postgres", "SELECT pg_reload_conf()");
        self.poll(
            "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'standby1'",
            "sync",
        );
    }

    /// Promotes this standby and waits until it accepts writes.
    pub fn promote(&self) {
        self.query("postgres", "SELECT pg_promote()");
        self.poll("SELECT pg_is_in_recovery()", "f");
    }

    /// Runs `sql` until its first value is `want`, up to [`READY`].
    pub fn poll(&self, sql: &str, want: &str) {
        let deadline = std::time::Instant::now() + READY;
        loop {
            let rows = self.query("postgres", sql);
            if rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .as_deref()
                == Some(want)
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{sql} never gave {want} (last {rows:?}):\n{}",
                self.log()
            );
            // A poll interval, not a synchronisation: the loop ends on the
            // query's answer.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// The directory of the server's binaries.
    pub fn bin(&self) -> &Path {
        &self.bin
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // An immediate shutdown: nothing of a test's cluster is kept.
        self.stop_with(nix::sys::signal::Signal::SIGQUIT);
    }
}

/// A client of the database at `url`, its connection driven by a task of
/// the runtime this is called in (a session the test holds itself: a lock,
/// a transaction left open).
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// What a [`CommitRelay`], once armed, loses of the next `COMMIT` that
/// passes through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lose {
    /// Its answer: the database commits, and the client sees its
    /// connection close instead of the answer.
    Answer,
    /// The `COMMIT` itself: the database never receives it (it rolls the
    /// transaction back when the connection closes), and the client sees
    /// its connection close, as for a lost answer.
    Commit,
}

/// A TCP relay in front of a cluster that, once armed, loses the answer
/// to the next `COMMIT` a client sends through it, or that `COMMIT`: what
/// a network cut at that moment does, which no test can time from outside.
/// Every other byte, on every connection, passes unchanged.
pub struct CommitRelay {
    pub port: u16,
    armed: Arc<Mutex<Option<Lose>>>,
    done: mpsc::Receiver<Lose>,
}

/// `COMMIT` as a simple-protocol query message (`Q`, its length, the text
/// ended by a NUL), as `tokio-postgres` sends it from `batch_execute`.
const COMMIT_MESSAGE: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl CommitRelay {
    /// A relay to `cluster`, passing everything until [`CommitRelay::arm`].
    pub fn start(cluster: &PgCluster) -> CommitRelay {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = format!("127.0.0.1:{}", cluster.port);
        let armed: Arc<Mutex<Option<Lose>>> = Arc::new(Mutex::new(None));
        let (done_tx, done) = mpsc::channel();
        let shared = armed.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let (armed, done) = (shared.clone(), done_tx.clone());
                // Set once this connection's COMMIT went through to the
                // database with its answer to be lost.
                let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let swallow_answer = swallow.clone();
                let (to_server, from_server) = (server.try_clone().unwrap(), server);
                let (from_client, to_client) = (client.try_clone().unwrap(), client);
                std::thread::spawn(move || {
                    forward_client(from_client, to_server, &armed, &swallow, &done)
                });
                let answers_done = done_tx.clone();
                std::thread::spawn(move || {
                    forward_server(from_server, to_client, &swallow_answer, &answers_done)
                });
            }
        });
        CommitRelay { port, armed, done }
    }

    /// The URL of database `db` through this relay.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Loses `what` of the next `COMMIT` through the relay.
    pub fn arm(&self, what: Lose) {
        *self.armed.lock().unwrap() = Some(what);
    }

    /// Waits until the armed loss happened: the `COMMIT` was dropped, or
    /// its answer came back from the database and was dropped.
    ///
    /// # Panics
    /// Nothing was lost within `limit`.
    pub fn wait_lost(&self, limit: Duration) -> Lose {
        self.done
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("no COMMIT passed the relay within {limit:?}"))
    }

    /// What the relay has lost so far, without waiting.
    pub fn lost_yet(&self) -> Option<Lose> {
        self.done.try_recv().ok()
    }
}

/// Client to database: everything, but an armed relay's `COMMIT` is
/// dropped (with the connection) or marks its answer to be lost.
fn forward_client(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    armed: &Mutex<Option<Lose>>,
    swallow: &std::sync::atomic::AtomicBool,
    done: &mpsc::Sender<Lose>,
) {
    use std::io::Read;
    let mut buf = [0u8; 16 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        let chunk = &buf[..n];
        let at = chunk
            .windows(COMMIT_MESSAGE.len())
            .position(|w| w == COMMIT_MESSAGE);
        let lose = match at {
            Some(_) => armed.lock().unwrap().take(),
            None => None,
        };
        match lose {
            Some(Lose::Commit) => {
                // What came before the COMMIT still counts.
                let _ = to.write_all(&chunk[..at.expect("found above")]);
                let _ = done.send(Lose::Commit);
                break;
            }
            Some(Lose::Answer) => {
                // Before it is forwarded: the answer cannot come first.
                swallow.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            None => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// `COMMIT`'s answer as the server sends it once it committed: a command
/// complete message (`C`, its length, the tag ended by a NUL).
const COMMIT_ANSWER: &[u8] = b"C\0\0\0\x0bCOMMIT\0";

/// Database to client: everything, until the `COMMIT` whose answer is to
/// be lost has gone out: from then on nothing more reaches the client, as
/// when the network is cut just after the `COMMIT`. Told as lost once the
/// database's answer to it comes: the answers to what went before it may
/// come first, and are not taken for it (the client sends its last
/// statements and the `COMMIT` together).
fn forward_server(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    swallow: &std::sync::atomic::AtomicBool,
    done: &mpsc::Sender<Lose>,
) {
    use std::io::Read;
    let mut buf = [0u8; 16 * 1024];
    // What the database answered since the `COMMIT` went out, searched
    // whole: the answer may come in two reads.
    let mut held = Vec::new();
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if swallow.load(std::sync::atomic::Ordering::SeqCst) {
            held.extend_from_slice(&buf[..n]);
            if held
                .windows(COMMIT_ANSWER.len())
                .any(|w| w == COMMIT_ANSWER)
            {
                let _ = done.send(Lose::Answer);
                break;
            }
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
