//! Durable before acknowledged, on the real binary's system calls: the
//! central runs under `strace`, agencies upload through it, and the trace
//! must show every `STORED:n` reply written to a socket only after an
//! `fdatasync` of the bets file that covers the agency's row n.
//!
//! Needs `strace` (and leave to trace); without it the test says SKIPPED,
//! unless `LOTTERY_REQUIRE_STRACE=1`, which makes that a failure (CI sets it).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;

const WINNING: u16 = 7574;

/// The system calls traced: every way bytes reach a file or a socket, and
/// every way a file is synced.
const TRACED: &str = "trace=write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg,fdatasync,fsync";

/// Whether `strace` can trace here; `Err` says why not.
fn strace_works() -> Result<(), String> {
    match Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(format!(
            "strace cannot trace here: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("no strace ({e})")),
    }
}

/// One system call of the trace that matters here, in the order the tracer
/// saw it happen.
#[derive(Debug)]
enum Event {
    /// A write to the bets file completed, of this many bytes.
    BetsWritten(u64),
    /// A sync of the bets file completed.
    BetsSynced,
    /// A write to a socket began (its bytes are shown at its start): which
    /// socket, and the payload as strace shows it.
    SocketWrite { socket: String, shown: String },
}

/// The `<...>` annotation of a call's first argument (the file's path or
/// the socket's endpoints, from `-yy`).
fn annotation(args: &str) -> Option<&str> {
    let start = args.find('<')? + 1;
    let end = start
        + args[start..]
            .find(">,")
            .or_else(|| args[start..].find('>'))?;
    Some(&args[start..end])
}

/// The return value at the end of a completed call's line.
fn returned(line: &str) -> Option<i64> {
    let at = line.rfind(") = ")? + 4;
    line[at..].split_whitespace().next()?.parse().ok()
}

/// Reads `strace -f -ttt -yy` output into events, joining calls that other
/// threads' lines interrupted (`<unfinished ...>` and `<... resumed>`).
fn events(trace: &str, bets_file: &str) -> Vec<(String, Event)> {
    // Per thread: the call it has started and not finished (name, first
    // argument's annotation).
    let mut open: HashMap<String, (String, String)> = HashMap::new();
    let mut out = Vec::new();
    for line in trace.lines() {
        // `PID TIME CALL…`, where strace pads the pid to a width of its own
        // (`384   1796…` for a short pid): split on runs of spaces.
        let Some((pid, after)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((time, rest)) = after.trim_start().split_once(' ') else {
            continue;
        };
        let at = format!("{time} (thread {pid})");
        // A call's completion: either its whole line, or its resumption.
        let (name, target, done) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some(name) = resumed.split(' ').next() else {
                continue;
            };
            let Some((started, target)) = open.remove(pid) else {
                continue;
            };
            assert_eq!(started, name, "thread {pid} resumed another call: {line}");
            (name.to_string(), target, Some(line))
        } else {
            let Some(paren) = rest.find('(') else {
                continue; // signals, exits
            };
            let name = rest[..paren].to_string();
            let target = annotation(&rest[paren..]).unwrap_or_default().to_string();
            let socket = target.starts_with("TCP") || target.starts_with("socket:");
            if socket && matches!(name.as_str(), "write" | "writev" | "sendto" | "sendmsg") {
                out.push((
                    at.clone(),
                    Event::SocketWrite {
                        socket: target.clone(),
                        shown: rest.to_string(),
                    },
                ));
            }
            if rest.ends_with("<unfinished ...>") {
                open.insert(pid.to_string(), (name, target));
                continue;
            }
            (name, target, Some(line))
        };
        let Some(done) = done else { continue };
        if !target.ends_with(bets_file) {
            continue;
        }
        match name.as_str() {
            "fdatasync" | "fsync" if returned(done) == Some(0) => {
                out.push((at, Event::BetsSynced));
            }
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2" => {
                let n = returned(done).unwrap_or(-1);
                assert!(n >= 0, "a write to the bets file failed: {done}");
                out.push((at, Event::BetsWritten(n as u64)));
            }
            _ => {}
        }
    }
    out
}

/// Where each agency's rows end in the bets file: per agency, the byte
/// offset just past its row n at index n - 1.
fn row_ends(path: &Path) -> BTreeMap<u32, Vec<u64>> {
    let len = std::fs::metadata(path).unwrap().len();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(path)
        .unwrap();
    let mut starts = Vec::new();
    for record in reader.records() {
        let record = record.unwrap();
        starts.push((
            record[0].parse::<u32>().unwrap(),
            record.position().unwrap().byte(),
        ));
    }
    let mut ends: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for (i, (agency, _)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(len, |(_, next)| *next);
        ends.entry(*agency).or_default().push(end);
    }
    ends
}

