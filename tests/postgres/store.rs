//! The store itself, opened in this process on a throwaway cluster: what
//! one transaction holds, what a lost connection or commit leaves behind,
//! the schema made once, and the columns an older database is given.

use super::*;

#[test]
fn batches_waiting_together_are_stored_in_one_transaction() {
    use lottery::store::{postgres::PostgresStore, Durability, Sequence, Store};
    let Some(pg) =
        PgCluster::start_or_skip("batches_waiting_together_are_stored_in_one_transaction")
    else {
        return;
    };
    let url = pg.create_db("lottery");
    runtime().block_on(async {
        let (store, stored) = PostgresStore::open(&target(&url), Durability::Sync, STEP)
            .await
            .unwrap();
        assert!(stored.is_empty());
        // 200 connections' batches, all queued before any is answered.
        let mut pending = Vec::new();
        let mut receipts = std::collections::HashMap::new();
        for i in 0..200u32 {
            let agency = 1 + i % 5;
            let bets = batch(agency, i * 10..i * 10 + 10);
            let receipt = after(receipts.get(&agency).copied(), agency, &bets);
            receipts.insert(agency, receipt);
            pending.push(
                store
                    .submit(&bets, 0, &Sequence::new(), receipt)
                    .await
                    .unwrap(),
            );
        }
        for p in pending {
            p.await.unwrap();
        }
        store.close().await;
    });
    let rows = pg.query(
        "lottery",
        "SELECT count(*), count(DISTINCT xmin::text) FROM bets",
    );
    let (rows, transactions): (u32, u32) = (
        rows[0][0].as_deref().unwrap().parse().unwrap(),
        rows[0][1].as_deref().unwrap().parse().unwrap(),
    );
    assert_eq!(rows, 2_000);
    // Each row's xmin is the transaction that inserted it.
    assert!(
        transactions <= 20,
        "200 waiting batches took {transactions} transactions"
    );
    // Every agency's bets numbered 0.. in the order they were submitted.
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, min(seq), max(seq), count(*) FROM bets GROUP BY agency ORDER BY agency"
        )
        .len(),
        5
    );
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT count(*) FROM bets WHERE agency = 1 AND seq = (document::int / 10) / 5 * 10 + document::int % 10"
        ),
        vec![vec![Some("400".to_string())]]
    );
}

#[test]
fn after_a_batch_is_lost_with_the_database_its_connection_stores_nothing_more() {
    use lottery::store::{Sequence, Store};
    let Some((mut pg, url)) = cluster_with_db("after_a_batch_is_lost_with_the_database") else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    let (pipelined, other) = (Sequence::new(), Sequence::new());
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        let first = store
            .submit(&batch(1, 0..3), 0, &pipelined, acked)
            .await
            .unwrap();
        first.await.unwrap();
    });
    pg.stop();
    let err = rt.block_on(async {
        let receipt = after(Some(acked), 1, &batch(1, 3..6));
        let lost = store
            .submit(&batch(1, 3..6), 0, &pipelined, receipt)
            .await
            .unwrap();
        lost.await.unwrap_err()
    });
    let shown = err.to_string();
    assert!(
        shown.starts_with(&format!("database 127.0.0.1:{}/lottery: ", pg.port)),
        "{shown}"
    );
    assert!(pipelined.is_broken());
    pg.start_again();
    rt.block_on(async {
        // Behind the gap: refused without being stored, database or not.
        let receipt = after(Some(acked), 1, &batch(1, 6..9));
        let behind = store
            .submit(&batch(1, 6..9), 0, &pipelined, receipt)
            .await
            .unwrap();
        let err = behind.await.unwrap_err().to_string();
        assert!(err.contains("earlier batch"), "{err}");
        // Another connection goes on, numbered after what was acknowledged.
        let receipt = after(Some(acked), 1, &batch(1, 9..12));
        let next = store
            .submit(&batch(1, 9..12), 0, &other, receipt)
            .await
            .unwrap();
        next.await.unwrap();
        store.close().await;
        let closed = store.submit(&batch(1, 12..13), 0, &other, receipt).await;
        assert!(closed.is_err(), "a closed store takes no batch");
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq) FROM bets"
        ),
        vec![vec![Some("0@0 1@1 2@2 9@3 10@4 11@5".to_string())]]
    );
    // The receipt committed is the acknowledged one: the three bets
    // acknowledged, then the other connection's three.
    let receipt = after(Some(acked), 1, &batch(1, 9..12));
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT agency, stored, encode(digest, 'hex') FROM agencies"
        ),
        vec![vec![
            Some("1".to_string()),
            Some("6".to_string()),
            Some(receipt.digest.to_string())
        ]]
    );
}

