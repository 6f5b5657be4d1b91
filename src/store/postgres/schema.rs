//! The database's schema, versioned: an ordered list of migrations, each a
//! batch of SQL, applied on start in one transaction under an advisory
//! lock, so several centrals starting together apply each step once.
//!
//! Never edit a step that has shipped: add one. `schema_version` holds one
//! row per step applied.

use tokio_postgres::Client;

use super::PgError;

/// The advisory lock taken while migrating (an arbitrary constant: "lottery"
/// in ASCII), so that concurrent starts queue instead of racing.
const MIGRATION_LOCK: i64 = 0x006c_6f74_7465_7279;

/// The migrations, in order; step `i` brings the schema to version `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: bets, per-agency state and the draw.
    "
    -- One row per agency that stored anything: its count (where its upload
    -- resumes; kept in the same transaction as its rows). finished, epoch
    -- and digest are for several centrals and receipts to come.
    CREATE TABLE agencies (
        agency   integer PRIMARY KEY CHECK (agency > 0),
        stored   bigint  NOT NULL DEFAULT 0 CHECK (stored >= 0),
        finished boolean NOT NULL DEFAULT false,
        epoch    bigint  NOT NULL DEFAULT 0,
        digest   bytea
    );
    -- One row per stored bet. seq is the bet's place in its agency's upload
    -- (0, 1, 2, ...): the key that makes a resumed upload idempotent.
    CREATE TABLE bets (
        agency     integer NOT NULL,
        seq        bigint  NOT NULL,
        first_name text    NOT NULL,
        last_name  text    NOT NULL,
        document   text    NOT NULL,
        birthdate  text    NOT NULL,
        number     integer NOT NULL,
        PRIMARY KEY (agency, seq)
    );
    -- The draw reads only the winning number's rows.
    CREATE INDEX bets_number ON bets (number);
    -- The draw record: at most one row (id is always true).
    CREATE TABLE draw (
        id             boolean PRIMARY KEY DEFAULT true CHECK (id),
        winning_number integer NOT NULL,
        drawn_at       text    NOT NULL,
        bets           bigint  NOT NULL
    );
    -- Per agency, the bets the draw counted and its winners in stored order.
    CREATE TABLE draw_agencies (
        agency  integer PRIMARY KEY,
        bets    bigint  NOT NULL,
        winners text[]  NOT NULL
    );
    ",
    // 2: receipts (issue #14): the draw's seal, each agency's digest in the
    // draw, and the rounds.
    "
    -- NULL only in a draw recorded before receipts: it cannot be checked.
    ALTER TABLE draw ADD COLUMN seal bytea;
    ALTER TABLE draw_agencies ADD COLUMN digest bytea;
    -- One row per sealed round, written in the draw's transaction: a draw
    -- row deleted afterwards is told from not drawn yet by it. kept_as
    -- is NULL while the round is current, then the suffix of the tables
    -- `lottery new-round` kept its rows in (bets_<kept_as>, ...).
    CREATE TABLE rounds (
        round    integer PRIMARY KEY CHECK (round > 0),
        seal     bytea   NOT NULL,
        drawn_at text    NOT NULL,
        bets     bigint  NOT NULL,
        kept_as  text
    );
    ",
    // 3: no index on bets (issue #13, point 7). Each btree index costs the
    // server about as much per inserted row as the row itself and the
    // central's work on it together (1.5 to 2 µs of CPU per row and index on
    // the reference machine, where a whole bet costs the central and its
    // agency about 2.4 µs): with both, the database took half the
    // throughput. Neither pays for itself:
    // - the key (agency, seq) only repeated a guarantee the writer already
    //   holds: a group stores an agency's rows only while holding that
    //   agency's row of `agencies` locked and finding there the count the
    //   rows continue (so no two transactions, on any central, ever write the
    //   same seq), and the draw checks the rows per agency against those
    //   counts, and `verify` their digests;
    // - the index on number served the draw's winners, but the draw reads
    //   every row anyway to count them; a second scan for the winners adds
    //   less than half a second over 10,000,000 rows (docs/PERFORMANCE.md).
    // Reads in stored order (`verify`, a start on a drawn round) sort.
    "
    ALTER TABLE bets DROP CONSTRAINT bets_pkey;
    DROP INDEX bets_number;
    ",
];

/// What [`migrate`] found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    /// The version found (0: an empty database).
    pub from: usize,
    /// The version now.
    pub to: usize,
}

/// Brings the schema up to the latest version.
///
/// # Errors
/// A statement failed (nothing of this start's steps is kept), or the
/// database holds a newer schema than this build knows.
pub async fn migrate(client: &mut Client) -> Result<Migrated, PgError> {
    let tx = client.transaction().await.map_err(PgError::from)?;
    // Held until the transaction ends: a second central waits here, then
    // finds the steps applied.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(PgError::from)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY)")
        .await
        .map_err(PgError::from)?;
    let from: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(PgError::from)?
        .get(0);
    let from = usize::try_from(from).unwrap_or(0);
    if from > MIGRATIONS.len() {
        return Err(format!(
            "the database's schema is version {from}, newer than this build's {}: \
             run a newer lottery",
            MIGRATIONS.len()
        )
        .into());
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(from) {
        tx.batch_execute(step)
            .await
            .map_err(|source| PgError::Schema {
                step: i + 1,
                source,
            })?;
        let version = i32::try_from(i + 1).expect("few migrations");
        tx.execute("INSERT INTO schema_version VALUES ($1)", &[&version])
            .await
            .map_err(PgError::from)?;
    }
    tx.commit().await.map_err(PgError::from)?;
    Ok(Migrated {
        from,
        to: MIGRATIONS.len(),
    })
}

/// The schema's version in the database (0: none yet), read without
/// changing anything.
///
/// # Errors
/// A statement failed.
pub async fn version(client: &Client) -> Result<usize, PgError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await
        .map_err(PgError::from)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let version: i32 = client
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(PgError::from)?
        .get(0);
    Ok(usize::try_from(version).unwrap_or(0))
}
