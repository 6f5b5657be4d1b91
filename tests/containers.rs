//! The lottery as its users run it: the image the Dockerfile describes, run
//! by the committed compose.yaml and by `lottery compose --postgres`, on a
//! real Docker engine (tests/common/docker.rs builds the images without a
//! registry). Every agency container must exit 0 with its exact winners,
//! and the store must hold exactly the input bets, through a stop, a killed
//! central, a central cut off from its database or from its agencies, and a
//! database failover.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::docker::{self, exec, inspect, logs, wait_exit, wait_for_log, Engine};
use common::{expected, lottery, Expected};

const WINNING: u16 = 7574;

/// Whole uploads in containers, agencies included: generous, as the
/// engine's start-up and a two-core machine shared with the build vary.
const RUN: Duration = Duration::from_secs(180);

/// A folder with what the committed compose.yaml mounts: config.toml (the
/// committed one, with some settings replaced), data files in `.data`,
/// and the secrets `lottery secrets` writes, made under `umask 077` as a
/// careful operator's shell would.
fn deployment(agencies: u32, bets: u64, agency_settings: &str) -> (tempfile::TempDir, Expected) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let mut config = std::fs::read_to_string(root.join("config.toml")).unwrap();
    // Each `key = value` line of `agency_settings` takes the place of the
    // committed file's line for that key (a TOML table may not repeat one).
    for line in agency_settings.lines() {
        let key = line.split('=').next().unwrap().trim();
        let same_key = |l: &str| l.split('=').next().map(str::trim) == Some(key);
        assert!(config.lines().any(same_key), "config.toml has no {key}");
        config = config
            .lines()
            .map(|l| if same_key(l) { line } else { l })
            .collect::<Vec<_>>()
            .join("\n");
    }
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let data = dir.path().join(".data");
    let out = lottery()
        .args(["gen-data", "--agencies", &agencies.to_string()])
        .args([
            "--bets-per-agency",
            &bets.to_string(),
            "--winner-share",
            "0.002",
        ])
        .arg("--out")
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "gen-data: {out:?}");
    let expect = expected(&data, agencies, WINNING);
    (dir, expect)
}

/// `lottery secrets` (or `compose`) run in `dir` under `umask 077`.
fn under_umask_077(dir: &Path, args: &[&str]) {
    let bin = env!("CARGO_BIN_EXE_lottery");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("umask 077; exec {bin} \"$@\""))
        .arg("sh")
        .args(args)
        .current_dir(dir)
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "lottery {args:?}: {out:?}");
}

/// Waits until the central in `container` has logged `n` batches stored.
fn wait_for_batches(container: &str, n: usize) {
    wait_for_log(container, &format!("{n} batches stored"), RUN, |log| {
        log.matches("action: apuesta_recibida | result: success")
            .count()
            >= n
    });
}

/// Every agency container exited 0 and logged its exact winners' count.
fn agencies_exit_0_with_their_winners(expect: &Expected, limit: Duration) {
    for (agency, winners) in &expect.winners {
        let name = format!("client{agency}");
        let code = wait_exit(&name, limit);
        assert_eq!(code, 0, "{name} exited {code}; its log:\n{}", logs(&name));
        assert_eq!(
            docker::winners_logged(&name),
            Some(winners.len()),
            "{name}'s consulta_ganadores line; its log:\n{}",
            logs(&name)
        );
    }
}

/// The per-agency winners from `lottery winners` in the central's
/// container: agency → documents.
fn winners_table(container: &str, record: &str) -> BTreeMap<u32, Vec<String>> {
    let (code, out) = exec(
        container,
        &[
            "lottery",
            "winners",
            "--config",
            "/etc/lottery/config.toml",
            "--record",
            record,
        ],
    );
    assert_eq!(code, 0, "lottery winners: {out}");
    parse_winners(&out)
}

/// `lottery winners`' table: agency → documents.
fn parse_winners(out: &str) -> BTreeMap<u32, Vec<String>> {
    out.lines()
        .skip(2)
        .map(|line| {
            // agency, bets, winners, then the documents (or `-`).
            let fields: Vec<&str> = line.split_whitespace().collect();
            let agency: u32 = fields[0].parse().unwrap();
            let list = if fields[3] == "-" {
                Vec::new()
            } else {
                fields[3..]
                    .join(" ")
                    .split(", ")
                    .map(str::to_string)
                    .collect()
            };
            (agency, list)
        })
        .collect()
}