/// How the database fails the writer's groups in flight.
#[derive(Debug, Clone, Copy)]
enum Failure {
    /// It stops: every group fails.
    Stops,
    /// The connection of the oldest group in flight is killed: the groups
    /// behind it go on, on their own connections.
    OneConnectionDies,
}

/// The writer keeps several groups in flight, each on its own connection:
/// when the database goes away under them, every batch acknowledged is
/// stored, and nothing is stored behind a batch that was not, whatever
/// group either was in.
#[test]
fn groups_in_flight_when_the_database_stops_leave_each_agency_an_acknowledged_prefix() {
    groups_in_flight_fail(Failure::Stops);
}

#[test]
fn groups_in_flight_behind_a_connection_killed_leave_each_agency_an_acknowledged_prefix() {
    groups_in_flight_fail(Failure::OneConnectionDies);
}

fn groups_in_flight_fail(failure: Failure) {
    use lottery::store::{Sequence, Store};
    let Some((mut pg, url)) = cluster_with_db(&format!("groups_in_flight_fail({failure:?})"))
    else {
        return;
    };
    // A runtime on this thread: while the test is outside `block_on` the
    // writer and its groups stand still, mid-way.
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    const AGENCIES: u32 = 3;
    const BATCHES: u32 = 100;
    let sequences: Vec<Sequence> = (0..AGENCIES).map(|_| Sequence::new()).collect();
    let mut receipts = std::collections::HashMap::new();
    let mut pending = Vec::new();
    rt.block_on(async {
        for i in 0..BATCHES {
            for agency in 1..=AGENCIES {
                let docs = i * 10..i * 10 + 10;
                let bets = batch(agency, docs.clone());
                let receipt = after(receipts.get(&agency).copied(), agency, &bets);
                receipts.insert(agency, receipt);
                let stored = store
                    .submit(&bets, 0, &sequences[agency as usize - 1], receipt)
                    .await
                    .unwrap();
                pending.push((agency, docs, receipt, stored));
            }
            if i % 10 == 9 {
                // The writer takes what waits as a group: many groups.
                tokio::task::yield_now().await;
            }
        }
        // Some are stored: the database fails with the rest in flight.
        pending[0].3.as_mut().await.unwrap();
    });
    match failure {
        Failure::Stops => pg.stop(),
        Failure::OneConnectionDies => {
            let killed = pg.query(
                "postgres",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = 'lottery' AND application_name = 'lottery' \
                 AND xact_start IS NOT NULL ORDER BY xact_start LIMIT 1",
            );
            assert_eq!(
                killed,
                vec![vec![Some("t".to_string())]],
                "no group in flight"
            );
        }
    }
    let outcomes: Vec<_> = rt.block_on(async {
        let mut outcomes = Vec::new();
        for (agency, docs, receipt, stored) in pending.drain(1..) {
            outcomes.push((agency, docs, receipt, stored.await.is_ok()));
        }
        outcomes
    });
    assert!(
        outcomes.iter().any(|o| !o.3),
        "the database stopped after every batch was stored: nothing was in flight"
    );
    // Per agency: the documents acknowledged, and the receipt after them.
    let mut acked: std::collections::BTreeMap<u32, (Vec<u32>, Option<lottery::receipt::Receipt>)> =
        (1..=AGENCIES).map(|a| (a, (Vec::new(), None))).collect();
    acked.get_mut(&1).unwrap().0.extend(0..10);
    acked.get_mut(&1).unwrap().1 = Some(after(None, 1, &batch(1, 0..10)));
    for (agency, docs, receipt, ok) in outcomes {
        let entry = acked.get_mut(&agency).unwrap();
        let behind_a_failure = entry.0.len() < entry.1.map_or(0, |r| r.count as usize);
        if ok {
            assert!(
                !behind_a_failure && entry.0.len() + 10 == receipt.count as usize,
                "agency {agency}: documents {docs:?} acknowledged behind a batch that was not"
            );
            entry.0.extend(docs);
            entry.1 = Some(receipt);
        } else {
            // Marks the failure: whatever comes later must fail too.
            entry.1 = Some(receipt);
        }
    }
    if matches!(failure, Failure::Stops) {
        pg.start_again();
    }
    // Each agency comes back (a new connection) with one more batch after
    // what it was acknowledged.
    rt.block_on(async {
        for agency in 1..=AGENCIES {
            let (docs, _) = &acked[&agency];
            let prior = (!docs.is_empty())
                .then(|| after(None, agency, &batch(agency, docs.iter().copied())));
            let bets = batch(agency, 5000..5003);
            let stored = store
                .submit(&bets, 0, &Sequence::new(), after(prior, agency, &bets))
                .await
                .unwrap();
            stored.await.unwrap();
        }
        store.close().await;
    });
    for agency in 1..=AGENCIES {
        let docs: Vec<u32> = acked[&agency].0.iter().copied().chain(5000..5003).collect();
        let expected = docs
            .iter()
            .enumerate()
            .map(|(seq, doc)| format!("{doc}@{seq}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(
            pg.query(
                "lottery",
                &format!(
                    "SELECT string_agg(document || '@' || seq, ' ' ORDER BY seq), \
                     (SELECT stored FROM agencies WHERE agency = {agency}) \
                     FROM bets WHERE agency = {agency}"
                )
            ),
            vec![vec![Some(expected), Some(docs.len().to_string())]],
            "agency {agency}"
        );
    }
}

#[test]
fn centrals_starting_together_create_the_schema_once() {
    use lottery::store::{postgres::PostgresStore, Durability};
    let Some((pg, url)) = cluster_with_db("centrals_starting_together_create_the_schema_once")
    else {
        return;
    };
    let target = target(&url);
    runtime().block_on(async {
        let opens = (0..4).map(|_| PostgresStore::open(&target, Durability::Sync, STEP));
        for opened in futures::future::join_all(opens).await {
            let (store, stored) = opened.unwrap();
            assert!(stored.is_empty());
            lottery::store::Store::close(&store).await;
        }
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT version FROM schema_version ORDER BY version"
        ),
        (1..=lottery::store::postgres::schema::MIGRATIONS.len())
            .map(|v| vec![Some(v.to_string())])
            .collect::<Vec<_>>()
    );
}

/// The relay's word that a `COMMIT`'s answer was lost means the database
/// committed. The writer sends the new counts and the `COMMIT` together,
/// so an answer to what went before the `COMMIT` can come back after it:
/// taking that for the `COMMIT`'s answer had the relay cut the connection
/// before the `COMMIT` reached the database, or tell of it before it
/// happened. Here the `COMMIT` waits for a lock the test holds, so what
/// the relay says before it is let go can be seen.
#[test]
fn the_relay_tells_of_a_lost_answer_only_once_the_database_has_committed() {
    let Some((pg, url)) = cluster_with_db("the_relay_tells_of_a_lost_answer") else {
        return;
    };
    // A deferred trigger: each transaction that inserted into `t` takes
    // advisory lock 7 as it commits.
    pg.query(
        "lottery",
        "CREATE TABLE t (x integer); \
         CREATE FUNCTION take_lock_7() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_advisory_xact_lock(7); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON t \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION take_lock_7()",
    );
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let holder = rt.block_on(async {
        let holder = common::pg::client(&url).await;
        holder
            .batch_execute("SELECT pg_advisory_lock(7)")
            .await
            .unwrap();
        holder
    });
    relay.arm(Lose::Answer);
    let through_relay = relay.url("lottery");
    let client = std::thread::spawn(move || {
        runtime().block_on(async {
            let client = common::pg::client(&through_relay).await;
            client
                .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
                .await
                .unwrap();
            // A query answered at once, and the `COMMIT` behind it.
            let (before, commit) = futures::join!(
                client.simple_query("SELECT 1"),
                client.batch_execute("COMMIT")
            );
            (before.is_ok(), commit.is_ok())
        })
    });
    pg.poll(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE query = 'COMMIT' AND wait_event_type = 'Lock'",
        "1",
    );
    assert_eq!(
        relay.lost_yet(),
        None,
        "the COMMIT is waiting for its lock: nothing is committed yet"
    );
    rt.block_on(async {
        holder
            .batch_execute("SELECT pg_advisory_unlock(7)")
            .await
            .unwrap()
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Answer);
    assert_eq!(
        pg.query("lottery", "SELECT count(*) FROM t"),
        vec![vec![Some("1".to_string())]],
        "told of a lost answer, the COMMIT has happened"
    );
    let (_, committed) = client.join().unwrap();
    assert!(
        !committed,
        "the client never hears that its COMMIT happened"
    );
}

#[test]
fn rows_of_a_commit_never_acknowledged_are_taken_back_out_before_the_next_batch() {
    use lottery::store::Store;
    let Some((pg, _)) = cluster_with_db("rows_of_a_commit_never_acknowledged") else {
        return;
    };
    let relay = CommitRelay::start(&pg);
    let rt = runtime();
    let store = rt.block_on(open_store(&relay.url("lottery")));
    let acked = after(None, 1, &batch(1, 0..3));
    rt.block_on(async {
        store_batch(&store, &batch(1, 0..3), acked).await.unwrap();
        // The next batch's commit happens but its answer is lost: the
        // central never acknowledges those rows, so their agency sends
        // them again.
        relay.arm(Lose::Answer);
        let lost = batch(1, 3..6);
        let receipt = after(Some(acked), 1, &lost);
        assert!(store_batch(&store, &lost, receipt).await.is_err());
    });
    assert_eq!(relay.wait_lost(STEP), Lose::Answer);
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..6)), Some("6".into())]],
        "the commit whose answer was lost happened"
    );
    rt.block_on(async {
        let next = after(Some(acked), 1, &batch(1, 6..9));
        store_batch(&store, &batch(1, 6..9), next).await.unwrap();
        store.close().await;
    });
    assert_eq!(
        agency_one(&pg),
        vec![vec![
            Some("0@0 1@1 2@2 6@3 7@4 8@5".to_string()),
            Some("6".into())
        ]]
    );
}

