//! `pgferry cutover --reverse`: a way back after a cutover. The migration finishes as usual,
//! and the new database's writes flow back to the old one, which stays frozen for applications;
//! if the new system misbehaves, `pgferry cutover` in the other direction returns to the old
//! database without losing a write.
//!
//! Invariants, and why they hold:
//! - **No write on the new database escapes.** Capture is installed on it (the old database's
//!   captured tables, one transaction) and the old database registered as its target inside the
//!   outage, after the check and before the cutover is recorded `done` — which is when the
//!   applications may start on the new database. Until then only pgferry writes to it. So every
//!   application write is captured, and the old database's registry entry on it, which has
//!   acknowledged nothing, holds every capture row back from purge until the old one has it.
//!   The old database's progress row for it starts empty: its first round back applies
//!   everything captured since the install. That is exact because the two were equal when the
//!   install committed (the final round had drained the frozen old database, and the check had
//!   compared them); rounds are state, not events, so a row captured while the final round
//!   applied (where the replica role is not allowed on the new database) is copied back
//!   unchanged.
//! - **The old database takes the rows back and nothing else.** Its freeze triggers refuse
//!   every write but a round's (`pgferry.apply`, `sql/freeze_apply.sql`). Its own capture does
//!   not record them: rounds apply under the replica role, which `--reverse` therefore requires
//!   on it. It stays a cut-over source: the sync engine refuses to replicate from it.
//! - **The way back is the ordinary cutover**, from the new database to the old one. Its
//!   preflight accepts a target frozen by a cutover only when that cutover records the source
//!   as the database it follows (`followed_by`). At its end, once the new database is recorded
//!   `done`, the old one is unfrozen and forgets its capture's old targets and rows, in one
//!   transaction ([`crate::freeze::forget_capture`]): they predate the writes it took back.
//! - **A failure changes nothing.** The checks run before the freeze (capture can be installed
//!   on the new database — a dry run of the install —, the replica role on the old one); a
//!   failure inside the outage after the install undoes it ([`undo`]) as the source is unfrozen.

use std::collections::BTreeSet;
use std::time::Duration;

use pgferry_core::artifact::{self, REGISTRY_LOCK_KEY, TRUNCATE_TRIGGER};
use pgferry_core::{Dsn, Ident, QualifiedName, Session, TablePattern};
use pgferry_install::{AddedTable, InstallOptions};
use serde::Serialize;

use crate::error::q;
use crate::{target, SourceInfo, SyncError};

/// What `--reverse` set up, in the cutover's report.
#[derive(Clone, Debug, Serialize)]
pub struct ReverseReport {
    /// The new database, which now captures its writes.
    pub captured_on: String,
    /// The old database, registered as its target (frozen for applications).
    pub follower: String,
    /// The old database's name in the new one's registry of targets.
    pub registered_as: String,
    /// Tables captured on the new database.
    pub tables: usize,
    /// Of them, captured by this cutover (the others were captured already).
    pub capture_added: usize,
    /// The command that replicates the new database's writes back (the daemon; or
    /// `pgferry sync … --once`).
    pub replicate: String,
    /// The command that returns to the old database, losing nothing.
    pub way_back: String,
}

/// The checks of `--reverse`, made before the freeze.
#[derive(Debug)]
pub(crate) struct Plan {
    target: Dsn,
    /// One exact pattern per captured table of the source.
    patterns: Vec<TablePattern>,
}

/// What the reverse step changed so far, for [`undo`].
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Tables this cutover captured on the new database.
    added: Vec<AddedTable>,
    /// The new database's node identity, once known.
    pub target_node: Option<String>,
    /// The old database's entry in the new one's registry.
    registered_as: Option<String>,
    /// Whether the old database got a progress row for the new one.
    progress_row: bool,
}

impl Progress {
    /// Whether anything needs undoing.
    pub fn started(&self) -> bool {
        !self.added.is_empty() || self.registered_as.is_some() || self.progress_row
    }
}