/// The seal on the first line of `lottery winners` in the central's
/// container (`draw of … seal HEX`).
fn winners_seal(container: &str, record: &str) -> String {
    let (code, out) = exec(
        container,
        &[
            "lottery",
            "winners",
            "--config",
            "/etc/lottery/config.toml",
            "--record",
            record,
        ],
    );
    assert_eq!(code, 0, "lottery winners: {out}");
    out.lines()
        .next()
        .and_then(|l| l.rsplit("seal ").next())
        .unwrap()
        .trim()
        .to_string()
}

/// The bets file in the central's container, read with a standard CSV
/// reader, by agency.
fn bets_file(container: &str, path: &str) -> BTreeMap<u32, Vec<common::Row>> {
    let (code, text) = exec(container, &["cat", path]);
    assert_eq!(code, 0, "reading {path}: {text}");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    common::stored(file.path())
}

const BETS_FILE: &str = "/var/lib/lottery/data/bets.csv";
const DRAW_RECORD: &str = "/var/lib/lottery/data/bets.draw.toml";

#[test]
fn compose_yaml_runs_the_central_and_five_agencies_in_containers() {
    let test = "compose_yaml_runs_the_central_and_five_agencies_in_containers";
    let Some(engine) = Engine::start_or_skip(test) else {
        return;
    };
    let (dir, expect) = deployment(5, 3000, "");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("compose.yaml"),
        dir.path().join("compose.yaml"),
    )
    .unwrap();
    under_umask_077(dir.path(), &["secrets", "--agencies", "5"]);
    let project = engine.project(dir.path(), "compose");
    project.compose_ok(&["up", "-d"]);

    agencies_exit_0_with_their_winners(&expect, RUN);
    // Nothing went wrong, so nothing says it did (the contract's rule), and
    // each agency kept its round's seal on the `seals` volume.
    for agency in 1..=5 {
        let log = logs(&format!("client{agency}"));
        assert!(!log.contains("result: fail"), "client{agency}:\n{log}");
    }
    assert!(
        !logs("server").contains("result: fail"),
        "{}",
        logs("server")
    );
    let seal = winners_seal("server", DRAW_RECORD);
    for agency in 1..=5 {
        let kept = docker::docker_ok(&[
            "run",
            "--rm",
            "--entrypoint",
            "cat",
            "--volume",
            &format!("{}:/seals:ro", project.volume("seals")),
            "lottery:latest",
            &format!("/seals/agency-{agency}.seal"),
        ]);
        assert!(
            kept.contains(&seal),
            "agency {agency} kept:\n{kept}\nnot the seal {seal}"
        );
    }

    // The agencies started only once the central was healthy.
    let healthy_at = first_healthy_check("server");
    for agency in 1..=5 {
        let started = inspect(&format!("client{agency}"), "{{.State.StartedAt}}");
        assert!(
            started.as_str() > healthy_at.as_str(),
            "client{agency} started at {started}, before the central's first healthy check at {healthy_at}"
        );
    }

    // Exactly the input, in each agency's order, written by the non-root
    // user, and the exact winners per agency.
    assert_eq!(bets_file("server", BETS_FILE), expect.rows);
    let (_, owner) = exec("server", &["stat", "-c", "%U %u", BETS_FILE]);
    assert_eq!(owner.trim(), "lottery 10001");
    assert_eq!(winners_table("server", DRAW_RECORD), expect.winners);

    operators_commands_on_the_file_store(&expect);

    // `docker compose stop`: the central shuts down cleanly within its
    // grace period (stop_grace_period: 8s), exit 0.
    let started = Instant::now();
    project.compose_ok(&["stop", "server"]);
    let took = started.elapsed();
    assert_eq!(
        inspect("server", "{{.State.ExitCode}}"),
        "0",
        "{}",
        logs("server")
    );
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
    let log = logs("server");
    let last: Vec<&str> = log.lines().rev().take(1).collect();
    assert!(
        last[0].contains("action: shutdown | result: success"),
        "the central's last line: {last:?}"
    );
    for step in [
        "action: signal",
        "action: close_listener",
        "action: close_bets_file",
    ] {
        assert!(log.contains(step), "no {step} in the central's log:\n{log}");
    }

    // A second round, as docs/OPERATIONS.md shows it: the drawn round kept
    // aside, then the same deployment up again, over the same files.
    project.compose_ok(&[
        "run",
        "--rm",
        "--no-deps",
        "server",
        "new-round",
        "--config",
        "/etc/lottery/config.toml",
        "--storage",
        BETS_FILE,
    ]);
    project.compose_ok(&["up", "-d"]);
    agencies_exit_0_with_their_winners(&expect, RUN);
    assert_eq!(bets_file("server", BETS_FILE), expect.rows);
    assert_eq!(winners_table("server", DRAW_RECORD), expect.winners);
    let (_, kept) = exec("server", &["ls", "/var/lib/lottery/data"]);
    assert!(
        kept.contains("bets.round-1-"),
        "the first round kept aside: {kept}"
    );
}

