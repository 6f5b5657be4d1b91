//! Several centrals sharing one database: sessions fenced across centrals,
//! commits one central is unsure of, the finished set counted across them,
//! and one draw however many ask for it.

use super::*;

/// Central A loses the answer to the commit of agency 1's bets 3..6 (the
/// commit happens), then a session of the agency opens on central B, which
/// tells it that 6 bets are stored: those rows are acknowledged now, and A
/// settling its doubt (before agency 2's session opens) must leave them.
/// `hello_on_a`: whether agency 1 had said HELLO on A too (a reference
/// agency does not, and A then knows no session of it).
fn a_lost_commit_counted_by_another_central_stays(test: &str, hello_on_a: bool) {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db(test) else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let a = rt.block_on(open_store(&relay.url("lottery")));
    let b = rt.block_on(open_store(&url));
    let first = after(None, 1, &batch(1, 0..3));
    let second = after(Some(first), 1, &batch(1, 3..6));
    rt.block_on(async {
        if hello_on_a {
            assert_eq!(a.open_session(1).await.unwrap().receipt.count, 0);
        }
        store_batch(&a, &batch(1, 0..3), first).await.unwrap();
        relay.arm(Lose::Answer);
        assert!(store_batch(&a, &batch(1, 3..6), second).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Answer);
    rt.block_on(async {
        // The agency moves to B: HELLO answers `STORED:6`.
        assert_eq!(b.open_session(1).await.unwrap().receipt, second);
        // Any work on A settles its doubt first.
        a.open_session(2).await.unwrap();
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..6)), Some("6".into())]],
        "central A removed bets central B acknowledged"
    );
    rt.block_on(async {
        // The agency goes on from 6 on B.
        let third = after(Some(second), 1, &batch(1, 6..9));
        store_batch(&b, &batch(1, 6..9), third).await.unwrap();
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..9)), Some("9".into())]]
    );
}

#[test]
fn a_lost_commit_counted_by_a_session_on_another_central_stays() {
    a_lost_commit_counted_by_another_central_stays("a_lost_commit_counted_hello_on_both", true);
}

#[test]
fn a_lost_commit_of_an_agency_without_hello_counted_on_another_central_stays() {
    a_lost_commit_counted_by_another_central_stays("a_lost_commit_counted_no_hello_on_a", false);
}

/// Central A's commit of agency 1's bets 5..8 never reaches the database,
/// and the agency (no HELLO anywhere) sends the same bets to central B,
/// which stores and acknowledges them: the table then holds exactly what
/// A's commit would have left, under the same epoch. A settling its doubt
/// must find that its own transaction did not commit, and remove nothing.
#[test]
fn rows_another_central_stored_where_a_lost_commit_would_have_are_kept() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("rows_another_central_stored_where_a_lost_commit") else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let a = rt.block_on(open_store(&relay.url("lottery")));
    let first = after(None, 1, &batch(1, 0..5));
    let second = after(Some(first), 1, &batch(1, 5..8));
    rt.block_on(async {
        store_batch(&a, &batch(1, 0..5), first).await.unwrap();
    });
    // Central B starts now: it reads agency 1's 5 bets from the table.
    let b = rt.block_on(open_store(&url));
    rt.block_on(async {
        relay.arm(Lose::Commit);
        assert!(store_batch(&a, &batch(1, 5..8), second).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Commit);
    rt.block_on(async {
        store_batch(&b, &batch(1, 5..8), second).await.unwrap();
        // Any work on A settles its doubt first.
        a.open_session(2).await.unwrap();
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..8)), Some("8".into())]],
        "central A removed bets central B acknowledged"
    );
}