#[test]
fn a_database_from_before_receipts_gets_its_digests_from_its_rows_at_open() {
    use lottery::store::postgres::{schema::MIGRATIONS, PostgresStore};
    use lottery::store::{Durability, Store};
    let Some((pg, url)) = cluster_with_db("a_database_from_before_receipts") else {
        return;
    };
    // What a central of schema version 1 left: rows and counts, no digests.
    pg.query(
        "lottery",
        &format!(
            "CREATE TABLE schema_version (version integer PRIMARY KEY); {} \
             INSERT INTO schema_version VALUES (1); \
             INSERT INTO bets SELECT 1, g, 'Ana', 'Pérez', (10 + g)::text, '1999-03-17', 7574 \
             FROM generate_series(0, 2) g; \
             INSERT INTO bets SELECT 2, g, 'Ana', 'Pérez', (20 + g)::text, '1999-03-17', 7574 \
             FROM generate_series(1, 0, -1) g; \
             INSERT INTO agencies (agency, stored) VALUES (1, 3), (2, 2)",
            MIGRATIONS[0]
        ),
    );
    let stored = runtime().block_on(async {
        let (store, stored) = PostgresStore::open(&target(&url), Durability::Sync, STEP)
            .await
            .unwrap();
        store.close().await;
        stored
    });
    // Chained in seq order, not the order the rows were inserted in
    // (agency 2's went in backwards).
    let receipts = BTreeMap::from([
        (1, after(None, 1, &batch(1, 10..13))),
        (2, after(None, 2, &batch(2, 20..22))),
    ]);
    assert_eq!(stored, receipts);
    assert_eq!(stored_receipts(&pg, "lottery"), receipts);
    assert_eq!(
        pg.query("lottery", "SELECT max(version) FROM schema_version"),
        vec![vec![Some(MIGRATIONS.len().to_string())]]
    );
}

