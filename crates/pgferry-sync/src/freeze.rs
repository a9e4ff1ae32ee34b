//! The cutover's freeze: every write to the source's captured tables is refused, whatever role
//! writes, so that no change can land after the final round.
//!
//! Why triggers, and not `default_transaction_read_only` or revoked privileges: the setting
//! reaches only new sessions and any session may switch it off; revoking privileges misses
//! table owners and superusers and must be restored exactly on rollback. The freeze is one
//! transaction on the source that
//! 1. locks every captured table `IN EXCLUSIVE MODE` (readers go on; writers queue behind it,
//!    and writers already inside a transaction must finish first — `lock_timeout` bounds that
//!    wait, and on timeout nothing has changed and the sessions in the way are named);
//! 2. puts on every table that holds rows (each partition and inheritance child) a `BEFORE
//!    INSERT OR UPDATE OR DELETE FOR EACH ROW` trigger and a `BEFORE TRUNCATE` trigger calling
//!    `pgferry.refuse_write()`, enabled `ALWAYS` so that they fire under
//!    `session_replication_role = replica` too; row triggers, because a row routed into a
//!    partition through its parent fires the partition's row triggers but not its statement
//!    triggers;
//! 3. records the cutover in `pgferry.cutover` (state `frozen`), and commits.
//!
//! After the commit, every transaction that wrote before it has committed (its changes are
//! captured and visible to any later snapshot) or will fail at its next write: a snapshot taken
//! now holds the source's final state. Only a table owner or a superuser can still write, by
//! dropping or disabling the triggers on purpose (`docs/migration.md`).
//!
//! Unfreezing drops the triggers and marks the cutover `unfrozen`, in one transaction. A
//! finished cutover is marked `done`: the source stays frozen and the sync engine refuses to
//! replicate from it (a daemon left running would otherwise recreate what cutover removed on
//! the targets).
//!
//! **pgferry's own apply sessions are let through** (`sql/freeze_apply.sql`, run after
//! `sql/freeze.sql` so that its definition of the function stands): a round's target
//! transaction sets `pgferry.apply = 'on'`, and a role that may use schema pgferry writing in
//! such a transaction gets its rows through. That is what lets a database cut over with
//! `cutover --reverse` follow the new one while it refuses its applications' writes
//! ([`crate::reverse`]). Unfreezing such a database (the way back, or `pgferry unfreeze`) also
//! forgets its capture's targets and rows: it took the new database's writes without capturing
//! them (they were applied under the replica role), so none of its old targets may resume from
//! it.

use std::time::Duration;

use pgferry_core::artifact::{Dialect, SCHEMA};
use pgferry_core::{catalog, QualifiedName, Session};
use serde::Serialize;

use crate::error::q;
use crate::registry::CapturedTable;
use crate::SyncError;

/// The SQL a freeze runs after locking: the cutover record and the triggers' function.
const FREEZE_SQL: &str = include_str!("../../../sql/freeze.sql");
/// Run right after [`FREEZE_SQL`]: the function lets pgferry's apply sessions through, and the
/// cutover record gains who follows it back.
const FREEZE_APPLY_SQL: &str = include_str!("../../../sql/freeze_apply.sql");
/// The row trigger refusing INSERT, UPDATE and DELETE on a frozen table.
pub const FREEZE_TRIGGER: &str = "pgferry_freeze";
/// The statement trigger refusing TRUNCATE on a frozen table.
pub const FREEZE_TRUNCATE_TRIGGER: &str = "pgferry_freeze_truncate";

/// A cutover recorded on the source (`pgferry.cutover`).
#[derive(Clone, Debug, Serialize)]
pub struct CutoverRecord {
    pub cutover_id: i64,
    /// `frozen`, `done` or `unfrozen`.
    pub state: String,
    pub targets: Vec<String>,
    /// When the freeze committed (RFC 3339, UTC).
    pub frozen_at: String,
    pub finished_at: Option<String>,
    /// The node replicating back into this database (`cutover --reverse`): the way back,
    /// `pgferry cutover` from it to this database, is allowed.
    pub followed_by: Option<String>,
}

