//! Operator tools against a real server: `lottery health`, `lottery status`,
//! `lottery winners`, JSON logs, and the generated compose files.

mod common;

use std::time::Duration;

use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

fn run(args: &[&str]) -> std::process::Output {
    lottery().args(args).output().unwrap()
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn health_status_and_winners_follow_the_lottery() {
    let data = gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: 1_500,
        seed: 9,
        winner_share: 0.01,
        ..GenOptions::default()
    });
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let record = work.path().join("bets.draw.toml");
    let server = Server::start(&storage, 2, 7574);
    let address = server.address();

    let health = run(&["health", "--address", &address]);
    assert!(health.status.success(), "{health:?}");
    assert_eq!(stdout(&health), "ok\n");

    // Before anything: every agency waiting, no draw, no winners table.
    let status = run(&["status", "--address", &address]);
    assert!(status.status.success());
    assert_eq!(
        stdout(&status),
        "agency   bets held  state\n     1           0  waiting\n     2           0  waiting\n total           0\nsales open\n0 of 2 agencies finished; draw pending\n"
    );
    let none = run(&["winners", "--record", record.to_str().unwrap()]);
    assert_eq!(none.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&none.stderr).contains("the draw has not happened yet"));
    // The same from the bets file, the record found beside it.
    let none = run(&["winners", "--storage", storage.to_str().unwrap()]);
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    let refusal = format!(
        "no draw record at {}: the draw has not happened yet",
        record.display()
    );
    assert!(
        String::from_utf8_lossy(&none.stderr).contains(&refusal),
        "{none:?}"
    );

    // Agency 1 uploads everything and waits for the draw.
    let one = start_agency(
        1,
        &address,
        &data_file(data.path(), 1),
        &work.path().join("w1.txt"),
    );
    server
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");
    let status = stdout(&run(&["status", "--address", &address]));
    assert!(
        status.contains("     1        1500  finished\n"),
        "{status}"
    );
    assert!(status.contains("     2           0  waiting\n"), "{status}");
    assert!(
        status.contains("1 of 2 agencies finished; draw pending"),
        "{status}"
    );

    let two = start_agency(
        2,
        &address,
        &data_file(data.path(), 2),
        &work.path().join("w2.txt"),
    );
    assert!(one.wait_exit(PATIENCE).success());
    assert!(two.wait_exit(PATIENCE).success());
    let status = stdout(&run(&["status", "--address", &address]));
    assert!(
        status.contains(" total        3000\n2 of 2 agencies finished; draw done"),
        "{status}"
    );

    // The winners table, from the record, agrees with the input.
    let expected = expected(data.path(), 2, 7574);
    let table = run(&["winners", "--record", record.to_str().unwrap()]);
    assert!(table.status.success());
    let table = stdout(&table);
    assert!(
        table.contains("(winning number 7574), 3000 bets"),
        "{table}"
    );
    for agency in [1u32, 2] {
        let winners = &expected.winners[&agency];
        let row = format!(
            "{agency:>6}  {:>10}  {:>7}  {}",
            1500,
            winners.len(),
            winners.join(", ")
        );
        assert!(table.contains(&row), "missing {row:?} in\n{table}");
    }

    // The whole table, exactly, whether the record is named or found
    // beside the bets file.
    let drawn: toml::Table = toml::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let want = expected_winners_table(&expected, 2, 7574, drawn["drawn_at"].as_str().unwrap());
    for args in [
        ["winners", "--record", record.to_str().unwrap()],
        ["winners", "--storage", storage.to_str().unwrap()],
    ] {
        let table = run(&args);
        assert!(table.status.success(), "{args:?}: {table:?}");
        assert_eq!(stdout(&table), want, "{args:?}");
    }

    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let down = run(&["health", "--address", &address, "--timeout", "1"]);
    assert_eq!(down.status.code(), Some(1));
}

