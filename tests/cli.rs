//! The command line as operators meet it: configuration errors, bad data,
//! exit codes, and the demo.

mod common;

use std::process::Output;

use common::*;

fn run(cmd: &mut std::process::Command) -> Output {
    cmd.output().expect("run lottery")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn invalid_config_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[server]\nport = \"twelve\"\n").unwrap();
    let out = run(lottery().arg("server").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("port"), "{}", text(&out));

    std::fs::write(&path, "[server]\nagencies = 0\n").unwrap();
    let out = run(lottery().arg("server").env("LOTTERY_CONFIG", &path));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("server.agencies"), "{}", text(&out));

    std::fs::write(&path, "[agency]\nbatch_size = 3\n").unwrap();
    let out = run(lottery().arg("agency").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("batch_size"), "{}", text(&out));
}

#[test]
fn unreadable_config_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where the file should be cannot be read as one.
    let out = run(lottery().arg("server").arg("--config").arg(dir.path()));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("cannot read config file"),
        "{}",
        text(&out)
    );
}

#[test]
fn bad_environment_value_exits_2_naming_the_variable() {
    let out = run(lottery().arg("server").env("SERVER_PORT", "99999"));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("SERVER_PORT"), "{}", text(&out));
    let out = run(lottery().arg("agency").env("CLI_LOG_LEVEL", "LOUD"));
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).contains("CLI_LOG_LEVEL"), "{}", text(&out));
}

#[test]
fn out_of_range_values_exit_2_naming_key_and_source() {
    let out = run(lottery().args(["agency", "--window", "65"]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains("agency.window") && t.contains("--window"), "{t}");
    assert!(t.contains("1..=64"), "{t}");
    let out = run(lottery()
        .arg("server")
        .env("SERVER_WINNING_NUMBER", "10000"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let t = text(&out);
    assert!(
        t.contains("server.winning_number") && t.contains("SERVER_WINNING_NUMBER"),
        "{t}"
    );
}

#[test]
fn flags_beat_environment_which_beats_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        "[agency]\nid = 4\nbatch_max_amount = 10\nserver_address = \"127.0.0.1:1\"\n",
    )
    .unwrap();
    // No data file: the agency stops at once, after logging its config.
    let out = run(lottery()
        .arg("agency")
        .arg("--config")
        .arg(&path)
        .env("CLI_BATCH_MAXAMOUNT", "20")
        .env("CLI_DATA_FILE", dir.path().join("missing-{id}.csv"))
        .args(["--id", "6"]));
    let t = text(&out);
    assert!(
        t.contains("action: config | result: success | client_id: 6 | server_address: 127.0.0.1:1 | batch_max_amount: 20 | log_level: INFO"),
        "{t}"
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(t.contains("missing-6.csv"), "{t}");
}

#[test]
fn malformed_data_line_stops_the_agency_naming_file_and_line() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    let server = Server::start(&storage, 1, 7574);
    let data = work.path().join("agency-1.csv");
    let mut text_in = ana_bets(100, |i| i, "\r\n");
    text_in.push_str("Bob,Lee,12345,1999-02-30,6\r\n");
    std::fs::write(&data, text_in).unwrap();
    let agency = start_agency(1, &server.address(), &data, &work.path().join("w.txt"));
    let status = agency.wait_exit(PATIENCE);
    assert_eq!(status.code(), Some(1));
    let err = agency.stderr();
    assert!(
        err.contains("agency-1.csv, line 101: NACIMIENTO \"1999-02-30\": not a real calendar date"),
        "{err}"
    );
    // The batches before the bad line were stored and acknowledged; nothing
    // after it was sent.
    let stored = stored(&storage);
    assert_eq!(stored[&1].len(), 100);
}

#[test]
fn demo_runs_on_generated_data_and_prints_the_table() {
    let work = tempfile::tempdir().unwrap();
    let out = run(lottery()
        .arg("demo")
        .args([
            "--agencies",
            "3",
            "--bets-per-agency",
            "3000",
            "--winner-share",
            "0.01",
        ])
        .arg("--work-dir")
        .arg(work.path()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("agency        bets  winners  winning documents"),
        "{t}"
    );
    assert!(t.contains("3 agencies stored 9000 bets in"), "{t}");
    assert!(t.contains("bets/s"), "{t}");
    // The table agrees with the data and the bets file.
    let expected = expected(&work.path().join("data"), 3, 7574);
    for (agency, winners) in &expected.winners {
        let row = format!("{agency:>6}  {:>10}  {:>7}", 3000, winners.len());
        assert!(t.contains(&row), "missing {row:?} in\n{t}");
    }
    assert_eq!(stored(&work.path().join("bets.csv")), expected.rows);
    assert!(!t.contains("result: fail"), "{t}");
}

#[test]
fn the_demo_runs_authenticated() {
    let out = run(lottery().arg("demo").args([
        "--agencies",
        "2",
        "--bets-per-agency",
        "200",
        "--log-level",
        "INFO",
    ]));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // Its central requires a secret of every agency, and every agency
    // presented its own: none was refused, all got their winners.
    assert!(
        t.contains("INFO     action: auth | result: success | state: required | agencies: 2"),
        "{t}"
    );
    assert!(!t.contains("state: off"), "{t}");
    assert!(!t.contains("result: fail"), "{t}");
    assert_eq!(t.matches("action: consulta_ganadores").count(), 4, "{t}");
}

#[test]
fn a_central_without_secrets_warns_at_start_but_does_not_fail() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::spawn({
        let mut cmd = lottery();
        cmd.arg("server")
            .env("SERVER_PORT", "0")
            .env("SERVER_AGENCIES", "3")
            .env("SERVER_STORAGE", work.path().join("bets.csv"));
        cmd
    });
    // Logged before the `listen` line the start waited for.
    let line = server
        .proc
        .lines()
        .into_iter()
        .find(|l| l.contains("action: auth |"))
        .expect("an auth line at start");
    assert!(
        line.contains(
            "WARN     action: auth | result: success | state: off | agencies_without_secret: 1,2,3"
        ),
        "{line}"
    );
    assert!(line.contains("read their winners"), "{line}");
    server.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(server.proc.wait_exit(STEP).success());
    assert!(!server.proc.output().contains("result: fail"));
}

#[test]
fn an_agency_without_a_secret_among_others_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(&secrets, "1 = \"uno\"\n3 = \"tres\"\n").unwrap();
    let out = run(lottery()
        .arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_AGENCIES", "3")
        .env("SERVER_STORAGE", dir.path().join("bets.csv"))
        .env("SERVER_SECRETS_FILE", &secrets));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(
        t.contains("agency 2 has no secret while other agencies have one"),
        "{t}"
    );
    assert!(!dir.path().join("bets.csv").exists(), "nothing started");
}

