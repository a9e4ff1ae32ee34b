//! One round: the target moves from the source snapshot it last applied (P) to a new one (S).
//!
//! Invariants, and why they hold:
//! - **Everything applied is read at S.** One `REPEATABLE READ READ ONLY` source transaction
//!   fixes S with its first query, then reads both the pending keys (capture rows visible at S
//!   whose writing transaction was not visible at P — PgQ's rule, so transactions that commit
//!   out of order, or stay open across rounds, land in exactly one round) and the rows for those
//!   keys. The target therefore moves from the source's state at P to its state at S.
//! - **TRUNCATE cannot slip under S.** A TRUNCATE is not MVCC-safe: a table first read after a
//!   concurrent TRUNCATE committed looks empty even at an older snapshot. The round holds
//!   ACCESS SHARE locks on the tables it reads. Those it was told to expect (the daemon: the
//!   tables of its last round that applied changes) are locked before S is taken (`LOCK TABLE`
//!   takes no snapshot): a TRUNCATE of them committed before the lock is visible at S, and one
//!   that comes later waits for the round. The others are locked once the round knows it needs them,
//!   after S, and then it checks (in another session) that no TRUNCATE of them committed after
//!   S; if one did, the round starts over at a new snapshot. That check runs while the tables
//!   are applied; nothing commits before its answer.
//! - **One target transaction per round**, with the progress row updated in it: after any crash
//!   the target holds the source's state at P or at S, never a mix. The progress row is locked
//!   and compared with P first, so a second applier (daemon, `sync --once`, cutover) rolls back
//!   instead of applying twice.
//! - **State, not events**: the target rows of every pending key (old keys of key changes
//!   included) are deleted, then the rows at S are copied in. Applying a round twice, or over
//!   a restored dump that already holds some of its changes, gives the same result.

use std::collections::BTreeMap;

use futures_util::{SinkExt, StreamExt};
use pgferry_core::artifact::Dialect;
use pgferry_core::ident::literal;
use pgferry_core::{QualifiedName, Session};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Statement, Transaction};

use crate::copy::{pass_through, pass_through_after, PassError};
use crate::registry::{CapturedTable, Key};
use crate::SyncError;

/// What a round applied to one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableApplied {
    /// `schema.table` for people to read.
    pub table: String,
    /// Capture rows (changes) the round covered.
    pub changes: u64,
    /// Key images staged and deleted on the target: the key of every change plus the old key
    /// of every key change (not deduplicated: a key changed twice counts twice; deduplicating
    /// on the source cost more than the rest of the staging).
    pub keys: u64,
    /// Rows copied in (keys that exist at the round's snapshot).
    pub rows: u64,
    /// Whether the round replayed a TRUNCATE of the table (or of one of its partitions).
    pub truncated: bool,
    /// Conflicts decided (two-way syncs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<crate::conflict::Decision>,
}

/// The outcome of one round.
#[derive(Clone, Debug, Serialize)]
pub struct RoundOutcome {
    /// The source snapshot the target now holds.
    pub snapshot: String,
    pub tables: Vec<TableApplied>,
    /// Whether the round was committed table by table (`--split-rounds-above`).
    pub split: bool,
    /// The ids of the tables the round read (for [`RoundContext::lock_first`]).
    #[serde(skip)]
    pub(crate) table_ids: Vec<i32>,
}

/// What a round needs to know about its source and target.
#[derive(Clone, Copy)]
pub(crate) struct RoundContext<'a> {
    pub dialect: Dialect,
    pub source_node: &'a str,
    pub previous: Option<&'a str>,
    pub tables: &'a BTreeMap<i32, CapturedTable>,
    /// Captured tables this sync leaves out (table patterns): their changes are not applied.
    pub skipped: &'a std::collections::BTreeSet<i32>,
    pub replica_role: bool,
    /// `server_version_num` of the source and of the target.
    pub versions: (u32, u32),
    /// Commit a round table by table when it holds more changes than this (and foreign keys
    /// are not checked on the target).
    pub split_above: Option<u64>,
    /// A two-way sync: the target's own changes are checked for conflicts.
    pub two_way: Option<&'a crate::conflict::Exchange>,
    /// Tables (ids) to lock against TRUNCATE before the snapshot is taken, because the round
    /// will probably read them: the daemon passes those of its last round that applied changes. A table
    /// locked this way needs no check for a TRUNCATE after the snapshot.
    pub lock_first: &'a [i32],
}

impl<'a> RoundContext<'a> {
    /// A round of `info`'s captured tables to a target that holds the source's snapshot
    /// `previous`: one transaction, one-way (set `split_above` and `two_way` after).
    pub fn new(
        info: &'a crate::SourceInfo,
        previous: Option<&'a str>,
        replica_role: bool,
        versions: (u32, u32),
    ) -> Self {
        RoundContext {
            dialect: info.dialect,
            source_node: &info.node_id,
            previous,
            tables: &info.tables,
            skipped: &info.skipped,
            replica_role,
            versions,
            split_above: None,
            two_way: None,
            lock_first: &[],
        }
    }
}

pub(crate) enum RoundResult {
    Applied(RoundOutcome),
    /// A TRUNCATE committed after the round's snapshot, or one holds a table right now: start
    /// over a little later.
    Retry,
}

/// Up to this many changes, a table's pending keys go to the target as query parameters
/// (held in pgferry's memory: a few hundred KiB at most) instead of through a temporary table,
/// whose creation, COPY and ANALYZE cost more than the whole small round otherwise.
const SMALL_TABLE_CHANGES: u64 = 1_000;

/// A round with at most this many changes in all reads them, keys included, with its snapshot
/// (one round trip and one scan of the capture table); a table of it with more than
/// [`SMALL_TABLE_CHANGES`] streams its keys through a temporary table, as in any round. Above
/// it a round scans the capture table three times (that first read, stopped at the limit, a
/// count per table, then the small tables' keys): 6.5 ms of the source's time a round at
/// 2,000 changes, against 1.3 ms for one scan of 1,000 (a lab source at full speed, where the
/// daemon's longer pause makes rounds of about 2,000). The keys held meanwhile are a few hundred
/// KiB at most.
const FEW_CHANGES: u64 = 5 * SMALL_TABLE_CHANGES;

/// The planner settings of a round's transactions, on both sides:
/// - `work_mem`: enough for the hash joins and aggregates over a large round's keys to stay in
///   memory (on the servers; pgferry's own memory does not grow with it).
/// - `random_page_cost`: a round reads and deletes rows by key, and what it touches was written
///   moments ago, so an index probe costs what it costs on cached pages. At the default (4) the
///   planner preferred hashing a whole table to probing its key index a few hundred times once
///   the table held some 100,000 rows: measured on a growing, insert-only table
///   (pgbench_history at full speed), the target's DELETE of a round's 561 keys took 21.8 ms by
///   hash join over a sequential scan, 0.55 ms by index with 1.1, and the round's cost grew
///   with the table instead of with its changes. Large rounds (keys a sizeable part of the
///   table) still hash.
const ROUND_SETTINGS: &str = "SET LOCAL work_mem = '64MB'; SET LOCAL random_page_cost = 1.1";

/// The SQL condition selecting the capture rows `d` that are pending after snapshot `previous`.
pub(crate) fn pending_condition(
    dialect: Dialect,
    previous: Option<&str>,
) -> Result<String, SyncError> {
    let Some(p) = previous else {
        return Ok("true".into());
    };
    let xmin: u64 = p
        .split(':')
        .next()
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| {
            SyncError::Core(pgferry_core::Error::Dsn {
                reason: format!("stored progress snapshot {p:?} is not a snapshot"),
            })
        })?;
    let xid_type = dialect.xid_type();
    Ok(format!(
        "d.xid >= '{xmin}'::{xid_type} AND NOT {}(d.xid, {}::{})",
        dialect.visible_in_snapshot(),
        literal(p),
        dialect.snapshot_type()
    ))
}