/// The source's latest cutover, if it ever had one.
pub async fn latest_cutover(source: &Session) -> Result<Option<CutoverRecord>, SyncError> {
    let exists: bool = source
        .client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.cutover') IS NOT NULL",
            &[],
        )
        .await
        .map_err(source.on_err("looking for cutovers"))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = source
        .client
        .query_opt(
            "SELECT cutover_id, state, targets,
                    pg_catalog.to_char(frozen_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    pg_catalog.to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                    pg_catalog.to_jsonb(c) ->> 'followed_by'
               FROM pgferry.cutover c ORDER BY cutover_id DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(source.on_err("reading the latest cutover"))?;
    // followed_by through to_jsonb: a database frozen by an older pgferry lacks the column.
    Ok(row.map(|r| CutoverRecord {
        cutover_id: r.get(0),
        state: r.get(1),
        targets: r.get(2),
        frozen_at: r.get(3),
        finished_at: r.get(4),
        followed_by: r.get(5),
    }))
}

/// Refuses to replicate from a source that was cut over (its latest cutover is `done`).
pub(crate) async fn refuse_cut_over(source: &Session) -> Result<(), SyncError> {
    match latest_cutover(source).await? {
        Some(c) if c.state == "done" => Err(SyncError::CutOver {
            source_db: source.target.clone(),
            at: c.finished_at.unwrap_or(c.frozen_at),
        }),
        _ => Ok(()),
    }
}

/// The relations that hold rows of the captured `tables`: each table itself when it is not
/// partitioned, and every partition and inheritance child below it, each once.
async fn row_holders(
    tx: &tokio_postgres::Transaction<'_>,
    tables: &[&CapturedTable],
    label: &str,
) -> Result<Vec<QualifiedName>, SyncError> {
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let rows = tx
        .query(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT pg_catalog.to_regclass(n)::oid FROM pg_catalog.unnest($1::text[]) AS n
                 UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid
             )
             SELECT DISTINCT ns.nspname::text, c.relname::text
               FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.oid
               JOIN pg_catalog.pg_namespace ns ON ns.oid = c.relnamespace
              WHERE c.relkind = 'r'
              ORDER BY 1, 2",
            &[&names],
        )
        .await
        .map_err(q(label, "listing the partitions of the captured tables"))?;
    Ok(rows
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// A frozen source.
#[derive(Debug)]
pub(crate) struct Frozen {
    pub cutover_id: i64,
    /// Relations that got freeze triggers.
    pub relations: usize,
}

/// Freezes the captured `tables` (see the module documentation): one transaction, waiting at
/// most `lock_timeout` for the locks. On a lock timeout nothing has changed and the error
/// names the sessions in the way.
pub(crate) async fn freeze(
    session: &mut Session,
    tables: &[&CapturedTable],
    targets: &[String],
    lock_timeout: Duration,
) -> Result<Frozen, SyncError> {
    let label = session.target.clone();
    let dialect = Dialect::new(session.server_version);
    let list = tables
        .iter()
        .map(|t| t.name.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // The transaction ends (rolls back) with this block when the lock timed out.
    {
        let tx = session
            .client
            .transaction()
            .await
            .map_err(q(&label, "starting the freeze"))?;
        match lock_all(&tx, &list, lock_timeout).await {
            Ok(()) => return finish_freeze(tx, &label, dialect, tables, targets).await,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {}
            Err(e) => return Err(q(&label, "locking the captured tables")(e)),
        }
    }
    let blockers = blockers(session, tables).await?;
    Err(SyncError::FreezeTimedOut {
        source_db: label,
        seconds: lock_timeout.as_secs_f64(),
        blockers,
    })
}

async fn lock_all(
    tx: &tokio_postgres::Transaction<'_>,
    list: &str,
    lock_timeout: Duration,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "SET LOCAL lock_timeout = '{}ms'; LOCK TABLE {list} IN EXCLUSIVE MODE",
        lock_timeout.as_millis().max(1)
    ))
    .await
}

/// The rest of the freeze, once the tables are locked.
async fn finish_freeze(
    tx: tokio_postgres::Transaction<'_>,
    label: &str,
    dialect: Dialect,
    tables: &[&CapturedTable],
    targets: &[String],
) -> Result<Frozen, SyncError> {
    let label = label.to_owned();
    tx.batch_execute(FREEZE_SQL)
        .await
        .map_err(q(&label, "creating the freeze's function"))?;
    tx.batch_execute(FREEZE_APPLY_SQL)
        .await
        .map_err(q(&label, "creating the freeze's function"))?;
    let holders = row_holders(&tx, tables, &label).await?;
    let function = pgferry_core::artifact::object("refuse_write");
    let execute = dialect.execute();
    let mut sql = String::new();
    for r in &holders {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {FREEZE_TRIGGER} ON {r};
             CREATE TRIGGER {FREEZE_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {r} FOR EACH ROW {execute} {function}();
             ALTER TABLE {r} ENABLE ALWAYS TRIGGER {FREEZE_TRIGGER};
             DROP TRIGGER IF EXISTS {FREEZE_TRUNCATE_TRIGGER} ON {r};
             CREATE TRIGGER {FREEZE_TRUNCATE_TRIGGER} BEFORE TRUNCATE ON {r} FOR EACH STATEMENT {execute} {function}();
             ALTER TABLE {r} ENABLE ALWAYS TRIGGER {FREEZE_TRUNCATE_TRIGGER};\n"
        ));
    }
    tx.batch_execute(&sql)
        .await
        .map_err(q(&label, "creating the freeze triggers"))?;
    let cutover_id: i64 = tx
        .query_one(
            "INSERT INTO pgferry.cutover (state, targets) VALUES ('frozen', $1) RETURNING cutover_id",
            &[&targets],
        )
        .await
        .map_err(q(&label, "recording the cutover"))?
        .get(0);
    tx.commit()
        .await
        .map_err(q(&label, "committing the freeze"))?;
    Ok(Frozen {
        cutover_id,
        relations: holders.len(),
    })
}

