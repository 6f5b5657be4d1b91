//! The operator tools on a database: `verify`, `new-round`, `winners`,
//! `status`, `bench`, and seals kept by the agencies.

use super::*;

/// Starts a central on the database at `url` and expects it to refuse to
/// serve: exit 1 before listening. Returns its stderr.
fn refused_start(url: &str, agencies: u32) -> String {
    common::refused_start(central_command(url, agencies))
}

#[test]
fn verify_the_central_and_new_round_check_a_postgres_round_against_its_rows() {
    let Some((pg, url)) = cluster_with_db("verify_the_central_and_new_round_on_postgres") else {
        return;
    };
    let data = generated(2, 300);
    let expected = expected(data.path(), 2, WINNING);
    assert!(expected.winners.values().all(|w| !w.is_empty()));
    let server = central(&url, 2);
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(600),
    );
    server.proc.wait_for("action: sorteo | result: success");
    // A count edited in table agencies after the draw is not served: the
    // HELLO that would resume from it is refused, naming the sealed count.
    pg.query("lottery", "UPDATE agencies SET stored = 0 WHERE agency = 1");
    let answer = hello(&server.address(), 1);
    assert!(
        answer.starts_with("STATUS:ERROR|")
            && answer.contains("CODE:STORAGE_FAILED")
            && answer.contains("agency 1: table agencies says 0 bets with digest ")
            && answer.contains("but the draw sealed 300 bets with digest "),
        "{answer}"
    );
    pg.query(
        "lottery",
        "UPDATE agencies SET stored = 300 WHERE agency = 1",
    );
    let answer = hello(&server.address(), 1);
    assert!(answer.contains("STORED:300"), "{answer}");
    stop(&server);

    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.starts_with("the draw record tables draw and draw_agencies matches the stored bets "),
        "{out}"
    );
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    let seal = lottery::receipt::seal(WINNING, 2, &receipts);
    assert!(out.contains(&format!("seal {seal}")), "{out}");

    // Each tampering, on a copy of the database: what verify and a central
    // starting on it say (exit 1 both).
    let cases = [
        (
            "a bet's number changed",
            "UPDATE bets SET number = CASE WHEN number = 1 THEN 2 ELSE 1 END \
             WHERE agency = 1 AND seq = 0",
            "agency 1 digest: the record says ",
        ),
        (
            "a row added",
            "INSERT INTO bets VALUES (2, 300, 'Forged', 'Row', '12345678', '1990-01-01', 7574)",
            "agency 2 count: the record says 300, the stored bets 301",
        ),
        (
            "winners swapped",
            "UPDATE draw_agencies d SET winners = o.winners FROM draw_agencies o \
             WHERE d.agency <> o.agency",
            "agency 1 winners: the record says [",
        ),
        (
            "the draw deleted",
            "DELETE FROM draw_agencies; DELETE FROM draw",
            "missing, but round 1 was sealed on ",
        ),
        (
            "the winning number changed",
            "UPDATE draw SET winning_number = 1234",
            "winning number: the record says 1234, the configuration 7574",
        ),
        // The receipts a restarted agency resumes from: checked against the
        // rows as the record is, or an agency is told it holds nothing.
        (
            "an agency's count zeroed in table agencies",
            "UPDATE agencies SET stored = 0 WHERE agency = 1",
            "agency 1 count: table agencies says 0, the stored bets 300",
        ),
        (
            "an agency's digest replaced in table agencies",
            "UPDATE agencies SET digest = (SELECT digest FROM agencies WHERE agency = 1) \
             WHERE agency = 2",
            "agency 2 digest: table agencies says ",
        ),
        (
            "an agency's row deleted from table agencies",
            "DELETE FROM agencies WHERE agency = 2",
            "agency 2 count: table agencies says 0, the stored bets 300",
        ),
    ];
    for (i, (what, sql, says)) in cases.iter().enumerate() {
        let copy = format!("tampered{i}");
        pg.query(
            "postgres",
            &format!("CREATE DATABASE {copy} TEMPLATE lottery"),
        );
        pg.query(&copy, sql);
        let copy_url = pg.url(&copy);
        let (code, out, err) = tool("verify", &copy_url, 2);
        assert_eq!(code, Some(1), "{what}: verify\n{out}\n{err}");
        assert!(out.contains(says), "{what}: verify says\n{out}");
        let refused = refused_start(&copy_url, 2);
        assert!(
            refused.contains(says),
            "{what}: the central says\n{refused}"
        );
        if i == 0 {
            // A round whose record does not match is not kept as sealed.
            let (code, out, err) = tool("new-round", &copy_url, 2);
            assert_eq!(code, Some(1), "{out}\n{err}");
            assert!(err.contains("does not match the stored bets"), "{err}");
            assert_eq!(
                pg.query(&copy, "SELECT count(*) FROM rounds WHERE kept_as IS NULL"),
                vec![vec![Some("1".to_string())]]
            );
        }
    }

    // A new round keeps this one's rows in tables named by round and seal,
    // and the next central starts empty.
    let (code, out, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let kept = format!("round_1_{}", seal.short());
    assert!(
        out.contains(&format!(
            "round 1 (seal {seal}) kept as table bets_{kept} (receipts in agencies_{kept}) \
             and tables draw_{kept} and draw_agencies_{kept}"
        )),
        "{out}"
    );
    assert_eq!(
        pg.query(
            "lottery",
            &format!("SELECT count(*), min(seq), max(seq) FROM bets_{kept}")
        ),
        vec![vec![
            Some("600".to_string()),
            Some("0".to_string()),
            Some("299".to_string())
        ]]
    );
    assert_eq!(
        pg.query(
            "lottery",
            &format!("SELECT encode(seal, 'hex') FROM draw_{kept}")
        ),
        vec![vec![Some(seal.to_string())]]
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT (SELECT count(*) FROM bets) + (SELECT count(*) FROM agencies) \
             + (SELECT count(*) FROM draw) + (SELECT count(*) FROM draw_agencies)"
        ),
        vec![vec![Some("0".to_string())]]
    );
    assert_eq!(
        pg.query("lottery", "SELECT round, kept_as FROM rounds"),
        vec![vec![Some("1".to_string()), Some(kept.clone())]]
    );
    // Nothing to keep now: said, not an error.
    let (code, out, _) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("round 2 holds no bets and no draw"),
        "{out}"
    );

    // Round 2: the agencies upload from their first bet and a new draw is
    // sealed as round 2.
    let server = central(&url, 2);
    let log = server.proc.output();
    assert!(
        log.contains(&format!("storage: {url} | rows: 0 | agencies: 0")),
        "{log}"
    );
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(600),
    );
    server.proc.wait_for("action: sorteo | result: success");
    stop(&server);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT round, encode(seal, 'hex'), kept_as FROM rounds ORDER BY round"
        )[1],
        vec![Some("2".to_string()), Some(seal.to_string()), None]
    );
}