/// Agency 1 sends 5 bets to central A without HELLO. Its next batch waits
/// on agency 1's row of `agencies` (held by someone else) when A's backend
/// is terminated, so A answers `STORAGE_FAILED`. The agency moves to
/// central B, says HELLO (`resume from bet 5`) and sends the 3 bets with
/// `FIRST:5`: B acknowledges `STORED:8`. Then agency 2's HELLO on A makes A
/// settle what it was unsure of: every acknowledged bet must still be there.
#[test]
fn an_agency_without_hello_whose_batch_died_on_one_central_keeps_what_another_acknowledged() {
    let Some((pg, url)) = cluster_with_db("an_agency_without_hello_whose_batch_died") else {
        return;
    };
    let a = central(&format!("{url}?application_name=central_a"), 2);
    let b = central(&url, 2);
    let bet = |doc: u32| {
        format!(
            "NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|NACIMIENTO:1999-03-17\\|\
             NUMERO:7574\\|AGENCY_ID:1"
        )
    };
    let batch = |first: Option<u32>, docs: std::ops::Range<u32>| {
        let mut payload = format!("BATCH_SIZE:{}", docs.len());
        if let Some(first) = first {
            payload += &format!("|FIRST:{first}");
        }
        for (i, doc) in docs.enumerate() {
            payload += &format!("|BET_{}:{}", i + 1, bet(doc));
        }
        payload + "\n"
    };
    // A reference agency: no HELLO, no FIRST.
    let mut on_a = connect(&a.address());
    let stored = exchange(&mut on_a, &batch(None, 0..5));
    assert!(stored.contains("|STORED:5"), "{stored}");
    // Someone holds agency 1's row: A's next batch waits for it.
    let rt = runtime();
    let holder = rt.block_on(async {
        let client = common::pg::client(&url).await;
        client
            .batch_execute("BEGIN; SELECT 1 FROM agencies WHERE agency = 1 FOR UPDATE")
            .await
            .unwrap();
        client
    });
    on_a.send(batch(None, 5..8));
    let deadline = Instant::now() + STEP;
    let waiting = loop {
        let waiting = pg.query(
            "postgres",
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'central_a' \
             AND wait_event_type = 'Lock'",
        );
        if !waiting.is_empty() {
            break waiting;
        }
        assert!(Instant::now() < deadline, "central A's batch never waited");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A DBA, a pooler or a network cut ends A's backend.
    let pid = waiting[0][0].clone().unwrap();
    pg.query("postgres", &format!("SELECT pg_terminate_backend({pid})"));
    let refused = on_a.reply();
    assert!(
        refused.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|"),
        "{refused}"
    );
    rt.block_on(async { holder.batch_execute("ROLLBACK").await.unwrap() });
    drop(on_a);
    // The agency moves to B, resumes from the table and is acknowledged.
    let mut on_b = connect(&b.address());
    let welcome = exchange(&mut on_b, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(
        welcome.contains("resume from bet 5") && welcome.contains("|STORED:5|"),
        "{welcome}"
    );
    let stored = exchange(&mut on_b, &batch(Some(5), 5..8));
    assert!(
        stored.starts_with("STATUS:SUCCESS") && stored.contains("|STORED:8"),
        "{stored}"
    );
    // Any work on A: agency 2's HELLO.
    let welcome = hello(&a.address(), 2);
    assert!(welcome.starts_with("STATUS:SUCCESS"), "{welcome}");
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..8)), Some("8".into())]],
        "acknowledged bets were removed"
    );
    drop(on_b);
    let log = stop(&a);
    assert!(!log.contains("removed: "), "{log}");
    stop(&b);
}

#[test]
fn bets_another_central_stored_are_refused_never_removed() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("bets_another_central_stored") else {
        return;
    };
    let rt = runtime();
    // Two centrals on one database, both opened before agency 1 uploads.
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        let first = a
            .submit(&batch(1, 0..3), 0, &Sequence::new(), acked)
            .await
            .unwrap();
        first.await.unwrap();
        // Central B still believes agency 1 holds nothing: refused, twice,
        // and central A's acknowledged rows stay.
        for docs in [10..13, 20..23] {
            let stale = b
                .submit(
                    &batch(1, docs.clone()),
                    0,
                    &Sequence::new(),
                    after(None, 1, &batch(1, docs)),
                )
                .await
                .unwrap();
            let err = stale.await.unwrap_err().to_string();
            assert!(
                err.contains(
                    "agency 1: the table holds 3 of its bets, this central acknowledged 0; \
                     another central on this database stored them"
                ),
                "{err}"
            );
        }
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
             (SELECT encode(digest, 'hex') FROM agencies) FROM bets"
        ),
        vec![vec![
            Some("0@0 1@1 2@2".to_string()),
            Some(acked.digest.to_string())
        ]]
    );
}