/// Checks, changing nothing, that the new database `target` can capture the source's tables
/// and the source can take its rounds. `ctl` is a session on the source.
pub(crate) async fn preflight(
    ctl: &Session,
    info: &SourceInfo,
    target: &Dsn,
    lock_timeout: Duration,
) -> Result<Plan, SyncError> {
    // The old database has capture triggers of its own on every captured table: rows coming
    // back must be applied under the replica role, or they would be captured again.
    if !target::may_set_replica_role(ctl).await? {
        return Err(SyncError::ReverseRefused {
            reason: format!(
                "pgferry's role on {} may not set session_replication_role = replica, which applying the new database's rows to it needs (its capture triggers would record them as its own changes)\n\
                 fix: cut over as a superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role TO <pgferry's role>",
                ctl.target
            ),
        });
    }
    let patterns = info
        .tables
        .values()
        .map(|t| TablePattern::parse(&t.name.to_string()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SyncError::Core)?;
    let plan = Plan {
        target: target.clone(),
        patterns,
    };
    // The install's own checks (keys, the TRIGGER privilege, every table there), changing
    // nothing.
    pgferry_install::install(target, &plan.install_options(true, lock_timeout))
        .await
        .map_err(|cause| SyncError::ReverseCapture {
            target: target.redacted(),
            cause,
        })?;
    // A capture the new database has already must not hold tables the old one lacks: rounds
    // back would have nowhere to put their rows.
    let wanted: BTreeSet<&QualifiedName> = info.tables.values().map(|t| &t.name).collect();
    let others = captured_elsewhere(target, &wanted).await?;
    if !others.is_empty() {
        return Err(SyncError::ReverseRefused {
            reason: format!(
                "{} captures table(s) the old database does not: {}; their changes could not be applied to it\n\
                 fix: capture the same tables on both, or cut over without --reverse",
                target.redacted(),
                others.join(", ")
            ),
        });
    }
    Ok(plan)
}

/// Tables the database captures that are not in `wanted`.
async fn captured_elsewhere(
    target: &Dsn,
    wanted: &BTreeSet<&QualifiedName>,
) -> Result<Vec<String>, SyncError> {
    let s = Session::connect(target, "cutover reverse").await?;
    let registered: bool = s
        .client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.captured_table') IS NOT NULL",
            &[],
        )
        .await
        .map_err(s.on_err("looking for a capture"))?
        .get(0);
    if !registered {
        return Ok(Vec::new());
    }
    Ok(s.client
        .query(
            "SELECT schema_name, table_name FROM pgferry.captured_table ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(s.on_err("reading the captured tables"))?
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|n| !wanted.contains(n))
        .map(|n| n.human())
        .collect())
}

impl Plan {
    fn install_options(&self, dry_run: bool, lock_timeout: Duration) -> InstallOptions {
        InstallOptions {
            tables: self.patterns.clone(),
            dry_run,
            lock_timeout,
            ..InstallOptions::default()
        }
    }
}

/// Inside the outage, before the cutover is recorded `done`: installs capture on the new
/// database and registers the old one (`source`, `ctl`) as its target. `progress` records each
/// change as it is made, for [`undo`].
pub(crate) async fn open(
    plan: &Plan,
    source: &Dsn,
    ctl: &Session,
    info: &SourceInfo,
    lock_timeout: Duration,
    progress: &mut Progress,
) -> Result<ReverseReport, SyncError> {
    let installed =
        pgferry_install::install(&plan.target, &plan.install_options(false, lock_timeout))
            .await
            .map_err(|cause| SyncError::ReverseCapture {
                target: plan.target.redacted(),
                cause,
            })?;
    progress.added = installed.added.clone();

    let new = Session::connect(&plan.target, "cutover reverse").await?;
    let label = new.target.clone();
    let node: String = new
        .client
        .query_one("SELECT node_id FROM pgferry.installation", &[])
        .await
        .map_err(new.on_err("reading the new database's identity"))?
        .get(0);
    progress.target_node = Some(node.clone());
    let table_ids: Vec<i32> = new
        .client
        .query(
            "SELECT table_id FROM pgferry.captured_table ORDER BY 1",
            &[],
        )
        .await
        .map_err(new.on_err("reading the captured tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();

    // The old database in the new one's registry: nothing acknowledged, so nothing is purged
    // before it has applied it.
    let name = register_follower(
        &new,
        &info.node_id,
        &target::default_name(source),
        &table_ids,
    )
    .await?;
    progress.registered_as = Some(name.clone());

    // The old database's progress for the new one: nothing applied yet, so its first round
    // applies every change captured since the install.
    progress.progress_row = true;
    ctl.client
        .execute(
            "WITH gone AS (DELETE FROM pgferry.applied_table WHERE source_node_id = $1)
             INSERT INTO pgferry.applied (source_node_id, source) VALUES ($1, $2)
             ON CONFLICT (source_node_id) DO UPDATE SET source = excluded.source, snapshot = NULL, rounds = 0, applied_at = NULL",
            &[&node, &label],
        )
        .await
        .map_err(ctl.on_err("registering the old database as a target of the new one"))?;

    let (old, new_dsn) = (
        shell(&source.without_password()),
        shell(&plan.target.without_password()),
    );
    Ok(ReverseReport {
        captured_on: label,
        follower: ctl.target.clone(),
        registered_as: name,
        tables: table_ids.len(),
        capture_added: installed.added.len(),
        replicate: format!("pgferry run --source {new_dsn} --target {old}"),
        way_back: format!("pgferry cutover --source {new_dsn} --target {old}"),
    })
}

/// Registers the node `follower` in `source`'s registry of targets under `name` (or, taken by
/// another node, `name (node)`), listing `table_ids` as received and nothing acknowledged. An
/// older entry of the same node is replaced.
async fn register_follower(
    source: &Session,
    follower: &str,
    name: &str,
    table_ids: &[i32],
) -> Result<String, SyncError> {
    let c = &source.client;
    c.execute(
        "SELECT pg_catalog.pg_advisory_lock($1)",
        &[&REGISTRY_LOCK_KEY],
    )
    .await
    .map_err(source.on_err("locking the registry of targets"))?;
    let registered = async {
        c.execute(
            "DELETE FROM pgferry.target WHERE node_id = $1",
            &[&follower],
        )
        .await?;
        let taken: bool = c
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pgferry.target WHERE name = $1)",
                &[&name],
            )
            .await?
            .get(0);
        let name = if taken {
            format!("{name} ({follower})")
        } else {
            name.to_owned()
        };
        c.execute(
            "INSERT INTO pgferry.target (name, node_id, table_ids) VALUES ($1, $2, $3)",
            &[&name, &follower, &table_ids],
        )
        .await?;
        Ok::<_, tokio_postgres::Error>(name)
    }
    .await
    .map_err(source.on_err("registering the old database as a target"));
    c.execute(
        "SELECT pg_catalog.pg_advisory_unlock($1)",
        &[&REGISTRY_LOCK_KEY],
    )
    .await
    .map_err(source.on_err("unlocking the registry of targets"))?;
    registered.map_err(SyncError::Core)
}