#[test]
fn gen_data_writes_the_requested_files() {
    let work = tempfile::tempdir().unwrap();
    let out = run(lottery()
        .arg("gen-data")
        .arg("--out")
        .arg(work.path())
        .args(["--agencies", "2", "--bets-per-agency", "50", "--crlf"]));
    assert!(out.status.success(), "{}", text(&out));
    for i in 1..=2 {
        let body = std::fs::read_to_string(data_file(work.path(), i)).unwrap();
        assert_eq!(body.matches("\r\n").count(), 50);
    }
    let out = run(lottery()
        .arg("gen-data")
        .arg("--out")
        .arg(work.path())
        .args(["--winner-share", "2"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("winner share 2 is not within 0..=1"),
        "{}",
        text(&out)
    );
}

#[test]
fn bench_with_admin_scrapes_each_central_s_metrics_during_the_load() {
    let work = tempfile::tempdir().unwrap();
    let out = run(lottery()
        .args([
            "bench",
            "--agencies",
            "2",
            "--bets-per-agency",
            "2000",
            "--admin",
        ])
        .arg("--work-dir")
        .arg(work.path()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let scrapes: u64 = t
        .lines()
        .find_map(|l| l.strip_prefix("admin listener on: "))
        .and_then(|rest| rest.strip_suffix(" scrapes of /metrics answered"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no admin line: {t}"));
    assert!(scrapes >= 1, "{t}");
}

#[test]
fn bench_runs_the_load_and_reports_it() {
    let work = tempfile::tempdir().unwrap();
    let out = run(lottery()
        .args([
            "bench",
            "--agencies",
            "2",
            "--bets-per-agency",
            "2000",
            "--window",
            "4",
        ])
        .arg("--work-dir")
        .arg(work.path()));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("2 agencies x 2000 bets, window 4, durable acknowledgements (fdatasync)"),
        "{t}"
    );
    assert!(t.contains("4000 bets in "), "{t}");
    assert!(t.contains("batch acknowledgement latency: p50 "), "{t}");
    assert!(t.contains("server peak RSS: "), "{t}");
    assert!(t.contains("CPU: central "), "{t}");
    assert!(t.contains(" µs per bet in all)"), "{t}");
    // The same CPU per bet, split into the processes' own code and the
    // kernel's work for them: four figures, each a number of µs.
    let split = t
        .lines()
        .find_map(|l| l.strip_prefix("CPU per bet: central "))
        .unwrap_or_else(|| panic!("no CPU split line: {t}"));
    let figures: Vec<f64> = split.split(' ').filter_map(|w| w.parse().ok()).collect();
    assert_eq!(figures.len(), 4, "{t}");
    // The draw's time comes from the server's own `sorteo` line.
    let draw = t
        .lines()
        .find_map(|l| l.strip_prefix("draw: "))
        .unwrap_or_else(|| panic!("no draw line: {t}"));
    assert!(draw.ends_with(" ms"), "{t}");
    // A healthy run needs one session per agency: a reconnect means a
    // session ended early, which the report must not hide.
    assert!(
        t.contains("reconnects: 0, refused connections (retried): "),
        "an agency reconnected in a healthy run:\n{t}"
    );
    // The load was real: the server stored every generated bet.
    let expected = expected(&work.path().join("data"), 2, 7574);
    assert_eq!(stored(&work.path().join("bets.csv")), expected.rows);
}

#[test]
fn an_agency_gives_up_after_its_reconnect_timeout() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, "Ana,Pérez,30904465,1999-03-17,7574\n").unwrap();
    // A port with nothing listening, held so that no server can be given
    // it meanwhile (this agency 1 would then speak to that server).
    let port = HeldPort::new();
    let out = run(lottery()
        .arg("agency")
        .env("CLI_SERVER_ADDRESS", port.address())
        .env("CLI_DATA_FILE", &data)
        .env("CLI_RECONNECT_TIMEOUT", "1"));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("action: connect | result: in_progress"), "{t}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err,
        format!(
            "lottery: error: gave up after 1s without progress; last error: cannot connect to \
             {}: Connection refused (os error 111); nothing listens there: is the central \
             running, and on this port? (its `listen` log line shows its address)\n",
            port.address()
        )
    );
    assert!(!t.contains("action: connect | result: fail"), "{t}");
}

/// `lottery agency` on a data file that does not exist: it stops at once.
fn agency_without_its_data_file(dir: &std::path::Path) -> (std::process::Command, String) {
    let missing = dir.join("agency-1.csv");
    let mut cmd = lottery();
    cmd.arg("agency").env("CLI_DATA_FILE", &missing);
    let message = format!(
        "cannot open data file {}: No such file or directory (os error 2)",
        missing.display()
    );
    (cmd, message)
}

#[test]
fn a_fatal_error_is_said_once_on_each_stream_without_repeating_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, message) = agency_without_its_data_file(dir.path());
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // Log tooling reads stdout; a person reads stderr.
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    assert_eq!(
        &last[20..],
        format!("ERROR    action: exit | result: fail | error: {message}"),
        "{stdout}"
    );
    assert_eq!(stdout.matches("cannot open data file").count(), 1);
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!("lottery: error: {message}\n")
    );
}