/// An agency that never said HELLO has no row in `agencies` until its
/// first batch's transaction makes one: batches of it in groups in flight
/// one behind the other are each stored after the last, not refused.
#[test]
fn a_new_agency_s_batches_in_groups_one_behind_the_other_are_all_stored() {
    use lottery::store::{Sequence, Store};
    let Some((pg, url)) = cluster_with_db("a_new_agency_s_batches_in_groups") else {
        return;
    };
    runtime().block_on(async {
        let store = open_store(&url).await;
        let sequence = Sequence::new();
        let mut receipt = None;
        let mut pending = Vec::new();
        for i in 0..12u32 {
            let bets = batch(7, i * 10..i * 10 + 10);
            let next = after(receipt, 7, &bets);
            receipt = Some(next);
            pending.push(store.submit(&bets, 0, &sequence, next).await.unwrap());
            // Each batch a group of its own, started before the last commits.
            tokio::task::yield_now().await;
        }
        for (i, stored) in pending.into_iter().enumerate() {
            stored
                .await
                .unwrap_or_else(|e| panic!("batch {i} refused: {e}"));
        }
        store.close().await;
    });
    assert_eq!(
        pg.query(
            "lottery",
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq), \
                    (SELECT stored FROM agencies WHERE agency = 7) FROM bets"
        ),
        vec![vec![
            Some("120".to_string()),
            Some("120".to_string()),
            Some("0".to_string()),
            Some("119".to_string()),
            Some("120".to_string())
        ]]
    );
}

