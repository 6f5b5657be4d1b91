//! Instructions per bet on the central's path from socket to durable row
//! and acknowledgement, counted by callgrind: a figure that does not move
//! with whatever else the machine is doing, unlike seconds.
//!
//! `cargo bench --bench instructions` runs the release central under
//! `valgrind --tool=callgrind` twice, while one agency (not under valgrind)
//! uploads a small and then a larger file, and reports the difference per
//! bet, so that start-up, recovery and shutdown cancel out. The draw is left
//! out (the central waits for a second agency that never comes). SHA-256 is
//! reported on its own line: valgrind runs the portable code where the real
//! run uses the CPU's SHA instructions.
//!
//! A second count swaps the roles: the central runs as it is and the agency
//! runs under callgrind, for the same two files: the agency's instructions
//! per bet, from reading its data file to sending the frames.
//!
//! The figures are compared with `benches/instructions.toml`: the run fails
//! when the central's instructions per bet (SHA-256 aside) grew by more than
//! the tolerance there, or the agency's did over `agency_per_bet`. `LOTTERY_WRITE_BASELINE=1` writes the new figures
//! instead. `LOTTERY_KEEP_CALLGRIND=DIR` keeps the two callgrind files
//! there, for `callgrind_annotate`. Needs `valgrind` (Debian's package).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{data_file, gen_data, lottery, lottery_under, Proc};
use lottery::tools::gen_data::GenOptions;

/// Bets in the small and the large run.
const SMALL: u64 = 20_000;
const LARGE: u64 = 60_000;

/// What one counted run executed.
#[derive(Debug, Clone, Copy)]
struct Count {
    /// Every user-space instruction.
    total: u64,
    /// Those in the `sha2` crate.
    sha256: u64,
}

fn main() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("instructions: valgrind is not installed (apt-get install valgrind): skipped");
        if std::env::var_os("LOTTERY_REQUIRE_VALGRIND").is_some() {
            std::process::exit(1);
        }
        return;
    }
    let (rest, sha) = per_bet(
        Counted::Central,
        "central, socket to durable row and acknowledgement",
    );
    let (agency, agency_sha) = per_bet(Counted::Agency, "agency, data file to frames sent");

    let baseline = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/instructions.toml");
    if std::env::var_os("LOTTERY_WRITE_BASELINE").is_some() {
        let text = format!(
            "# Written by `LOTTERY_WRITE_BASELINE=1 cargo bench --bench instructions`.\n\
             # Instructions per bet, central, SHA-256 aside; a run fails above\n\
             # per_bet * (1 + tolerance); the agency's likewise over agency_per_bet.\n\
             per_bet = {rest:.0}\nsha256 = {sha:.0}\n\
             agency_per_bet = {agency:.0}\nagency_sha256 = {agency_sha:.0}\ntolerance = 0.10\n"
        );
        std::fs::write(&baseline, text).unwrap();
        println!("baseline written to {}", baseline.display());
        return;
    }
    let text = std::fs::read_to_string(&baseline).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let tolerance = table["tolerance"].as_float().unwrap();
    let mut over = false;
    for (who, key, now) in [
        ("central", "per_bet", rest),
        ("agency", "agency_per_bet", agency),
    ] {
        // A baseline written before the agency was counted has no figure
        // for it: nothing to compare.
        let Some(was) = table.get(key).and_then(toml::Value::as_integer) else {
            println!("  {who}: no baseline ({key})");
            continue;
        };
        let was = was as f64;
        let change = now / was - 1.0;
        println!("  {who} baseline {was:>8.0}  ({:+.1} %)", change * 100.0);
        if change > tolerance {
            eprintln!(
                "instructions: the {who}'s {now:.0} per bet is {:.1} % over the baseline {was:.0} \
                 (tolerance {:.0} %)",
                change * 100.0,
                tolerance * 100.0
            );
            over = true;
        }
    }
    if over {
        std::process::exit(1);
    }
}