/// Marks a cutover done: the source stays frozen and no longer replicates. `followed_by`: the
/// node that replicates back into it (`cutover --reverse`).
pub(crate) async fn mark_done(
    session: &Session,
    cutover_id: i64,
    followed_by: Option<&str>,
) -> Result<(), SyncError> {
    session
        .client
        .execute(
            "UPDATE pgferry.cutover SET state = 'done', finished_at = pg_catalog.clock_timestamp(), followed_by = $2
              WHERE cutover_id = $1",
            &[&cutover_id, &followed_by],
        )
        .await
        .map_err(session.on_err("recording the cutover as done"))?;
    Ok(())
}

/// What an unfreeze removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Unfrozen {
    /// Freeze triggers dropped.
    pub triggers: usize,
    /// Cutover records marked `unfrozen`.
    pub cutovers: u64,
    /// A database that followed another back (`cutover --reverse`): the targets its capture
    /// forgot (see [`forget_capture`]).
    pub forgotten_targets: Vec<String>,
    /// Its capture rows dropped with them.
    pub capture_rows_dropped: u64,
}

/// Makes the source writable again: drops every freeze trigger and marks its cutovers
/// `unfrozen`, in one transaction, retrying while a lock is in the way (about 30 s). A database
/// that followed another back since it was cut over also forgets its capture's targets and rows
/// in that transaction ([`forget_capture`]).
pub async fn unfreeze(
    session: &mut Session,
    note: &str,
    dry_run: bool,
) -> Result<(Unfrozen, Vec<String>), SyncError> {
    let label = session.target.clone();
    let mut tries = 0u32;
    loop {
        match unfreeze_once(session, note, dry_run).await {
            Err(SyncError::Core(pgferry_core::Error::Query { source, .. }))
                if source.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                    && tries < 15 =>
            {
                tries += 1;
                tracing::info!(source = %label, "unfreeze: a table is locked, retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(tries))).await;
            }
            other => return other,
        }
    }
}

async fn unfreeze_once(
    session: &mut Session,
    note: &str,
    dry_run: bool,
) -> Result<(Unfrozen, Vec<String>), SyncError> {
    let label = session.target.clone();
    let dialect = Dialect::new(session.server_version);
    let tx = session
        .client
        .transaction()
        .await
        .map_err(q(&label, "starting the unfreeze"))?;
    tx.batch_execute("SET LOCAL lock_timeout = '2s'")
        .await
        .map_err(q(&label, "setting lock_timeout"))?;
    let triggers = catalog::triggers_calling(&tx, SCHEMA, &["pgferry\\_freeze%"], &label).await?;
    let mut statements: Vec<String> = triggers
        .iter()
        .map(|t| format!("DROP TRIGGER {} ON {}", t.trigger, t.table))
        .collect();
    let recorded: bool = tx
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.cutover') IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(&label, "looking for cutovers"))?
        .get(0);
    if recorded {
        statements.push(format!(
            "UPDATE pgferry.cutover SET state = 'unfrozen', finished_at = pg_catalog.clock_timestamp(), note = {} WHERE state <> 'unfrozen'",
            pgferry_core::ident::literal(note)
        ));
    }
    // Followed back since it was cut over: its capture's targets and rows are stale.
    let followed = recorded
        && tx
            .query_one(
                "SELECT coalesce(bool_or(c.state = 'done' AND pg_catalog.to_jsonb(c) ->> 'followed_by' IS NOT NULL), false)
                   FROM (SELECT * FROM pgferry.cutover ORDER BY cutover_id DESC LIMIT 1) c",
                &[],
            )
            .await
            .map_err(q(&label, "reading the latest cutover"))?
            .get::<_, bool>(0);
    if followed {
        statements.extend(forget_statements(dialect));
    }
    if dry_run {
        return Ok((
            Unfrozen {
                triggers: triggers.len(),
                ..Unfrozen::default()
            },
            statements,
        ));
    }
    for t in &triggers {
        tx.batch_execute(&format!("DROP TRIGGER {} ON {}", t.trigger, t.table))
            .await
            .map_err(q(&label, format!("dropping {} on {}", t.trigger, t.table)))?;
    }
    let cutovers = if recorded {
        tx.execute(
            "UPDATE pgferry.cutover SET state = 'unfrozen', finished_at = pg_catalog.clock_timestamp(), note = $1 WHERE state <> 'unfrozen'",
            &[&note],
        )
        .await
        .map_err(q(&label, "recording the unfreeze"))?
    } else {
        0
    };
    let (forgotten_targets, capture_rows_dropped) = if followed {
        forget_capture(&tx, dialect, &label).await?
    } else {
        (Vec::new(), 0)
    };
    tx.commit()
        .await
        .map_err(q(&label, "committing the unfreeze"))?;
    Ok((
        Unfrozen {
            triggers: triggers.len(),
            cutovers,
            forgotten_targets,
            capture_rows_dropped,
        },
        statements,
    ))
}

/// The statements of [`forget_capture`], for a dry run.
fn forget_statements(dialect: Dialect) -> [String; 3] {
    [
        "DELETE FROM pgferry.target".to_owned(),
        "DELETE FROM pgferry.delta".to_owned(),
        format!(
            "UPDATE pgferry.installation SET purged_below = {}",
            dialect.current_xid()
        ),
    ]
}

/// Forgets the capture's targets and rows of a database returning to service after following
/// another back (`cutover --reverse`). Its targets no longer follow it: the cutover released
/// them, or left them behind. And since then it took the other database's writes under the
/// replica role, uncaptured: a target resuming from its old progress would miss them, and its
/// capture rows describe a past no target needs. So the registry is emptied, the rows deleted,
/// and the purge horizon moved past them all, so that a target coming back is refused (it needs
/// a fresh copy) instead of silently missing rows. Returns the targets and the rows dropped.
pub(crate) async fn forget_capture(
    tx: &tokio_postgres::Transaction<'_>,
    dialect: Dialect,
    label: &str,
) -> Result<(Vec<String>, u64), SyncError> {
    let [targets, delta, horizon] = forget_statements(dialect);
    let forgotten = tx
        .query(&format!("{targets} RETURNING name"), &[])
        .await
        .map_err(q(label, "forgetting the capture's targets"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let dropped = tx
        .execute(&delta, &[])
        .await
        .map_err(q(label, "dropping the capture's rows"))?;
    tx.execute(&horizon, &[])
        .await
        .map_err(q(label, "moving the purge horizon"))?;
    Ok((forgotten, dropped))
}

/// Sessions holding locks on the `tables` (or their partitions) that a freeze must wait for,
/// described without their queries (which may hold row values).
async fn blockers(session: &Session, tables: &[&CapturedTable]) -> Result<Vec<String>, SyncError> {
    lock_holders(session, tables, 0.0).await
}

/// The sessions [`blockers`] describes, those whose transaction began at least `older_than`
/// seconds ago.
pub(crate) async fn lock_holders(
    session: &Session,
    tables: &[&CapturedTable],
    older_than: f64,
) -> Result<Vec<String>, SyncError> {
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let rows = session
        .client
        .query(
            "WITH RECURSIVE tree(oid) AS (
                 SELECT pg_catalog.to_regclass(n)::oid FROM pg_catalog.unnest($1::text[]) AS n
                 UNION
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.oid
             )
             SELECT DISTINCT a.pid, coalesce(a.usename::text, '?'), coalesce(a.application_name, ''),
                    coalesce(a.client_addr::text, 'local'), coalesce(a.state, '?'),
                    coalesce(extract(epoch FROM pg_catalog.now() - a.xact_start)::float8, 0)
               FROM pg_catalog.pg_locks l
               JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'relation' AND l.granted AND l.mode <> 'AccessShareLock'
                AND l.relation IN (SELECT oid FROM tree)
                AND l.pid <> pg_catalog.pg_backend_pid()
                AND coalesce(extract(epoch FROM pg_catalog.now() - a.xact_start)::float8, 0) >= $2
              ORDER BY 1",
            &[&names, &older_than],
        )
        .await
        .map_err(session.on_err("listing the sessions holding the captured tables"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (pid, user, app, addr, state, age): (i32, String, String, String, String, f64) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
            format!("pid {pid} (user {user}, application {app:?}, from {addr}, {state}, in a transaction for {age:.0} s)")
        })
        .collect())
}