#[test]
fn a_batch_whose_rows_the_database_does_not_all_keep_is_refused_and_none_of_it_stays() {
    use lottery::store::Store;
    let Some((pg, url)) = cluster_with_db("a_batch_whose_rows_the_database_does_not_all_keep")
    else {
        return;
    };
    let rt = runtime();
    let store = rt.block_on(open_store(&url));
    let first = batch(1, 0..3);
    let acked = after(None, 1, &first);
    rt.block_on(store_batch(&store, &first, acked)).unwrap();
    // Someone's trigger on the table quietly drops a row: COPY then
    // stores fewer rows than it was sent, and says so in its count.
    pg.query(
        "lottery",
        "CREATE FUNCTION drop_document_4() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.document = '4' THEN RETURN NULL; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER drop_document_4 BEFORE INSERT ON bets \
         FOR EACH ROW EXECUTE FUNCTION drop_document_4()",
    );
    let second = batch(1, 3..6);
    let refused = rt
        .block_on(store_batch(&store, &second, after(Some(acked), 1, &second)))
        .expect_err("a batch the database kept only part of was acknowledged");
    assert!(
        refused
            .to_string()
            .contains("the database stored 2 of the 3 rows sent"),
        "{refused}"
    );
    rt.block_on(store.close());
    assert_eq!(
        agency_one(&pg),
        vec![vec![Some(numbered(0..3)), Some("3".into())]],
        "nothing of the refused batch stays"
    );
}