/// Runs one round from `ctx.previous` to a new snapshot. `probe` is a second source session,
/// used to look past the round's snapshot for TRUNCATEs.
pub(crate) async fn run(
    source: &mut Session,
    probe: &Session,
    target: &mut Session,
    ctx: &RoundContext<'_>,
) -> Result<RoundResult, SyncError> {
    let pending = pending_condition(ctx.dialect, ctx.previous)?;
    let source_label = source.target.clone();
    let target_label = target.target.clone();
    let stx = crate::begin_read_only(source, "starting the round's source transaction").await?;
    let sq = |ctx: &str, e: tokio_postgres::Error| {
        SyncError::Core(pgferry_core::Error::Query {
            context: ctx.to_owned(),
            target: source_label.clone(),
            source: e,
        })
    };
    // Sent together (tokio-postgres pipelines them), executed in order: the snapshot query is
    // the transaction's first, so it fixes S, and the pending changes are read at S. Queries
    // of a round are sent unprepared with their parameter types (`query_typed`): one round trip
    // each instead of a prepare and an execute.
    // The tables the round expects, locked against TRUNCATE before S is taken (module docs).
    let first: Vec<&CapturedTable> = ctx
        .lock_first
        .iter()
        .filter_map(|id| ctx.tables.get(id))
        .collect();
    let mut prologue = ROUND_SETTINGS.to_string();
    if !first.is_empty() {
        let names: Vec<String> = first.iter().map(|t| t.name.to_string()).collect();
        prologue.push_str("; ");
        prologue.push_str(&truncate_lock_sql(&names));
    }
    let snapshot_sql = format!("SELECT {}::text", ctx.dialect.current_snapshot());
    // A round of few changes (the daemon's usual one) reads them all, keys included, in this
    // first round trip and in one scan of the capture table; a larger one counts them per
    // table here and reads its small tables' keys later.
    let few_sql = format!(
        "SELECT d.table_id, d.op = 'T', d.key, d.old_key FROM pgferry.delta d
          WHERE {pending} LIMIT {}",
        FEW_CHANGES + 1
    );
    let shipped_sql = "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1";
    // Joined, not tried: when the lock fails, the statements after it fail too, and the round
    // must see the lock's error to start over.
    let (prologue, snapshot, few, shipped, view) = tokio::join!(
        stx.batch_execute(&prologue),
        async {
            stx.query_typed_one(&snapshot_sql, &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .map_err(|e| sq("taking the round's snapshot", e))
        },
        async {
            stx.query_typed(&few_sql, &[])
                .await
                .map_err(|e| sq("finding pending changes", e))
        },
        async {
            // Two-way: which of the target's own changes the source already applied.
            let Some(ex) = ctx.two_way else {
                return Ok(None);
            };
            stx.query_typed(shipped_sql, &[(&ex.local_node_id, Type::TEXT)])
                .await
                .map(|r| r.first().and_then(|r| r.get::<_, Option<String>>(0)))
                .map_err(|e| sq("reading what the source applied from the target", e))
        },
        async {
            // Meshes of three or more nodes: the source's progress on its peers.
            match ctx.two_way {
                Some(ex) if crate::mesh::applies(ex) => {
                    crate::mesh::read_source(&stx, &source_label)
                        .await
                        .map(Some)
                }
                _ => Ok(None),
            }
        }
    );
    if let Err(e) = prologue {
        // An expected table locked exclusively right now, or dropped since the last round: the
        // round starts over without expectations (see `round_with_retries`).
        let code = e.code();
        if code == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
            || (code == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE)
                && !first.is_empty())
        {
            tracing::debug!(error = %e, "an expected table cannot be locked: starting over");
            return Ok(RoundResult::Retry);
        }
        return Err(sq("locking the round's tables against TRUNCATE", e));
    }
    let (snapshot, few, shipped, view) = (snapshot?, few?, shipped?, view?);
    let unshipped = match ctx.two_way {
        Some(ex) => Some(pending_condition(ex.local_dialect, shipped.as_deref())?),
        None => None,
    };
    let two_way = match (ctx.two_way, unshipped.as_deref()) {
        (Some(ex), Some(unshipped)) => Some(TwoWayRound {
            ex,
            unshipped,
            mesh: view.as_ref(),
        }),
        _ => None,
    };
    tracing::debug!(snapshot = %snapshot, "round started");
    // Per table: changes, whether one is a TRUNCATE, and (a round of few changes) the keys.
    let mut found: BTreeMap<i32, (u64, bool, Vec<Key>)> = BTreeMap::new();
    let few_keys = few.len() as u64 <= FEW_CHANGES;
    if few_keys {
        for r in &few {
            let e = found.entry(r.get(0)).or_default();
            let truncate: bool = r.get(1);
            e.0 += 1;
            e.1 |= truncate;
            if !truncate {
                e.2.extend(r.get::<_, Option<Key>>(2));
            }
            e.2.extend(r.get::<_, Option<Key>>(3));
        }
    } else {
        let pending_sql = format!(
            "SELECT d.table_id, count(*), bool_or(d.op = 'T') FROM pgferry.delta d
              WHERE {pending} GROUP BY 1 ORDER BY 1"
        );
        for r in stx
            .query_typed(&pending_sql, &[])
            .await
            .map_err(|e| sq("counting pending changes", e))?
        {
            let count: i64 = r.get(1);
            found.insert(r.get(0), (count as u64, r.get(2), Vec::new()));
        }
    }
    let mut work: Vec<(&CapturedTable, u64, bool)> = Vec::new();
    let mut keys_found = Vec::new();
    for (id, (count, truncate, keys)) in found {
        if let Some(t) = ctx.tables.get(&id) {
            work.push((t, count, truncate));
            keys_found.push(keys);
        } else if !ctx.skipped.contains(&id) {
            // Captured after this sync read the source's tables: its changes must not be
            // acknowledged unapplied (purge would drop them). Start over with fresh tables.
            return Err(SyncError::CaptureChanged {
                source_db: source_label.clone(),
            });
        }
    }
    let labels = (source_label.as_str(), target_label.as_str());
    let total: u64 = work.iter().map(|(_, c, _)| c).sum();
    let split = match ctx.split_above {
        Some(n) if total > n && ctx.replica_role => true,
        Some(n) if total > n => {
            tracing::warn!(
                changes = total,
                "not splitting the round: foreign keys are checked on the target (no replica role)"
            );
            false
        }
        _ => false,
    };
    if split {
        tracing::warn!(
            changes = total,
            tables = work.len(),
            "splitting the round: each table commits on its own at the same snapshot, \
             so until the round ends the target's tables are not at one common snapshot"
        );
    }
    // The target's transaction starts (its progress row locked and checked, the columns read,
    // and, unless the round is split, the progress recorded) while the source locks the
    // round's tables against TRUNCATE and reads their columns: neither waits for the other, and
    // a round that starts over rolls the target's back.
    let tables: Vec<&CapturedTable> = work.iter().map(|(t, _, _)| *t).collect();
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let table_ids: Vec<i32> = tables.iter().map(|t| t.table_id).collect();
    // The round's tables that were not locked before S: locked now, then checked for a
    // TRUNCATE committed after S.
    let after_s: Vec<&CapturedTable> = tables
        .iter()
        .copied()
        .filter(|t| !first.iter().any(|f| f.table_id == t.table_id))
        .collect();
    let late_names: Vec<String> = after_s.iter().map(|t| t.name.to_string()).collect();
    let lock = async {
        if names.is_empty() {
            return Ok((true, Vec::new()));
        }
        let (locked, columns) = tokio::join!(
            async {
                if late_names.is_empty() {
                    return Ok(true);
                }
                lock_against_truncate(&stx, &late_names, &source_label).await
            },
            crate::schema::columns(&stx, &names, ctx.versions.0, &source_label)
        );
        // A table locked exclusively fails the column query too: the lock decides.
        if !locked? {
            return Ok((false, Vec::new()));
        }
        Ok((true, columns?))
    };
    let start = TargetStart {
        columns_of: &names,
        progress: (!split).then_some(snapshot.as_str()),
    };
    let ((locked, src_columns), (mut ttx, ahead, dst_columns)) =
        tokio::try_join!(lock, begin_target(target, ctx, &target_label, start))?;
    if !locked {
        return Ok(RoundResult::Retry);
    }
    let columns: Vec<Vec<pgferry_core::Ident>> =
        crate::schema::compare_all(&tables, &src_columns, &dst_columns, labels.1)?
            .into_iter()
            .map(|cs| cs.into_iter().map(|c| c.name).collect())
            .collect();
    // Whether a TRUNCATE slipped under S between the snapshot and the locks taken after it:
    // asked now, from the probe session, while the tables are applied; the answer is awaited
    // before anything commits (a split round commits table by table, so it waits for it first).
    let late_ids: Vec<i32> = after_s.iter().map(|t| t.table_id).collect();
    let at = snapshot.clone();
    let late = async {
        if late_ids.is_empty() {
            return Ok(false);
        }
        truncated_after(probe, ctx.dialect, &late_ids, &at, &source_label).await
    };
    futures_util::pin_mut!(late);
    if split && late.as_mut().await? {
        return Ok(RoundResult::Retry);
    }

    // A small table's pending keys: found above (a round of few changes, unless a split round
    // left tables ahead of P, which have their own pending changes) or read now for all small
    // tables at once.
    let mut pendings = Vec::with_capacity(work.len());
    for (t, _, _) in &work {
        pendings.push(pending_condition(
            ctx.dialect,
            ahead.get(&t.table_id).map(String::as_str).or(ctx.previous),
        )?);
    }
    let found: Vec<Option<Vec<Key>>> = if few_keys && ahead.is_empty() {
        keys_found
            .into_iter()
            .zip(&work)
            .map(|(keys, (_, changes, _))| (*changes <= SMALL_TABLE_CHANGES).then_some(keys))
            .collect()
    } else {
        small_keys(&stx, &work, &pendings, labels).await?
    };
    let small_keys: Vec<Option<SmallKeys>> = work
        .iter()
        .zip(found)
        .map(|((t, _, _), keys)| keys.map(|k| SmallKeys::of(t, &k)))
        .collect();
    if let Some(ex) = ctx.two_way {
        let small: Vec<(&CapturedTable, &SmallKeys)> = work
            .iter()
            .zip(&small_keys)
            .filter_map(|((t, _, _), k)| Some((*t, k.as_ref()?)))
            .collect();
        lock_all(&ttx, ex, &small, &target_label).await?;
    }
    let mut statements = if ctx.two_way.is_none() {
        let each: Vec<_> = work
            .iter()
            .zip(&pendings)
            .zip(columns.iter().zip(&small_keys))
            .map(|(((t, _, _), pending), (columns, small))| CopyOf {
                table: t,
                pending,
                columns,
                small: small.as_ref(),
            })
            .collect();
        copy_statements(&stx, &ttx, &each, labels)
            .await?
            .into_iter()
            .map(Some)
            .collect()
    } else {
        Vec::new()
    };
    statements.resize_with(work.len(), || None);
    let prepared = columns.into_iter().zip(small_keys).zip(statements).map(
        |((columns, small_keys), statements)| Prepared {
            columns,
            small_keys,
            statements,
        },
    );
    let each: Vec<TableWork> = work
        .into_iter()
        .zip(&pendings)
        .zip(prepared)
        .map(
            |(((table, changes, has_truncate), pending), prep)| TableWork {
                table,
                changes,
                has_truncate,
                pending,
                prep,
            },
        )
        .collect();
    let mut applied = Vec::new();
    if split {
        for work in each {
            let table_id = work.table.table_id;
            applied.push(apply_table(&stx, &ttx, work, two_way.as_ref(), labels).await?);
            // This table is at S: record it, commit, and go on in a new transaction.
            ttx.execute(
                "INSERT INTO pgferry.applied_table (source_node_id, table_id, snapshot) VALUES ($1, $2, $3)
                 ON CONFLICT (source_node_id, table_id) DO UPDATE SET snapshot = excluded.snapshot",
                &[&ctx.source_node, &table_id, &snapshot],
            )
            .await
            .map_err(tgt(&target_label, "recording a table's progress"))?;
            ttx.commit()
                .await
                .map_err(tgt(&target_label, "committing a table of a split round"))?;
            ttx = begin_target(target, ctx, &target_label, TargetStart::default())
                .await?
                .0;
        }
        record_progress(&ttx, ctx.source_node, &snapshot)
            .await
            .map_err(tgt(&target_label, "recording the target's progress"))?;
    } else {
        let apply = async {
            // One-way: the small tables without a TRUNCATE go through one pipeline
            // (apply_small), after the others.
            let mut small = Vec::new();
            // Per table, in order: applied alone (true) or in the pipeline.
            let mut alone = Vec::new();
            for work in each {
                let batched = two_way.is_none() && !work.has_truncate;
                match work {
                    TableWork {
                        table,
                        changes,
                        prep:
                            Prepared {
                                small_keys: Some(keys),
                                statements: Some((rows, into)),
                                ..
                            },
                        ..
                    } if batched => {
                        alone.push(false);
                        small.push(Small {
                            table,
                            changes,
                            keys,
                            rows,
                            into,
                        });
                    }
                    work => {
                        alone.push(true);
                        applied
                            .push(apply_table(&stx, &ttx, work, two_way.as_ref(), labels).await?);
                    }
                }
            }
            let mut batch = apply_small(&stx, &ttx, small, labels).await?.into_iter();
            // Reported in the order of the tables, as before.
            let mut each = std::mem::take(&mut applied).into_iter();
            for alone in alone {
                applied.extend(if alone { each.next() } else { batch.next() });
            }
            Ok(())
        };
        let (truncated, ()) = tokio::try_join!(late, apply)?;
        if truncated {
            return Ok(RoundResult::Retry);
        }
    }
    if let (Some(ex), Some(view)) = (ctx.two_way, &view) {
        crate::mesh::forget(&ttx, ex, view, &target_label).await?;
    }
    // Ending the read-only source transaction alongside the target's commit changes nothing
    // the round guarantees.
    let (committed, ended) = tokio::join!(ttx.commit(), stx.commit());
    committed.map_err(tgt(&target_label, "committing the round"))?;
    ended.map_err(|e| sq("ending the round's source transaction", e))?;
    tracing::debug!(snapshot = %snapshot, "round committed");
    Ok(RoundResult::Applied(RoundOutcome {
        snapshot,
        tables: applied,
        split,
        table_ids,
    }))
}

