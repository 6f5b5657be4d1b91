//! Receipts, the sealed draw, `lottery verify` and rounds, end to end with
//! the real binary: what an agency and an operator can check, and every
//! tampering they catch.

mod common;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

const WINNING: u16 = 7574;

/// Data for `agencies` agencies, with many winners (so that every agency
/// has some) and names holding the protocol's own characters.
fn data(agencies: u32, bets: u64, seed: u64) -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies,
        bets_per_agency: bets,
        seed,
        winning_number: WINNING,
        winner_share: 0.02,
        tricky_share: 0.2,
        crlf: false,
    })
}

/// One agency's seal line: (seal, bets, digest).
fn seal_line(log: &str) -> (String, u64, String) {
    let line = log
        .lines()
        .find(|l| l.contains("action: seal | result: success"))
        .unwrap_or_else(|| panic!("no seal line:\n{log}"));
    let field = |name: &str| {
        line.split(" | ")
            .find_map(|f| f.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            .to_string()
    };
    (
        field("seal"),
        field("bets").parse().unwrap(),
        field("digest"),
    )
}

/// A whole round in `work`: a central on `bets.csv`, every agency of
/// `data`; returns each agency's log. Each agency's receipt, as it computed
/// it from its own file and logged it, must be the central's (the record's),
/// and every agency logs the record's seal.
fn round(work: &Path, data: &Path, agencies: u32) -> Vec<String> {
    let storage = work.join("bets.csv");
    let server = Server::start(&storage, agencies, WINNING);
    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let out = work.join(format!("winners-{id}.txt"));
            start_agency(id, &server.address(), &data_file(data, id), &out)
        })
        .collect();
    let logs: Vec<String> = running
        .iter()
        .map(|agency| {
            let status = agency.wait_exit(PATIENCE);
            assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
            agency.output()
        })
        .collect();
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());

    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(work.join("bets.draw.toml")).unwrap()).unwrap();
    let seal = record["seal"].as_str().unwrap();
    for (i, log) in logs.iter().enumerate() {
        let entry = &record["agencies"][&(i + 1).to_string()];
        let (logged_seal, bets, digest) = seal_line(log);
        assert_eq!(logged_seal, seal, "agency {}", i + 1);
        assert_eq!(bets as i64, entry["bets"].as_integer().unwrap());
        assert_eq!(
            digest,
            entry["digest"].as_str().unwrap(),
            "agency {}",
            i + 1
        );
    }
    logs
}

/// `lottery verify` on the round in `work`, with `extra` arguments.
fn verify(work: &Path, agencies: u32, extra: &[&str]) -> (ExitStatus, String, String) {
    let mut cmd = lottery();
    cmd.arg("verify")
        .arg("--storage")
        .arg(work.join("bets.csv"))
        .arg("--agencies")
        .arg(agencies.to_string())
        .args(extra);
    let out = cmd.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a central on the round in `work` and expects it to refuse:
/// returns what it said on stderr.
fn refused_start(work: &Path, agencies: u32, winning: u16) -> String {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", agencies.to_string())
        .env("SERVER_STORAGE", work.join("bets.csv"))
        .env("SERVER_WINNING_NUMBER", winning.to_string());
    common::refused_start(cmd)
}

/// Copies the files of a round into a fresh directory.
fn copy_round(from: &Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for name in ["bets.csv", "bets.draw.toml", "bets.rounds.toml"] {
        std::fs::copy(from.join(name), to.path().join(name)).unwrap();
    }
    to
}

fn first_row(text: &str) -> String {
    text.lines().next().unwrap().to_string()
}

fn edit(path: &Path, f: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, f(text)).unwrap();
}

/// A seal no round has: 64 hex digits.
const FORGED_SEAL: &str = "5ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea15ea1";

