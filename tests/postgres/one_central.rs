//! One central on the database: a whole lottery, a restart, and what it
//! says and does when the database is missing, refuses it or is slow.

use super::*;

#[test]
fn five_agencies_store_every_bet_once_as_rows_and_get_their_exact_winners() {
    let Some((pg, url)) = cluster_with_db("five_agencies_store_every_bet_once_as_rows") else {
        return;
    };
    let data = generated(5, 1_500);
    let expected = expected(data.path(), 5, WINNING);
    let server = central(&url, 5);
    let log = server.proc.output();
    assert!(
        log.contains(&format!(
            "action: database_schema | result: success | storage: {url} | from_version: 0 | \
             version: {}",
            lottery::store::postgres::schema::MIGRATIONS.len()
        )),
        "{log}"
    );
    run_agencies(
        &[1, 2, 3, 4, 5],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(7_500),
    );
    server.proc.wait_for("action: sorteo | result: success");

    // Every input bet, once, in its agency's file order.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let counts: BTreeMap<u32, usize> = expected.rows.iter().map(|(a, r)| (*a, r.len())).collect();
    assert_eq!(agency_counts(&pg, "lottery"), counts);
    // The draw record, queryable.
    let winners = pg.query(
        "lottery",
        "SELECT agency, array_to_string(winners, ',') FROM draw_agencies ORDER BY agency",
    );
    for row in winners {
        let agency: u32 = row[0].as_deref().unwrap().parse().unwrap();
        assert_eq!(
            row[1].as_deref().unwrap(),
            expected.winners[&agency].join(","),
            "recorded winners of {agency}"
        );
    }

    let log = stop(&server);
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
    assert!(!log.contains("result: fail"), "{log}");
}

#[test]
fn a_restarted_central_resumes_from_the_table_and_serves_the_recorded_draw() {
    let Some((pg, url)) = cluster_with_db("a_restarted_central_resumes_from_the_table") else {
        return;
    };
    let data = generated(2, 800);
    let expected = expected(data.path(), 2, WINNING);
    let relay = Relay::start("");

    // Agency 1 uploads everything, then waits for the draw; the central
    // stops before agency 2 comes.
    let first = central(&url, 2);
    relay.point_at(Some(&first.address()));
    let out = tempfile::tempdir().unwrap();
    let waiting = start_agency(
        1,
        &relay.address,
        &data_file(data.path(), 1),
        &out.path().join("w1"),
    );
    first
        .proc
        .wait_for("action: agencia_finalizada | result: success");
    relay.point_at(None);
    let log = stop(&first);
    assert!(!log.contains("action: sorteo"), "{log}");
    drop(waiting);
    assert_eq!(stored_rows(&pg, "lottery")[&1], expected.rows[&1]);
    // The receipt kept with the rows is the digest of agency 1's file.
    assert_eq!(
        stored_receipts(&pg, "lottery"),
        BTreeMap::from([(1, file_receipt(&expected, 1))])
    );
    // Not drawn yet: nothing to verify, and no new round over its bets.
    let (code, out, err) = tool("verify", &url, 2);
    assert_eq!(code, Some(1));
    assert!(
        out.starts_with("no draw record in the database's tables draw and draw_agencies: "),
        "{out}"
    );
    // Said once, and not as a mismatch.
    assert!(
        err.contains("the round is not drawn yet: there is no draw record to verify")
            && !err.contains("does not match"),
        "{err}"
    );
    let (code, _, err) = tool("new-round", &url, 2);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("round 1 is not drawn yet (no draw record) and table bets holds bets"),
        "{err}"
    );

    // A new central reads where agency 1 stands from the table.
    let second = central(&url, 2);
    let log = second.proc.output();
    assert!(
        log.contains(&format!(
            "action: recover | result: success | storage: {url} | rows: 800 | agencies: 1"
        )),
        "{log}"
    );
    // Its answer to HELLO is agency 1's receipt from the table: the count
    // and the digest of exactly its file.
    let receipt = file_receipt(&expected, 1);
    let reply = hello(&second.address(), 1);
    assert!(
        reply.ends_with(&format!("|STORED:800|DIGEST:{}\n", receipt.digest)),
        "{reply}"
    );
    relay.point_at(Some(&second.address()));
    // Agency 1 sends its file again: nothing of it is stored twice.
    run_agencies(
        &[1, 2],
        &relay.address,
        data.path(),
        &expected,
        upload_limit(1_600),
    );
    second.proc.wait_for("action: sorteo | result: success");
    // Agency 1's HELLO was answered with the receipt from the table, which
    // its file's prefix matched: it resumed at 800 and sent nothing again.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let receipts: BTreeMap<u32, Receipt> = [1, 2].map(|a| (a, file_receipt(&expected, a))).into();
    assert_eq!(stored_receipts(&pg, "lottery"), receipts);
    // The draw record holds each agency's receipt and the seal over them.
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, bets, encode(digest, 'hex') FROM draw_agencies ORDER BY agency"
        ),
        receipts
            .iter()
            .map(|(a, r)| vec![
                Some(a.to_string()),
                Some(r.count.to_string()),
                Some(r.digest.to_string())
            ])
            .collect::<Vec<_>>()
    );
    let seal = lottery::receipt::seal(WINNING, 2, &receipts).to_string();
    assert_eq!(
        pg.query("lottery", "SELECT encode(seal, 'hex') FROM draw"),
        vec![vec![Some(seal.clone())]]
    );
    relay.point_at(None);
    stop(&second);

    // A third central finds the draw and only serves it.
    let third = central(&url, 2);
    let log = third.proc.output();
    assert!(
        log.contains("action: draw_record | result: success | state: already_drawn"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "record: tables draw and draw_agencies | storage: {url}"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("action: verify | result: success | seal: {seal}")),
        "{log}"
    );
    relay.point_at(Some(&third.address()));
    run_agencies(&[2], &relay.address, data.path(), &expected, STEP);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    // An agency whose file is not what the table holds for it (another
    // round's data) stops at its HELLO with exit 3 and sends nothing.
    let other = generated(3, 800);
    let out = tempfile::tempdir().unwrap();
    let stale = start_agency(
        1,
        &relay.address,
        &data_file(other.path(), 1),
        &out.path().join("stale"),
    );
    assert_eq!(
        stale.wait_exit(PATIENCE).code(),
        Some(3),
        "{}\n{}",
        stale.output(),
        stale.stderr()
    );
    assert!(
        stale
            .stderr()
            .contains("the central holds 800 bets for agency 1 that are not the first 800 of "),
        "{}",
        stale.stderr()
    );
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let log = stop(&third);
    assert!(!log.contains("action: sorteo"), "{log}");
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM draw"),
        vec![vec![Some("1".to_string())]]
    );
}