/// Undoes what the reverse step did before the cutover failed: the old database's progress
/// row for the new one, the old database's entry in the new one's registry, and the capture this
/// cutover added on the new database (triggers, functions, registrations and capture rows of
/// those tables; a capture that was there before stays). Best effort: returns what could not
/// be undone.
pub(crate) async fn undo(progress: &Progress, plan: &Plan, ctl: &Session) -> Vec<String> {
    let mut left = Vec::new();
    if let (true, Some(node)) = (progress.progress_row, &progress.target_node) {
        if let Err(e) = ctl
            .client
            .execute(
                "DELETE FROM pgferry.applied WHERE source_node_id = $1",
                &[node],
            )
            .await
        {
            left.push(format!(
                "{}: its progress row for the new database was not removed: {e}",
                ctl.target
            ));
        }
    }
    if progress.registered_as.is_some() || !progress.added.is_empty() {
        if let Err(e) = undo_on_target(progress, &plan.target).await {
            left.push(format!(
                "{}: the capture --reverse installed was not removed ({e}): run `pgferry uninstall` there only if it captures nothing else of yours",
                plan.target.redacted()
            ));
        }
    }
    left
}

async fn undo_on_target(progress: &Progress, target: &Dsn) -> Result<(), SyncError> {
    let mut s = Session::connect(target, "cutover reverse undo").await?;
    let label = s.target.clone();
    let tx = s.begin_locked(Duration::from_secs(5)).await?;
    if let Some(name) = &progress.registered_as {
        tx.execute("DELETE FROM pgferry.target WHERE name = $1", &[name])
            .await
            .map_err(q(&label, "removing the old database from the registry"))?;
    }
    let ids: Vec<i32> = progress.added.iter().map(|a| a.table_id).collect();
    let mut sql = String::new();
    for a in &progress.added {
        let table = &a.table;
        for trigger in a.mode.triggers().iter().chain([&TRUNCATE_TRIGGER]) {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {} ON {table};\n",
                Ident::new(*trigger)
            ));
        }
        for p in &a.partitions {
            sql.push_str(&format!(
                "DROP TRIGGER IF EXISTS {} ON {p};\n",
                Ident::new(TRUNCATE_TRIGGER)
            ));
        }
        sql.push_str(&format!(
            "DROP FUNCTION IF EXISTS {}();\n",
            artifact::capture_function(table)
        ));
    }
    tx.batch_execute(&sql)
        .await
        .map_err(q(&label, "removing the capture's triggers"))?;
    tx.execute(
        "DELETE FROM pgferry.delta WHERE table_id = ANY($1)",
        &[&ids],
    )
    .await
    .map_err(q(&label, "removing the capture's rows"))?;
    tx.execute(
        "DELETE FROM pgferry.captured_table WHERE table_id = ANY($1)",
        &[&ids],
    )
    .await
    .map_err(q(&label, "removing the captured tables"))?;
    tx.commit()
        .await
        .map_err(q(&label, "committing the removal of the capture"))?;
    Ok(())
}

/// Whether the target of a cutover from the source `source_node` is one returning to service
/// (frozen by a cutover of its own, whose record says it follows this source back: the way
/// back). A target frozen otherwise is refused: a cutover must hand the writes over to it.
pub(crate) async fn returning(
    dst: &Session,
    source_node: &str,
    source_label: &str,
) -> Result<bool, SyncError> {
    let Some(c) = crate::freeze::latest_cutover(dst).await? else {
        return Ok(false);
    };
    match c.state.as_str() {
        "unfrozen" => Ok(false),
        "done" if c.followed_by.as_deref() == Some(source_node) => Ok(true),
        _ => Err(SyncError::TargetFrozen {
            target: dst.target.clone(),
            source_db: source_label.to_owned(),
            at: c.finished_at.clone().unwrap_or(c.frozen_at.clone()),
            state: if c.state == "done" {
                "cut over".to_owned()
            } else {
                c.state
            },
        }),
    }
}

/// `text` as one POSIX shell word.
fn shell(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::shell;

    #[test]
    fn shell_words_survive_quotes() {
        assert_eq!(shell("host=h dbname=a"), "'host=h dbname=a'");
        assert_eq!(shell("dbname='it\\'s'"), r"'dbname='\''it\'\''s'\'''");
    }
}
