//! The database or a central lost in the middle of an upload: nothing
//! acknowledged is lost, nothing is stored twice.

use super::*;

#[test]
fn the_database_restarted_mid_upload_loses_nothing_and_stores_nothing_twice() {
    let Some((mut pg, url)) = cluster_with_db("the_database_restarted_mid_upload") else {
        return;
    };
    let data = generated(5, 8_000);
    let expected = expected(data.path(), 5, WINNING);
    let server = central(&url, 5);
    let out = tempfile::tempdir().unwrap();
    let running: Vec<_> = (1..=5)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let mut cmd =
                agency_command(id, &server.address(), &data_file(data.path(), id), &winners);
            cmd.env("CLI_BATCH_MAXAMOUNT", "20");
            (id, winners, Proc::spawn(cmd))
        })
        .collect();
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    // An immediate shutdown, as a crash: open transactions are lost.
    pg.stop_with(Signal::SIGQUIT);
    server
        .proc
        .wait_for("action: apuesta_recibida | result: fail");
    pg.start_again();
    let deadline = Instant::now() + upload_limit(40_000) + Duration::from_secs(30);
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id}: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(&read_winners(winners), &expected.winners[id], "agency {id}");
    }
    server.proc.wait_for("action: sorteo | result: success");
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let log = stop(&server);
    assert!(log.contains("state: reconnected"), "{log}");
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
}

/// `addresses` rotated to start at the `first`-th: each agency is given
/// every central, starting with a different one.
fn rotated(addresses: &[String], first: usize) -> String {
    let mut list = addresses.to_vec();
    list.rotate_left(first % addresses.len());
    list.join(",")
}

#[test]
fn three_centrals_six_agencies_one_central_killed_mid_upload_draw_once() {
    let Some((pg, url)) = cluster_with_db("three_centrals_six_agencies") else {
        return;
    };
    let agencies = 6;
    let data = generated(agencies, 20_000);
    let expected = expected(data.path(), agencies, WINNING);
    let centrals: Vec<Server> = (0..3).map(|_| central(&url, agencies)).collect();
    let addresses: Vec<String> = centrals.iter().map(Server::address).collect();
    let out = tempfile::tempdir().unwrap();
    // Agencies 1 and 4 start on the first central, 2 and 5 on the second,
    // 3 and 6 on the third.
    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let list = rotated(&addresses, (id - 1) as usize);
            let agency = start_agency(id, &list, &data_file(data.path(), id), &winners);
            (id, winners, agency)
        })
        .collect();
    // The first central dies once it stored a batch: its agencies move on.
    centrals[0]
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    centrals[0].proc.signal(Signal::SIGKILL);
    let deadline = Instant::now() + upload_limit(120_000) + PATIENCE;
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id} failed: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(
            &read_winners(winners),
            &expected.winners[id],
            "agency {id} winners"
        );
    }
    // Every input bet exactly once, in each agency's order.
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM agencies WHERE finished"),
        vec![vec![Some("6".to_string())]]
    );
    // An agency that comes back after the draw, to a central that did not
    // draw, gets its winners at once and stores nothing.
    let late = central(&url, agencies);
    run_agencies(&[2], &late.address(), data.path(), &expected, PATIENCE);
    assert_eq!(stored_rows(&pg, "lottery"), expected.rows);
    let mut logs = vec![centrals[0].proc.output()];
    logs.extend(centrals[1..].iter().map(stop));
    logs.push(stop(&late));
    let draws: usize = logs
        .iter()
        .map(|log| log.matches("action: sorteo | result: success").count())
        .sum();
    assert_eq!(
        draws,
        1,
        "one draw across the centrals:\n{}",
        logs.join("\n")
    );
    // The survivors and the late central saw nothing go wrong.
    for log in &logs[1..] {
        assert!(!log.contains("result: fail"), "{log}");
    }
    assert!(
        logs[1..3]
            .iter()
            .any(|log| log.contains("state: drawn_by_another_central")),
        "the central that did not draw learned of it:\n{}",
        logs.join("\n")
    );
    assert!(
        logs[3].contains("state: already_drawn") && !logs[3].contains("action: sorteo"),
        "{}",
        logs[3]
    );
}

#[test]
fn the_primary_killed_and_its_synchronous_standby_promoted_loses_no_acknowledged_bet() {
    let Some(mut primary) = PgCluster::start_or_skip("the_primary_killed_and_its_standby_promoted")
    else {
        return;
    };
    primary.create_db("lottery");
    let standby = primary.standby();
    primary.wait_for_sync_standby();
    // Both hosts: the central connects to whichever accepts writes.
    let url = format!(
        "postgres://{}@127.0.0.1:{},127.0.0.1:{}/lottery?target_session_attrs=read-write",
        common::pg::SUPERUSER,
        primary.port,
        standby.port
    );
    let agencies = 4;
    let data = generated(agencies, 8_000);
    let expected = expected(data.path(), agencies, WINNING);
    let server = central(&url, agencies);
    let out = tempfile::tempdir().unwrap();
    let running: Vec<_> = (1..=agencies)
        .map(|id| {
            let winners = out.path().join(format!("winners-{id}.txt"));
            let mut cmd =
                agency_command(id, &server.address(), &data_file(data.path(), id), &winners);
            // Small batches, so that the upload is still under way.
            cmd.env("CLI_BATCH_MAXAMOUNT", "20");
            (id, winners, Proc::spawn(cmd))
        })
        .collect();
    server
        .proc
        .wait_for("action: apuesta_recibida | result: success");
    primary.stop_with(Signal::SIGKILL);
    server
        .proc
        .wait_for("action: apuesta_recibida | result: fail");
    // Before the promotion nothing writes to the standby: every batch the
    // central acknowledged so far (committed on the primary, so flushed on
    // the synchronous standby) must be there already.
    let acknowledged: u64 = server
        .proc
        .output()
        .lines()
        .filter_map(|l| {
            l.split("apuesta_recibida | result: success | cantidad: ")
                .nth(1)
        })
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum();
    let on_standby: u64 = standby.query("lottery", "SELECT count(*) FROM bets")[0][0]
        .as_deref()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        acknowledged > 0 && on_standby >= acknowledged,
        "{acknowledged} bets acknowledged, {on_standby} on the standby"
    );
    // What an operator or a failover manager does.
    standby.promote();
    let deadline = Instant::now() + upload_limit(32_000) + PATIENCE;
    for (id, winners, agency) in &running {
        let status = agency.wait_exit(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "agency {id}: {status}\n{}\n{}",
            agency.output(),
            agency.stderr()
        );
        assert_eq!(&read_winners(winners), &expected.winners[id], "agency {id}");
    }
    server.proc.wait_for("action: sorteo | result: success");
    // Every input bet on the new primary, once, in each agency's order.
    assert_eq!(stored_rows(&standby, "lottery"), expected.rows);
    let counts: BTreeMap<u32, usize> = expected.rows.iter().map(|(a, r)| (*a, r.len())).collect();
    assert_eq!(agency_counts(&standby, "lottery"), counts);
    let log = stop(&server);
    assert!(log.contains("state: reconnected"), "{log}");
    assert_eq!(log.matches("action: sorteo | result: success").count(), 1);
}