#[test]
fn an_unreachable_database_at_start_is_retried_then_named_and_exits_1() {
    // Needs no cluster: a port that refuses connections.
    let held = HeldPort::new();
    let url = format!("postgres://lottery:hunter2@{}/bets", held.address());
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "2");
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let (log, stderr) = (central.output(), central.stderr());
    assert_eq!(status.code(), Some(1), "{log}\n{stderr}");
    let shown = "postgres://lottery:***@";
    assert!(
        log.contains(&format!(
            "action: database_connect | result: in_progress | storage: {shown}{}/bets | attempt: 1 | retry_in_ms: 200 | error: ",
            held.address()
        )),
        "{log}"
    );
    assert!(
        log.contains("action: database_connect | result: fail"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "action: exit | result: fail | error: database {}/bets: unreachable for 2 s (",
            held.address()
        )),
        "{log}"
    );
    assert!(log.contains("Connection refused"), "{log}");
    assert!(
        !format!("{log}{stderr}").contains("hunter2"),
        "{log}\n{stderr}"
    );
}

#[test]
fn a_central_started_before_its_database_waits_for_it_and_serves() {
    let Some((mut pg, url)) = cluster_with_db("a_central_started_before_its_database") else {
        return;
    };
    pg.stop();
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "60");
    let proc = Proc::spawn(cmd);
    proc.wait_for("action: database_connect | result: in_progress");
    pg.start_again();
    proc.wait_for("action: database_connect | result: success");
    let line = proc.wait_for("action: listen | result: success");
    let port = line
        .split(" | ")
        .find_map(|field| field.strip_prefix("address: "))
        .and_then(|address| address.rsplit(':').next())
        .and_then(|port| port.trim().parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    let server = Server { proc, port };
    let data = generated(1, 300);
    let expected = expected(data.path(), 1, WINNING);
    run_agencies(
        &[1],
        &server.address(),
        data.path(),
        &expected,
        upload_limit(300),
    );
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    stop(&server);
}