/// `lottery winners` with `args`, and `env` added to its environment:
/// (exit code, stdout, stderr).
fn winners(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = lottery()
        .arg("winners")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn winners_prints_the_draw_recorded_in_the_database_and_changes_nothing() {
    let Some((pg, url)) = cluster_with_db("winners_prints_the_draw_recorded_in_the_database")
    else {
        return;
    };
    let tables = || {
        pg.query(
            "lottery",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
        )
    };
    // A database no central has used: refused, naming it, and left as it
    // was (no schema created).
    let (code, out, err) = winners(&["--storage", &url], &[]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(
        err.contains(&format!("database 127.0.0.1:{}/lottery: ", pg.port)),
        "{err}"
    );
    assert!(!out.contains("winning documents"), "{out}");
    assert_eq!(tables(), vec![vec![Some("0".to_string())]]);

    let data = generated(2, 300);
    let expected = expected(data.path(), 2, WINNING);
    assert!(expected.winners.values().all(|w| !w.is_empty()));
    let server = central(&url, 2);
    let address = server.address();
    let work = tempfile::tempdir().unwrap();
    let one = start_agency(
        1,
        &address,
        &data_file(data.path(), 1),
        &work.path().join("w1.txt"),
    );
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");

    // Bets stored, no draw yet: refused (exit 1), the database named
    // without its password, whether it came from server.storage or
    // --storage.
    let with_password = url.replacen("postgres@", "postgres:hunter2@", 1);
    let refusal = format!(
        "no draw recorded in the database postgres://postgres:***@127.0.0.1:{}/lottery \
         (tables draw and draw_agencies): the draw has not happened yet",
        pg.port
    );
    for (args, env) in [
        (vec![], vec![("SERVER_STORAGE", with_password.as_str())]),
        (vec!["--storage", with_password.as_str()], vec![]),
    ] {
        let (code, out, err) = winners(&args, &env);
        assert_eq!(code, Some(1), "{out}\n{err}");
        assert!(err.contains(&refusal), "{err}");
        assert!(!out.contains("winning documents"), "{out}");
        assert!(!format!("{out}{err}").contains("hunter2"), "{out}\n{err}");
    }

    let two = start_agency(
        2,
        &address,
        &data_file(data.path(), 2),
        &work.path().join("w2.txt"),
    );
    assert!(one.wait_exit(PATIENCE).success());
    assert!(two.wait_exit(PATIENCE).success());
    server.proc.wait_for("action: sorteo | result: success");

    // The draw, against the running central: the exact table, every count,
    // winner and the seal computed from the data files.
    let drawn_at = pg.query("lottery", "SELECT drawn_at FROM draw")[0][0]
        .clone()
        .unwrap();
    let want = expected_winners_table(&expected, 2, WINNING, &drawn_at);
    let (code, out, err) = winners(&[], &[("SERVER_STORAGE", &url)]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out, want);
    // A role that may only read the tables is enough: nothing is written,
    // migrated or created.
    pg.query(
        "lottery",
        "CREATE ROLE reader LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader",
    );
    let reader = url.replacen("postgres@", "reader@", 1);
    let (code, out, err) = winners(&["--storage", &reader], &[]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(out, want);
    stop(&server);
}

/// An operator may ask any central: with a shared database, `lottery
/// status` shows what every central stored and who finished anywhere.
#[test]
fn status_on_any_central_shows_the_agencies_of_every_central() {
    let Some((_pg, url)) = cluster_with_db("status_on_any_central") else {
        return;
    };
    let data = generated(2, 700);
    let (a, b) = (central(&url, 3), central(&url, 3));
    let out = tempfile::tempdir().unwrap();
    let one = start_agency(
        1,
        &a.address(),
        &data_file(data.path(), 1),
        &out.path().join("w1.txt"),
    );
    a.proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");
    let status = lottery()
        .args(["status", "--address", &b.address()])
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status,
        "agency   bets held  state\n     1         700  finished\n     2           0  waiting\n     \
         3           0  waiting\n total         700\nsales open\n1 of 3 agencies finished; draw pending\n"
    );
    drop(one);
    let _ = (stop(&a), stop(&b));
}

/// The load tool against the database with several centrals: every bet of
/// every agency stored once, whichever central it went through, and one
/// draw reported.
#[test]
fn bench_with_three_centrals_stores_every_bet_once_and_reports_one_draw() {
    let Some((pg, url)) = cluster_with_db("bench_with_three_centrals") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let out = lottery()
        .args(["bench", "--agencies", "4", "--bets-per-agency", "1500"])
        .args(["--storage", &url, "--centrals", "3"])
        .arg("--work-dir")
        .arg(work.path())
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(
            "4 agencies x 1500 bets, window 8, 3 centrals, durable acknowledgements \
             (PostgreSQL, synchronous commit)"
        ),
        "{report}"
    );
    assert!(report.contains("6000 bets in "), "{report}");
    assert!(report.contains("reconnects: 0, "), "{report}");
    let expected = expected(&work.path().join("data"), 4, WINNING);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM draw"),
        vec![vec![Some("1".to_string())]]
    );
}