#[test]
fn json_logs_carry_the_same_events() {
    let work = tempfile::tempdir().unwrap();
    let mut cmd = lottery();
    cmd.args(["server", "--log-format", "json"])
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "1")
        .env("SERVER_STORAGE", work.path().join("bets.csv"));
    let server = Proc::spawn(cmd);
    let listen = server.wait_for("\"action\":\"listen\"");
    let listen: serde_json::Value = serde_json::from_str(&listen).unwrap();
    assert_eq!(listen["result"], "success");
    assert_eq!(listen["level"], "INFO");
    let address = listen["address"]
        .as_str()
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");

    let data = work.path().join("agency-1.csv");
    std::fs::write(
        &data,
        "Ana,Pérez,30904465,1999-03-17,7574\nBob,Lee,2,1999-03-17,1\n",
    )
    .unwrap();
    let mut cmd = agency_command(1, &address, &data, &work.path().join("w.txt"));
    cmd.env("LOG_FORMAT", "json");
    let agency = Proc::spawn(cmd);
    assert!(agency.wait_exit(PATIENCE).success());
    let lines: Vec<serde_json::Value> = agency
        .lines()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let config = lines.iter().find(|v| v["action"] == "config").unwrap();
    assert_eq!(config["client_id"], 1);
    let winners = lines
        .iter()
        .find(|v| v["action"] == "consulta_ganadores")
        .unwrap();
    assert_eq!(winners["result"], "success");
    assert_eq!(winners["cant_ganadores"], 1);

    let stored = server.wait_for("\"action\":\"apuesta_recibida\"");
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    assert_eq!(stored["cantidad"], 2);
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
    for line in server.lines() {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_ne!(v["result"], "fail", "{line}");
    }
    assert!(server.output().contains("\"action\":\"shutdown\""));
}

#[test]
fn the_committed_compose_file_is_the_generated_one() {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/compose.yaml")).unwrap();
    assert_eq!(
        committed,
        lottery::tools::compose::render(5),
        "run `make compose` and commit"
    );
}

