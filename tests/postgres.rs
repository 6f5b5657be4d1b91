//! The PostgreSQL store against a real cluster (see `common::pg`): each
//! test starts its own throwaway cluster, or says that it skipped.

mod common;

use common::pg::PgCluster;

#[test]
fn the_test_cluster_starts_answers_and_restarts() {
    let Some(mut pg) = PgCluster::start_or_skip("the_test_cluster_starts_answers_and_restarts")
    else {
        return;
    };
    let url = pg.create_db("lottery");
    assert!(url.ends_with("/lottery"), "{url}");
    pg.query(
        "lottery",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (7574)",
    );
    pg.stop();
    pg.start_again();
    assert_eq!(
        pg.query("lottery", "SELECT x FROM t"),
        vec![vec![Some("7574".to_string())]]
    );
}