#[test]
fn a_clean_round_verifies_and_every_tampering_is_caught() {
    let data = data(2, 300, 11);
    let work = tempfile::tempdir().unwrap();
    round(work.path(), data.path(), 2);
    let (status, out, _) = verify(work.path(), 2, &[]);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.starts_with("the draw record "), "{out}");
    assert!(out.contains(" matches the stored bets "), "{out}");

    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(work.path().join("bets.draw.toml")).unwrap())
            .unwrap();
    let winners = |a: &str| record["agencies"][a]["winners"].as_array().unwrap().clone();
    let (one, two) = (winners("1"), winners("2"));
    let sealed = record["seal"].as_str().unwrap().to_string();
    assert!(!one.is_empty() && !two.is_empty() && one != two);

    // Each tampering: what it does, and what verify and the central say.
    type Tamper = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Tamper, String)> = vec![
        (
            "a bet's number changed",
            Box::new(|dir: &Path| {
                edit(&dir.join("bets.csv"), |text| {
                    let row = first_row(&text);
                    let (head, number) = row.rsplit_once(',').unwrap();
                    let other = if number == "1" { "2" } else { "1" };
                    text.replacen(&row, &format!("{head},{other}"), 1)
                })
            }),
            "digest: the record says ".to_string(),
        ),
        (
            "a row added",
            Box::new(|dir: &Path| {
                edit(&dir.join("bets.csv"), |text| {
                    text + "2,Forged,Row,12345678,1990-01-01,7574\n"
                })
            }),
            "agency 2 count: the record says 300, the stored bets 301".to_string(),
        ),
        (
            "a row removed",
            Box::new(|dir: &Path| {
                edit(&dir.join("bets.csv"), |text| {
                    let row = first_row(&text);
                    text.replacen(&format!("{row}\n"), "", 1)
                })
            }),
            "count: the record says 300, the stored bets 299".to_string(),
        ),
        (
            "winners swapped",
            Box::new(move |dir: &Path| {
                let mut record = record.clone();
                let agencies = record["agencies"].as_table_mut().unwrap();
                let one = agencies["1"]["winners"].clone();
                let two = agencies["2"]["winners"].clone();
                agencies["1"].as_table_mut().unwrap()["winners"] = two;
                agencies["2"].as_table_mut().unwrap()["winners"] = one;
                std::fs::write(
                    dir.join("bets.draw.toml"),
                    toml::to_string(&record).unwrap(),
                )
                .unwrap();
            }),
            "agency 1 winners: the record says [".to_string(),
        ),
        (
            "the record deleted",
            Box::new(|dir: &Path| std::fs::remove_file(dir.join("bets.draw.toml")).unwrap()),
            "missing, but round 1 of ".to_string(),
        ),
        (
            "the seal forged in the record and the ledger alike",
            Box::new(move |dir: &Path| {
                for name in ["bets.draw.toml", "bets.rounds.toml"] {
                    edit(&dir.join(name), |text| {
                        assert!(text.contains(&sealed), "{name} holds the seal");
                        text.replace(&sealed, FORGED_SEAL)
                    })
                }
            }),
            format!("seal: the record says {FORGED_SEAL}, the stored bets"),
        ),
        (
            "the winning number changed in the record",
            Box::new(|dir: &Path| {
                edit(&dir.join("bets.draw.toml"), |text| {
                    text.replace("winning_number = 7574", "winning_number = 1234")
                })
            }),
            "winning number: the record says 1234, the configuration 7574".to_string(),
        ),
    ];
    for (what, tamper, says) in cases {
        let copy = copy_round(work.path());
        tamper(copy.path());
        let (status, out, err) = verify(copy.path(), 2, &[]);
        assert_eq!(status.code(), Some(1), "{what}: verify\n{out}\n{err}");
        assert!(out.contains(&says), "{what}: verify says\n{out}");
        let refused = refused_start(copy.path(), 2, WINNING);
        assert!(
            refused.contains(&says),
            "{what}: the central says\n{refused}"
        );
    }

    // A record deleted together with the ledger is beyond the central (the
    // agencies' receipts remain the check): documented, not silent success
    // of verify, which has no record to compare.
    let copy = copy_round(work.path());
    std::fs::remove_file(copy.path().join("bets.draw.toml")).unwrap();
    std::fs::remove_file(copy.path().join("bets.rounds.toml")).unwrap();
    let (status, out, _) = verify(copy.path(), 2, &[]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("no draw record at "), "{out}");

    // The configuration's winning number differs from the record's.
    let (status, out, _) = verify(work.path(), 2, &["--winning-number", "1"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        out.contains("winning number: the record says 7574, the configuration 1"),
        "{out}"
    );
    let refused = refused_start(work.path(), 2, 1);
    assert!(
        refused.contains("winning number: the record says 7574, the configuration 1"),
        "{refused}"
    );

    // The configuration's agency count differs from the round's: the count
    // is named, not the seal blamed.
    for agencies in [1, 3] {
        let (status, out, _) = verify(work.path(), agencies, &[]);
        assert_eq!(status.code(), Some(1), "{out}");
        let says = format!(
            "agencies: the record is of a round of 2 agencies, the configuration says \
             {agencies} (server.agencies, SERVER_AGENCIES, --agencies)"
        );
        assert!(out.contains(&says), "{out}");
        assert!(!out.contains("seal:"), "{out}");
        let refused = refused_start(work.path(), agencies, WINNING);
        assert!(refused.contains(&says), "{refused}");
    }

    // A usage error.
    let (status, _, err) = verify(work.path(), 2, &["--no-such-flag"]);
    assert_eq!(status.code(), Some(2), "{err}");
}