#[test]
fn a_fatal_error_is_said_once_when_both_streams_go_to_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut cmd, message) = agency_without_its_data_file(dir.path());
    let log = dir.path().join("log.txt");
    let file = std::fs::File::create(&log).unwrap();
    let status = cmd
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(1));
    // `2>&1` into a file or the journal: tooling reads it, so the log line.
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("cannot open data file").count(), 1, "{text}");
    let last = text.lines().last().unwrap();
    assert_eq!(
        &last[20..],
        format!("ERROR    action: exit | result: fail | error: {message}"),
        "{text}"
    );
}

/// Runs `cmd` with a terminal as its stdout and stderr; its exit code and
/// everything it wrote there (line ends as `\n`).
fn run_in_terminal(mut cmd: std::process::Command) -> (Option<i32>, String) {
    use std::io::Read;
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave)
        .spawn()
        .unwrap();
    // Only the child holds the terminal now: reading ends (EIO) once it
    // has exited.
    drop(cmd);
    let mut terminal = std::fs::File::from(pty.master);
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = terminal.read(&mut chunk) {
        bytes.extend_from_slice(&chunk[..n]);
    }
    let code = child.wait().unwrap().code();
    (
        code,
        String::from_utf8(bytes).unwrap().replace("\r\n", "\n"),
    )
}

