//! Delta capture: `install` adds to a source database what records its row changes, and
//! `uninstall` removes it.
//!
//! Invariants:
//! - Install is all-or-nothing: it plans and applies inside one transaction, under an advisory
//!   lock, so two installs never interleave and a refused install leaves no trace.
//! - A table is captured exactly once: as a whole when it is a partitioned table with a key on a
//!   server that allows row triggers on partitioned tables (11+), otherwise through each of its
//!   partitions. TRUNCATE triggers are not inherited, so every partition of a captured
//!   partitioned table carries its own (re-running install adds them to partitions attached
//!   since).
//! - Once install commits, every later write to a captured table is captured: CREATE TRIGGER
//!   waits for writers already in the table, so a dump started after install sees every change
//!   that the capture does not hold.
//! - Re-running adds newly matched tables and repairs missing pgferry triggers; it changes
//!   nothing else, except the capture of tables whose delta columns it is told to change
//!   ([`delta_column`]), regenerated in the same transaction, and capture functions made before
//!   the guard that skips pgferry's own apply (`sql/capture_guard.sql`), regenerated with it.

mod delta_column;
mod error;
mod plan;

pub use delta_column::DeltaColumn;
pub use error::InstallError;
pub use plan::{schema_statements, AddedTable, DeltaColumnsChange, InstallOptions, InstallReport};

use std::time::Duration;

use pgferry_core::artifact::{self, Dialect, SCHEMA};
use pgferry_core::catalog;
use pgferry_core::{Dsn, Session};
use serde::Serialize;

/// The base schema, version 1 (see `sql/`).
pub const SCHEMA_V1_SQL: &str = include_str!("../../../sql/pgferry--1.sql");
/// Template of a table's capture function.
pub const CAPTURE_FUNCTION_SQL: &str = include_str!("../../../sql/capture_function.sql");
/// Body of a statement-mode capture function (see `sql/capture_function.sql`), with the guard
/// that skips pgferry's own apply (`sql/capture_guard.sql`); `sql/capture_statement.plpgsql`
/// is the released body without it.
pub const CAPTURE_STATEMENT_SQL: &str = include_str!("../../../sql/capture_statement_v2.plpgsql");
/// Body of a row-mode capture function, with the guard.
pub const CAPTURE_ROW_SQL: &str = include_str!("../../../sql/capture_row_v2.plpgsql");
/// Body of the capture function of a table with delta columns (row mode), with the guard.
pub const CAPTURE_ROW_DELTA_SQL: &str = include_str!("../../../sql/capture_row_delta_v2.plpgsql");
/// The guard given to the TRUNCATE capture (idempotent; see the file).
pub const CAPTURE_GUARD_SQL: &str = include_str!("../../../sql/capture_guard.sql");
/// What a guarded capture function's source contains (and an unguarded one's does not): the
/// installer regenerates functions without it, and a sync without the replica role relies on it.
pub const CAPTURE_GUARD_MARK: &str = "current_setting('pgferry.apply', true)";
/// What the schema gains when a delta column is first declared (idempotent).
pub const DELTA_COLUMNS_SQL: &str = include_str!("../../../sql/delta_columns.sql");

/// Fills the per-version placeholders of an SQL template.
pub fn render(sql: &str, dialect: Dialect) -> String {
    sql.replace("@XID_TYPE@", dialect.xid_type())
        .replace("@CURRENT_XID@", dialect.current_xid())
        .replace("@SNAPSHOT_TYPE@", dialect.snapshot_type())
        .replace("@CURRENT_SNAPSHOT@", dialect.current_snapshot())
}

/// How many times an install or uninstall starts over after PostgreSQL ended it to resolve a
/// deadlock with an application's transaction (it then rolled back whole).
const DEADLOCK_RETRIES: u32 = 5;