#[test]
fn a_refused_login_is_not_retried() {
    let Some(pg) = PgCluster::start_or_skip("a_refused_login_is_not_retried") else {
        return;
    };
    // No such database: asking again will not create it.
    let url = pg.url("nope");
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_STORAGE_CONNECT_TIMEOUT", "60");
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let log = central.output();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("result: in_progress"), "{log}");
    assert!(
        log.contains(&format!(
            "action: exit | result: fail | error: database 127.0.0.1:{}/nope: refused the connection: FATAL: database \"nope\" does not exist",
            pg.port
        )),
        "{log}"
    );
}

#[test]
fn a_url_without_the_password_the_database_asks_for_is_a_configuration_error_at_once() {
    const TEST: &str =
        "a_url_without_the_password_the_database_asks_for_is_a_configuration_error_at_once";
    let Some(mut pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    pg.query("postgres", "CREATE ROLE guarded LOGIN PASSWORD 'hunter2'");
    pg.query("postgres", "CREATE DATABASE guarded OWNER guarded");
    // This role must give its password on loopback (the first matching
    // line wins); a restart, not a reload, so it holds from the first
    // connection on.
    pg.stop();
    let hba = pg.data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all guarded 127.0.0.1/32 scram-sha-256\n{text}"),
    )
    .unwrap();
    pg.start_again();
    let url = format!("postgres://guarded@127.0.0.1:{}/guarded", pg.port);
    let mut cmd = central_command(&url, 1);
    // The habit of libpq's tools, which this program does not share.
    cmd.env("PGPASSWORD", "hunter2");
    let central = Proc::spawn(cmd);
    // At once: well within the 30 s the database is waited for.
    let status = central.wait_exit(STEP);
    let (log, stderr) = (central.output(), central.stderr());
    assert_eq!(status.code(), Some(2), "{log}\n{stderr}");
    assert!(!log.contains("result: in_progress"), "{log}");
    let says = format!(
        "database 127.0.0.1:{}/guarded: the database asks for a password and the storage URL \
         gives none (PGPASSWORD is set, but this program reads neither it nor ~/.pgpass): put \
         it in the URL, postgres://USER:PASSWORD@HOST/DB or ?password=PASSWORD",
        pg.port
    );
    assert!(stderr.contains(&says), "{stderr}");
    assert!(!format!("{log}{stderr}").contains("hunter2"));
}