#[test]
fn an_agency_moving_to_another_central_resumes_there_and_fences_the_old_session() {
    use lottery::store::{Sequence, SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("an_agency_moving_to_another_central") else {
        return;
    };
    let rt = runtime();
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    let first = after(None, 1, &batch(1, 0..3));
    let second = after(Some(first), 1, &batch(1, 3..6));
    rt.block_on(async {
        // A session of agency 1 on central A stores 3 bets.
        let opened = a.open_session(1).await.unwrap();
        assert_eq!(opened.receipt.count, 0);
        let stored = a.submit(&batch(1, 0..3), 0, &Sequence::new(), first);
        stored.await.unwrap().await.unwrap();
        // It moves to central B, which answers HELLO from the table.
        let moved = b.open_session(1).await.unwrap();
        assert_eq!((moved.receipt, moved.finished), (first, false));
        // Agency 2 stores on A in the same group as A's fenced batch.
        a.open_session(2).await.unwrap();
        let fenced = a
            .submit(&batch(1, 3..6), 0, &Sequence::new(), second)
            .await
            .unwrap();
        let other = a
            .submit(
                &batch(2, 0..2),
                0,
                &Sequence::new(),
                after(None, 2, &batch(2, 0..2)),
            )
            .await
            .unwrap();
        let err = fenced.await.unwrap_err().to_string();
        assert!(
            err.contains(
                "agency 1: superseded by a newer session of the agency on another central"
            ),
            "{err}"
        );
        other.await.unwrap();
        // The older session cannot announce the end either.
        let err = a.finish(1, 1).await.unwrap_err().to_string();
        assert!(err.contains("superseded"), "{err}");
        // The newer session stores the rest, nothing twice, and finishes.
        let rest = b.submit(&batch(1, 3..6), 0, &Sequence::new(), second);
        rest.await.unwrap().await.unwrap();
        assert_eq!(b.finish(1, 1).await.unwrap(), 1);
        a.close().await;
        b.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, string_agg(document || '@' || seq, ' ' ORDER BY seq) FROM bets \
             GROUP BY agency ORDER BY agency"
        ),
        vec![
            vec![Some("1".into()), Some("0@0 1@1 2@2 3@3 4@4 5@5".into())],
            vec![Some("2".into()), Some("0@0 1@1".into())],
        ]
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, stored, epoch, finished FROM agencies ORDER BY agency"
        ),
        vec![
            vec![
                Some("1".into()),
                Some("6".into()),
                Some("2".into()),
                Some("t".into())
            ],
            vec![
                Some("2".into()),
                Some("2".into()),
                Some("1".into()),
                Some("f".into())
            ],
        ]
    );
}

#[test]
fn a_session_superseded_on_another_central_stores_nothing_more() {
    let Some((pg, url)) = cluster_with_db("a_session_superseded_on_another_central") else {
        return;
    };
    let (a, b) = (central(&url, 2), central(&url, 2));
    let bet = |doc: u32| {
        format!(
            "NOMBRE:Ana\\|APELLIDO:Perez\\|DOCUMENTO:{doc}\\|NACIMIENTO:1999-03-17\\|\
             NUMERO:7574\\|AGENCY_ID:1"
        )
    };
    let batch = |first: u32| {
        format!(
            "BATCH_SIZE:2|FIRST:{first}|BET_1:{}|BET_2:{}\n",
            bet(first),
            bet(first + 1)
        )
    };
    // Agency 1 opens a session on central A and stores two bets there.
    let mut old = connect(&a.address());
    let welcome = exchange(&mut old, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(welcome.contains("|STORED:0|"), "{welcome}");
    let stored = exchange(&mut old, &batch(0));
    assert!(stored.starts_with("STATUS:SUCCESS"), "{stored}");
    // It moves to central B, which answers from the table.
    let mut new = connect(&b.address());
    let welcome = exchange(&mut new, "ACTION:HELLO|AGENCY_ID:1\n");
    assert!(welcome.contains("|STORED:2|"), "{welcome}");
    // The older session on A is fenced: refused, nothing stored.
    let refused = exchange(&mut old, &batch(2));
    assert!(
        refused.starts_with("STATUS:ERROR|CODE:STORAGE_FAILED|")
            && refused.contains(
                "agency 1: superseded by a newer session of the agency on another central"
            ),
        "{refused}"
    );
    a.proc.wait_for("action: store | result: fail");
    let refused = exchange(&mut old, "ACTION:BETTING_FINISHED|AGENCY_ID:1\n");
    assert!(refused.contains("superseded"), "{refused}");
    // The newer one goes on from bet 2.
    let stored = exchange(&mut new, &batch(2));
    assert!(stored.starts_with("STATUS:SUCCESS"), "{stored}");
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
             (SELECT finished::text FROM agencies WHERE agency = 1) FROM bets"
        ),
        vec![vec![Some("0@0 1@1 2@2 3@3".into()), Some("false".into())]]
    );
    drop((old, new));
    stop(&a);
    stop(&b);
}