/// `lottery status`, `health`, `verify` and `winners` as an operator runs
/// them with `docker compose exec` against the running central.
fn operators_commands_on_the_file_store(expect: &Expected) {
    let (code, out) = exec(
        "server",
        &["lottery", "health", "--address", "127.0.0.1:12345"],
    );
    assert_eq!((code, out.trim()), (0, "ok"));
    let (code, status) = exec(
        "server",
        &["lottery", "status", "--address", "127.0.0.1:12345"],
    );
    assert_eq!(code, 0, "{status}");
    for (agency, rows) in &expect.rows {
        let line = format!("{agency:>6}  {:>10}  finished", rows.len());
        assert!(status.contains(&line), "no `{line}` in:\n{status}");
    }
    assert!(
        status.contains("5 of 5 agencies finished; draw done"),
        "{status}"
    );
    let (code, out) = exec(
        "server",
        &[
            "lottery",
            "verify",
            "--config",
            "/etc/lottery/config.toml",
            "--storage",
            BETS_FILE,
        ],
    );
    assert_eq!(code, 0, "lottery verify: {out}");
}

/// The end time of the first passing health check of a container, in the
/// engine's RFC 3339 form (which sorts as text).
fn first_healthy_check(container: &str) -> String {
    let out = inspect(
        container,
        "{{range .State.Health.Log}}{{.ExitCode}} {{.End}}\n{{end}}",
    );
    out.lines()
        .find_map(|l| l.strip_prefix("0 ").map(str::to_string))
        .unwrap_or_else(|| panic!("{container} has no passing health check: {out}"))
}

#[test]
fn a_central_container_killed_mid_upload_and_started_again_loses_nothing() {
    let test = "a_central_container_killed_mid_upload_and_started_again_loses_nothing";
    let Some(engine) = Engine::start_or_skip(test) else {
        return;
    };
    // Small batches, one in flight: an upload long enough to be cut.
    let (dir, expect) = deployment(5, 4000, "batch_max_amount = 4\nwindow = 1");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("compose.yaml"),
        dir.path().join("compose.yaml"),
    )
    .unwrap();
    under_umask_077(dir.path(), &["secrets", "--agencies", "5"]);
    let project = engine.project(dir.path(), "killed");
    project.compose_ok(&["up", "-d"]);

    wait_for_batches("server", 50);
    docker::docker_ok(&["kill", "server"]);
    let running: Vec<u32> = (1..=5)
        .filter(|a| inspect(&format!("client{a}"), "{{.State.Running}}") == "true")
        .collect();
    assert!(
        !running.is_empty(),
        "every agency had finished before the kill"
    );
    docker::docker_ok(&["start", "server"]);

    agencies_exit_0_with_their_winners(&expect, RUN);
    assert_eq!(bets_file("server", BETS_FILE), expect.rows);
    assert_eq!(winners_table("server", DRAW_RECORD), expect.winners);
    drop(project);
}