/// The apply of a two-way round's table: the rows at the round's snapshot are staged, then
/// pending keys without a row are deleted, rows whose key exists are UPDATEd in place, and the
/// others inserted. In place, not deleted and copied in: a local transaction waiting for a row
/// the round locked then changes the round's version of the row (PostgreSQL follows an updated
/// row to its new version), where after a delete and an insert its UPDATE would find no row and
/// change nothing. `first` (the savepoint) runs first; `delete_sql` is the table's delete of its
/// pending keys (with `params` when `small`).
#[allow(clippy::too_many_arguments)]
async fn merge_rows(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    t: &CapturedTable,
    columns: &[pgferry_core::Ident],
    rows_sql: &str,
    first: impl std::future::Future<Output = Result<(), tokio_postgres::Error>>,
    delete_sql: &str,
    small: bool,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<u64, PassError<tokio_postgres::Error>> {
    let name = &t.name;
    let stage = format!("pgferry_rows_{}", t.table_id);
    let cols: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let on = same_key_rows(t);
    let key_names: Vec<&str> = t.key.iter().map(|(c, _, _)| c.as_str()).collect();
    let set: Vec<String> = columns
        .iter()
        .filter(|c| !key_names.contains(&c.as_str()))
        .map(|c| format!("{c} = r.{c}"))
        .collect();
    first.await.map_err(PassError::First)?;
    let rows = stage_rows(stx, ttx, name, &stage, &cols.join(", "), rows_sql).await?;
    let gone =
        format!("{delete_sql} AND NOT EXISTS (SELECT 1 FROM pg_temp.{stage} AS r WHERE {on})");
    if small {
        ttx.execute_typed(&gone, params).await?;
    } else {
        ttx.batch_execute(&gone).await?;
    }
    let mut sql = String::new();
    if !set.is_empty() {
        sql.push_str(&format!(
            "UPDATE {name} AS t SET {} FROM pg_temp.{stage} AS r WHERE {on};",
            set.join(", "),
        ));
    }
    sql.push_str(&insert_missing(name, &stage, &cols.join(", "), &on));
    ttx.batch_execute(&sql).await?;
    Ok(rows)
}

/// `t.k1 = r.k1 AND …`: a row `t` of `table` and a staged row `r` with the same key.
fn same_key_rows(table: &CapturedTable) -> String {
    table
        .key
        .iter()
        .map(|(c, _, _)| format!("t.{c} = r.{c}"))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Copies the rows of `copy_out` (a `COPY (…) TO STDOUT` on `stx`) into `stage`, a new
/// temporary table on `ttx` with the columns `cols` of `table`, dropped at commit (one of the
/// same name from earlier in the transaction is replaced). Returns the rows copied.
async fn stage_rows(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    table: &QualifiedName,
    stage: &str,
    cols: &str,
    copy_out: &str,
) -> Result<u64, PassError<tokio_postgres::Error>> {
    ttx.batch_execute(&format!(
        "DROP TABLE IF EXISTS pg_temp.{stage};
         CREATE TEMP TABLE {stage} ON COMMIT DROP AS SELECT {cols} FROM {table} WITH NO DATA"
    ))
    .await
    .map_err(PassError::First)?;
    Ok(pass_through(
        stx,
        copy_out,
        ttx,
        &format!("COPY pg_temp.{stage} ({cols}) FROM STDIN"),
    )
    .await?)
}

/// The INSERT into `table` of the rows of `stage` whose key it lacks (`on`: [`same_key_rows`]).
fn insert_missing(table: &QualifiedName, stage: &str, cols: &str, on: &str) -> String {
    format!(
        "INSERT INTO {table} ({cols}) SELECT {cols} FROM pg_temp.{stage} AS r
          WHERE NOT EXISTS (SELECT 1 FROM {table} AS t WHERE {on})"
    )
}

/// Two-way: locks the local rows of every small table's incoming keys at once, all or nothing
/// ([`crate::conflict::lock_rows`]), so the round holds its rows before it changes any. Large
/// tables lock theirs when they are applied ([`crate::conflict::probe`]).
async fn lock_all(
    ttx: &Transaction<'_>,
    ex: &crate::conflict::Exchange,
    tables: &[(&CapturedTable, &SmallKeys)],
    label: &str,
) -> Result<(), SyncError> {
    let statements: Vec<(String, Vec<Vec<Option<String>>>)> = tables
        .iter()
        .filter_map(|(t, keys)| {
            let local = ex.local_tables.get(&t.name.to_string())?;
            let incoming = format!("({})", local.keys_from_params());
            Some((
                crate::conflict::lock_sql(local, &incoming),
                keys.columns.clone(),
            ))
        })
        .collect();
    if statements.is_empty() {
        return Ok(());
    }
    crate::conflict::lock_rows(ttx, &statements, LOCK_ALL_TRIES, label).await
}

/// How many times [`lock_all`] tries before the round gives up (and starts over).
const LOCK_ALL_TRIES: u32 = 5_000;

/// Makes sure no TRUNCATE of `tables` slips under `snapshot`, the snapshot of `stx`: locks them
/// `IN ACCESS SHARE MODE NOWAIT` in `stx` (a TRUNCATE now waits for the transaction), then
/// checks from `probe`, a second source session, that no TRUNCATE of them committed after
/// `snapshot`. Returns false when the caller must start over at a new snapshot: one did, or a
/// table is locked exclusively right now.
///
/// NOWAIT: the caller never waits for a lock while holding others, so it can never be part of a
/// deadlock with an application (which PostgreSQL might resolve by aborting the application's
/// transaction). Rounds and `pgferry copy` share this.
pub(crate) async fn hold_against_truncate(
    stx: &Transaction<'_>,
    probe: &Session,
    dialect: Dialect,
    tables: &[&CapturedTable],
    snapshot: &str,
    source_label: &str,
) -> Result<bool, SyncError> {
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    if !lock_against_truncate(stx, &names, source_label).await? {
        return Ok(false);
    }
    let ids: Vec<i32> = tables.iter().map(|t| t.table_id).collect();
    Ok(!truncated_after(probe, dialect, &ids, snapshot, source_label).await?)
}

/// The first half of [`hold_against_truncate`]: locks `tables` (quoted names) `IN ACCESS SHARE
/// MODE NOWAIT` in `stx`. False: one is locked exclusively right now.
async fn lock_against_truncate(
    stx: &Transaction<'_>,
    tables: &[String],
    source_label: &str,
) -> Result<bool, SyncError> {
    match stx.batch_execute(&truncate_lock_sql(tables)).await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
            tracing::debug!("a captured table is locked exclusively: starting over");
            Ok(false)
        }
        Err(e) => Err(SyncError::Core(pgferry_core::Error::Query {
            context: "locking captured tables against TRUNCATE".into(),
            target: source_label.to_owned(),
            source: e,
        })),
    }
}