#[test]
fn the_last_two_announcements_on_two_centrals_at_once_count_every_agency() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("the_last_two_announcements") else {
        return;
    };
    let rt = runtime();
    let a = rt.block_on(open_store(&url));
    let b = rt.block_on(open_store(&url));
    rt.block_on(async {
        a.open_session(1).await.unwrap();
        b.open_session(2).await.unwrap();
    });
    for round in 0..20 {
        // Whichever commits second must see the other's announcement, or
        // neither central would draw.
        let (one, two) = rt.block_on(async { tokio::join!(a.finish(1, 2), b.finish(2, 2)) });
        let (one, two) = (one.unwrap(), two.unwrap());
        assert_eq!(one.max(two), 2, "round {round}: {one}, {two}");
        pg.query("lottery", "UPDATE agencies SET finished = false");
    }
    rt.block_on(async {
        a.close().await;
        b.close().await;
    });
}

/// An agency above the configured number that finished (a row left by a
/// central configured for more agencies) is not one of this lottery's: it
/// neither completes the set early nor keeps it from completing.
#[test]
fn only_the_configured_agencies_count_as_finished() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("only_the_configured_agencies_count") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    pg.query(
        "lottery",
        "INSERT INTO agencies (agency, finished) VALUES (7, true)",
    );
    let counts: Vec<u32> = rt.block_on(async {
        let mut counts = Vec::new();
        for agency in 1..=3 {
            store.open_session(agency).await.unwrap();
            counts.push(store.finish(agency, 3).await.unwrap());
        }
        store.close().await;
        counts
    });
    assert_eq!(counts, [1, 2, 3]);
}

#[test]
fn an_agency_waiting_on_one_central_is_told_who_finished_on_the_others() {
    let Some((_pg, url)) = cluster_with_db("an_agency_waiting_on_one_central") else {
        return;
    };
    let (a, b) = (central(&url, 3), central(&url, 3));
    let finish = |address: &str, agency: u32| {
        let mut stream = connect(address);
        let welcome = exchange(&mut stream, &format!("ACTION:HELLO|AGENCY_ID:{agency}\n"));
        assert!(welcome.starts_with("STATUS:SUCCESS"), "{welcome}");
        stream.send(format!("ACTION:BETTING_FINISHED|AGENCY_ID:{agency}\n"));
        stream
    };
    let _one = finish(&a.address(), 1);
    a.proc
        .wait_for("action: agencia_finalizada | result: success");
    let mut two = finish(&b.address(), 2);
    // Agency 1 finished on the other central: counted.
    assert_eq!(
        two.reply(),
        "STATUS:WAITING|MESSAGE:waiting for the draw: 2 of 3 agencies finished\n"
    );
    let _ = (stop(&a), stop(&b));
}

/// Two centrals storing the first bets of the same agency at once (an
/// agency that never said HELLO, so no session fences either): one is
/// stored, the other refused, never both: nothing in the table but the
/// writers' check keeps a `seq` from being written twice.
#[test]
fn two_centrals_storing_a_new_agency_s_first_bets_at_once_store_them_once() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("two_centrals_storing_a_new_agency") else {
        return;
    };
    let outcomes = runtime().block_on(async {
        let one = open_store(&url).await;
        let two = open_store(&url).await;
        let mut outcomes = Vec::new();
        for round in 0..5u32 {
            let agency = 10 + round;
            let bets = batch(agency, 0..50);
            let receipt = after(None, agency, &bets);
            let a = one
                .submit(&bets, 0, &Sequence::new(), receipt)
                .await
                .unwrap();
            let b = two
                .submit(&bets, 0, &Sequence::new(), receipt)
                .await
                .unwrap();
            let (a, b) = futures::join!(a, b);
            outcomes.push((agency, a.is_ok(), b.is_ok()));
        }
        one.close().await;
        two.close().await;
        outcomes
    });
    for (agency, a, b) in outcomes {
        assert!(a || b, "agency {agency}: neither central stored its bets");
        assert!(
            !(a && b),
            "agency {agency}: both centrals acknowledged its bets"
        );
        assert_eq!(
            pg.query(
                "lottery",
                &format!(
                    "SELECT count(*), count(DISTINCT seq), \
                     (SELECT stored FROM agencies WHERE agency = {agency}) \
                     FROM bets WHERE agency = {agency}"
                )
            ),
            vec![vec![
                Some("50".to_string()),
                Some("50".to_string()),
                Some("50".to_string())
            ]],
            "agency {agency}"
        );
    }
}

