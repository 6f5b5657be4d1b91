//! The tools' connection, and `lottery new-round` on a database.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::{Client, IsolationLevel};

use crate::model::AgencyId;
use crate::receipt::{self, Receipt, Recomputed};
use crate::store::{Draw, Durability, NewRound, PgTarget, StorageError};

use super::connect::{connect, ConnectionSettings};
use super::record::{load_draw, load_draw_in, record_error};
use super::recover::{chain_rows, recompute, served, BETS_IN_ORDER};
use super::schema;
use super::{database, PgError};

/// The tables that hold one round: kept together by `lottery new-round`.
const ROUND_TABLES: [&str; 5] = ["bets", "agencies", "draw", "draw_agencies", "sales"];

/// A connection for the operator's tools (`lottery verify`, `lottery
/// new-round`): one attempt, and a schema this build knows at its latest
/// version (the central migrates it when it starts).
///
/// # Errors
/// The database cannot be reached, or its schema is not the latest.
pub async fn tool_connection(target: &PgTarget) -> Result<Client, StorageError> {
    let fail = |e: PgError| database(target, e);
    let settings = ConnectionSettings {
        durability: Durability::Sync,
    };
    let client = connect(target, settings)
        .await
        .map_err(|e| fail(e.into()))?;
    let version = schema::version(&client).await.map_err(fail)?;
    if version != schema::MIGRATIONS.len() {
        return Err(fail(PgError::Invalid(format!(
            "the schema is version {version}, this build's is {}: start the central on it once \
             (it migrates the schema), or run a matching lottery",
            schema::MIGRATIONS.len()
        ))));
    }
    Ok(client)
}

/// A tool's connection to the database (`lottery verify`, `winners`,
/// `new-round`): checked against this build's schema once, then asked
/// everything the tool needs.
pub struct Tool {
    target: PgTarget,
    client: Client,
}

impl std::fmt::Debug for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tool")
            .field("target", &self.target)
            .finish()
    }
}

impl Tool {
    /// Connects to `target` as a tool: read only, nothing migrated.
    ///
    /// # Errors
    /// As [`tool_connection`].
    pub async fn open(target: &PgTarget) -> Result<Tool, StorageError> {
        let client = tool_connection(target).await?;
        Ok(Tool {
            target: target.clone(),
            client,
        })
    }

    /// As [`load_draw`].
    ///
    /// # Errors
    /// As [`load_draw`].
    pub async fn load_draw(&mut self) -> Result<Option<Draw>, StorageError> {
        load_draw(&self.target, &mut self.client).await
    }

    /// As [`recompute`].
    ///
    /// # Errors
    /// As [`recompute`].
    pub async fn recompute(&mut self, winning_number: u16) -> Result<Recomputed, StorageError> {
        recompute(&self.target, &mut self.client, winning_number).await
    }

    /// The close of sales kept, if any.
    ///
    /// # Errors
    /// The database failed.
    pub async fn load_close(&mut self) -> Result<Option<crate::store::ClosedRound>, StorageError> {
        super::close::load_close(&self.target, &self.client).await
    }

    /// Each agency's bets stored when sales closed, if they closed.
    ///
    /// # Errors
    /// The database failed.
    pub async fn stored_at_close(
        &mut self,
    ) -> Result<Option<BTreeMap<AgencyId, u64>>, StorageError> {
        super::close::stored_at_close(&self.target, &self.client).await
    }

    /// As [`served`].
    ///
    /// # Errors
    /// As [`served`].
    pub async fn served(&mut self) -> Result<BTreeMap<AgencyId, Receipt>, StorageError> {
        served(&self.target, &mut self.client).await
    }

    /// As [`new_round`].
    ///
    /// # Errors
    /// As [`new_round`].
    pub async fn new_round(
        &mut self,
        agencies: u32,
        winning_number: u16,
    ) -> Result<NewRound, StorageError> {
        new_round(&self.target, &mut self.client, agencies, winning_number).await
    }
}