/// An agency's data file with `lines` of bets, every special character
/// in its names.
fn special_names(dir: &Path, agency: u32) -> PathBuf {
    let path = data_file(dir, agency);
    let text = [
        "Ana|María,Pérez:Núñez,30904465,1999-03-17,7574",
        r#""Juan, Carlos","O""Neil\",20000001,1980-01-31,7574"#,
        r"Peña\|:,Ñandú,20000002,1970-12-01,1",
        "\"Zoë \"\"la\"\" Ü\",Çelik|||,20000003,2000-02-29,7574\r",
        r#"":|\",":\|",20000004,1950-06-15,42"#,
    ]
    .join("\n");
    std::fs::write(&path, text + "\n").unwrap();
    path
}

#[test]
fn the_agency_and_the_central_compute_the_same_digest_on_every_special_character() {
    let data = tempfile::tempdir().unwrap();
    special_names(data.path(), 1);
    special_names(data.path(), 2);
    let work = tempfile::tempdir().unwrap();
    // `round` checks each agency's digest (from its file) against the
    // central's (from what it stored), and the seal.
    round(work.path(), data.path(), 2);
    let (status, out, _) = verify(work.path(), 2, &[]);
    assert_eq!(status.code(), Some(0), "{out}");
}

#[test]
fn the_agency_and_the_central_compute_the_same_digest_on_the_real_data() {
    let Some(dir) =
        real_data("the_agency_and_the_central_compute_the_same_digest_on_the_real_data")
    else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    round(work.path(), &dir, 5);
    let (status, out, _) = verify(work.path(), 5, &[]);
    assert_eq!(status.code(), Some(0), "{out}");
}