/// Runs `attempt` again, after a short pause, while it fails on a deadlock: adding or removing
/// triggers locks the tables one after another, and an application's transaction writing two
/// of them in the other order can deadlock with it. PostgreSQL then aborts one of the two;
/// when it is pgferry's, the whole change rolled back and starting over is safe, so the
/// application goes on and the install (or uninstall) does not fail for it.
async fn retry_deadlocks<T, F, Fut>(what: &str, mut attempt: F) -> Result<T, InstallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, InstallError>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(InstallError::Core(pgferry_core::Error::Query { source, .. }))
                if tries < DEADLOCK_RETRIES
                    && source.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) =>
            {
                tries += 1;
                tracing::info!(
                    what,
                    tries,
                    "deadlock with an application's transaction: starting over"
                );
                tokio::time::sleep(Duration::from_millis(100 << tries.min(4))).await;
            }
            r => return r,
        }
    }
}

/// Installs capture on the tables the options select. See the module docs for guarantees.
pub async fn install(dsn: &Dsn, opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    retry_deadlocks("install", || install_once(dsn, opts)).await
}

async fn install_once(dsn: &Dsn, opts: &InstallOptions) -> Result<InstallReport, InstallError> {
    let mut session = Session::connect(dsn, "install").await?;
    let dialect = Dialect::new(session.server_version);
    let (server_version, target) = (session.server_version, session.target.clone());
    let q = |ctx: &str, e| pgferry_core::Error::Query {
        context: ctx.to_owned(),
        target: target.clone(),
        source: e,
    };
    let tx = session.begin_locked(opts.lock_timeout).await?;

    let plan = plan::plan(&tx, server_version, dialect, opts, &target).await?;
    let mut report = plan.report;
    if opts.dry_run || report.statements.is_empty() {
        tx.rollback()
            .await
            .map_err(|e| q("ending the install transaction", e))?;
        return Ok(report);
    }
    for (what, stmt) in &report.statements {
        tx.batch_execute(stmt)
            .await
            .map_err(|e| q(&format!("installing: {what}"), e))?;
    }
    let node: String = tx
        .query_one("SELECT node_id FROM pgferry.installation", &[])
        .await
        .map_err(|e| q("reading the node identity", e))?
        .get(0);
    report.node_id = Some(node);
    tx.commit()
        .await
        .map_err(|e| q("committing the install", e))?;
    Ok(report)
}

/// What `uninstall` removed (or would remove).
#[derive(Debug, Serialize)]
pub struct UninstallReport {
    pub dry_run: bool,
    /// Whether a pgferry schema was there at all.
    pub found: bool,
    pub triggers: Vec<String>,
    pub schema_objects: usize,
    pub statements: Vec<String>,
}

/// Removes every object install made, in one transaction. User tables, their data, and their
/// own triggers and functions are untouched.
pub async fn uninstall(
    dsn: &Dsn,
    dry_run: bool,
    lock_timeout: Duration,
) -> Result<UninstallReport, InstallError> {
    retry_deadlocks("uninstall", || uninstall_once(dsn, dry_run, lock_timeout)).await
}

async fn uninstall_once(
    dsn: &Dsn,
    dry_run: bool,
    lock_timeout: Duration,
) -> Result<UninstallReport, InstallError> {
    let mut session = Session::connect(dsn, "uninstall").await?;
    let target = session.target.clone();
    let q = |ctx: &str, e| pgferry_core::Error::Query {
        context: ctx.to_owned(),
        target: target.clone(),
        source: e,
    };
    let tx = session.begin_locked(lock_timeout).await?;
    let found = catalog::schema_exists(&tx, SCHEMA, &target).await?;
    let removal = artifact::pgferry_removal(&tx, &target).await?;
    if !removal.dependents.is_empty() {
        return Err(InstallError::Dependents {
            objects: removal.dependents,
        });
    }
    let (triggers, objects, statements) =
        (removal.triggers, removal.schema_objects, removal.statements);
    let report = UninstallReport {
        dry_run,
        found,
        triggers: triggers
            .iter()
            .map(|t| format!("{} on {}", t.trigger, t.table))
            .collect(),
        schema_objects: objects,
        statements,
    };
    if dry_run {
        tx.rollback().await.map_err(|e| q("rolling back", e))?;
        return Ok(report);
    }
    for s in &report.statements {
        tx.batch_execute(s).await.map_err(|e| q(s, e))?;
    }
    tx.commit()
        .await
        .map_err(|e| q("committing the uninstall", e))?;
    Ok(report)
}