#[test]
fn bench_centrals_need_a_database() {
    let out = lottery()
        .args(["bench", "--centrals", "2"])
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--storage"), "{err}");
}

/// `lottery new-round` on a database a central is still connected to is
/// refused, naming why; once the central is stopped it goes on.
#[test]
fn new_round_waits_for_the_centrals_to_stop() {
    let Some((_pg, url)) = cluster_with_db("new_round_waits_for_the_centrals") else {
        return;
    };
    let server = central(&url, 2);
    let (code, _, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("of a running central (from 127.0.0.1) are open on this database: a new round starts with every central stopped"),
        "{err}"
    );
    let _ = stop(&server);
    let (code, out, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(0), "{out}{err}");
}

/// The path where an agency keeps the seal its winners came with: beside
/// its data file.
fn kept_seal(data: &Path, agency: u32) -> std::path::PathBuf {
    let mut name = data_file(data, agency).into_os_string();
    name.push(".seal");
    name.into()
}

/// A consistent forgery: one agency's row edited, its receipt in
/// `agencies` recomputed to match, the draw and the ledger deleted. The
/// central draws it again and `verify` agrees with it, but an agency that
/// kept the round's first seal exits 3, and `verify --seal` with the
/// published seal exits 1.
#[test]
fn a_consistent_forgery_is_caught_by_the_kept_seal_and_verify_seal() {
    let Some((pg, url)) = cluster_with_db("a_consistent_forgery_on_postgres") else {
        return;
    };
    let data = generated(2, 200);
    let expected = expected(data.path(), 2, WINNING);
    let server = central(&url, 2);
    run_agencies(
        &[1, 2],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(400),
    );
    server.proc.wait_for("action: sorteo | result: success");
    stop(&server);
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    let published = lottery::receipt::seal(WINNING, 2, &receipts);
    for agency in [1, 2] {
        let kept = std::fs::read_to_string(kept_seal(data.path(), agency)).unwrap();
        assert!(
            kept.contains(&format!("seal = \"{published}\"")),
            "agency {agency} kept\n{kept}"
        );
    }

    // The forgery, consistent throughout the database.
    pg.query(
        "lottery",
        "UPDATE bets SET number = CASE WHEN number = 1 THEN 2 ELSE 1 END \
         WHERE agency = 1 AND seq = 0",
    );
    let mut forged = Receipt::empty(1);
    for row in &stored_rows(&pg, "lottery")[&1] {
        let texts = [&row[1], &row[2], &row[3], &row[4]].map(|t| t.as_bytes());
        forged.push(texts, row[5].parse().unwrap());
    }
    pg.query(
        "lottery",
        &format!(
            "UPDATE agencies SET digest = decode('{}', 'hex') WHERE agency = 1; \
             DELETE FROM draw_agencies; DELETE FROM draw; DELETE FROM rounds",
            forged.digest
        ),
    );
    // Every agency finished and no draw: the central draws at once.
    let server = central(&url, 2);
    server.proc.wait_for("action: sorteo | result: success");
    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(0), "the forgery is consistent\n{out}\n{err}");
    let resealed = lottery::receipt::seal(
        WINNING,
        2,
        &BTreeMap::from([(1, forged), (2, receipts[&2])]),
    );
    assert!(out.contains(&format!("seal {resealed}")), "{out}");

    // The published seal, checked by anyone.
    let check = |seal: &str| {
        let out = lottery()
            .args([
                "verify",
                "--storage",
                &url,
                "--agencies",
                "2",
                "--seal",
                seal,
            ])
            .env("LOTTERY_CONFIG", "/dev/null")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(&published.to_string());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(&format!(
            "differs: seal: the published seal is {published}, the stored bets give {resealed}"
        )),
        "{out}"
    );
    let (code, out) = check(&resealed.to_string());
    assert_eq!(code, Some(0), "{out}");

    // The untouched agency, run again, compares the seal it kept.
    let winners = data.path().join("winners-2-again.txt");
    let agency = start_agency(2, &server.address(), &data_file(data.path(), 2), &winners);
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
        said.contains(&format!("the central sealed this round as {resealed}"))
            && said.contains(&format!("this agency was given {published}")),
        "{said}"
    );
    assert!(!winners.exists(), "no winners are reported");
    assert!(
        !agency.output().contains("consulta_ganadores"),
        "{}",
        agency.output()
    );
    stop(&server);
}