/// The `bets` table in the `postgres` container, by agency in upload
/// order, as [`common::Row`]s.
fn bets_table(container: &str) -> BTreeMap<u32, Vec<common::Row>> {
    let (code, text) = exec(
        container,
        &[
            "psql",
            "-U",
            "lottery",
            "-d",
            "lottery",
            "--no-align",
            "--tuples-only",
            "--field-separator-zero",
            "--record-separator=\n",
            "-c",
            "SELECT agency, first_name, last_name, document, birthdate, number \
             FROM bets ORDER BY agency, seq",
        ],
    );
    assert_eq!(code, 0, "reading the bets table: {text}");
    let mut out: BTreeMap<u32, Vec<common::Row>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split('\0').collect();
        assert_eq!(fields.len(), 6, "row {line:?}");
        let row: common::Row = std::array::from_fn(|i| fields[i].to_string());
        out.entry(row[0].parse().unwrap()).or_default().push(row);
    }
    out
}

/// `SELECT count(*) FROM table` in the `postgres` container.
fn count(container: &str, table: &str) -> u64 {
    sql(container, &format!("SELECT count(*) FROM {table}"))
        .parse()
        .unwrap()
}

/// Waits until the `bets` table holds `more` rows more than it did, and
/// insists that the upload is still going on then (some agency still
/// running), so what the test did meanwhile happened during the upload.
fn wait_for_more_rows(container: &str, more: u64, what: &str, agencies: u32) {
    let from = count(container, "bets");
    let start = Instant::now();
    while count(container, "bets") < from + more {
        assert!(
            start.elapsed() < RUN,
            "no {more} more rows within {RUN:?} {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        (1..=agencies).any(|a| inspect(&format!("client{a}"), "{{.State.Running}}") == "true"),
        "every agency had finished {what}: the upload was too short for the test"
    );
}

/// [`deployment`] for the PostgreSQL layout: `agencies` agencies of `bets`
/// bets each, in small batches one in flight (an upload slow enough to be
/// disrupted), and `lottery compose --postgres --centrals N` written to
/// `out` with its secrets, under `umask 077`.
fn postgres_deployment(
    centrals: u32,
    agencies: u32,
    bets: u64,
    out: &str,
) -> (tempfile::TempDir, Expected) {
    let (dir, expect) = deployment(
        agencies,
        bets,
        "batch_max_amount = 4\nwindow = 1\nreply_timeout = 5",
    );
    let (centrals, agencies) = (centrals.to_string(), agencies.to_string());
    under_umask_077(
        dir.path(),
        &[
            "compose",
            "--postgres",
            "--centrals",
            &centrals,
            "--agencies",
            &agencies,
            "--out",
            out,
        ],
    );
    (dir, expect)
}

#[test]
fn three_centrals_on_postgres_in_containers_survive_a_kill_and_two_cuts() {
    let test = "three_centrals_on_postgres_in_containers_survive_a_kill_and_two_cuts";
    let Some(engine) = Engine::start_or_skip(test) else {
        return;
    };
    // An upload long enough for three disruptions, one after the other.
    let (dir, expect) = postgres_deployment(3, 6, 15000, "compose.yaml");
    let project = engine.project(dir.path(), "cut");
    project.compose_ok(&["up", "-d"]);

    // One central killed mid-upload, and left dead.
    wait_for_batches("central-1", 30);
    docker::docker_ok(&["kill", "central-1"]);
    // Another cut off from the database, then joined again.
    let store = project.network("store");
    docker::docker_ok(&["network", "disconnect", &store, "central-2"]);
    wait_for_more_rows(
        "postgres",
        300,
        "while central-2 was cut off from the database",
        6,
    );
    docker::docker_ok(&["network", "connect", &store, "central-2"]);
    // The agencies' traffic to the third cut while it keeps the database.
    let agencies = project.network("lottery");
    docker::docker_ok(&["network", "disconnect", &agencies, "central-3"]);
    wait_for_more_rows(
        "postgres",
        300,
        "while central-3 was cut off from its agencies",
        6,
    );
    docker::docker_ok(&[
        "network",
        "connect",
        "--alias",
        "central-3",
        &agencies,
        "central-3",
    ]);

    agencies_exit_0_with_their_winners(&expect, RUN);
    assert_eq!(
        bets_table("postgres"),
        expect.rows,
        "the bets table against the input"
    );
    assert_eq!(count("postgres", "draw"), 1);
    let draws: usize = (1..=3)
        .map(|c| {
            logs(&format!("central-{c}"))
                .matches("action: sorteo | result: success")
                .count()
        })
        .sum();
    assert_eq!(draws, 1, "sorteo lines across the centrals");
    operators_commands_on_postgres("central-2", &expect);
    drop(project);
}

/// `lottery status`, `health`, `verify` and `winners` as an operator runs
/// them with `docker compose exec` in a central of the PostgreSQL layout:
/// the tools that read the database get its URL with the password from the
/// same secret the central's entrypoint reads.
fn operators_commands_on_postgres(central: &str, expect: &Expected) {
    let (code, out) = exec(
        central,
        &["lottery", "health", "--address", "127.0.0.1:12345"],
    );
    assert_eq!((code, out.trim()), (0, "ok"));
    let (code, status) = exec(
        central,
        &["lottery", "status", "--address", "127.0.0.1:12345"],
    );
    assert_eq!(code, 0, "{status}");
    for (agency, rows) in &expect.rows {
        let line = format!("{agency:>6}  {:>10}  finished", rows.len());
        assert!(status.contains(&line), "no `{line}` in:\n{status}");
    }
    let agencies = expect.rows.len();
    assert!(
        status.contains(&format!(
            "{agencies} of {agencies} agencies finished; draw done"
        )),
        "{status}"
    );
    let with_database = |tool: &str| {
        exec(
            central,
            &[
                "sh",
                "-c",
                &format!(
                    "exec lottery {tool} --config /etc/lottery/config.toml \
                     --storage \"$SERVER_STORAGE?password=$(cat /run/secrets/postgres)\""
                ),
            ],
        )
    };
    let (code, out) = with_database("verify");
    assert_eq!(code, 0, "lottery verify: {out}");
    let (code, out) = with_database("winners");
    assert_eq!(code, 0, "lottery winners: {out}");
    let table: BTreeMap<u32, Vec<String>> = parse_winners(&out);
    assert_eq!(table, expect.winners);
}

/// A primary and its synchronous standby in two containers, one central on
/// both hosts (`target_session_attrs=read-write`) and three agencies.
fn ha_compose() -> String {
    let pg = |name: &str, extra: &str, depends: &str| {
        format!(
            "
  {name}:
    container_name: {name}
    image: {image}
    environment:
      - POSTGRES_USER=lottery
      - POSTGRES_DB=lottery
      - POSTGRES_PASSWORD_FILE=/run/secrets/postgres{extra}
    secrets: [postgres]
    healthcheck:
      test: [\"CMD\", \"pg_isready\", \"-U\", \"lottery\", \"-d\", \"lottery\"]
      interval: 1s
      timeout: 3s
      retries: 60
    networks: [store]{depends}
",
            image = docker::POSTGRES_IMAGE
        )
    };
    let mut out = String::from("services:");
    out += &pg("pg-primary", "\n      - POSTGRES_SYNC_STANDBY=standby", "");
    out += &pg(
        "pg-standby",
        "\n      - POSTGRES_PRIMARY=pg-primary\n      - POSTGRES_STANDBY_NAME=standby",
        "\n    depends_on:\n      pg-primary:\n        condition: service_healthy",
    );
    out += "
  central:
    container_name: central
    image: lottery:latest
    entrypoint:
      - /bin/sh
      - -c
      - 'set -e; export SERVER_STORAGE=\"$${SERVER_STORAGE}&password=$$(cat /run/secrets/postgres)\"; exec lottery \"$$@\"'
      - central
    command: [\"server\"]
    environment:
      - LOTTERY_CONFIG=/etc/lottery/config.toml
      - SERVER_AGENCIES=3
      - SERVER_STORAGE=postgres://lottery@pg-primary:5432,pg-standby:5432/lottery?target_session_attrs=read-write
      - SERVER_SECRETS_FILE=/run/secrets/central
    secrets: [central, postgres]
    volumes:
      - ./config.toml:/etc/lottery/config.toml:ro
    depends_on:
      pg-standby:
        condition: service_healthy
    healthcheck:
      test: [\"CMD\", \"lottery\", \"health\", \"--address\", \"127.0.0.1:12345\"]
      interval: 1s
      timeout: 3s
      retries: 60
    networks: [lottery, store]
";
    for id in 1..=3 {
        out += &format!(
            "
  client{id}:
    container_name: client{id}
    image: lottery:latest
    command: [\"agency\"]
    environment:
      - LOTTERY_CONFIG=/etc/lottery/config.toml
      - CLI_ID={id}
      - CLI_SERVER_ADDRESS=central:12345
      - CLI_DATA_FILE=/data/agency-{{id}}.csv
      - CLI_SECRET_FILE=/run/secrets/agency-{id}
    secrets: [agency-{id}]
    volumes:
      - ./config.toml:/etc/lottery/config.toml:ro
      - ./.data:/data:ro
    depends_on:
      central:
        condition: service_healthy
    networks: [lottery]
"
        );
    }
    out += "
networks:
  lottery:
  store:

secrets:
  central:
    file: ./secrets/central.toml
  postgres:
    file: ./secrets/postgres.secret
  agency-1:
    file: ./secrets/agency-1.secret
  agency-2:
    file: ./secrets/agency-2.secret
  agency-3:
    file: ./secrets/agency-3.secret
";
    out
}

/// `psql -At -c sql` as the database's owner in `container`.
fn sql(container: &str, query: &str) -> String {
    let (code, text) = exec(
        container,
        &["psql", "-U", "lottery", "-d", "lottery", "-At", "-c", query],
    );
    assert_eq!(code, 0, "{container}: {query}: {text}");
    text.trim().to_string()
}

#[test]
fn the_standby_container_promoted_after_the_primary_s_is_killed_loses_no_acknowledged_bet() {
    let test =
        "the_standby_container_promoted_after_the_primary_s_is_killed_loses_no_acknowledged_bet";
    let Some(engine) = Engine::start_or_skip(test) else {
        return;
    };
    // The same secrets as the generated PostgreSQL layout, its file unused.
    let (dir, expect) = postgres_deployment(1, 3, 4000, "unused.yaml");
    std::fs::write(dir.path().join("compose.yaml"), ha_compose()).unwrap();
    let project = engine.project(dir.path(), "ha");
    project.compose_ok(&["up", "-d"]);

    wait_for_batches("central", 30);
    assert_eq!(
        sql(
            "pg-primary",
            "SELECT application_name, sync_state FROM pg_stat_replication"
        ),
        "standby|sync"
    );
    docker::docker_ok(&["kill", "pg-primary"]);
    // What the central acknowledged: every batch it logged as stored, all of
    // them committed on the primary and flushed by the standby before the
    // kill (nothing can commit after it, until the promotion).
    let acknowledged: u64 = logs("central")
        .lines()
        .filter(|l| l.contains("action: apuesta_recibida | result: success"))
        .filter_map(|l| l.rsplit("cantidad: ").next()?.trim().parse::<u64>().ok())
        .sum();
    // The standby has applied all it received, then holds at least that.
    let start = Instant::now();
    while sql(
        "pg-standby",
        "SELECT pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()",
    ) != "t"
    {
        assert!(
            start.elapsed() < RUN,
            "the standby never caught up with what it received"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let held: u64 = sql("pg-standby", "SELECT count(*) FROM bets")
        .parse()
        .unwrap();
    assert!(
        held >= acknowledged,
        "the standby holds {held} bets, the central acknowledged {acknowledged}"
    );
    let (code, out) = exec(
        "pg-standby",
        &[
            "runuser",
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "promote",
            "-w",
            "-D",
            "/var/lib/postgresql/data",
        ],
    );
    assert_eq!(code, 0, "promoting the standby: {out}");

    agencies_exit_0_with_their_winners(&expect, RUN);
    assert_eq!(
        bets_table("pg-standby"),
        expect.rows,
        "the new primary's bets table"
    );
    assert_eq!(count("pg-standby", "draw"), 1);
    drop(project);
}