/// The lock that keeps a TRUNCATE of `tables` (quoted names) waiting for the transaction:
/// ACCESS SHARE, never waited for (see [`hold_against_truncate`]).
fn truncate_lock_sql(tables: &[String]) -> String {
    format!(
        "LOCK TABLE {} IN ACCESS SHARE MODE NOWAIT",
        tables.join(", ")
    )
}

/// The second half of [`hold_against_truncate`], once the tables are locked: whether a
/// TRUNCATE of one of `ids` committed after `snapshot` (seen from `probe`, another session).
async fn truncated_after(
    probe: &Session,
    dialect: Dialect,
    ids: &[i32],
    snapshot: &str,
    source_label: &str,
) -> Result<bool, SyncError> {
    let late: bool = probe
        .client
        .query_typed_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM pgferry.delta d WHERE d.table_id = ANY($1) AND d.op = 'T'
                   AND NOT {}(d.xid, $2::text::{}))",
                dialect.visible_in_snapshot(),
                dialect.snapshot_type()
            ),
            &[(&ids, Type::INT4_ARRAY), (&snapshot, Type::TEXT)],
        )
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: "looking for TRUNCATEs after the snapshot".into(),
                target: source_label.to_owned(),
                source: e,
            })
        })?
        .get(0);
    if late {
        tracing::info!("a TRUNCATE committed after the snapshot: starting over");
    }
    Ok(late)
}