#[test]
fn a_stale_round_stops_the_agency_and_new_round_keeps_the_old_one() {
    let first = data(2, 200, 1);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    round(work.path(), first.path(), 2);
    let before = std::fs::read(&storage).unwrap();

    // New data in the same folder, the central still on the drawn round:
    // the agency stops at once, sends nothing, reports no winners.
    let second = data(2, 200, 2);
    let server = Server::start(&storage, 2, WINNING);
    let out = work.path().join("stale-winners.txt");
    let stale = start_agency(1, &server.address(), &data_file(second.path(), 1), &out);
    let status = stale.wait_exit(PATIENCE);
    assert_eq!(
        status.code(),
        Some(3),
        "{}\n{}",
        stale.output(),
        stale.stderr()
    );
    let said = stale.stderr();
    assert!(
        said.contains("the central holds 200 bets for agency 1 that are not the first 200 of ")
            && said.contains("an earlier round's bets, another agency's file, or an edited file"),
        "{said}"
    );
    assert!(
        !stale.output().contains("consulta_ganadores"),
        "{}",
        stale.output()
    );
    assert!(!out.exists(), "no winners are reported");

    // A file shorter than what the central holds: stopped the same way.
    let short = tempfile::tempdir().unwrap();
    let head: String = std::fs::read_to_string(data_file(first.path(), 2))
        .unwrap()
        .lines()
        .take(10)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(data_file(short.path(), 2), head).unwrap();
    let cut = start_agency(2, &server.address(), &data_file(short.path(), 2), &out);
    assert_eq!(cut.wait_exit(PATIENCE).code(), Some(3), "{}", cut.stderr());
    assert!(
        cut.stderr()
            .contains("the central holds 200 bets for agency 2 but ")
            && cut.stderr().contains(" has only 10: "),
        "{}",
        cut.stderr()
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(
        std::fs::read(&storage).unwrap(),
        before,
        "nothing was stored"
    );

    // A new round: the old one's files kept by round and seal, checked.
    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(work.path().join("bets.draw.toml")).unwrap())
            .unwrap();
    let seal = record["seal"].as_str().unwrap().to_string();
    let new_round = lottery()
        .arg("new-round")
        .arg("--storage")
        .arg(&storage)
        .arg("--agencies")
        .arg("2")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&new_round.stdout);
    assert!(
        new_round.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&new_round.stderr)
    );
    let kept_bets = work.path().join(format!("bets.round-1-{}.csv", &seal[..8]));
    let kept_record = work
        .path()
        .join(format!("bets.round-1-{}.draw.toml", &seal[..8]));
    assert!(
        said.contains(&format!(
            "round 1 (seal {seal}) kept as {}",
            kept_bets.display()
        )),
        "{said}"
    );
    assert_eq!(std::fs::read(&kept_bets).unwrap(), before);
    assert!(kept_record.is_file());
    assert!(!storage.exists() && !work.path().join("bets.draw.toml").exists());

    // Round 2 runs on the new data, seals anew, and verifies.
    round(work.path(), second.path(), 2);
    let (status, out, _) = verify(work.path(), 2, &[]);
    assert_eq!(status.code(), Some(0), "{out}");
    let ledger = std::fs::read_to_string(work.path().join("bets.rounds.toml")).unwrap();
    assert!(
        ledger.contains("round = 1") && ledger.contains("round = 2"),
        "{ledger}"
    );
    assert!(
        ledger.contains(&format!("kept_bets = \"{}\"", kept_bets.display())),
        "{ledger}"
    );
}

#[test]
fn winners_whose_receipt_is_not_the_file_are_not_reported() {
    // A central that stores every batch but then seals a receipt other than
    // the agency's file: the agency exits 3 and reports no winners.
    let data = data(1, 50, 3);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let empty = lottery::receipt::Receipt::empty(1);
    let forged = lottery::receipt::Receipt::empty(2).digest;
    let central = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut stream = Raw::new(stream);
        let mut held = 0u64;
        while let Some(payload) = stream.recv() {
            let reply = if payload.starts_with("ACTION:HELLO|") {
                format!(
                    "STATUS:SUCCESS|MESSAGE:hi|STORED:0|DIGEST:{}\n",
                    empty.digest
                )
            } else if let Some(rest) = payload.strip_prefix("BATCH_SIZE:") {
                held += rest.split('|').next().unwrap().parse::<u64>().unwrap();
                format!("STATUS:SUCCESS|MESSAGE:stored|STORED:{held}\n")
            } else {
                // The finished announcement: winners with a forged receipt.
                format!(
                    "STATUS:SUCCESS|WINNERS:12345678|STORED:{held}|DIGEST:{forged}|SEAL:{forged}\n"
                )
            };
            stream.send(&reply);
        }
        held
    });
    let out = data.path().join("winners.txt");
    let agency = start_agency(1, &address, &data_file(data.path(), 1), &out);
    let status = agency.wait_exit(PATIENCE);
    assert_eq!(
        status.code(),
        Some(3),
        "{}\n{}",
        agency.output(),
        agency.stderr()
    );
    let said = agency.stderr();
    assert!(
        said.contains(&format!("counted 50 bets with digest {forged}"))
            && said.contains("so these winners are not valid"),
        "{said}"
    );
    assert!(
        !agency.output().contains("consulta_ganadores"),
        "{}",
        agency.output()
    );
    assert!(!out.exists(), "no winners are reported");
    assert_eq!(central.join().unwrap(), 50);
}

/// Where an agency keeps the seal its winners came with: beside its data
/// file.
fn kept_seal(data: &Path, agency: u32) -> PathBuf {
    let mut name = data_file(data, agency).into_os_string();
    name.push(".seal");
    name.into()
}

/// The seal in a round's draw record.
fn recorded_seal(work: &Path) -> String {
    let record: toml::Table =
        toml::from_str(&std::fs::read_to_string(work.join("bets.draw.toml")).unwrap()).unwrap();
    record["seal"].as_str().unwrap().to_string()
}