/// `lottery new-round` on a database: the current round must be drawn and
/// its record must match its bets; its rows are then copied into tables
/// named by round and seal (`bets_round_1_a938d40f`, likewise `agencies_`,
/// `draw_`, `draw_agencies_`), the live tables emptied and `rounds` told
/// where the round went, all in one transaction. The next start of the
/// central is an empty round. Run it with the central stopped.
///
/// # Errors
/// The round is not drawn, its record does not match its bets, a kept
/// table's name is taken, or the database failed.
pub async fn new_round(
    target: &PgTarget,
    client: &mut Client,
    agencies: u32,
    winning_number: u16,
) -> Result<NewRound, StorageError> {
    let fail = |e: tokio_postgres::Error| database(target, e);
    let refuse = |reason: String| record_error(target, reason);
    // A central keeps its writer's connections open while it runs (they
    // carry this build's application_name, or the URL's): one still
    // connected is still serving this round. One that lost every
    // connection (the database restarted, nothing written since) is not
    // seen: stopping the centrals first is still the operator's part. The
    // server ends the backends of a central that just exited a moment
    // after it: they are given up to `STOPPING` to go before they count.
    const STOPPING: std::time::Duration = std::time::Duration::from_secs(3);
    let looked_until = std::time::Instant::now() + STOPPING;
    let running = loop {
        let running = client
            .query(
                "SELECT coalesce(host(client_addr), 'local socket') FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() \
                 AND application_name = current_setting('application_name')",
                &[],
            )
            .await
            .map_err(fail)?;
        if running.is_empty() || std::time::Instant::now() >= looked_until {
            break running;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if !running.is_empty() {
        let from: BTreeSet<String> = running.iter().map(|r| r.get(0)).collect();
        return Err(database(
            target,
            format!(
                "{} connection(s) of a running central (from {}) are open on this database: a new \
             round starts with every central stopped: stop them, then run new-round again",
                running.len(),
                from.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::Serializable)
        .start()
        .await
        .map_err(fail)?;
    // Nothing may change the round while it is checked and kept.
    tx.batch_execute(
        "LOCK TABLE bets, agencies, draw, draw_agencies, rounds IN ACCESS EXCLUSIVE MODE",
    )
    .await
    .map_err(fail)?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(round) FILTER (WHERE kept_as IS NULL), \
                             coalesce(max(round), 0) + 1) FROM rounds",
            &[],
        )
        .await
        .map_err(fail)?
        .get(0);
    let current = current as u32;
    let Some(draw) = load_draw_in(target, &tx).await? else {
        let held: bool = tx
            .query_one("SELECT EXISTS (SELECT 1 FROM bets)", &[])
            .await
            .map_err(fail)?
            .get(0);
        if held {
            return Err(refuse(format!(
                "round {current} is not drawn yet (no draw record) and table bets holds bets: \
                 a new round starts only after the draw"
            )));
        }
        return Ok(NewRound::AlreadyEmpty { round: current });
    };
    let found = chain_rows(&tx, BETS_IN_ORDER, Some(draw.winning_number))
        .await
        .map_err(|why| database(target, why))?;
    let differences = receipt::differences(draw.claimed(), &found, agencies, winning_number);
    if !differences.is_empty() {
        return Err(refuse(format!(
            "does not match the stored bets, so the round is not kept as sealed: {}",
            differences.join("; ")
        )));
    }
    // A draw whose round row is gone (deleted by hand) is sealed now.
    let sealed = tx
        .query_opt(
            "SELECT round FROM rounds WHERE kept_as IS NULL AND seal = $1",
            &[&draw.seal.0.as_slice()],
        )
        .await
        .map_err(fail)?;
    let round = match sealed {
        Some(row) => row.get::<_, i32>(0) as u32,
        None => {
            tx.execute(
                "INSERT INTO rounds (round, seal, drawn_at, bets) VALUES ($1, $2, $3, $4)",
                &[
                    &(current as i32),
                    &draw.seal.0.as_slice(),
                    &draw.drawn_at,
                    &(draw.bets as i64),
                ],
            )
            .await
            .map_err(fail)?;
            current
        }
    };
    let suffix = format!("round_{round}_{}", draw.seal.short());
    for table in ROUND_TABLES {
        let kept = format!("{table}_{suffix}");
        let taken: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&kept])
            .await
            .map_err(fail)?
            .get(0);
        if taken {
            return Err(refuse(format!(
                "cannot keep round {round} as table {kept}: that table exists"
            )));
        }
        // A copy, not a rename: the live tables keep the shape (keys,
        // names) the migrations gave them.
        tx.batch_execute(&format!("CREATE TABLE {kept} AS TABLE {table}"))
            .await
            .map_err(fail)?;
    }
    tx.batch_execute(&format!("TRUNCATE {}", ROUND_TABLES.join(", ")))
        .await
        .map_err(fail)?;
    // The next round's sales are open: the one row every group reads.
    tx.batch_execute("INSERT INTO sales (id) VALUES (true)")
        .await
        .map_err(fail)?;
    tx.execute(
        "UPDATE rounds SET kept_as = $2 WHERE round = $1",
        &[&(round as i32), &suffix],
    )
    .await
    .map_err(fail)?;
    tx.commit().await.map_err(fail)?;
    Ok(NewRound::Kept {
        round,
        seal: draw.seal,
        bets: format!("table bets_{suffix} (receipts in agencies_{suffix})"),
        record: format!("tables draw_{suffix} and draw_agencies_{suffix}"),
        // A close is part of the draw's row: kept with the record.
        close: None,
    })
}