/// An error of the target session, with what was being done.
fn tgt(label: &str, ctx: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let (ctx, label) = (ctx.into(), label.to_owned());
    move |e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: ctx,
            target: label,
            source: e,
        })
    }
}

/// What a round's target transaction reads and writes as it starts, in the same round trip.
#[derive(Default)]
struct TargetStart<'s> {
    /// Tables (quoted names) whose columns are read for the column check.
    columns_of: &'s [String],
    /// The round's snapshot, recorded as the target's progress at once when the round commits
    /// in one transaction: the progress row is locked anyway, and the rest of the round commits
    /// with it or not at all.
    progress: Option<&'s str>,
}

/// A round's target transaction as it starts: the tables a split round already moved past P
/// (their own progress), and the target's columns of [`TargetStart::columns_of`].
type Started<'a> = (
    Transaction<'a>,
    BTreeMap<i32, String>,
    Vec<Vec<crate::schema::Column>>,
);

/// Starts a target transaction of the round: replica role when allowed, and the progress row
/// locked and checked against P, so a second applier rolls back instead of applying twice.
async fn begin_target<'a>(
    target: &'a mut Session,
    ctx: &RoundContext<'_>,
    label: &str,
    start: TargetStart<'_>,
) -> Result<Started<'a>, SyncError> {
    let ttx = target
        .client
        .transaction()
        .await
        .map_err(tgt(label, "starting the round's target transaction"))?;
    // The round is acknowledged to the source after it commits, and the source may then purge
    // what it applied: the commit must be durable even where the target runs with
    // synchronous_commit off, or a crash could lose a round the source no longer holds.
    // `pgferry.apply`: a target frozen by a cutover lets this transaction's rows through (a
    // database cut over with --reverse follows the new one; `sql/freeze_apply.sql`).
    // Two-way: the round locks rows applications write, maybe in another order. With a short
    // deadlock_timeout the round runs the deadlock check first (an application's is 1 s), so
    // when they wait for each other the round, not the application, is aborted, and starts
    // over at once (round_with_retries); ordinary waits for a busy row just wait. A role that
    // may not set it gets a short lock_timeout instead: the round gives way to any busy row.
    let settings = format!(
        "{ROUND_SETTINGS}; SET LOCAL synchronous_commit = on; SET LOCAL pgferry.apply = 'on'{}{}",
        if ctx.replica_role {
            "; SET LOCAL session_replication_role = replica"
        } else {
            ""
        },
        match ctx.two_way {
            Some(ex) if ex.deadlock_timeout => {
                "; SET LOCAL deadlock_timeout = '20ms'; SET LOCAL lock_timeout = '10s'"
            }
            Some(_) => "; SET LOCAL lock_timeout = '10ms'",
            None => "",
        }
    );
    let node: [(&(dyn ToSql + Sync), Type); 1] = [(&ctx.source_node, Type::TEXT)];
    // Pipelined, run in order: settings, the progress row locked, (under that lock) the tables
    // a split round already moved past P, which keep their own progress, the columns, and the
    // progress recorded. The first error in statement order is the cause (the statements after
    // it fail only because the transaction has).
    let (set, held, ahead, columns, progressed) = tokio::join!(
        ttx.batch_execute(&settings),
        ttx.query_typed_one(
            "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1 FOR UPDATE",
            &node,
        ),
        ttx.query_typed(
            "SELECT table_id, snapshot FROM pgferry.applied_table WHERE source_node_id = $1",
            &node,
        ),
        async {
            if start.columns_of.is_empty() {
                return Ok(Vec::new());
            }
            crate::schema::columns(&ttx, start.columns_of, ctx.versions.1, label).await
        },
        async {
            let Some(snapshot) = start.progress else {
                return Ok(());
            };
            record_progress(&ttx, ctx.source_node, snapshot).await
        }
    );
    set.map_err(tgt(
        label,
        "setting the round's planner settings, synchronous_commit, apply mark and replica role",
    ))?;
    let held: Option<String> = held
        .map_err(tgt(label, "locking the target's progress"))?
        .get(0);
    let ahead = ahead.map_err(tgt(label, "reading the target's per-table progress"))?;
    let columns = columns?;
    progressed.map_err(tgt(label, "recording the target's progress"))?;
    if held.as_deref() != ctx.previous {
        return Err(SyncError::AnotherApplier {
            target: label.to_owned(),
        });
    }
    let ahead = ahead.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok((ttx, ahead, columns))
}

/// Records `snapshot` as the target's progress from `source_node` (and ends the per-table
/// progress of a split round), inside the round's transaction.
async fn record_progress(
    ttx: &Transaction<'_>,
    source_node: &str,
    snapshot: &str,
) -> Result<(), tokio_postgres::Error> {
    let progress: [(&(dyn ToSql + Sync), Type); 2] =
        [(&source_node, Type::TEXT), (&snapshot, Type::TEXT)];
    let (progressed, cleared) = tokio::join!(
        ttx.execute_typed(
            "UPDATE pgferry.applied SET snapshot = $2, rounds = rounds + 1, applied_at = pg_catalog.now()
              WHERE source_node_id = $1",
            &progress,
        ),
        ttx.execute_typed(
            "DELETE FROM pgferry.applied_table WHERE source_node_id = $1",
            &progress[..1],
        )
    );
    progressed.and(cleared).map(|_| ())
}

/// What a two-way round's tables need to find and decide conflicts.
struct TwoWayRound<'a> {
    ex: &'a crate::conflict::Exchange,
    /// The condition selecting the target's own capture rows the source has not applied.
    unshipped: &'a str,
    /// Meshes of three or more nodes ([`crate::mesh`]).
    mesh: Option<&'a crate::mesh::SourceView>,
}

/// Replays a TRUNCATE of `victim` (`t` or one of its partitions) in a two-way round. A
/// TRUNCATE removes the rows its node had; rows written concurrently elsewhere survive on every
/// node: the local node's rows of keys it changed and the source had not applied (and, in
/// meshes of three or more, rows it holds from another peer the source had not applied) are
/// kept, every other local row goes, and the source's whole table at the round's snapshot
/// comes in for the keys the local node does not keep. The source's rows written after its
/// TRUNCATE include rows it applied from other nodes, which its capture does not list: hence
/// the whole table. Kept keys the source also changed meet the round's conflict check as usual.
async fn truncate_two_way(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    tw: &TwoWayRound<'_>,
    t: &CapturedTable,
    victim: &QualifiedName,
    columns: &[pgferry_core::Ident],
    labels: (&str, &str),
) -> Result<(), SyncError> {
    let (_, target_label) = labels;
    let human = victim.human();
    let lt = tw.ex.local_tables.get(&t.name.to_string()).ok_or_else(|| {
        SyncError::NotCapturedOnPeer {
            table: t.name.human(),
            node: tw.ex.local.clone(),
        }
    })?;
    let own = ttx
        .query(
            &format!(
                "SELECT DISTINCT y.key {}",
                crate::conflict::touched_keys(tw.unshipped, lt.table_id)
            ),
            &[],
        )
        .await
        .map_err(tgt(
            target_label,
            format!("reading local changes to {human}"),
        ))?;
    let mut kept: Vec<Vec<Option<String>>> = own.iter().map(|r| r.get(0)).collect();
    if let Some(view) = tw.mesh {
        kept.extend(crate::mesh::unknown_to_source(ttx, tw.ex, view, lt, target_label).await?);
    }
    let cols = columns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let stage = format!("pgferry_truncated_{}", lt.table_id);
    let delete = if kept.is_empty() {
        format!("DELETE FROM {victim}")
    } else {
        format!(
            "DELETE FROM {victim} AS t WHERE NOT {}",
            crate::conflict::key_in(lt, &kept)
        )
    };
    ttx.batch_execute(&delete)
        .await
        .map_err(tgt(target_label, format!("replaying TRUNCATE of {human}")))?;
    let copying = format!("copying the rows of {human} after its TRUNCATE");
    let copy_out = format!("COPY (SELECT {cols} FROM {victim}) TO STDOUT");
    stage_rows(stx, ttx, victim, &stage, &cols, &copy_out)
        .await
        .map_err(|(PassError::First(e) | PassError::Copy(e))| {
            tgt(target_label, copying.clone())(e)
        })?;
    ttx.batch_execute(&insert_missing(victim, &stage, &cols, &same_key_rows(lt)))
        .await
        .map_err(tgt(target_label, copying))?;
    Ok(())
}