#[test]
fn a_database_that_holds_a_commit_past_shutdown_is_named_in_the_closing_line() {
    const TEST: &str = "a_database_that_holds_a_commit_past_shutdown_is_named_in_the_closing_line";
    let Some(pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    let url = pg.create_db("stuck");
    let mut cmd = central_command(&url, 1);
    cmd.env("SERVER_SHUTDOWN_GRACE", "1");
    let server = Server::spawn(cmd);
    let mut agency = connect(&server.address());
    let batch = |doc: u32| {
        format!(
            "BATCH_SIZE:1|BET_1:NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|\
             NACIMIENTO:1999-03-17\\|NUMERO:7574\\|AGENCY_ID:1\n"
        )
    };
    let stored = exchange(&mut agency, &batch(30_000_001));
    assert!(stored.contains("|STORED:1"), "{stored}");
    // Another session holds agency 1's row: the central's next commit
    // waits for it, as it would on a hung database.
    let rt = runtime();
    let client = rt.block_on(common::pg::client(&url));
    rt.block_on(client.batch_execute("BEGIN; SELECT * FROM agencies WHERE agency = 1 FOR UPDATE"))
        .unwrap();
    agency.send(batch(30_000_002));
    let deadline = Instant::now() + STEP;
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'";
    while pg.query("stuck", waiting)[0][0].as_deref() != Some("1") {
        assert!(
            Instant::now() < deadline,
            "the central's commit never waited"
        );
        // A poll interval, not a synchronisation: the loop ends on the
        // database's answer.
        std::thread::sleep(Duration::from_millis(20));
    }
    server.proc.signal(Signal::SIGTERM);
    let line = server.proc.wait_for("the store did not close within");
    assert!(
        line.contains("ERROR    action: close_database | result: fail | reason: "),
        "{line}"
    );
    let status = server.proc.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{}", server.proc.output());
    rt.block_on(client.batch_execute("ROLLBACK")).unwrap();
}

/// Set in the run of [`a_developer_who_is_not_root_gets_a_cluster_of_their_own`]
/// that root starts as another user.
const AS_DEVELOPER: &str = "LOTTERY_PG_TEST_AS_DEVELOPER";

#[test]
fn a_developer_who_is_not_root_gets_a_cluster_of_their_own() {
    const TEST: &str = "a_developer_who_is_not_root_gets_a_cluster_of_their_own";
    if common::pg::running_as_root() && std::env::var_os(AS_DEVELOPER).is_none() {
        // Run as root: this very test runs again as `nobody`, a developer
        // who owns nothing here but a temporary directory.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let Some((uid, gid)) = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 || f[0] != "nobody" {
                return None;
            }
            Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?))
        }) else {
            skipped(TEST, "no user nobody to run as");
            return;
        };
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).unwrap();
        // The build may sit where `nobody` cannot go (a checkout in a
        // private folder): the test and the binary it runs are copied into
        // the folder it owns.
        let test_copy = tmp.path().join("postgres-test");
        let bin_copy = tmp.path().join("lottery");
        std::fs::copy(std::env::current_exe().unwrap(), &test_copy).unwrap();
        std::fs::copy(common::lottery_bin(), &bin_copy).unwrap();
        let out = {
            use std::os::unix::process::CommandExt;
            // The harness names a test by its path below the crate root.
            let exact = match module_path!().split_once("::") {
                Some((_, module)) => format!("{module}::{TEST}"),
                None => TEST.to_string(),
            };
            Command::new(&test_copy)
                .args([&exact, "--exact", "--nocapture", "--test-threads=1"])
                .env(AS_DEVELOPER, "1")
                .env("LOTTERY_TEST_BIN", &bin_copy)
                .env("TMPDIR", tmp.path())
                .uid(uid)
                .gid(gid)
                .output()
                .unwrap()
        };
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "as nobody:\n{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "as nobody:\n{stdout}\n{stderr}"
        );
        return;
    }
    let Some(pg) = PgCluster::start_or_skip(TEST) else {
        return;
    };
    let url = pg.create_db("mine");
    let central = central(&url, 1);
    assert_eq!(
        hello(&central.address(), 1),
        format!(
            "STATUS:SUCCESS|MESSAGE:agency 1: resume from bet 0|STORED:0|DIGEST:{}\n",
            Receipt::empty(1).digest
        )
    );
    stop(&central);
}

/// A central started on storage URL `url`, which must end at once as a
/// configuration error (exit 2): everything it printed.
fn refused_at_start(url: &str) -> String {
    let central = Proc::spawn(central_command(url, 1));
    let status = central.wait_exit(STEP);
    let printed = format!("{}{}", central.output(), central.stderr());
    assert_eq!(status.code(), Some(2), "{printed}");
    printed
}

#[test]
fn a_bad_storage_url_is_a_configuration_error_that_hides_the_password() {
    let printed =
        refused_at_start("postgres://lottery:hunter2@db/bets?target_session_attrs=sometimes");
    assert!(
        printed.contains(
            "invalid SERVER_STORAGE = \"postgres://lottery:***@db/bets?target_session_attrs=sometimes\": not a PostgreSQL URL: "
        ),
        "{printed}"
    );
    assert!(!printed.contains("hunter2"));
}

/// Nothing here speaks TLS to the database: a URL that requires it is
/// refused at start, not tried until the patience runs out.
#[test]
fn a_storage_url_that_requires_tls_is_a_configuration_error() {
    let printed = refused_at_start("postgres://lottery:hunter2@db/bets?sslmode=require");
    assert!(
        printed.contains(
            "invalid SERVER_STORAGE = \"postgres://lottery:***@db/bets?sslmode=require\": \
             sslmode=require asks for TLS to the database"
        ),
        "{printed}"
    );
}

#[test]
fn a_bad_storage_url_in_the_config_file_is_quoted_without_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[server]\nstorage = \"postgres://lottery:hunter2@db/bets?target_session_attrs=sometimes\"\n",
    )
    .unwrap();
    let mut cmd = lottery();
    cmd.arg("server").env("LOTTERY_CONFIG", &config);
    let central = Proc::spawn(cmd);
    let status = central.wait_exit(STEP);
    let stderr = central.stderr();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "storage = \"postgres://lottery:***@db/bets?target_session_attrs=sometimes\""
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