/// Every agency's announcement is in the table but no draw is recorded:
/// the central that was drawing died before its commit. Any central draws
/// then, without waiting for an agency to announce again.
#[test]
fn every_agency_finished_and_no_draw_recorded_makes_a_central_draw() {
    let Some((pg, url)) = cluster_with_db("every_agency_finished_and_no_draw") else {
        return;
    };
    // The schema, then the state a central that died mid-draw leaves.
    let first = central(&url, 2);
    let _ = stop(&first);
    pg.query(
        "lottery",
        "INSERT INTO agencies (agency, finished) VALUES (1, true), (2, true)",
    );
    let server = central(&url, 2);
    server
        .proc
        .wait_for("action: sorteo | result: success | winning_number: 7574 | bets: 0");
    assert_eq!(
        pg.query("lottery", "SELECT count(*), max(bets) FROM draw"),
        vec![vec![Some("1".to_string()), Some("0".to_string())]]
    );
    let _ = stop(&server);
}

/// A row taken out of `bets` behind the centrals' back: the draw must be
/// refused, not recorded over fewer bets than were acknowledged.
#[test]
fn a_draw_over_fewer_bets_than_were_acknowledged_is_refused() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("a_draw_over_fewer_bets_than_were_acknowledged") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    rt.block_on(async {
        let bets = batch(1, 0..3);
        store_batch(&store, &bets, after(None, 1, &bets))
            .await
            .unwrap();
    });
    pg.query("lottery", "DELETE FROM bets WHERE seq = 2");
    let err = rt.block_on(async {
        let drawn = store.draw_once(WINNING, 1).await;
        store.close().await;
        drawn.unwrap_err().to_string()
    });
    assert!(
        err.contains(
            "the stored bets differ from what was acknowledged \
             (agency 1: 2 in the store, 3 acknowledged); nothing was recorded"
        ),
        "{err}"
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT (SELECT count(*) FROM draw), (SELECT count(*) FROM rounds)"
        ),
        vec![vec![Some("0".into()), Some("0".into())]]
    );
}

/// Three centrals asking for the draw at once, then again one after the
/// other (and a central started afterwards): one draw is recorded, and
/// every call answers with it.
#[test]
fn the_draw_runs_once_whichever_centrals_ask_together_or_in_turn() {
    use lottery::store::{SharedStore, Store};
    let Some((pg, url)) = cluster_with_db("the_draw_runs_once_whichever_centrals_ask") else {
        return;
    };
    let rt = runtime();
    let centrals: Vec<_> = (0..3).map(|_| rt.block_on(open_store(&url))).collect();
    let draws = rt.block_on(async {
        let bets = batch(1, 0..3);
        store_batch(&centrals[0], &bets, after(None, 1, &bets))
            .await
            .unwrap();
        let together =
            futures::future::join_all(centrals.iter().map(|c| c.draw_once(WINNING, 1))).await;
        let mut draws: Vec<_> = together
            .into_iter()
            .map(|d| d.expect("every central gets the draw"))
            .collect();
        for c in &centrals {
            draws.push(c.draw_once(WINNING, 1).await.expect("the recorded draw"));
        }
        let late = open_store(&url).await;
        draws.push(late.draw_once(WINNING, 1).await.expect("the recorded draw"));
        late.close().await;
        for c in &centrals {
            c.close().await;
        }
        draws
    });
    assert_eq!(
        draws.iter().filter(|(_, ran)| *ran).count(),
        1,
        "one central runs the draw"
    );
    let (first, _) = &draws[0];
    assert_eq!(first.winners_of(1), ["0", "1", "2"]);
    for (draw, _) in &draws {
        assert_eq!(
            (draw.seal, &draw.winners, draw.bets),
            (first.seal, &first.winners, 3)
        );
    }
    assert_eq!(
        pg.query("lottery", "SELECT count(*), max(bets) FROM draw"),
        vec![vec![Some("1".into()), Some("3".into())]]
    );
}
