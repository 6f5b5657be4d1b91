//! `/metrics` of a central on the database, counted against a run exactly
//! (the bets file's version is in `tests/admin.rs`), with the database
//! writer's own metrics.

use super::*;
use common::admin::{admin_address, check_before_and_during, get, metric, round, BETS};

#[test]
fn metrics_count_a_real_run_on_the_database_exactly() {
    let Some((_pg, url)) = cluster_with_db("metrics_count_a_real_run_on_the_database") else {
        return;
    };
    let data = gen_data(GenOptions {
        agencies: 2,
        bets_per_agency: BETS,
        seed: 22,
        winning_number: WINNING,
        winner_share: 0.02,
        tricky_share: 0.05,
        crlf: false,
    });
    let server = round(central_command(&url, 3), data.path(), |stage, admin| {
        let response = get(admin, "/metrics", None);
        assert_eq!(response.status, 200, "{}", response.body);
        check_before_and_during(stage, &response.body);
    });
    let text = get(&admin_address(&server), "/metrics", None).body;
    assert_eq!(metric(&text, "lottery_database_groups_in_flight"), 0.0);
    assert_eq!(metric(&text, "lottery_database_retries_total"), 0.0);
    let page = get(&admin_address(&server), "/", None).body;
    assert!(page.contains("database: <code id=\"storage\">"), "{page}");
    // The server the writer reached: the one cluster's loopback address.
    assert!(
        page.contains("primary: <code id=\"primary\">127.0.0.1:"),
        "{page}"
    );
    assert!(!page.contains("password"), "{page}");
    stop(&server);
    every_metric_is_documented(&text);
}

/// The metrics a central on the database exposes (all of them: the bets
/// file's central has no `lottery_database_*`) are exactly those the README
/// names and docs/OPERATIONS.md's table explains: neither list can drift.
fn every_metric_is_documented(metrics: &str) {
    let exposed: std::collections::BTreeSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        // OpenMetrics names a counter without `_total` in its TYPE line.
        .map(|name| {
            let counter = metrics.contains(&format!("# TYPE {name} counter"));
            if counter {
                format!("{name}_total")
            } else {
                name.to_string()
            }
        })
        .collect();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let named = |text: &str| -> std::collections::BTreeSet<String> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter(|q| q.starts_with("lottery_"))
            .map(|q| q.split('{').next().unwrap().to_string())
            .collect()
    };
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let readme = readme
        .split("## Watching it run")
        .nth(1)
        .expect("README: Watching it run")
        .split("\n## ")
        .next()
        .unwrap();
    let operations = std::fs::read_to_string(root.join("docs/OPERATIONS.md")).unwrap();
    let table: String = operations
        .lines()
        .filter(|l| l.starts_with("| `lottery_"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(named(readme), exposed, "README's metrics against /metrics");
    assert_eq!(
        named(&table),
        exposed,
        "OPERATIONS.md's table against /metrics"
    );
}