/// What a terminal shows of each line of `text`: what the last carriage
/// return or line erase left.
fn shown(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|line| {
            let line = line.replace("\x1b[2K", "");
            line.rsplit('\r')
                .find(|part| !part.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn a_fatal_error_is_said_once_in_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (cmd, message) = agency_without_its_data_file(dir.path());
    let (code, text) = run_in_terminal(cmd);
    assert_eq!(code, Some(1));
    // A person reads a terminal: the plain message, once.
    assert_eq!(text.matches("cannot open data file").count(), 1, "{text}");
    assert!(
        text.ends_with(&format!("\nlottery: error: {message}\n")),
        "{text}"
    );
    assert!(!text.contains("action: exit"), "{text}");
}

#[test]
fn in_a_terminal_log_lines_are_written_around_the_progress_bar() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    let bets = ana_bets(3_000, |i| if i == 0 { 7574 } else { i }, "\n");
    std::fs::write(&data, bets).unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 1, 7574);
    let winners = work.path().join("winners.txt");
    let (code, text) = run_in_terminal(agency_command(1, &server.address(), &data, &winners));
    assert_eq!(code, Some(0), "{text}");
    let shown = shown(&text);
    // Every log line starts a line of its own, none glued to the bar...
    // (config, connect, seal, consulta_ganadores)
    let logged: Vec<&String> = shown.iter().filter(|l| l.contains("action: ")).collect();
    assert_eq!(logged.len(), 4, "{shown:#?}");
    for line in logged {
        assert!(
            line.starts_with("20") && !line.contains("bets  "),
            "{shown:#?}"
        );
    }
    assert!(
        shown[shown.len() - 3]
            .ends_with("consulta_ganadores | result: success | cant_ganadores: 1"),
        "{shown:#?}"
    );
    // ...and the finished bar is left on a line of its own, last.
    assert!(
        shown[shown.len() - 2].contains("3000/3000 bets"),
        "{shown:#?}"
    );
    assert_eq!(shown.last().unwrap(), "", "{shown:#?}");
}

#[test]
fn a_toml_error_keeps_its_lines_so_the_marker_points_at_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "[server]\nport = \"twelve\"\n").unwrap();
    let out = run(lottery().arg("server").arg("--config").arg(&path));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "lottery: configuration error: invalid config file {}: TOML parse error at line 2, \
             column 8\n  |\n2 | port = \"twelve\"\n  |        ^^^^^^^^\ninvalid type: string \
             \"twelve\", expected u16\n",
            path.display()
        )
    );
}

/// The agency's stdout with `config` (or nothing) and `LOTTERY_CONFIG` (or
/// none), run in `dir`; it stops at once, having no data file.
fn agency_config_lines(
    dir: &std::path::Path,
    flag: Option<&std::path::Path>,
    var: Option<&std::path::Path>,
) -> Vec<String> {
    let mut cmd = lottery();
    cmd.current_dir(dir)
        .arg("agency")
        .env_remove("LOTTERY_CONFIG");
    if let Some(path) = flag {
        cmd.arg("--config").arg(path);
    }
    if let Some(path) = var {
        cmd.env("LOTTERY_CONFIG", path);
    }
    let out = run(&mut cmd);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l[20..].to_string())
        .filter(|l| !l.contains("action: exit"))
        .collect()
}

const AGENCY_CONFIG: &str = "INFO     action: config | result: success | client_id: 1 | \
    server_address: 127.0.0.1:12345 | batch_max_amount: 70 | log_level: INFO | data_file: \
    .data/agency-1.csv";

#[test]
fn a_missing_default_config_file_means_defaults_in_silence() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        agency_config_lines(dir.path(), None, None),
        [format!("{AGENCY_CONFIG} | config_file: none")]
    );
}

#[test]
fn the_config_line_names_the_file_read() {
    let dir = tempfile::tempdir().unwrap();
    // The default, ./config.toml, when it is there.
    std::fs::write(dir.path().join("config.toml"), "[log]\nlevel = \"INFO\"\n").unwrap();
    assert_eq!(
        agency_config_lines(dir.path(), None, None),
        [format!("{AGENCY_CONFIG} | config_file: ./config.toml")]
    );
    let named = dir.path().join("named.toml");
    std::fs::write(&named, "").unwrap();
    assert_eq!(
        agency_config_lines(dir.path(), Some(&named), None),
        [format!(
            "{AGENCY_CONFIG} | config_file: {}",
            named.display()
        )]
    );
}

