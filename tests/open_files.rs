//! The open-files limit (RLIMIT_NOFILE) against `server.max_connections`:
//! the central raises its soft limit to the hard one, and when even that is
//! too low it serves fewer connections and refuses the rest with
//! `SERVER_BUSY`, instead of letting them hang on "Too many open files".

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::resource::{setrlimit, Resource};
use nix::sys::signal::Signal;

/// How long a test waits for one reply; a connection left hanging by the
/// central fails the test after it.
const REPLY: Duration = Duration::from_secs(15);

/// `lottery server` on a free port with `max_connections = 1024`, run under
/// an open-files limit of `soft` (and `hard`).
fn server_under(storage: &Path, soft: u64, hard: u64) -> Command {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_STORAGE", storage)
        .env("SERVER_MAX_CONNECTIONS", "1024")
        // Every connection the test opens waits in the accept queue, in
        // order, rather than in SYN retransmissions.
        .env("SERVER_LISTEN_BACKLOG", "512");
    // SAFETY: between fork and exec the child only calls setrlimit, a
    // plain system call that takes no lock and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard).map_err(std::io::Error::from)
        });
    }
    cmd
}

fn connect(server: &Server) -> Raw {
    Raw::connect_within(&server.address(), REPLY)
}

/// A connection the central serves: it answers PING.
fn served(server: &Server) -> Raw {
    let mut stream = connect(server);
    stream.send("ACTION:PING\n");
    assert_eq!(stream.reply(), "STATUS:SUCCESS|MESSAGE:pong\n");
    stream
}

#[test]
fn a_low_open_files_limit_lowers_max_connections_and_the_rest_get_server_busy() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::spawn(server_under(&work.path().join("bets.csv"), 64, 64));
    // Logged before the listen line, which `spawn` has waited for.
    let warn = server
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: open_files"))
        .unwrap_or_else(|| panic!("no open_files line:\n{}", server.proc.output()));
    assert!(
        warn.contains(
            " WARN     action: open_files | result: success | limit: 64 | max_connections: 32 | configured: 1024 | reason: "
        ),
        "{warn}"
    );
    assert!(
        server
            .proc
            .output()
            .contains("action: listen | result: success | address: 0.0.0.0:")
            && server.proc.output().contains("| max_connections: 32"),
        "{}",
        server.proc.output()
    );

    // The lowered limit's worth of connections is served...
    let held: Vec<Raw> = (0..32).map(|_| served(&server)).collect();
    // ...and more than the process could still open are each told at once.
    for _ in 0..48 {
        let mut extra = connect(&server);
        let reply = extra.reply();
        assert!(
            reply.starts_with("STATUS:ERROR|CODE:SERVER_BUSY|MESSAGE:") && reply.ends_with('\n'),
            "{reply}"
        );
    }
    drop(held);

    server.proc.signal(Signal::SIGTERM);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", server.proc.output());
    let log = server.proc.output();
    assert!(!log.contains("Too many open files"), "{log}");
}

#[test]
fn the_soft_open_files_limit_is_raised_to_the_hard_one() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::spawn(server_under(&work.path().join("bets.csv"), 64, 4096));
    assert!(
        server.proc.output().contains("| max_connections: 1024"),
        "{}",
        server.proc.output()
    );
    // Far more connections than the soft limit would have allowed.
    let held: Vec<Raw> = (0..100).map(|_| served(&server)).collect();
    drop(held);
    server.proc.signal(Signal::SIGTERM);
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{}", server.proc.output());
    let log = server.proc.output();
    assert!(!log.contains("action: open_files"), "{log}");
    assert!(!log.contains("result: fail"), "{log}");
}

#[test]
fn an_open_files_limit_too_low_for_a_handful_of_connections_exits_2() {
    let work = tempfile::tempdir().unwrap();
    let server = Proc::spawn(server_under(&work.path().join("bets.csv"), 24, 24));
    let status = server.wait_exit(Duration::from_secs(10));
    let err = server.stderr();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("lottery: configuration error: invalid server.max_connections = \"1024\": the open-files limit (RLIMIT_NOFILE) is 24"),
        "{err}"
    );
    assert!(
        !server.output().contains("action: listen"),
        "{}",
        server.output()
    );
}
