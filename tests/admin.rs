//! The admin listener of a real central: the probes, the operator's
//! secret, and `/metrics` counted against a run exactly (the database's
//! version of that run is in `tests/postgres/admin.rs`).

mod common;

use std::time::Duration;

use common::admin::{admin_address, admin_line, check_before_and_during, get, metric, round, BETS};
use common::*;
use lottery::tools::gen_data::GenOptions;
use nix::sys::signal::Signal;

fn data() -> tempfile::TempDir {
    gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: BETS,
        seed: 22,
        winning_number: 7574,
        winner_share: 0.02,
        tricky_share: 0.05,
        crlf: false,
    })
}

fn central(dir: &std::path::Path) -> std::process::Command {
    let mut cmd = lottery();
    cmd.arg("server")
        .env("SERVER_PORT", "0")
        .env("SERVER_STORAGE", dir.join("bets.csv"))
        .env("SERVER_WINNING_NUMBER", "7574");
    cmd
}

#[test]
fn metrics_count_a_real_run_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = data();
    let server = round(central(dir.path()), data.path(), |stage, admin| {
        let response = get(admin, "/metrics", None);
        assert_eq!(response.status, 200, "{}", response.body);
        assert!(
            response
                .header("content-type")
                .is_some_and(|t| t.starts_with("application/openmetrics-text")),
            "{:?}",
            response.headers
        );
        assert!(response.body.ends_with("# EOF\n"), "{}", response.body);
        check_before_and_during(stage, &response.body);
    });
    let text = get(&admin_address(&server), "/metrics", None).body;
    // The bets file's writer has no database metrics.
    assert!(!text.contains("lottery_database_"), "{text}");
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
    let log = server.proc.output();
    let closing = log.find("action: close_admin | result: success");
    let shutdown = log.find("action: shutdown | result: success");
    assert!(closing.is_some() && closing < shutdown, "{log}");
}

#[test]
fn probes_answer_without_the_secret_and_pages_ask_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets.toml");
    std::fs::write(
        &secrets,
        "1 = \"0123456789abcdef0123456789abcdef\"\noperator = \"fedcba9876543210fedcba9876543210\"\n",
    )
    .unwrap();
    let mut cmd = central(dir.path());
    cmd.env("SERVER_AGENCIES", "1")
        .env("SERVER_SECRETS_FILE", &secrets)
        .env("SERVER_ADMIN_ADDRESS", "127.0.0.1:0");
    let server = Server::spawn(cmd);
    let admin = admin_address(&server);
    assert!(
        !server.proc.output().contains("WARN"),
        "{}",
        server.proc.output()
    );
    for probe in ["/healthz", "/readyz"] {
        let response = get(&admin, probe, None);
        assert_eq!(response.status, 200, "{probe}: {}", response.body);
    }
    for page in ["/", "/metrics", "/live"] {
        let response = get(&admin, page, None);
        assert_eq!(response.status, 401, "{page}");
        assert!(
            response
                .header("www-authenticate")
                .is_some_and(|v| v.starts_with("Basic")),
            "{page}"
        );
        assert_eq!(
            get(&admin, page, Some("Bearer wrong")).status,
            401,
            "{page}"
        );
        let bearer = get(
            &admin,
            page,
            Some("Bearer fedcba9876543210fedcba9876543210"),
        );
        assert_eq!(bearer.status, 200, "{page}: {}", bearer.body);
    }
    // Basic authentication, any user: "ops:fedcba9876543210fedcba9876543210".
    let basic = get(
        &admin,
        "/metrics",
        Some("Basic b3BzOmZlZGNiYTk4NzY1NDMyMTBmZWRjYmE5ODc2NTQzMjEw"),
    );
    assert_eq!(basic.status, 200);

    // A wrong agency secret counts as an authentication failure.
    let mut agency = Raw::connect(&server.address());
    agency.send("ACTION:HELLO|AGENCY_ID:1|SECRET:not-the-secret\n");
    let reply = agency.reply();
    assert!(reply.contains("CODE:UNAUTHENTICATED"), "{reply}");
    server.proc.wait_for("action: auth_failures");
    let text = get(
        &admin,
        "/metrics",
        Some("Bearer fedcba9876543210fedcba9876543210"),
    )
    .body;
    assert_eq!(metric(&text, "lottery_auth_failures_total"), 1.0);
    assert_eq!(metric(&text, "lottery_auth_lockouts_total"), 0.0);

    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn an_admin_listener_open_beyond_loopback_without_a_secret_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = central(dir.path());
    cmd.env("SERVER_ADMIN_ADDRESS", "0.0.0.0:0");
    let server = Server::spawn(cmd);
    let line = admin_line(&server);
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("operator_secret: false"), "{line}");
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn an_admin_address_that_is_not_ip_and_port_is_a_configuration_error() {
    let out = lottery()
        .args(["server", "--admin-address", "localhost"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--admin-address"), "{stderr}");
    assert!(stderr.contains("is not IP:PORT"), "{stderr}");
}

/// The status page says whether sales are open, and once closed, who
/// closed them, when and why (the reason escaped as HTML).
#[test]
fn the_status_page_shows_the_close_of_sales() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = central(dir.path());
    cmd.env("SERVER_AGENCIES", "2")
        .env("SERVER_ADMIN_ADDRESS", "127.0.0.1:0");
    let server = Server::spawn(cmd);
    let admin = admin_address(&server);
    let page = get(&admin, "/", None);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains("sales: <span id=\"sales\">open</span>"),
        "{}",
        page.body
    );
    let close = lottery()
        .args(["close", "--address", &server.address()])
        .args(["--reason", "agency 2 <gone>"])
        .output()
        .unwrap();
    assert!(close.status.success(), "{close:?}");
    let page = get(&admin, "/", None).body;
    assert!(
        page.contains("sales: <span id=\"sales\">closed at ")
            && page.contains(" by operator (agency 2 &lt;gone&gt;)</span>"),
        "{page}"
    );
    server.proc.signal(Signal::SIGTERM);
    assert!(server.proc.wait_exit(Duration::from_secs(10)).success());
}