/// One table of a round, as [`apply_table`] (or, for small one-way tables, [`apply_small`])
/// takes it.
struct TableWork<'r> {
    table: &'r CapturedTable,
    /// Capture rows pending for it.
    changes: u64,
    /// Whether one of them is a TRUNCATE.
    has_truncate: bool,
    /// The condition selecting its pending capture rows.
    pending: &'r str,
    prep: Prepared,
}

/// What a table needs before its rows move, read before any table is applied.
struct Prepared {
    /// The columns to copy (checked on both sides).
    columns: Vec<pgferry_core::Ident>,
    /// A small table's pending keys (None: a large one streams them).
    small_keys: Option<SmallKeys>,
    /// One-way rounds: the source's COPY of the rows and the target's COPY into the table
    /// ([`copy_statements`]), prepared for every table of the round at once.
    statements: Option<(Statement, Statement)>,
}

/// A small table's pending keys, as the queries take them.
struct SmallKeys {
    /// How many (key images: a key changed twice counts twice).
    count: u64,
    /// One list per key column ([`CapturedTable::key_columns`]): the parameters of
    /// [`CapturedTable::keys_from_params`], or the constants of
    /// [`CapturedTable::keys_from_literals`].
    columns: Vec<Vec<Option<String>>>,
}

impl SmallKeys {
    fn of(t: &CapturedTable, keys: &[Key]) -> SmallKeys {
        SmallKeys {
            count: keys.len() as u64,
            columns: t.key_columns(keys),
        }
    }

    /// The parameters of [`CapturedTable::keys_from_params`].
    fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.columns
            .iter()
            .map(|c| (c as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
            .collect()
    }
}

/// The target's DELETE of `t`'s rows whose keys are bound as parameters
/// ([`CapturedTable::keys_from_params`]).
fn delete_keys_sql(t: &CapturedTable) -> String {
    let join: Vec<String> = t
        .key
        .iter()
        .map(|(c, _, _)| format!("t.{c} = k.{c}"))
        .collect();
    format!(
        "DELETE FROM {} AS t USING ({}) AS k WHERE {}",
        t.name,
        t.keys_from_params(),
        join.join(" AND ")
    )
}

/// A table a one-way round applies in [`apply_small`].
struct Small<'a> {
    table: &'a CapturedTable,
    changes: u64,
    keys: SmallKeys,
    /// The source's COPY of the rows and the target's COPY into the table ([`copy_statements`]).
    rows: Statement,
    into: Statement,
}

/// Applies the small tables of a one-way round (no TRUNCATE among their changes) as one
/// pipeline: every table's DELETE of its pending keys and every source COPY are sent at once,
/// then the rows of each table are copied in turn, the next table's COPY starting while the
/// previous one ends — about one round trip per table instead of three. The order of the
/// tables does not matter: the target runs under the replica role (or its tables have no
/// foreign keys), and all of it commits together.
async fn apply_small(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    tables: Vec<Small<'_>>,
    labels: (&str, &str),
) -> Result<Vec<TableApplied>, SyncError> {
    let (source_label, target_label) = labels;
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let clock = std::time::Instant::now();
    let sql: Vec<String> = tables.iter().map(|s| delete_keys_sql(s.table)).collect();
    let params: Vec<Vec<(&(dyn ToSql + Sync), Type)>> =
        tables.iter().map(|s| s.keys.params()).collect();
    // Sent on their first poll, in this order: the deletes (driven to their end beside the
    // copies, so their answers never hold up the connection), then the copies.
    let deletes = futures_util::future::join_all(
        sql.iter()
            .zip(&params)
            .map(|(sql, params)| ttx.execute_typed(sql, params)),
    );
    let mut sources: Vec<_> = tables
        .iter()
        .map(|s| Box::pin(futures_util::future::maybe_done(stx.copy_out(&s.rows))))
        .collect();
    let copies = async {
        // The source's COPYs are all sent now; their rows come back in order, each read to its
        // end before the next.
        for source in &mut sources {
            let _ = futures_util::poll!(source.as_mut());
        }
        let into = |i: usize| {
            tgt(
                target_label,
                format!("copying the rows of {}", tables[i].table.name.human()),
            )
        };
        let from = |i: usize| {
            let context = format!("reading the rows of {}", tables[i].table.name.human());
            move |e| {
                SyncError::Core(pgferry_core::Error::Query {
                    context,
                    target: source_label.to_owned(),
                    source: e,
                })
            }
        };
        let mut rows = Vec::with_capacity(tables.len());
        let mut sink = Box::pin(
            ttx.copy_in::<_, bytes::Bytes>(&tables[0].into)
                .await
                .map_err(into(0))?,
        );
        for (i, source) in sources.iter_mut().enumerate() {
            source.as_mut().await;
            let stream = source
                .as_mut()
                .take_output()
                .expect("the source's COPY was awaited above")
                .map_err(from(i))?;
            futures_util::pin_mut!(stream);
            while let Some(chunk) = stream.next().await {
                sink.feed(chunk.map_err(from(i))?).await.map_err(into(i))?;
            }
            match tables.get(i + 1) {
                Some(next) => {
                    let (done, started) =
                        tokio::join!(sink.as_mut().finish(), ttx.copy_in(&next.into));
                    rows.push(done.map_err(into(i))?);
                    sink = Box::pin(started.map_err(into(i + 1))?);
                }
                None => rows.push(sink.as_mut().finish().await.map_err(into(i))?),
            }
        }
        Ok::<_, SyncError>(rows)
    };
    let (deleted, copied) = tokio::join!(deletes, copies);
    // The first error in statement order is the cause (the statements after it fail only
    // because the transaction has).
    for (s, d) in tables.iter().zip(deleted) {
        d.map_err(tgt(
            target_label,
            format!("deleting the pending keys of {}", s.table.name.human()),
        ))?;
    }
    let copied = copied?;
    drop(sources);
    let seconds = clock.elapsed().as_secs_f64();
    Ok(tables
        .into_iter()
        .zip(copied)
        .map(|(s, rows)| {
            let human = s.table.name.human();
            tracing::debug!(table = %human, changes = s.changes, keys = s.keys.count, rows, seconds, "table applied");
            TableApplied {
                table: human,
                changes: s.changes,
                keys: s.keys.count,
                rows,
                truncated: false,
                conflicts: Vec::new(),
            }
        })
        .collect())
}

/// The keys whose rows a table's COPY moves: a one-way round's small table writes the keys it
/// read (`small`, [`CapturedTable::key_params`]) into the COPY (which takes no parameters; they
/// include the old keys of key changes, whose rows at the snapshot are copied like any other
/// deleted key's), so the source does not scan the capture table again for each table; the
/// others read them from the capture rows matching `pending`.
fn copied_keys(t: &CapturedTable, pending: &str, small: Option<&[Vec<Option<String>>]>) -> String {
    match small {
        Some(values) => t.keys_from_literals(values),
        None => format!(
            "SELECT {new} FROM pgferry.delta d WHERE {pending} AND d.table_id = {id} AND d.op <> 'T'",
            new = t.restore("d.key"),
            id = t.table_id,
        ),
    }
}