/// Counts `who`'s instructions for the small and the large file, prints
/// them per bet, and returns the count per bet without SHA-256, and
/// SHA-256's.
fn per_bet(who: Counted, what: &str) -> (f64, f64) {
    let small = run(SMALL, who);
    let large = run(LARGE, who);
    let bets = (LARGE - SMALL) as f64;
    let per_bet = (large.total - small.total) as f64 / bets;
    let sha = (large.sha256 - small.sha256) as f64 / bets;
    let rest = per_bet - sha;
    println!("instructions per bet, {what}:");
    println!("  all          {per_bet:>8.0}");
    println!("  SHA-256      {sha:>8.0}  (portable code under valgrind; the CPU's SHA instructions in a real run)");
    println!("  all but SHA  {rest:>8.0}");
    (rest, sha)
}

/// Which process runs under callgrind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    Central,
    Agency,
}

/// Runs the central, or agency 1 (`who`), under callgrind while agency 1
/// uploads `bets` bets.
fn run(bets: u64, who: Counted) -> Count {
    let data = gen_data(GenOptions {
        agencies: 1,
        bets_per_agency: bets,
        seed: 25,
        winning_number: 7574,
        winner_share: 0.01,
        tricky_share: 0.01,
        crlf: false,
    });
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("callgrind.out");
    let out_flag = format!("--callgrind-out-file={}", out.display());
    let callgrind = ["valgrind", "--tool=callgrind", "--quiet", &out_flag];
    let under = |counted: Counted| match who == counted {
        true => lottery_under(&callgrind),
        false => lottery(),
    };
    let mut server = under(Counted::Central);
    server
        .arg("server")
        .env("SERVER_PORT", "0")
        // A second agency that never comes: the draw stays out of the count.
        .env("SERVER_AGENCIES", "2")
        .env("SERVER_STORAGE", work.path().join("bets.csv"));
    let server = Proc::spawn(server);
    let listen = server.wait_for_within("action: listen", Duration::from_secs(120));
    let port = listen
        .split(" | ")
        .find_map(|field| field.strip_prefix("address: "))
        .and_then(|a| a.rsplit(':').next())
        .expect("the listen line's address")
        .to_owned();
    let mut agency = under(Counted::Agency);
    agency
        .arg("agency")
        .env("CLI_ID", "1")
        .env("CLI_SERVER_ADDRESS", format!("127.0.0.1:{port}"))
        .env("CLI_DATA_FILE", data_file(data.path(), 1))
        .env("CLI_SEAL_FILE", work.path().join("agency-1.seal"));
    let agency = Proc::spawn(agency);
    let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        server.wait_for_within(
            "action: agencia_finalizada | result: success | agency: 1",
            Duration::from_secs(600),
        )
    }));
    if finished.is_err() {
        panic!(
            "the agency did not finish; its output:\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
    }
    agency.signal(nix::sys::signal::Signal::SIGTERM);
    agency.wait_exit(Duration::from_secs(30));
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(120));
    assert!(status.success(), "{}\n{}", server.output(), server.stderr());
    if let Some(keep) = std::env::var_os("LOTTERY_KEEP_CALLGRIND") {
        // For `callgrind_annotate`, to see where the instructions went.
        let name = match who {
            Counted::Central => format!("callgrind.{bets}.out"),
            Counted::Agency => format!("callgrind.agency.{bets}.out"),
        };
        let kept = Path::new(&keep).join(name);
        std::fs::copy(&out, &kept).expect("the callgrind file can be kept");
        eprintln!("kept {}", kept.display());
    }
    count(&out)
}

/// The totals of a callgrind output file, all and in `sha2`.
fn count(out: &Path) -> Count {
    let annotated = Command::new("callgrind_annotate")
        .arg("--threshold=100")
        .arg(out)
        .output()
        .expect("callgrind_annotate");
    let text = String::from_utf8_lossy(&annotated.stdout);
    let number = |s: &str| s.trim().replace(',', "").parse::<u64>().ok();
    let mut total = None;
    let mut sha256 = 0;
    for line in text.lines() {
        let line = line.trim();
        let Some((figure, rest)) = line.split_once(' ') else {
            continue;
        };
        if rest.contains("PROGRAM TOTALS") {
            total = number(figure);
        } else if rest.contains("sha2::") {
            sha256 += number(figure).unwrap_or(0);
        }
    }
    Count {
        total: total.unwrap_or_else(|| panic!("no PROGRAM TOTALS in:\n{text}")),
        sha256,
    }
}