/// The `STORED:n` counts a shown payload carries (several replies may go
/// out in one write).
fn stored_counts(shown: &str) -> Vec<u64> {
    shown
        .split("STORED:")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// The agency a `HELLO` reply is for (`MESSAGE:agency 2: resume from ...`).
fn hello_agency(shown: &str) -> Option<u32> {
    let rest = &shown[shown.find("MESSAGE:agency ")? + "MESSAGE:agency ".len()..];
    let (id, rest) = rest.split_once(':')?;
    rest.starts_with(" resume from bet")
        .then(|| id.parse().ok())
        .flatten()
}

#[test]
fn no_stored_count_leaves_before_the_fdatasync_that_covers_it() {
    const TEST: &str = "no_stored_count_leaves_before_the_fdatasync_that_covers_it";
    if let Err(why) = strace_works() {
        if std::env::var("LOTTERY_REQUIRE_STRACE").as_deref() == Ok("1") {
            panic!("LOTTERY_REQUIRE_STRACE=1 and {why}");
        }
        skipped(
            TEST,
            &format!("{why}; set LOTTERY_REQUIRE_STRACE=1 to make this a failure"),
        );
        return;
    }
    const AGENCIES: u32 = 2;
    let data = gen_data(GenOptions {
        agencies: AGENCIES,
        bets_per_agency: 2_000,
        seed: 21,
        winning_number: WINNING,
        winner_share: 0.01,
        tricky_share: 0.05,
        crlf: false,
    });
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let trace_path = work.path().join("server.trace");
    let trace_arg = trace_path.to_str().unwrap();
    let mut cmd = lottery_under(&[
        "strace",
        "-f",
        "-ttt",
        "-yy",
        "-qq",
        "-s",
        "65536",
        "-e",
        TRACED,
        "-e",
        "signal=none",
        "-o",
        trace_arg,
    ]);
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", AGENCIES.to_string())
        .env("SERVER_STORAGE", &storage)
        .env("SERVER_WINNING_NUMBER", WINNING.to_string());
    let server = Server::spawn(cmd);
    // Both agencies at once: their batches share the writer's groups.
    let agencies: Vec<Proc> = (1..=AGENCIES)
        .map(|id| {
            let mut cmd = agency_command(
                id,
                &server.address(),
                &data_file(data.path(), id),
                &work.path().join(format!("winners-{id}.txt")),
            );
            cmd.env("CLI_BATCH_MAXAMOUNT", "20");
            // A central slowed by the tracer on a loaded machine may take
            // seconds to answer HELLO: the agency must not take it for a
            // reference central, whose replies carry no STORED to check.
            cmd.env("CLI_HELLO_TIMEOUT", "120");
            Proc::spawn(cmd)
        })
        .collect();
    for (i, agency) in agencies.iter().enumerate() {
        let status = agency.wait_exit(upload_limit(2_000) * 4);
        assert!(
            status.success(),
            "agency {}: {status}\n{}\n{}",
            i + 1,
            agency.output(),
            agency.stderr()
        );
        assert!(
            !agency.output().contains("protocol: reference"),
            "agency {} spoke the reference protocol:\n{}",
            i + 1,
            agency.output()
        );
    }
    // The central is strace's child: signal it, and strace ends with it
    // once it has written the whole trace.
    let children = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        server.proc.pid, server.proc.pid
    ))
    .unwrap();
    let central: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(central),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.proc.wait_exit(Duration::from_secs(20)).success());

    let expected = expected(data.path(), AGENCIES, WINNING);
    assert_eq!(stored(&storage), expected.rows, "the stored rows");
    let ends = row_ends(&storage);
    let trace = std::fs::read_to_string(&trace_path).unwrap();
    let bets_file = format!("/{}", storage.file_name().unwrap().to_str().unwrap());

    // Walk the calls in order: what is written, what is synced, and each
    // socket's agency (from its HELLO reply) and acknowledged counts.
    let (mut written, mut synced) = (0u64, 0u64);
    let mut agency_of: HashMap<String, u32> = HashMap::new();
    let (mut checked, mut syncs) = (0, 0);
    for (at, event) in events(&trace, &bets_file) {
        match event {
            Event::BetsWritten(n) => written += n,
            Event::BetsSynced => {
                synced = written;
                syncs += 1;
            }
            Event::SocketWrite { socket, shown } => {
                if let Some(agency) = hello_agency(&shown) {
                    agency_of.insert(socket.clone(), agency);
                }
                for n in stored_counts(&shown).into_iter().filter(|&n| n > 0) {
                    let agency = *agency_of.get(&socket).unwrap_or_else(|| {
                        panic!("STORED:{n} at {at} on a socket no HELLO named: {socket}")
                    });
                    let end = ends[&agency][n as usize - 1];
                    assert!(
                        synced >= end,
                        "at {at}, STORED:{n} went to agency {agency} while the bets file was \
                         synced only up to byte {synced} ({written} written); its row {n} ends \
                         at byte {end}"
                    );
                    checked += 1;
                }
            }
        }
    }
    // Not vacuous: every batch's acknowledgement was seen and checked, and
    // the file was synced.
    let batches = 2 * 2_000 / 20;
    if checked < batches {
        // Say what the trace did hold, so that a failure can be read.
        let sample: Vec<&str> = trace
            .lines()
            .filter(|l| l.contains("STORED") || l.contains("fdatasync"))
            .take(12)
            .collect();
        panic!(
            "only {checked} STORED counts seen in the trace, {batches} batches sent; the trace \
             has {} lines, {} of them mention STORED; {syncs} syncs seen; sockets named by a \
             HELLO: {agency_of:?}; a sample:\n{}",
            trace.lines().count(),
            trace.lines().filter(|l| l.contains("STORED")).count(),
            sample.join("\n")
        );
    }
    assert!(syncs > 0);
    assert_eq!(written, std::fs::metadata(&storage).unwrap().len());
}