/// A consistent forgery: one agency's row edited in the bets file, the
/// record and the ledger removed, and that agency announced finished by
/// whoever holds the central. The round is drawn again with a new seal and
/// `verify` agrees with it; the untouched agency, which kept the round's
/// first seal, exits 3 naming both, and `verify --seal` with the published
/// seal exits 1.
#[test]
fn a_consistent_forgery_is_caught_by_the_kept_seal_and_verify_seal() {
    let data = data(2, 200, 21);
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    round(work.path(), data.path(), 2);
    let published = recorded_seal(work.path());
    for agency in [1, 2] {
        let kept = std::fs::read_to_string(kept_seal(data.path(), agency)).unwrap();
        assert!(
            kept.contains(&format!("seal = \"{published}\"")),
            "agency {agency} kept\n{kept}"
        );
    }

    // Run again against the same round, the agency is given the seal it
    // kept: it reports its winners as before.
    let server = Server::start(&storage, 2, WINNING);
    let again = work.path().join("winners-1-again.txt");
    let agency = start_agency(1, &server.address(), &data_file(data.path(), 1), &again);
    let status = agency.wait_exit(PATIENCE);
    assert!(status.success(), "{}\n{}", agency.output(), agency.stderr());
    assert_eq!(
        read_winners(&again),
        read_winners(&work.path().join("winners-1.txt"))
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());

    // The forgery.
    edit(&storage, |text| {
        let row = text
            .lines()
            .find(|l| l.starts_with("1,"))
            .unwrap()
            .to_string();
        let (head, number) = row.rsplit_once(',').unwrap();
        let other = if number == "1" { "2" } else { "1" };
        text.replacen(&row, &format!("{head},{other}"), 1)
    });
    std::fs::remove_file(work.path().join("bets.draw.toml")).unwrap();
    std::fs::remove_file(work.path().join("bets.rounds.toml")).unwrap();
    let server = Server::start(&storage, 2, WINNING);
    let mut forger = Raw::connect(&server.address());
    forger.send("ACTION:HELLO|AGENCY_ID:1\n");
    let hello = forger.recv().unwrap();
    assert!(hello.contains("STORED:200"), "{hello}");
    forger.send("ACTION:BETTING_FINISHED|AGENCY_ID:1\n");

    let winners = work.path().join("winners-2-again.txt");
    let agency = start_agency(2, &server.address(), &data_file(data.path(), 2), &winners);
    let status = agency.wait_exit(PATIENCE);
    server.proc.wait_for("action: sorteo | result: success");
    let resealed = recorded_seal(work.path());
    assert_ne!(resealed, published);
    assert_eq!(
        status.code(),
        Some(3),
        "{}\n{}",
        agency.output(),
        agency.stderr()
    );
    let said = agency.stderr();
    assert!(
        said.contains(&format!("the central sealed this round as {resealed}"))
            && said.contains(&format!("this agency was given {published}"))
            && said.contains(&kept_seal(data.path(), 2).display().to_string()),
        "{said}"
    );
    assert!(!winners.exists(), "no winners are reported");
    assert!(
        !agency.output().contains("consulta_ganadores"),
        "{}",
        agency.output()
    );
    // The kept seal is left as it was: the next run says the same.
    let kept = std::fs::read_to_string(kept_seal(data.path(), 2)).unwrap();
    assert!(kept.contains(&published), "{kept}");
    drop(forger);
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());

    // Verify agrees with the forgery alone; with the published seal it
    // names both.
    let (status, out, _) = verify(work.path(), 2, &[]);
    assert_eq!(status.code(), Some(0), "{out}");
    let (status, out, _) = verify(work.path(), 2, &["--seal", &published]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "differs: seal: the published seal is {published}, the stored bets give {resealed}"
        )),
        "{out}"
    );
    let (status, out, _) = verify(work.path(), 2, &["--seal", &resealed]);
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(
        out.contains(&format!("the published seal {resealed} is this round's")),
        "{out}"
    );
    let (status, _, err) = verify(work.path(), 2, &["--seal", "not-hex"]);
    assert_eq!(status.code(), Some(2), "{err}");
}