#[test]
fn a_generated_compose_file_has_everything_for_n_agencies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compose-7.yaml");
    let out = run(&[
        "compose",
        "--agencies",
        "7",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let services = doc["services"].as_mapping().unwrap();
    let mut names: Vec<String> = services
        .keys()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = (1..=7).map(|i| format!("client{i}")).collect();
    want.push("server".into());
    want.sort();
    assert_eq!(names, want);

    let server = &doc["services"]["server"];
    assert_eq!(server["container_name"], "server");
    let env: Vec<&str> = server["environment"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(env.contains(&"SERVER_AGENCIES=7"), "{env:?}");
    // The admin listener, published on the host's loopback only.
    assert!(
        env.contains(&"SERVER_ADMIN_ADDRESS=0.0.0.0:9180"),
        "{env:?}"
    );
    assert_eq!(server["ports"][0], "127.0.0.1::9180");
    let test: Vec<&str> = server["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        test,
        ["CMD", "lottery", "health", "--address", "127.0.0.1:12345"]
    );
    assert!(server["stop_grace_period"].as_str().is_some());
    let volumes: Vec<&str> = server["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(volumes.contains(&"bets:/var/lib/lottery/data"));
    assert!(volumes.iter().any(|v| v.starts_with("./config.toml:")));
    assert!(doc["volumes"].as_mapping().unwrap().contains_key("bets"));

    // Authenticated: the central reads every agency's secret and the
    // operator's from its own secret, mounted read-only (compose secrets
    // are), and nothing secret is written into the compose file itself.
    assert!(
        env.contains(&"SERVER_SECRETS_FILE=/run/secrets/central"),
        "{env:?}"
    );
    assert_eq!(server["secrets"][0], "central");
    assert_eq!(doc["secrets"]["central"]["file"], "./secrets/central.toml");
    let secrets_dir = dir.path().join("secrets");
    let central: std::collections::BTreeMap<String, String> =
        toml::from_str(&std::fs::read_to_string(secrets_dir.join("central.toml")).unwrap())
            .unwrap();
    assert_eq!(central.len(), 8, "7 agencies and the operator: {central:?}");
    assert!(central["operator"].len() >= 32);
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in central.values() {
        assert!(
            !text.contains(secret.as_str()),
            "a secret in the compose file"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secrets_dir)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the secrets directory is private");

    for i in 1..=7 {
        let client = &doc["services"][format!("client{i}").as_str()];
        // Its own secret only, from the file the central's agrees with.
        let name = format!("agency-{i}");
        assert_eq!(client["secrets"].as_sequence().unwrap().len(), 1);
        assert_eq!(client["secrets"][0], name.as_str());
        assert_eq!(
            doc["secrets"][name.as_str()]["file"],
            format!("./secrets/agency-{i}.secret").as_str()
        );
        let own = std::fs::read_to_string(secrets_dir.join(format!("agency-{i}.secret"))).unwrap();
        assert_eq!(own.trim(), central[&i.to_string()]);
        assert_eq!(client["container_name"], format!("client{i}").as_str());
        assert_eq!(
            client["depends_on"]["server"]["condition"],
            "service_healthy"
        );
        let env: Vec<&str> = client["environment"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(env.contains(&format!("CLI_ID={i}").as_str()), "{env:?}");
        assert!(env.contains(&"CLI_SERVER_ADDRESS=server:12345"));
        let secret_file = format!("CLI_SECRET_FILE=/run/secrets/agency-{i}");
        assert!(env.contains(&secret_file.as_str()), "{env:?}");
        let volumes: Vec<&str> = client["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(volumes.contains(&"./.data:/data:ro"), "{volumes:?}");
        assert!(client["stop_grace_period"].as_str().is_some());
    }
}

#[test]
fn regenerating_the_compose_file_keeps_the_secrets_and_adds_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compose.yaml");
    let compose = |n: &str| {
        let out = run(&["compose", "--agencies", n, "--out", path.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
        let central = dir.path().join("secrets/central.toml");
        toml::from_str::<std::collections::BTreeMap<String, String>>(
            &std::fs::read_to_string(central).unwrap(),
        )
        .unwrap()
    };
    let two = compose("2");
    let three = compose("3");
    assert_eq!(two["1"], three["1"], "a running agency keeps its secret");
    assert_eq!(two["operator"], three["operator"]);
    assert_eq!(three.len(), 4);
    assert!(three.values().all(|s| s.len() == 64), "{three:?}");
    assert_ne!(three["1"], three["2"]);
    // `lottery secrets` (the by-hand run's) is the same directory's maker.
    let dir_arg = dir.path().join("secrets");
    let out = run(&[
        "secrets",
        "--agencies",
        "3",
        "--dir",
        dir_arg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("central.toml: the central's (SERVER_SECRETS_FILE)"));
    let again: std::collections::BTreeMap<String, String> =
        toml::from_str(&std::fs::read_to_string(dir_arg.join("central.toml")).unwrap()).unwrap();
    assert_eq!(again, three);
}

#[test]
fn the_secrets_are_out_of_other_users_reach_and_readable_in_containers_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets).unwrap();
    // A folder anyone could enter, and a secret kept from an earlier run
    // under `umask 077`.
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o755)).unwrap();
    let kept = secrets.join("agency-1.secret");
    std::fs::write(&kept, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 077; exec {} secrets --agencies 2 --dir \"$1\"",
            env!("CARGO_BIN_EXE_lottery")
        ))
        .arg("sh")
        .arg(&secrets)
        .env("LOTTERY_CONFIG", "/dev/null")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // No other user of this machine can reach a file in the folder...
    let mode = std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the secrets folder is {mode:o}");
    // ...and each file can be read by the containers' user, which is not
    // its owner (compose mounts it as it is).
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&secrets).unwrap() {
        let entry = entry.unwrap();
        let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
        let name = entry.file_name().to_string_lossy().to_string();
        assert_eq!(mode, 0o644, "{name} is {mode:o}");
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        [
            "agency-1.secret",
            "agency-2.secret",
            "central.toml",
            "operator.secret"
        ]
    );
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "0123456789abcdef0123456789abcdef\n",
        "the kept secret is unchanged"
    );
}

/// The strings of a YAML sequence.
fn strings(v: &serde_yaml::Value) -> Vec<&str> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a sequence: {v:?}"))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[test]
fn a_postgres_compose_file_spreads_agencies_over_centrals_sharing_one_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compose-pg.yaml");
    let compose = || {
        let out = run(&[
            "compose",
            "--postgres",
            "--centrals",
            "3",
            "--agencies",
            "5",
            "--out",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{out:?}");
        std::fs::read_to_string(dir.path().join("secrets/postgres.secret")).unwrap()
    };
    let password = compose();
    let text = std::fs::read_to_string(&path).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut names: Vec<&str> = doc["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "central-1",
            "central-2",
            "central-3",
            "client1",
            "client2",
            "client3",
            "client4",
            "client5",
            "postgres"
        ]
    );

    // The database: its data on a named volume, healthy once it accepts
    // connections, its password from a secret file.
    let pg = &doc["services"]["postgres"];
    // The official image unless LOTTERY_POSTGRES_IMAGE names another (the
    // container tests' Debian-built one).
    assert_eq!(pg["image"], "${LOTTERY_POSTGRES_IMAGE:-postgres:15}");
    assert_eq!(
        strings(&pg["volumes"]),
        ["postgres:/var/lib/postgresql/data"]
    );
    assert!(doc["volumes"]
        .as_mapping()
        .unwrap()
        .contains_key("postgres"));
    assert_eq!(
        strings(&pg["healthcheck"]["test"]),
        ["CMD", "pg_isready", "-U", "lottery", "-d", "lottery"]
    );
    let env = strings(&pg["environment"]);
    assert!(
        env.contains(&"POSTGRES_PASSWORD_FILE=/run/secrets/postgres"),
        "{env:?}"
    );
    assert_eq!(strings(&pg["secrets"]), ["postgres"]);
    assert_eq!(
        doc["secrets"]["postgres"]["file"],
        "./secrets/postgres.secret"
    );
    // Only the centrals share its network.
    assert_eq!(strings(&pg["networks"]), ["store"]);

    for c in 1..=3 {
        let name = format!("central-{c}");
        let central = &doc["services"][name.as_str()];
        assert_eq!(central["container_name"], name.as_str());
        assert_eq!(
            central["depends_on"]["postgres"]["condition"],
            "service_healthy"
        );
        assert_eq!(central["ports"][0], "127.0.0.1::9180");
        let env = strings(&central["environment"]);
        for want in [
            "SERVER_STORAGE=postgres://lottery@postgres:5432/lottery",
            "SERVER_AGENCIES=5",
            "SERVER_PORT=12345",
            "SERVER_SECRETS_FILE=/run/secrets/central",
            "SERVER_ADMIN_ADDRESS=0.0.0.0:9180",
        ] {
            assert!(env.contains(&want), "{name}: {env:?}");
        }
        assert_eq!(strings(&central["secrets"]), ["central", "postgres"]);
        assert_eq!(
            strings(&central["healthcheck"]["test"]),
            ["CMD", "lottery", "health", "--address", "127.0.0.1:12345"]
        );
        // Nothing kept on the central: the database holds it all.
        assert_eq!(
            strings(&central["volumes"]),
            ["./config.toml:/etc/lottery/config.toml:ro"]
        );
        assert_eq!(strings(&central["networks"]), ["lottery", "store"]);
        assert_eq!(strings(&central["command"]), ["server"]);
    }

    // Agency i starts at central ((i-1) mod 3)+1 and goes round.
    let order = [
        "central-1:12345,central-2:12345,central-3:12345",
        "central-2:12345,central-3:12345,central-1:12345",
        "central-3:12345,central-1:12345,central-2:12345",
        "central-1:12345,central-2:12345,central-3:12345",
        "central-2:12345,central-3:12345,central-1:12345",
    ];
    for (i, addresses) in (1..=5).zip(order) {
        let client = &doc["services"][format!("client{i}").as_str()];
        let env = strings(&client["environment"]);
        let want = format!("CLI_SERVER_ADDRESS={addresses}");
        assert!(env.contains(&want.as_str()), "client{i}: {env:?}");
        let first = format!("central-{}", (i - 1) % 3 + 1);
        assert_eq!(
            client["depends_on"][first.as_str()]["condition"],
            "service_healthy",
            "client{i}"
        );
        assert_eq!(strings(&client["networks"]), ["lottery"], "client{i}");
        assert_eq!(
            strings(&client["secrets"]),
            [format!("agency-{i}").as_str()]
        );
    }

    // No secret in the YAML: not the database's password, nor any agency's.
    let secrets = dir.path().join("secrets");
    let central: std::collections::BTreeMap<String, String> =
        toml::from_str(&std::fs::read_to_string(secrets.join("central.toml")).unwrap()).unwrap();
    assert!(password.trim().len() >= 32);
    for secret in central.values().chain([&password.trim().to_string()]) {
        assert!(
            !text.contains(secret.as_str()),
            "a secret in the compose file"
        );
    }
    // The database was initialised with this password: regenerating keeps it.
    assert_eq!(compose(), password);

    // Each central's entrypoint adds the password to the URL just before it
    // starts the central: run it as compose would (`$$` is a literal `$`),
    // with the secret where it is mounted replaced by the file here and a
    // stand-in `lottery` that shows what it was given.
    let entrypoint = strings(&doc["services"]["central-2"]["entrypoint"]);
    assert_eq!(entrypoint[..2], ["/bin/sh", "-c"]);
    let script = entrypoint[2].replace("$$", "$").replace(
        "/run/secrets/postgres",
        secrets.join("postgres.secret").to_str().unwrap(),
    );
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let stand_in = bin.join("lottery");
    std::fs::write(&stand_in, "#!/bin/sh\necho \"$* $SERVER_STORAGE\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&stand_in, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(entrypoint[0])
        .args(&entrypoint[1..2])
        .arg(&script)
        .args(&entrypoint[3..])
        .arg("server")
        .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
        .env("SERVER_STORAGE", "postgres://lottery@postgres:5432/lottery")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!(
            "server postgres://lottery@postgres:5432/lottery?password={}\n",
            password.trim()
        )
    );
}

#[test]
fn several_centrals_without_postgres_are_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("compose.yaml");
    let out = run(&[
        "compose",
        "--centrals",
        "2",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(
            "error: --centrals above 1 needs --postgres: several centrals must share one \
             database (a bets file belongs to one central)\n"
        ),
        "{err}"
    );
    assert!(!path.exists(), "nothing written");
    // One central is the file layout as before.
    let out = run(&[
        "compose",
        "--centrals",
        "1",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        lottery::tools::compose::render(5)
    );
}

#[test]
fn status_and_health_say_where_they_looked_when_the_central_is_down() {
    // Held, not listening: connecting is refused.
    let port = HeldPort::new();
    let address = port.address();
    for tool in ["status", "health"] {
        let out = run(&[tool, "--address", &address]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!(
                "lottery: error: cannot connect to the central at {address}: Connection refused \
                 (os error 111); nothing listens there: is the central running, and on this \
                 port? (its `listen` log line shows its address); the address is --address, \
                 else the first of agency.server_address (CLI_SERVER_ADDRESS)\n"
            ),
            "lottery {tool}"
        );
    }
}

#[test]
fn status_says_which_central_did_not_answer_in_time() {
    // Listening, never answering: the kernel accepts, nobody reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let out = run(&["status", "--address", &address, "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "lottery: error: the central at {address} did not answer within 1 s: is that the \
             central's address, and is it serving? the address is --address, else the \
             first of agency.server_address (CLI_SERVER_ADDRESS); --timeout waits longer\n"
        )
    );
}