/// The source's `COPY (…) TO STDOUT` of `t`'s rows whose key is among `keys` (a query), and
/// for which `keep` (empty, or ` AND …` over `t`) holds.
fn rows_copy_sql(
    t: &CapturedTable,
    columns: &[pgferry_core::Ident],
    keys: &str,
    keep: &str,
) -> String {
    let key_tuple = if t.key.len() == 1 {
        format!("t.{}", t.key[0].0)
    } else {
        format!(
            "({})",
            t.key
                .iter()
                .map(|(c, _, _)| format!("t.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "COPY (SELECT {cols} FROM {name} AS t WHERE {key_tuple} IN ({keys}){keep}) TO STDOUT",
        cols = columns
            .iter()
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", "),
        name = t.name,
    )
}

/// The target's `COPY … FROM STDIN` of `columns` into `t`.
fn copy_in_sql(t: &CapturedTable, columns: &[pgferry_core::Ident]) -> String {
    format!(
        "COPY {} ({}) FROM STDIN",
        t.name,
        columns
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What [`copy_statements`] needs of a table.
struct CopyOf<'a> {
    table: &'a CapturedTable,
    /// Its pending condition ([`pending_condition`]).
    pending: &'a str,
    columns: &'a [pgferry_core::Ident],
    /// A small table's pending keys.
    small: Option<&'a SmallKeys>,
}

/// A one-way round's COPY statements for every table (the order of `tables`), prepared at
/// once: tokio-postgres prepares a COPY given as text before running it, a round trip on each
/// side per table; prepared together, the round pays one for all of them.
async fn copy_statements(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    tables: &[CopyOf<'_>],
    labels: (&str, &str),
) -> Result<Vec<(Statement, Statement)>, SyncError> {
    let sql: Vec<(String, String)> = tables
        .iter()
        .map(|c| {
            let keys = copied_keys(c.table, c.pending, c.small.map(|k| k.columns.as_slice()));
            (
                rows_copy_sql(c.table, c.columns, &keys, ""),
                copy_in_sql(c.table, c.columns),
            )
        })
        .collect();
    let (rows, into) = tokio::try_join!(
        async {
            futures_util::future::try_join_all(sql.iter().map(|(rows, _)| stx.prepare(rows)))
                .await
                .map_err(|e| {
                    SyncError::Core(pgferry_core::Error::Query {
                        context: "preparing the copies of the round's rows".into(),
                        target: labels.0.to_owned(),
                        source: e,
                    })
                })
        },
        async {
            futures_util::future::try_join_all(sql.iter().map(|(_, into)| ttx.prepare(into)))
                .await
                .map_err(tgt(
                    labels.1,
                    "preparing the copies into the round's tables",
                ))
        }
    )?;
    Ok(rows.into_iter().zip(into).collect())
}

/// The small tables' pending keys, in the order of `work` (None for a large table: its keys
/// stream through a temporary table). One scan of the capture table for all of them — per
/// pending condition, as tables a split round moved ahead have their own — instead of two per
/// table: under load the capture table holds a second or two of changes, and its scans were
/// most of what rounds cost the source.
async fn small_keys(
    stx: &Transaction<'_>,
    work: &[(&CapturedTable, u64, bool)],
    pendings: &[String],
    labels: (&str, &str),
) -> Result<Vec<Option<Vec<Key>>>, SyncError> {
    let is_small = |changes: u64| changes <= SMALL_TABLE_CHANGES;
    let mut ids_by_pending: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for ((t, changes, _), pending) in work.iter().zip(pendings) {
        if is_small(*changes) {
            ids_by_pending
                .entry(pending.as_str())
                .or_default()
                .push(t.table_id);
        }
    }
    let found = futures_util::future::try_join_all(ids_by_pending.iter().map(
        |(pending, ids)| async move {
            stx.query_typed(
                &CapturedTable::pending_keys_of_tables(pending),
                &[(ids, Type::INT4_ARRAY)],
            )
            .await
        },
    ))
    .await
    .map_err(|e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: "reading the pending keys".into(),
            target: labels.0.to_owned(),
            source: e,
        })
    })?;
    let mut by_table: BTreeMap<i32, Vec<Key>> = BTreeMap::new();
    for row in found.into_iter().flatten() {
        by_table.entry(row.get(1)).or_default().push(row.get(0));
    }
    Ok(work
        .iter()
        .map(|(t, changes, _)| {
            is_small(*changes).then(|| by_table.remove(&t.table_id).unwrap_or_default())
        })
        .collect())
}

/// Applies one table's pending changes at the round's snapshot, inside `ttx`.
async fn apply_table(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    work: TableWork<'_>,
    two_way: Option<&TwoWayRound<'_>>,
    labels: (&str, &str),
) -> Result<TableApplied, SyncError> {
    let TableWork {
        table: t,
        changes,
        has_truncate,
        pending,
        prep,
    } = work;
    let (source_label, target_label) = labels;
    let sq = |c: &str, e: tokio_postgres::Error| {
        SyncError::Core(pgferry_core::Error::Query {
            context: c.to_owned(),
            target: source_label.to_owned(),
            source: e,
        })
    };
    let tq = |c: String| tgt(target_label, c);
    let name = &t.name;
    let human = name.human();
    let Prepared {
        columns,
        small_keys,
        statements,
    } = prep;
    let mut truncated = false;
    if has_truncate {
        let rows = stx
                .query(
                    &format!(
                        "SELECT DISTINCT d.key FROM pgferry.delta d WHERE {pending} AND d.table_id = {} AND d.op = 'T'",
                        t.table_id
                    ),
                    &[],
                )
                .await
                .map_err(|e| sq("reading TRUNCATEs", e))?;
        for r in rows {
            let key: Option<Vec<String>> = r.get(0);
            let victim = match key {
                Some(k) if k.len() == 2 => QualifiedName::new(k[0].clone(), k[1].clone()),
                _ => name.clone(),
            };
            if let Some(tw) = two_way {
                truncate_two_way(stx, ttx, tw, t, &victim, &columns, labels).await?;
                truncated = true;
                continue;
            }
            let referenced: bool = ttx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                          WHERE contype = 'f' AND confrelid = pg_catalog.to_regclass($1))",
                    &[&victim.to_string()],
                )
                .await
                .map_err(tq(format!("checking foreign keys to {}", victim.human())))?
                .get(0);
            // TRUNCATE refuses a table a foreign key references, even under the replica role.
            let sql = if referenced {
                format!("DELETE FROM {victim}")
            } else {
                format!("TRUNCATE {victim}")
            };
            ttx.batch_execute(&sql)
                .await
                .map_err(tq(format!("replaying TRUNCATE of {}", victim.human())))?;
            truncated = true;
        }
    }
    let clock = std::time::Instant::now();
    let id = t.table_id;
    let keys_table = format!("pgferry_keys_{id}");
    let key_defs: Vec<String> = t.key.iter().map(|(c, ty, _)| format!("{c} {ty}")).collect();
    let join: Vec<String> = t
        .key
        .iter()
        .map(|(c, _, _)| format!("t.{c} = k.{c}"))
        .collect();
    let keys_sql = format!("COPY ({}) TO STDOUT", t.pending_keys(pending, true));
    // The target side before the rows: every target row with a pending key (old keys of key
    // changes included) is deleted. A small round passes its keys as parameters; a large one
    // streams them into a temporary table (never collected in pgferry's memory).
    let small = small_keys.is_some();
    let (keys, delete_sql, key_values) = if let Some(k) = small_keys {
        (k.count, delete_keys_sql(t), k.columns)
    } else {
        ttx.batch_execute(&format!(
            "CREATE TEMP TABLE {keys_table} ({}) ON COMMIT DROP",
            key_defs.join(", ")
        ))
        .await
        .map_err(tq(format!("preparing the keys of {human}")))?;
        let keys = pass_through(
            stx,
            &keys_sql,
            ttx,
            &format!("COPY pg_temp.{keys_table} FROM STDIN"),
        )
        .await
        .map_err(tq(format!("moving the pending keys of {human}")))?;
        tracing::debug!(table = %human, keys, seconds = clock.elapsed().as_secs_f64(), "keys staged");
        let sql = format!(
            "ANALYZE pg_temp.{keys_table}; DELETE FROM {name} AS t USING pg_temp.{keys_table} AS k WHERE {}",
            join.join(" AND ")
        );
        (keys, sql, Vec::new())
    };
    // pgferry.delta has no index and its statistics lag behind: for a large set of keys the
    // planner would still pick a nested loop of index probes; a hash join is faster.
    let large = changes > 10_000;
    if large {
        stx.batch_execute("SET LOCAL enable_nestloop = off")
            .await
            .map_err(|e| sq("choosing the join", e))?;
    }
    let params: Vec<(&(dyn ToSql + Sync), Type)> = key_values
        .iter()
        .map(|v| (v as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
        .collect();
    // Two-way: the target's own unshipped changes to these keys are conflicts, decided before
    // any row moves; keys the target keeps are left out of the delete and the copy.
    let mut plan = crate::conflict::Plan::default();
    let mut sides: Option<crate::conflict::Sides<'_>> = None;
    let mut origins = None;
    if let Some(&TwoWayRound {
        ex,
        unshipped,
        mesh,
        ..
    }) = two_way
    {
        let lt =
            ex.local_tables
                .get(&name.to_string())
                .ok_or_else(|| SyncError::NotCapturedOnPeer {
                    table: human.clone(),
                    node: ex.local.clone(),
                })?;
        let s = crate::conflict::Sides {
            stx,
            ttx,
            ex,
            remote_t: t,
            local_t: lt,
            pending,
            unshipped,
            labels,
        };
        sides = Some(s);
        let incoming = if small {
            format!("({})", t.keys_from_params())
        } else {
            format!("pg_temp.{keys_table}")
        };
        let mut found = crate::conflict::probe(
            ttx,
            lt,
            &incoming,
            if small { &params } else { &[] },
            // A small table's rows were locked with every other's (lock_all).
            small,
            unshipped,
            target_label,
        )
        .await?;
        // Meshes of three or more nodes: keys whose row came from another peer are decided
        // against that peer's change (crate::mesh), not against this node's older changes.
        let checked = match mesh {
            Some(view) => Some(crate::mesh::check(s, view).await?),
            None => None,
        };
        if let Some(c) = &checked {
            found.retain(|k| !c.covered.contains(k));
        }
        if !found.is_empty() {
            plan = crate::conflict::plan(s, found).await?;
        }
        if let Some(c) = checked {
            plan.extend(c.plan);
            origins = Some(c.stage);
        }
    }
    let base_delete = delete_sql;
    // The keys whose rows are copied: a one-way round's small table writes the keys it read
    // into the COPY (which takes no parameters; they include the old keys of key changes, whose
    // rows at the snapshot are copied like any other deleted key's), so the source does not
    // scan the capture table again for each table.
    let copied_keys = copied_keys(
        t,
        pending,
        (small && two_way.is_none()).then_some(key_values.as_slice()),
    );
    let rows_sql = |keep: &str| rows_copy_sql(t, &columns, &copied_keys, keep);
    // Two-way: the delete and the copy run under a savepoint; a unique index other than the
    // key refusing a row (two nodes gave two keys the same value) is a clash, decided like a
    // conflict, and the table is applied again.
    let mut clash_checked = two_way.is_none();
    let rows = loop {
        let excluded = plan.excluded();
        let keep = if excluded.is_empty() {
            String::new()
        } else {
            format!(" AND NOT {}", crate::conflict::key_in(t, &excluded))
        };
        let delete_sql = format!("{base_delete}{keep}");
        let rows_sql = rows_sql(&keep);
        // The source starts on the rows while the target deletes.
        let delete = async {
            let savepoint = async {
                if clash_checked {
                    Ok(())
                } else {
                    ttx.batch_execute("SAVEPOINT pgferry_apply").await
                }
            };
            let delete = async {
                if two_way.is_some() {
                    // Two-way rounds delete after staging the rows (merge_rows).
                    Ok(())
                } else if small {
                    ttx.execute_typed(&delete_sql, &params).await.map(|_| ())
                } else {
                    ttx.batch_execute(&delete_sql).await
                }
            };
            tokio::try_join!(savepoint, delete).map(|_| ())
        };
        let applied = if two_way.is_some() {
            merge_rows(
                stx,
                ttx,
                t,
                &columns,
                &rows_sql,
                delete,
                &delete_sql,
                small,
                &params,
            )
            .await
        } else {
            match &statements {
                Some((rows, into)) => pass_through_after(stx, rows, ttx, into, delete).await,
                None => {
                    let into = copy_in_sql(t, &columns);
                    pass_through_after(stx, rows_sql.as_str(), ttx, into.as_str(), delete).await
                }
            }
        };
        let failed = match applied {
            Ok(rows) => break rows,
            Err(e) => e,
        };
        let unique = |e: &tokio_postgres::Error| {
            e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
        };
        let clash = match (&failed, sides) {
            (PassError::Copy(e), Some(s)) if !clash_checked && unique(e) => {
                clash_checked = true;
                ttx.batch_execute("ROLLBACK TO SAVEPOINT pgferry_apply")
                    .await
                    .map_err(tgt(target_label, format!("starting {human} over")))?;
                let relation = if small {
                    format!("({})", t.keys_from_params())
                } else {
                    format!("pg_temp.{keys_table}")
                };
                let incoming = crate::conflict::Incoming {
                    relation: &relation,
                    params: if small { &params } else { &[] },
                    excluded: &excluded,
                    columns: &columns,
                    rows_sql: &rows_sql,
                };
                let clashes = crate::conflict::clashes(s, &incoming).await?;
                (!clashes.is_empty()).then_some((clashes, s.local_t))
            }
            _ => None,
        };
        let Some((clashes, lt)) = clash else {
            return Err(match failed {
                PassError::First(e) => tgt(
                    target_label,
                    format!("deleting the pending keys of {human}"),
                )(e),
                PassError::Copy(e) => tgt(target_label, format!("copying the rows of {human}"))(e),
            });
        };
        crate::conflict::settle_clashes(ttx, lt, &clashes, target_label).await?;
        plan.extend(clashes);
    };
    if large {
        stx.batch_execute("SET LOCAL enable_nestloop = on")
            .await
            .map_err(|e| sq("choosing the join", e))?;
    }
    let mut conflicts = Vec::new();
    if let Some(s) = sides {
        if !plan.is_empty() {
            crate::conflict::carry_out(s, &columns, &plan).await?;
            conflicts = plan.decisions(&human, s.ex);
        }
        if let Some(stage) = &origins {
            crate::mesh::remember(ttx, s.ex, s.local_t, stage, &plan.excluded(), target_label)
                .await?;
        }
    }
    tracing::debug!(
        table = %human,
        changes,
        keys,
        rows,
        seconds = clock.elapsed().as_secs_f64(),
        "table applied"
    );
    Ok(TableApplied {
        table: human,
        changes,
        keys,
        rows,
        truncated,
        conflicts,
    })
}
