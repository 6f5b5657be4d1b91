//! The close of sales on a database shared by three centrals: one row,
//! taken by whichever central the operator reached; every central honours
//! it; one draw; and per agency, acknowledged = stored = drawn.

use super::*;

/// The value of `key` in a contract log line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(" | ")
        .find_map(|f| f.strip_prefix(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn a_close_on_one_of_three_centrals_draws_once_over_exactly_what_was_acknowledged() {
    let Some((pg, url)) = cluster_with_db("close_on_one_of_three_centrals") else {
        return;
    };
    let agencies = 3;
    let per_agency = 40_000;
    let data = generated(agencies, per_agency);
    let work = tempfile::tempdir().unwrap();
    let centrals: Vec<Server> = (0..3).map(|_| central(&url, agencies)).collect();
    // Agency i on central i, uploading at full speed.
    let procs: Vec<Proc> = (1..=agencies)
        .map(|a| {
            start_agency(
                a,
                &centrals[a as usize - 1].address(),
                &data_file(data.path(), a),
                &work.path().join(format!("w{a}.txt")),
            )
        })
        .collect();
    // Every central has stored batches.
    for c in &centrals {
        c.proc
            .wait_for("action: apuesta_recibida | result: success");
    }
    let close = lottery()
        .args([
            "close",
            "--address",
            &centrals[1].address(),
            "--reason",
            "the storm cut agency 2",
        ])
        .output()
        .unwrap();
    assert!(close.status.success(), "{close:?}");
    centrals[1]
        .proc
        .wait_for("action: cierre | result: success | by: operator");
    // The others learn of it from the database, at once.
    for i in [0, 2] {
        let line = centrals[i].proc.wait_for_within(
            "action: cierre | result: success | state: closed_elsewhere",
            Duration::from_secs(3),
        );
        assert!(line.contains("reason: the storm cut agency 2"), "{line}");
    }
    let mut acknowledged = BTreeMap::new();
    for (i, agency) in procs.iter().enumerate() {
        let id = i as u32 + 1;
        let status = agency.wait_exit(upload_limit(per_agency));
        let output = agency.output();
        let n: usize = match status.code() {
            Some(4) => {
                let line = output
                    .lines()
                    .find(|l| l.contains("action: cierre | result: success"))
                    .unwrap_or_else(|| panic!("agency {id}:\n{output}"));
                assert_eq!(field(line, "acknowledged"), field(line, "stored"), "{line}");
                field(line, "stored").parse().unwrap()
            }
            Some(0) => per_agency as usize,
            other => panic!(
                "agency {id} exited {other:?}:\n{output}\n{}",
                agency.stderr()
            ),
        };
        acknowledged.insert(id, n);
    }
    assert!(
        acknowledged.values().any(|n| *n < per_agency as usize),
        "the close landed after every upload: {acknowledged:?}"
    );
    let expected = expected(data.path(), agencies, WINNING);
    let rows = stored_rows(&pg, "lottery");
    let drawn: BTreeMap<u32, usize> = pg
        .query("lottery", "SELECT agency, bets FROM draw_agencies")
        .into_iter()
        .map(|r| {
            (
                r[0].clone().unwrap().parse().unwrap(),
                r[1].clone().unwrap().parse().unwrap(),
            )
        })
        .collect();
    for agency in 1..=agencies {
        let n = acknowledged[&agency];
        let got = rows.get(&agency).map_or(&[][..], Vec::as_slice);
        assert!(
            got == &expected.rows[&agency][..n],
            "agency {agency}: the rows stored are not its first {n} ({} stored)",
            got.len()
        );
        assert_eq!(drawn[&agency], n, "agency {agency}: drawn");
        let won: Vec<String> = expected.rows[&agency][..n]
            .iter()
            .filter(|r| r[5] == WINNING.to_string())
            .map(|r| r[3].clone())
            .collect();
        assert_eq!(
            read_winners(&work.path().join(format!("w{agency}.txt"))),
            won,
            "agency {agency}: its winners"
        );
    }
    // What the close's transaction counted is what was drawn: nothing was
    // stored after it.
    let at_close = pg.query("lottery", "SELECT counted, stored FROM sales");
    let list = |v: &Option<String>| -> Vec<usize> {
        v.clone()
            .unwrap()
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let counted: BTreeMap<u32, usize> = list(&at_close[0][0])
        .into_iter()
        .map(|a| a as u32)
        .zip(list(&at_close[0][1]))
        .collect();
    let nonzero: BTreeMap<u32, usize> = acknowledged
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(a, n)| (*a, *n))
        .collect();
    assert_eq!(counted, nonzero, "stored when sales closed");
    let close_row = pg.query("lottery", "SELECT closed_by, close_reason FROM draw");
    assert_eq!(
        close_row,
        vec![vec![
            Some("operator".to_string()),
            Some("the storm cut agency 2".to_string())
        ]]
    );
    // Each agency run again on its central (each learned of the close, from
    // the database's close or its draw) is told the same.
    for a in 1..=agencies {
        let again = start_agency(
            a,
            &centrals[a as usize - 1].address(),
            &data_file(data.path(), a),
            &work.path().join(format!("again{a}.txt")),
        );
        let code = again.wait_exit(upload_limit(per_agency)).code();
        let want = if acknowledged[&a] < per_agency as usize {
            4
        } else {
            0
        };
        assert_eq!(code, Some(want), "agency {a} again:\n{}", again.stderr());
    }
    // A second close, on another central: refused.
    let again = lottery()
        .args([
            "close",
            "--address",
            &centrals[2].address(),
            "--reason",
            "x",
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1), "{again:?}");
    let logs: Vec<String> = centrals.iter().map(stop).collect();
    let sorteos: usize = logs
        .iter()
        .map(|l| l.matches("action: sorteo | result: success").count())
        .sum();
    assert_eq!(sorteos, 1, "{logs:?}");
    let verify = lottery()
        .args(["verify"])
        .env("SERVER_STORAGE", &url)
        .env("SERVER_AGENCIES", agencies.to_string())
        .output()
        .unwrap();
    assert!(verify.status.success(), "{verify:?}");
}

#[test]
fn a_central_started_after_a_close_draws() {
    let Some((pg, url)) = cluster_with_db("a_central_started_after_a_close") else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("agency-1.csv");
    std::fs::write(&data, ana_bets(20, |i| 7570 + i % 8, "\n")).unwrap();
    let first = central(&url, 2);
    let one = start_agency(1, &first.address(), &data, &work.path().join("w1.txt"));
    first
        .proc
        .wait_for("action: agencia_finalizada | result: success | agency: 1");
    one.signal(Signal::SIGTERM);
    assert_eq!(one.wait_exit(STEP).code(), Some(0));
    stop(&first);
    // Closed while no central ran (as a central that stopped right after
    // its close leaves it).
    pg.query(
        "lottery",
        "UPDATE sales SET closed_by = 'operator', closed_at = '2026-12-07T12:00:00.000Z', \
         reason = 'night', finished = '{1}', counted = '{1}', stored = '{20}'",
    );
    let again = central(&url, 2);
    again.proc.wait_for("action: sorteo | result: success");
    let one = start_agency(1, &again.address(), &data, &work.path().join("w1.txt"));
    assert_eq!(one.wait_exit(STEP).code(), Some(0), "{}", one.output());
    let agencies = pg.query(
        "lottery",
        "SELECT agency, bets, finished FROM draw_agencies ORDER BY agency",
    );
    assert_eq!(
        agencies,
        vec![
            vec![Some("1".into()), Some("20".into()), Some("t".into())],
            vec![Some("2".into()), Some("0".into()), Some("f".into())],
        ]
    );
    stop(&again);
}

#[test]
fn close_at_on_three_centrals_is_taken_once() {
    let Some((pg, url)) = cluster_with_db("close_at_on_three_centrals") else {
        return;
    };
    let agencies = 3;
    let data = generated(agencies, 150_000);
    let work = tempfile::tempdir().unwrap();
    let at = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let centrals: Vec<Server> = (0..3)
        .map(|_| {
            let mut cmd = central_command(&url, agencies);
            cmd.env("SERVER_CLOSE_AT", &at);
            Server::spawn(cmd)
        })
        .collect();
    let procs: Vec<Proc> = (1..=agencies)
        .map(|a| {
            start_agency(
                a,
                &centrals[a as usize - 1].address(),
                &data_file(data.path(), a),
                &work.path().join(format!("w{a}.txt")),
            )
        })
        .collect();
    let mut short = 0;
    for agency in &procs {
        let code = agency.wait_exit(upload_limit(150_000)).code();
        assert!(matches!(code, Some(0 | 4)), "{code:?}\n{}", agency.stderr());
        short += usize::from(code == Some(4));
    }
    assert!(short > 0, "close_at came after every upload");
    let logs: Vec<String> = centrals.iter().map(stop).collect();
    let took: Vec<&String> = logs
        .iter()
        .filter(|l| {
            l.contains("action: cierre | result: success | by: close_at | from: server.close_at")
        })
        .collect();
    assert_eq!(took.len(), 1, "one central took the close");
    for (i, log) in logs.iter().enumerate() {
        let line = log
            .lines()
            .find(|l| l.contains("action: cierre | result: success"))
            .unwrap_or_else(|| panic!("central {i} logged no cierre"));
        assert!(
            line.contains("| by: close_at | from: server.close_at")
                || line.contains("| state: closed_elsewhere | by: close_at"),
            "central {i}: {line}"
        );
    }
    let sorteos: usize = logs
        .iter()
        .map(|l| l.matches("action: sorteo | result: success").count())
        .sum();
    assert_eq!(sorteos, 1);
    let close = pg.query("lottery", "SELECT closed_by, close_reason FROM draw");
    assert_eq!(
        close,
        vec![vec![
            Some("close_at".to_string()),
            Some(format!("server.close_at = {at}"))
        ]]
    );
}