#[test]
fn a_named_config_file_that_is_missing_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo.toml");
    for (flag, var, named_by) in [
        (Some(missing.as_path()), None, "--config"),
        (None, Some(missing.as_path()), "LOTTERY_CONFIG"),
    ] {
        assert_eq!(
            agency_config_lines(dir.path(), flag, var),
            [
                format!(
                    "WARN     action: config_file | result: fail | path: {} | reason: the \
                     configuration file named by {named_by} does not exist; running on \
                     defaults, environment and flags",
                    missing.display()
                ),
                format!("{AGENCY_CONFIG} | config_file: none"),
            ]
        );
    }
}

#[test]
fn the_server_config_line_keeps_the_contract_fields_first_then_the_file() {
    let work = tempfile::tempdir().unwrap();
    let server = Server::start(&work.path().join("bets.csv"), 1, 7574);
    let line = server.proc.lines()[0].clone();
    assert!(
        line.contains(
            " INFO     action: config | result: success | port: 0 | listen_backlog: 5 | \
             logging_level: INFO | agencies: 1 | "
        ),
        "{line}"
    );
    assert!(line.ends_with(" | config_file: /dev/null"), "{line}");
}

#[test]
fn a_setting_s_bounds_are_in_its_help() {
    let out = lottery().args(["agency", "--help"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        help.contains(
            "moves on to the next. (at least 2) [agency.hello_timeout, CLI_HELLO_TIMEOUT]"
        ),
        "{help}"
    );
    assert!(
        help.contains("(1 to 64) [agency.window, CLI_WINDOW]"),
        "{help}"
    );
}

#[test]
fn a_port_in_use_is_named_with_what_to_do() {
    let work = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = lottery()
        .args(["server", "--port", &port.to_string(), "--storage"])
        .arg(work.path().join("bets.csv"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "cannot listen on port {port}: Address already in use"
        )),
        "{err}"
    );
    assert!(
        err.contains("another server.port (SERVER_PORT, --port)"),
        "{err}"
    );
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the OS error once: {err}"
    );
    assert!(
        !work.path().join("bets.csv").exists(),
        "no bets file is created by a central that cannot listen"
    );
}

#[test]
fn an_unreadable_secret_file_is_a_configuration_error_naming_its_setting() {
    let work = tempfile::tempdir().unwrap();
    let missing = work.path().join("agency-1.secret");
    let out = lottery()
        .arg("agency")
        .env("CLI_SECRET_FILE", &missing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "lottery: configuration error: cannot read {}, named by agency.secret_file \
             (CLI_SECRET_FILE): No such file or directory (os error 2)\n",
            missing.display()
        )
    );
    let out = lottery()
        .arg("server")
        .env("SERVER_SECRETS_FILE", &missing)
        .env("SERVER_STORAGE", work.path().join("bets.csv"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("named by server.secrets_file (SERVER_SECRETS_FILE)"),
        "{out:?}"
    );
}

/// Operator tools pointed at a round that is not there to act on say so
/// once, in their own words: `verify` on an undrawn round is not a
/// mismatch, and `new-round` on a path holding nothing (a mistyped
/// `--storage`) is not "already a new round".
#[test]
fn verify_and_new_round_say_what_is_missing() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("bets.csv");
    std::fs::write(&storage, "").unwrap();
    let out = run(lottery()
        .arg("verify")
        .arg("--storage")
        .arg(&storage)
        .env("LOTTERY_CONFIG", "/dev/null"));
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains("this round is not drawn, so there is nothing to verify"),
        "{t}"
    );
    assert!(
        t.contains("the round is not drawn yet: there is no draw record to verify"),
        "{t}"
    );
    assert!(!t.contains("does not match"), "{t}");

    let typo = work.path().join("bets.cvs");
    let out = run(lottery()
        .arg("new-round")
        .arg("--storage")
        .arg(&typo)
        .env("LOTTERY_CONFIG", "/dev/null"));
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(
        t.contains(&format!(
            "bets file {}: no bets file, no draw record and no rounds ledger",
            typo.display()
        )) && t.contains("check server.storage"),
        "{t}"
    );
    assert!(!typo.exists(), "new-round made the file it was pointed at");
}
