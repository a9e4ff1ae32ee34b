//! `pgferry copy`: the initial copy of captured tables into a target whose schema exists, all
//! jobs reading one exported source snapshot C, recorded so that the next round applies exactly
//! the changes the copy does not hold.
//!
//! Invariants, and why they hold:
//! - **Nothing the target needs is purged.** Before C is taken, the target's registry entry
//!   exists on the source (created, or a reservation adopted); an entry that acknowledged
//!   nothing holds back all purge, and one that acknowledged P holds back every change not
//!   visible in P. So every change committed after C stays captured until the target has it.
//!   (A purge that started before the entry existed removes only changes visible in other
//!   targets' older acknowledged snapshots, hence visible in C: the copy holds them.)
//! - **Every change after C is captured.** Only captured tables are copied, and their capture
//!   committed before C (it was read before C was taken): a write the copy does not see
//!   committed after the capture triggers existed.
//! - **One snapshot for every job.** C is taken and exported (`pg_export_snapshot()`) by a
//!   `REPEATABLE READ READ ONLY` transaction; every job imports it, so all tables, ranges and
//!   partitions are read at C. That transaction locks the copied tables `IN ACCESS SHARE MODE
//!   NOWAIT` and checks that no TRUNCATE of them committed after C (the rounds' guard, see
//!   [`crate::round::hold_against_truncate`]): a TRUNCATE or table rewrite is not MVCC-safe and
//!   would make a table look empty at C. Like `pg_dump`'s, the locks make DDL and TRUNCATE on
//!   those tables wait until the copy ends.
//! - **Rounds never run over a half-copied table.** The source's registry lists per target the
//!   tables it received. The copied tables are taken off that list before the first row is
//!   written (a round refuses a target that lacks a captured table), and put back only when
//!   every one of them has committed. Meanwhile the copy holds the target's progress row
//!   (`FOR NO KEY UPDATE`), so a round (daemon, `sync`, cutover) waits for it instead of
//!   committing in the middle.
//! - **Resumable.** Target writes are several transactions (one per table or range, `--jobs`
//!   at once). A table whose last piece committed is recorded on the target, with C, in
//!   `pgferry.applied_table` — the per-table progress rounds already honour. A rerun keeps
//!   recorded tables that are not yet listed as received (and whose missing changes cannot
//!   have been purged: see [`resumable`]), copies the rest at a new snapshot,
//!   and refuses (without `--truncate`) tables holding rows without a record: a copy
//!   interrupted in the middle of them, or rows loaded by other means.
//! - **The progress row moves only when every table has committed.** A target that had applied
//!   nothing (and now holds every captured table from copies) gets the oldest of its tables'
//!   copy snapshots as its progress P, which is acknowledged to the source; the records are
//!   cleared. A target already at P (tables captured later, or a table copied again) keeps P.
//!
//! Why keeping P is exact: rounds move **state, not events**. A table copied at C holds the
//! source's state at C; P is older than C (P was read under the progress row's lock before C
//! was taken, and it cannot move while that lock is held). The next round, at S, applies every
//! key with a change not visible in P, re-reading those rows at S: changes between P and C are
//! applied again (harmless: the rows are re-read, not replayed), and every change after C is
//! among them, since what is not visible in C is not visible in P. Keys unchanged since P hold
//! the same rows at C as at S. So after that round the table holds the state at S, like the
//! others. The same argument makes the oldest copy snapshot a correct P for tables copied at
//! several (newer) snapshots by a resumed copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use pgferry_core::ident::literal;
use pgferry_core::{catalog, Dsn, Ident, QualifiedName, Session, TablePattern};
use serde::Serialize;
use tokio_postgres::Transaction;

use crate::error::q;
use crate::registry::CapturedTable;
use crate::target::{self, Intent};
use crate::{round, sequence, source_info, SourceInfo, SyncError};

/// What to copy, and how.
#[derive(Clone, Debug)]
pub struct CopyOptions {
    /// Captured tables to copy (`schema.table` patterns); empty means all.
    pub tables: Vec<TablePattern>,
    /// Jobs: each holds one session per side and copies one table or range at a time.
    pub jobs: usize,
    /// Empty target tables that hold rows before copying them (else they are refused).
    pub truncate: bool,
    /// Plan and check only; change nothing.
    pub dry_run: bool,
    /// Relations larger than this (bytes) are cut into block ranges that jobs share (sources
    /// on PostgreSQL 14 and later, with more than one job).
    pub split_above: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions {
            tables: Vec::new(),
            jobs: 2,
            truncate: false,
            dry_run: false,
            split_above: DEFAULT_SPLIT_ABOVE,
        }
    }
}

/// Relations above this size are split into ranges by default: 128 MiB.
pub const DEFAULT_SPLIT_ABOVE: u64 = 128 << 20;

/// At most this many ranges per relation.
const MAX_RANGES: u64 = 4096;

/// How many times taking the snapshot may start over because a TRUNCATE is in the way (a
/// table locked exclusively, or truncated just after the snapshot): with growing pauses, about
/// 30 s, as for rounds.
const MAX_SNAPSHOT_RETRIES: u32 = 20;

/// What happened, or would happen, to one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableCopied {
    /// `schema.table` for people to read.
    pub table: String,
    /// `copy`, `truncate and copy`, or `resumed` (copied completely by an interrupted run,
    /// kept).
    pub action: &'static str,
    /// Relations read: the table itself, or the leaf partitions of a partitioned table.
    pub relations: usize,
    /// Pieces the table was copied in (ranges and partitions), each its own target
    /// transaction.
    pub pieces: usize,
    /// On-disk size of what was read on the source, in bytes.
    pub size_bytes: u64,
    /// The planner's row estimate (for the plan and the progress display).
    pub estimated_rows: u64,
    /// Rows copied.
    pub rows: u64,
    /// COPY text bytes moved.
    pub bytes: u64,
    /// From the start of its first piece to the end of its last.
    pub seconds: f64,
    /// The source snapshot the table was copied at (a resumed table: its earlier one).
    pub snapshot: Option<String>,
}

/// What a copy did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct CopyReport {
    pub source: String,
    pub target: String,
    /// The target's name in the source's registry (None in a dry run of a new target).
    pub name: Option<String>,
    pub dry_run: bool,
    /// The snapshot this run copied at (None: a dry run, or nothing left to copy).
    pub snapshot: Option<String>,
    /// The target's progress for this source after the copy: the snapshot the next round
    /// starts from (None: it has applied nothing; the copied tables' own snapshots, kept on the
    /// target, stand until its first round).
    pub applied_snapshot: Option<String>,
    /// Whether the target had applied rounds from this source before (its progress was kept).
    pub already_replicating: bool,
    pub jobs: usize,
    /// Whether target sessions used `session_replication_role = replica` (triggers and
    /// foreign keys of the target do not fire).
    pub replica_role: bool,
    pub tables: Vec<TableCopied>,
    pub rows: u64,
    pub bytes: u64,
    /// Sequences moved forward on the target.
    pub sequences_advanced: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    pub bytes_per_second: f64,
}

/// Live counters of a running copy, for a progress display; filled once the plan is known.
#[derive(Debug, Default)]
pub struct CopyProgress {
    tables: OnceLock<Vec<TableProgress>>,
}

/// Counters of one table.
#[derive(Debug)]
struct TableProgress {
    table: String,
    estimated_rows: u64,
    pieces: usize,
    rows: AtomicU64,
    bytes: AtomicU64,
    pieces_done: AtomicUsize,
    active: AtomicU32,
}

/// A reading of [`CopyProgress`].
#[derive(Clone, Debug, Default)]
pub struct ProgressView {
    pub rows: u64,
    pub bytes: u64,
    /// Estimated rows of every table (finished tables count with their real rows).
    pub estimated_rows: u64,
    pub tables: usize,
    pub tables_done: usize,
    /// Tables being copied right now.
    pub copying: Vec<String>,
}

impl CopyProgress {
    /// The counters now; None until the copy has planned (or when there is nothing to copy).
    pub fn view(&self) -> Option<ProgressView> {
        let tables = self.tables.get()?;
        let mut v = ProgressView {
            tables: tables.len(),
            ..ProgressView::default()
        };
        for t in tables {
            let rows = t.rows.load(Ordering::Relaxed);
            let done = t.pieces_done.load(Ordering::Relaxed) >= t.pieces;
            v.rows += rows;
            v.bytes += t.bytes.load(Ordering::Relaxed);
            v.estimated_rows += if done {
                rows
            } else {
                t.estimated_rows.max(rows)
            };
            if done {
                v.tables_done += 1;
            } else if t.active.load(Ordering::Relaxed) > 0 {
                v.copying.push(t.table.clone());
            }
        }
        Some(v)
    }
}

/// Where a target stands for a source, read without changing anything.
#[derive(Debug, Default)]
struct TargetState {
    /// The target's own identity (None: pgferry never registered it).
    node_id: Option<String>,
    /// Whether it has a progress row for this source.
    registered: bool,
    /// Its progress for this source (None: nothing applied).
    applied: Option<String>,
    /// Per-table progress: tables copied (or applied by a split round) at their own snapshot.
    records: BTreeMap<i32, String>,
}

async fn target_state(dst: &Session, source_node: &str) -> Result<TargetState, SyncError> {
    let mut st = TargetState::default();
    if !catalog::schema_exists(&dst.client, pgferry_core::artifact::SCHEMA, &dst.target).await? {
        return Ok(st);
    }
    let present: bool = dst
        .client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.installation') IS NOT NULL
                AND pg_catalog.to_regclass('pgferry.applied_table') IS NOT NULL",
            &[],
        )
        .await
        .map_err(dst.on_err("looking for the target's progress"))?
        .get(0);
    if !present {
        return Ok(st);
    }
    let param: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&source_node];
    let (node, applied, records) = tokio::try_join!(
        dst.client
            .query_opt("SELECT node_id FROM pgferry.installation", &[]),
        dst.client.query_opt(
            "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1",
            &param,
        ),
        dst.client.query(
            "SELECT table_id, snapshot FROM pgferry.applied_table WHERE source_node_id = $1",
            &param,
        )
    )
    .map_err(dst.on_err("reading the target's progress"))?;
    st.node_id = node.map(|r| r.get(0));
    st.registered = applied.is_some();
    st.applied = applied.and_then(|r| r.get(0));
    st.records = records.iter().map(|r| (r.get(0), r.get(1))).collect();
    Ok(st)
}

/// One relation read on the source: the captured table itself, or a leaf partition of it.
#[derive(Clone, Debug)]
struct Relation {
    name: QualifiedName,
    /// A foreign table (a foreign partition) is read with a query, never split.
    foreign: bool,
    size: u64,
    pages: u64,
    /// Whether the role may read it (a partition read directly checks its own privileges).
    readable: bool,
    estimated_rows: u64,
}

/// What will happen to a table.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    Copy,
    TruncateAndCopy,
    /// Copied completely by an interrupted run at this snapshot; kept.
    Resumed(String),
}

impl Action {
    fn label(&self) -> &'static str {
        match self {
            Action::Copy => "copy",
            Action::TruncateAndCopy => "truncate and copy",
            Action::Resumed(_) => "resumed",
        }
    }
}

/// A table in the plan.
struct Planned<'a> {
    table: &'a CapturedTable,
    columns: Vec<Ident>,
    /// The target's table is partitioned (emptied without ONLY).
    target_partitioned: bool,
    /// A foreign key on the target references it (emptied with DELETE: TRUNCATE refuses).
    referenced: bool,
    /// The role may empty it (TRUNCATE, or DELETE where referenced).
    may_empty: bool,
    relations: Vec<Relation>,
    action: Action,
}

/// One piece of work: a relation, or a block range of it, copied in one target transaction.
#[derive(Clone, Debug)]
struct Piece {
    /// Index into the plan.
    table: usize,
    /// What to read (None: a partitioned table without partitions: nothing to read).
    relation: Option<Relation>,
    /// Block range `[from, to)`; None at either end means unbounded.
    blocks: Option<(Option<u64>, Option<u64>)>,
    size: u64,
}

/// Copies the captured tables (those matching `opts.tables`) from `source` into `target`. See
/// the module docs for what it guarantees. `progress` is filled as it goes.
pub async fn copy(
    source: &Dsn,
    target: &Dsn,
    opts: &CopyOptions,
    progress: &CopyProgress,
) -> Result<CopyReport, SyncError> {
    let started = Instant::now();
    let jobs = opts.jobs.max(1);
    let mut src = Session::connect(source, "copy").await?;
    let info = source_info(&src, &opts.tables).await?;
    if info.tables.is_empty() {
        return Err(SyncError::NoTableMatches {
            source_db: src.target.clone(),
            patterns: opts.tables.iter().map(|p| p.to_string()).collect(),
        });
    }
    let mut dst = Session::connect(target, "copy").await?;
    let labels = (src.target.clone(), dst.target.clone());
    target::refuse_uncleaned_copy(&dst, &info.node_id).await?;
    let replica_role = target::may_set_replica_role(&dst).await?;
    let name = target::default_name(target);

    // Checks and plan, read-only: a refused copy changes nothing.
    let tables: Vec<&CapturedTable> = info.tables.values().collect();
    let mut plan = inspect(&mut src, &mut dst, &tables, &labels).await?;
    if !replica_role {
        let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
        // The copy does not set pgferry.apply: every trigger is in the way.
        let blocked = target::needs_replica_role(&dst, &names, false).await?;
        if !blocked.tables.is_empty() {
            return Err(SyncError::NeedsReplicaRole {
                target: labels.1.clone(),
                tables: human_names(&tables, &blocked.tables),
            });
        }
    }
    let state = target_state(&dst, &info.node_id).await?;
    let received = target::find_entry(&src, state.node_id.as_deref(), &name)
        .await?
        .and_then(|f| f.table_ids)
        .unwrap_or_default();
    decide(&src, &dst, &mut plan, &state, &received, opts.truncate).await?;

    let mut report = CopyReport {
        source: labels.0.clone(),
        target: labels.1.clone(),
        name: None,
        dry_run: opts.dry_run,
        snapshot: None,
        applied_snapshot: state.applied.clone(),
        already_replicating: state.applied.is_some(),
        jobs,
        replica_role,
        tables: Vec::new(),
        rows: 0,
        bytes: 0,
        sequences_advanced: 0,
        seconds: 0.0,
        rows_per_second: 0.0,
        bytes_per_second: 0.0,
    };
    if opts.dry_run {
        let pieces = cut(&plan, src.server_version, jobs, opts.split_above);
        report.name = state.node_id.as_ref().map(|_| name.clone());
        report.tables = table_reports(&plan, &pieces, None);
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // From here on the target changes. Register it (schema pgferry, a progress row), then hold
    // its progress row so no round commits while tables are half-copied, and check again under
    // that lock (another copy may have run meanwhile).
    let reg = target::register(&mut dst, &info.node_id, &src.target).await?;
    let mut guard_session = Session::connect(target, "copy").await?;
    no_idle_timeout(&guard_session).await?;
    let guard = guard_session
        .client
        .transaction()
        .await
        .map_err(q(&labels.1, "starting the copy's progress transaction"))?;
    let held: Option<String> = guard
        .query_one(
            "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1 FOR NO KEY UPDATE",
            &[&info.node_id],
        )
        .await
        .map_err(q(&labels.1, "locking the target's progress"))?
        .get(0);
    let mut state = target_state(&dst, &info.node_id).await?;
    state.applied = held.clone();
    let received = target::find_entry(&src, Some(&reg.node_id), &name)
        .await?
        .and_then(|f| f.table_ids)
        .unwrap_or_default();
    decide(&src, &dst, &mut plan, &state, &received, opts.truncate).await?;
    let selected: Vec<i32> = plan.iter().map(|p| p.table.table_id).collect();
    let entry = target::registry_entry_for(
        &src,
        &reg.node_id,
        &name,
        held.as_deref(),
        Intent::Copy { tables: &selected },
    )
    .await?;
    report.name = Some(entry.name.clone());
    report.applied_snapshot = held.clone();
    report.already_replicating = held.is_some();

    let outcome = write(
        &info,
        source,
        target,
        &src,
        &mut plan,
        opts,
        jobs,
        replica_role,
        progress,
        &labels,
    )
    .await
    .map_err(|e| SyncError::CopyInterrupted {
        target: labels.1.clone(),
        cause: Box::new(e),
    })?;
    report.snapshot = outcome.snapshot.clone();
    report.tables = outcome.tables;

    // Every table committed (with its record): list them as received, then move the progress
    // row if the target had none, then acknowledge. A crash between the first two leaves
    // records that rounds honour; between the last two, an acknowledgement the next round
    // writes.
    target::accept_tables(&src, &entry.name, &selected).await?;
    let mut captured: BTreeSet<i32> = info.tables.keys().copied().collect();
    captured.extend(info.skipped.iter().copied());
    let mut listed: BTreeSet<i32> = entry.table_ids.iter().copied().collect();
    listed.extend(selected.iter().copied());
    let finish = settle_progress(
        guard,
        &info.node_id,
        held.as_deref(),
        &listed,
        &captured,
        &selected,
    );
    let applied = finish
        .await
        .map_err(q(&labels.1, "recording the copy as the target's progress"))?;
    if held.is_none() {
        if let Some(a) = &applied {
            target::acknowledge(&src, &entry.name, a).await?;
        }
    }
    report.applied_snapshot = applied;

    let sequences: Vec<&crate::registry::CapturedSequence> = info
        .sequences
        .iter()
        .filter(|s| selected.contains(&s.table_id))
        .collect();
    report.sequences_advanced =
        sequence::advance(&src, &dst, &sequences, &mut Default::default()).await?;
    report.rows = report.tables.iter().map(|t| t.rows).sum();
    report.bytes = report.tables.iter().map(|t| t.bytes).sum();
    report.seconds = started.elapsed().as_secs_f64();
    if report.seconds > 0.0 {
        report.rows_per_second = report.rows as f64 / report.seconds;
        report.bytes_per_second = report.bytes as f64 / report.seconds;
    }
    Ok(report)
}

/// Settles the target's progress once every copied table has committed, in `guard` (the
/// transaction holding the progress row since before the snapshot): a target at P keeps P and
/// forgets the copied tables' records (they are newer than P, so rounds from P are exact); a
/// target that applied nothing and now holds every captured table from copies (`listed` are
/// the tables the registry lists as received, `captured` all captured tables) takes the oldest
/// of its tables' copy snapshots and forgets the records. Any other target keeps its records,
/// which its first round honours table by table. Returns the target's progress.
async fn settle_progress(
    guard: Transaction<'_>,
    source_node: &str,
    held: Option<&str>,
    listed: &BTreeSet<i32>,
    captured: &BTreeSet<i32>,
    copied: &[i32],
) -> Result<Option<String>, tokio_postgres::Error> {
    // The copy's pieces committed with synchronous_commit on; this commit is acknowledged to
    // the source, which may then purge what the copy holds: it must be durable too.
    guard
        .batch_execute("SET LOCAL synchronous_commit = on")
        .await?;
    let records: BTreeMap<i32, String> = guard
        .query(
            "SELECT table_id, snapshot FROM pgferry.applied_table WHERE source_node_id = $1",
            &[&source_node],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut applied = held.map(str::to_owned);
    if held.is_some() {
        guard
            .execute(
                "DELETE FROM pgferry.applied_table WHERE source_node_id = $1 AND table_id = ANY($2)",
                &[&source_node, &copied],
            )
            .await?;
    } else if captured.is_subset(listed) && listed.iter().all(|id| records.contains_key(id)) {
        let oldest = listed
            .iter()
            .filter_map(|id| records.get(id))
            .min_by_key(|s| snapshot_order(s))
            .cloned();
        guard
            .execute(
                "UPDATE pgferry.applied SET snapshot = $2, applied_at = pg_catalog.now() WHERE source_node_id = $1",
                &[&source_node, &oldest],
            )
            .await?;
        guard
            .execute(
                "DELETE FROM pgferry.applied_table WHERE source_node_id = $1",
                &[&source_node],
            )
            .await?;
        applied = oldest;
    }
    guard.commit().await?;
    Ok(applied)
}

/// What the writing phase produced.
struct Outcome {
    snapshot: Option<String>,
    tables: Vec<TableCopied>,
}

/// Takes the snapshot, empties what must be emptied, and copies every piece; each table that
/// completes is recorded on the target with the snapshot.
#[allow(clippy::too_many_arguments)]
async fn write(
    info: &SourceInfo,
    source: &Dsn,
    target: &Dsn,
    src: &Session,
    plan: &mut [Planned<'_>],
    opts: &CopyOptions,
    jobs: usize,
    replica_role: bool,
    progress: &CopyProgress,
    labels: &(String, String),
) -> Result<Outcome, SyncError> {
    let todo: Vec<&CapturedTable> = plan
        .iter()
        .filter(|p| !matches!(p.action, Action::Resumed(_)))
        .map(|p| p.table)
        .collect();
    if todo.is_empty() {
        let tables = table_reports(plan, &[], None);
        progress.tables.get_or_init(Vec::new);
        return Ok(Outcome {
            snapshot: None,
            tables,
        });
    }
    let mut exporter = Session::connect(source, "copy").await?;
    no_idle_timeout(&exporter).await?;
    let dialect = info.dialect;
    let mut tries = 0;
    let (snapshot, exported, etx) = loop {
        let etx = crate::begin_read_only(&mut exporter, "starting the copy's snapshot transaction")
            .await?;
        let row = etx
            .query_one(
                &format!(
                    "SELECT {}::text, pg_catalog.pg_export_snapshot()",
                    dialect.current_snapshot()
                ),
                &[],
            )
            .await
            .map_err(q(&labels.0, "taking and exporting the copy's snapshot"))?;
        let (snapshot, exported): (String, String) = (row.get(0), row.get(1));
        if round::hold_against_truncate(&etx, src, dialect, &todo, &snapshot, &labels.0).await? {
            break (snapshot, exported, etx);
        }
        drop(etx);
        if tries >= MAX_SNAPSHOT_RETRIES {
            return Err(SyncError::TablesBusy {
                source_db: labels.0.clone(),
            });
        }
        tries += 1;
        tokio::time::sleep(Duration::from_millis(20u64 << tries.min(7))).await;
    };
    tracing::debug!(snapshot = %snapshot, "copy snapshot taken");
    // The partitions and sizes as of the snapshot: a partition created just before it is read.
    let names: Vec<&CapturedTable> = plan.iter().map(|p| p.table).collect();
    let relations = relations(&etx, &names, &labels.0).await?;
    for (p, r) in plan.iter_mut().zip(relations) {
        p.relations = r;
    }
    let pieces = cut(plan, src.server_version, jobs, opts.split_above);

    // Empty what must be emptied, and forget records of tables copied again.
    let mut prep = Session::connect(target, "copy").await?;
    let ptx = prep
        .client
        .transaction()
        .await
        .map_err(q(&labels.1, "starting to empty tables"))?;
    let mut sql =
        String::from("SET LOCAL synchronous_commit = on; SET LOCAL statement_timeout = 0");
    if replica_role {
        sql.push_str("; SET LOCAL session_replication_role = replica");
    }
    for p in plan.iter().filter(|p| p.action == Action::TruncateAndCopy) {
        let only = if p.target_partitioned { "" } else { "ONLY " };
        let stmt = if p.referenced {
            format!("DELETE FROM {only}{}", p.table.name)
        } else {
            format!("TRUNCATE {only}{}", p.table.name)
        };
        sql.push_str("; ");
        sql.push_str(&stmt);
    }
    ptx.batch_execute(&sql)
        .await
        .map_err(q(&labels.1, "emptying the tables to copy (--truncate)"))?;
    let again: Vec<i32> = todo.iter().map(|t| t.table_id).collect();
    ptx.execute(
        "DELETE FROM pgferry.applied_table WHERE source_node_id = $1 AND table_id = ANY($2)",
        &[&info.node_id, &again],
    )
    .await
    .map_err(q(&labels.1, "clearing earlier copy records"))?;
    ptx.commit()
        .await
        .map_err(q(&labels.1, "committing the emptied tables"))?;
    drop(prep);

    let counters: Vec<TableProgress> = plan
        .iter()
        .enumerate()
        .map(|(i, p)| TableProgress {
            table: p.table.name.human(),
            estimated_rows: p.relations.iter().map(|r| r.estimated_rows).sum(),
            pieces: if matches!(p.action, Action::Resumed(_)) {
                0
            } else {
                pieces.iter().filter(|x| x.table == i).count()
            },
            rows: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            pieces_done: AtomicUsize::new(0),
            active: AtomicU32::new(0),
        })
        .collect();
    let counters = progress.tables.get_or_init(|| counters);
    let left: Vec<AtomicUsize> = counters
        .iter()
        .map(|c| AtomicUsize::new(c.pieces))
        .collect();
    let spans: Vec<Mutex<Option<(Instant, Instant)>>> =
        plan.iter().map(|_| Mutex::new(None)).collect();
    let mut order = pieces.clone();
    // Largest first, so that the last pieces are small and the jobs finish together.
    order.sort_by_key(|p| std::cmp::Reverse(p.size));
    let work = Work {
        plan: &*plan,
        queue: Mutex::new(order.into_iter().collect()),
        left,
        spans,
        counters,
        exported: &exported,
        snapshot: &snapshot,
        source_node: &info.node_id,
        replica_role,
        labels,
    };
    let workers = (0..jobs.min(pieces.len()).max(1)).map(|_| worker(&work, source, target));
    futures_util::future::try_join_all(workers).await?;
    etx.commit()
        .await
        .map_err(q(&labels.0, "ending the copy's snapshot transaction"))?;
    let mut tables = table_reports(work.plan, &pieces, Some(&snapshot));
    for (i, t) in tables.iter_mut().enumerate() {
        if matches!(work.plan[i].action, Action::Resumed(_)) {
            continue;
        }
        t.rows = work.counters[i].rows.load(Ordering::Relaxed);
        t.bytes = work.counters[i].bytes.load(Ordering::Relaxed);
        t.seconds = work.spans[i]
            .lock()
            .map(|s| s.map_or(0.0, |(a, b)| (b - a).as_secs_f64()))
            .unwrap_or(0.0);
    }
    Ok(Outcome {
        snapshot: Some(snapshot),
        tables,
    })
}

/// What the jobs share.
struct Work<'a, 'p> {
    plan: &'a [Planned<'p>],
    queue: Mutex<VecDeque<Piece>>,
    /// Pieces of each table not committed yet.
    left: Vec<AtomicUsize>,
    /// When each table's first piece started and its last one ended.
    spans: Vec<Mutex<Option<(Instant, Instant)>>>,
    counters: &'a [TableProgress],
    exported: &'a str,
    snapshot: &'a str,
    source_node: &'a str,
    replica_role: bool,
    labels: &'a (String, String),
}

impl Work<'_, '_> {
    /// The next piece for a job: the largest of a table no other job is copying, else the
    /// largest. Jobs loading different tables do not contend for one table's indexes and
    /// relation extension lock on the target, so ranges are shared only when no other table is
    /// left (measured with `bench/copy.sh`: two jobs on two tables beat two jobs on one table's
    /// two halves, then on the other's).
    fn next_piece(&self) -> Option<Piece> {
        let mut queue = self.queue.lock().ok()?;
        let idle = queue
            .iter()
            .position(|p| self.counters[p.table].active.load(Ordering::Relaxed) == 0);
        let piece = match idle {
            Some(i) => queue.remove(i),
            None => queue.pop_front(),
        }?;
        // Under the queue's lock, so that two jobs never both take a table for idle.
        self.counters[piece.table]
            .active
            .fetch_add(1, Ordering::Relaxed);
        Some(piece)
    }
}

/// One job: a source session at the exported snapshot and a target session; takes pieces
/// until none is left.
async fn worker(work: &Work<'_, '_>, source: &Dsn, target: &Dsn) -> Result<(), SyncError> {
    let (sl, tl) = (&work.labels.0, &work.labels.1);
    let mut s = Session::connect(source, "copy").await?;
    let mut t = Session::connect(target, "copy").await?;
    no_idle_timeout(&s).await?;
    let stx = crate::begin_read_only(&mut s, "starting a copy job's transaction").await?;
    stx.batch_execute(&format!(
        "SET TRANSACTION SNAPSHOT {}; SET LOCAL statement_timeout = 0",
        literal(work.exported)
    ))
    .await
    .map_err(q(sl, "importing the copy's snapshot"))?;
    let settings = format!(
        "SET LOCAL synchronous_commit = on; SET LOCAL statement_timeout = 0{}",
        if work.replica_role {
            "; SET LOCAL session_replication_role = replica"
        } else {
            ""
        }
    );
    while let Some(piece) = work.next_piece() {
        let planned = &work.plan[piece.table];
        let human = planned.table.name.human();
        let counter = &work.counters[piece.table];
        let clock = Instant::now();
        let last_alone = counter.pieces == 1;
        let ttx = t
            .client
            .transaction()
            .await
            .map_err(q(tl, format!("starting to copy {human}")))?;
        ttx.batch_execute(&settings)
            .await
            .map_err(q(tl, "setting the copy's session"))?;
        if let Some(rel) = &piece.relation {
            let cols: Vec<String> = planned.columns.iter().map(|c| c.to_string()).collect();
            let copy_out = match (piece.blocks, rel.foreign) {
                (None, false) => format!("COPY {} ({}) TO STDOUT", rel.name, cols.join(", ")),
                (blocks, _) => {
                    let mut cond = Vec::new();
                    if let Some((from, to)) = blocks {
                        if let Some(f) = from {
                            cond.push(format!("t.ctid >= '({f},0)'::pg_catalog.tid"));
                        }
                        if let Some(to) = to {
                            cond.push(format!("t.ctid < '({to},0)'::pg_catalog.tid"));
                        }
                    }
                    format!(
                        "COPY (SELECT {} FROM ONLY {} AS t{}) TO STDOUT",
                        planned
                            .columns
                            .iter()
                            .map(|c| format!("t.{c}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        rel.name,
                        if cond.is_empty() {
                            String::new()
                        } else {
                            format!(" WHERE {}", cond.join(" AND "))
                        }
                    )
                }
            };
            let copy_in = format!(
                "COPY {} ({}) FROM STDIN",
                planned.table.name,
                cols.join(", ")
            );
            let mut counted = 0u64;
            let rows =
                crate::copy::pass_through_metered(&stx, &copy_out, &ttx, &copy_in, |b, r| {
                    counter.bytes.fetch_add(b, Ordering::Relaxed);
                    counter.rows.fetch_add(r, Ordering::Relaxed);
                    counted += r;
                })
                .await
                .map_err(q(tl, format!("copying the rows of {human}")))?;
            // The target's count is the authority.
            if rows >= counted {
                counter.rows.fetch_add(rows - counted, Ordering::Relaxed);
            } else {
                counter.rows.fetch_sub(counted - rows, Ordering::Relaxed);
            }
        }
        if last_alone {
            record(&ttx, work, planned.table.table_id)
                .await
                .map_err(q(tl, format!("recording {human} as copied")))?;
        }
        ttx.commit()
            .await
            .map_err(q(tl, format!("committing the copy of {human}")))?;
        counter.active.fetch_sub(1, Ordering::Relaxed);
        counter.pieces_done.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = work.spans[piece.table].lock() {
            let now = Instant::now();
            *s = Some(s.map_or((clock, now), |(a, b)| (a.min(clock), b.max(now))));
        }
        // A table of several pieces is recorded once all have committed (by whichever job
        // committed the last one), in a transaction of its own.
        if work.left[piece.table].fetch_sub(1, Ordering::AcqRel) == 1 && !last_alone {
            let rtx = t
                .client
                .transaction()
                .await
                .map_err(q(tl, format!("recording {human} as copied")))?;
            rtx.batch_execute(&settings)
                .await
                .map_err(q(tl, "setting the copy's session"))?;
            record(&rtx, work, planned.table.table_id)
                .await
                .map_err(q(tl, format!("recording {human} as copied")))?;
            rtx.commit()
                .await
                .map_err(q(tl, format!("recording {human} as copied")))?;
        }
        tracing::debug!(table = %human, seconds = clock.elapsed().as_secs_f64(), "piece copied");
    }
    stx.commit()
        .await
        .map_err(q(sl, "ending a copy job's transaction"))?;
    Ok(())
}

/// Records on the target that a table holds the source's state at the copy's snapshot.
async fn record(
    tx: &Transaction<'_>,
    work: &Work<'_, '_>,
    table_id: i32,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "INSERT INTO pgferry.applied_table (source_node_id, table_id, snapshot) VALUES ($1, $2, $3)
         ON CONFLICT (source_node_id, table_id) DO UPDATE SET snapshot = excluded.snapshot",
        &[&work.source_node, &table_id, &work.snapshot],
    )
    .await
    .map(|_| ())
}

/// Checks every table on both sides and reads what the plan needs: the columns to copy
/// (missing columns and type mismatches are refused, naming the table and column), the target
/// table's kind, whether a foreign key references it, and the source relations with sizes.
async fn inspect<'a>(
    src: &mut Session,
    dst: &mut Session,
    tables: &[&'a CapturedTable],
    labels: &(String, String),
) -> Result<Vec<Planned<'a>>, SyncError> {
    let versions = (src.server_version, dst.server_version);
    let stx = crate::begin_read_only(src, "starting a read-only transaction").await?;
    let ttx = crate::begin_read_only(dst, "starting a read-only transaction").await?;
    let l = (labels.0.as_str(), labels.1.as_str());
    let checks = futures_util::future::try_join_all(tables.iter().map(|t| async {
        let columns = crate::schema::columns_to_copy(&stx, &ttx, t, versions, l).await?;
        let row = ttx
            .query_one(
                "SELECT c.relkind = 'p',
                        EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k WHERE k.contype = 'f' AND k.confrelid = c.oid),
                        pg_catalog.has_table_privilege(c.oid, 'INSERT'),
                        pg_catalog.has_table_privilege(c.oid, 'TRUNCATE'),
                        pg_catalog.has_table_privilege(c.oid, 'DELETE')
                   FROM pg_catalog.pg_class c WHERE c.oid = pg_catalog.to_regclass($1)",
                &[&t.name.to_string()],
            )
            .await
            .map_err(q(&labels.1, format!("reading the kind of {}", t.name.human())))?;
        let may = |i| row.get::<_, bool>(i);
        Ok::<_, SyncError>((columns, may(0), may(1), [may(2), may(3), may(4)]))
    }))
    .await?;
    let rels = relations(&stx, tables, &labels.0).await?;
    let unreadable: Vec<String> = rels
        .iter()
        .flatten()
        .filter(|r| !r.readable)
        .map(|r| r.name.human())
        .collect();
    if !unreadable.is_empty() {
        return Err(SyncError::MissingPrivilege {
            database: labels.0.clone(),
            privilege: "SELECT",
            tables: unreadable,
        });
    }
    let no_insert: Vec<String> = tables
        .iter()
        .zip(&checks)
        .filter(|(_, c)| !c.3[0])
        .map(|(t, _)| t.name.human())
        .collect();
    if !no_insert.is_empty() {
        return Err(SyncError::MissingPrivilege {
            database: labels.1.clone(),
            privilege: "INSERT",
            tables: no_insert,
        });
    }
    Ok(tables
        .iter()
        .zip(checks)
        .zip(rels)
        .map(
            |((t, (columns, target_partitioned, referenced, may)), relations)| Planned {
                table: t,
                columns,
                target_partitioned,
                referenced,
                may_empty: if referenced { may[2] } else { may[1] },
                relations,
                action: Action::Copy,
            },
        )
        .collect())
}

/// Decides each table's action: resumed (recorded by an interrupted copy and not yet received),
/// copied when empty on the target, emptied first with `truncate`; refuses non-empty tables
/// otherwise, naming every one.
async fn decide(
    src: &Session,
    dst: &Session,
    plan: &mut [Planned<'_>],
    state: &TargetState,
    received: &[i32],
    truncate: bool,
) -> Result<(), SyncError> {
    let purged_below: Option<String> = src
        .client
        .query_one("SELECT purged_below::text FROM pgferry.installation", &[])
        .await
        .map_err(q(&src.target, "reading the purge horizon"))?
        .get(0);
    let purged_below = purged_below.and_then(|x| x.parse().ok());
    let filled = futures_util::future::try_join_all(plan.iter().map(|p| async {
        let only = if p.target_partitioned { "" } else { "ONLY " };
        dst.client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {only}{})", p.table.name),
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .map_err(q(
                &dst.target,
                format!("looking for rows in {}", p.table.name.human()),
            ))
    }))
    .await?;
    let mut refused = Vec::new();
    for (p, filled) in plan.iter_mut().zip(filled) {
        let id = p.table.table_id;
        p.action = match state.records.get(&id) {
            Some(s) if !received.contains(&id) && resumable(s, purged_below) => {
                Action::Resumed(s.clone())
            }
            _ if !filled => Action::Copy,
            _ if truncate => Action::TruncateAndCopy,
            _ => {
                refused.push(p.table.name.human());
                Action::Copy
            }
        };
    }
    if !refused.is_empty() {
        return Err(SyncError::TargetNotEmpty {
            target: dst.target.clone(),
            tables: refused,
        });
    }
    for (privilege, referenced) in [("TRUNCATE", false), ("DELETE", true)] {
        let denied: Vec<String> = plan
            .iter()
            .filter(|p| p.action == Action::TruncateAndCopy)
            .filter(|p| p.referenced == referenced && !p.may_empty)
            .map(|p| p.table.name.human())
            .collect();
        if !denied.is_empty() {
            return Err(SyncError::MissingPrivilege {
                database: dst.target.clone(),
                privilege,
                tables: denied,
            });
        }
    }
    Ok(())
}

/// The relations to read for each table (in order): an ordinary table itself; a partitioned
/// table's leaf partitions (read once each, however deep). Sizes and row estimates from the
/// catalog (the planner's estimate: rows per page times the current pages).
async fn relations(
    tx: &Transaction<'_>,
    tables: &[&CapturedTable],
    label: &str,
) -> Result<Vec<Vec<Relation>>, SyncError> {
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let rows = tx
        .query(
            "WITH RECURSIVE tree(root, relid) AS (
                 SELECT r.i, pg_catalog.to_regclass(r.name)::pg_catalog.oid
                   FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS r(name, i)
                 UNION ALL
                 SELECT tree.root, h.inhrelid
                   FROM tree
                   JOIN pg_catalog.pg_class p ON p.oid = tree.relid AND p.relkind = 'p'
                   JOIN pg_catalog.pg_inherits h ON h.inhparent = tree.relid)
             SELECT tree.root, n.nspname::text, c.relname::text, c.relkind = 'f',
                    pg_catalog.pg_relation_size(c.oid)::int8, c.relpages::int8, c.reltuples::float8,
                    pg_catalog.current_setting('block_size')::int8,
                    pg_catalog.has_table_privilege(c.oid, 'SELECT')
               FROM tree
               JOIN pg_catalog.pg_class c ON c.oid = tree.relid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind <> 'p'
              ORDER BY 1, 2, 3",
            &[&names],
        )
        .await
        .map_err(q(label, "reading the tables' partitions and sizes"))?;
    let mut out: Vec<Vec<Relation>> = vec![Vec::new(); tables.len()];
    for r in rows {
        let root: i64 = r.get(0);
        let size: i64 = r.get(4);
        let (relpages, reltuples, block): (i64, f64, i64) = (r.get(5), r.get(6), r.get(7));
        let pages = (size / block.max(1)) as f64;
        let estimated = if relpages > 0 && reltuples > 0.0 {
            reltuples / relpages as f64 * pages
        } else if reltuples > 0.0 {
            reltuples
        } else {
            // Never analyzed: about 100 bytes a row.
            size as f64 / 100.0
        };
        if let Some(list) = out.get_mut(root as usize - 1) {
            list.push(Relation {
                name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                foreign: r.get(3),
                size: size as u64,
                pages: pages as u64,
                readable: r.get(8),
                estimated_rows: estimated.round() as u64,
            });
        }
    }
    Ok(out)
}

/// Cuts the plan into pieces. A relation larger than `split_above` is cut into block ranges
/// (at least one per job) when the source can read a range without scanning the whole table:
/// a TID Range Scan, PostgreSQL 14 and later. Before 14 a ctid condition is a filter over a
/// full scan, so each relation stays one piece (partitions still spread over the jobs).
fn cut(plan: &[Planned<'_>], server_version: u32, jobs: usize, split_above: u64) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        if matches!(p.action, Action::Resumed(_)) {
            continue;
        }
        if p.relations.is_empty() {
            pieces.push(Piece {
                table: i,
                relation: None,
                blocks: None,
                size: 0,
            });
        }
        for r in &p.relations {
            let splittable = server_version >= 140000
                && jobs > 1
                && !r.foreign
                && split_above > 0
                && r.size > split_above
                && r.pages > 1;
            if !splittable {
                pieces.push(Piece {
                    table: i,
                    relation: Some(r.clone()),
                    blocks: None,
                    size: r.size,
                });
                continue;
            }
            let pages = r.pages;
            let n = r
                .size
                .div_ceil(split_above)
                .max(jobs as u64)
                .min(MAX_RANGES)
                .min(pages);
            let mut share = r.clone();
            share.estimated_rows = r.estimated_rows / n;
            for k in 0..n {
                let from = (k > 0).then(|| pages * k / n);
                let to = (k + 1 < n).then(|| pages * (k + 1) / n);
                pieces.push(Piece {
                    table: i,
                    relation: Some(share.clone()),
                    blocks: Some((from, to)),
                    size: r.size / n,
                });
            }
        }
    }
    pieces
}

fn table_reports(
    plan: &[Planned<'_>],
    pieces: &[Piece],
    snapshot: Option<&str>,
) -> Vec<TableCopied> {
    plan.iter()
        .enumerate()
        .map(|(i, p)| TableCopied {
            table: p.table.name.human(),
            action: p.action.label(),
            relations: p.relations.len(),
            pieces: pieces.iter().filter(|x| x.table == i).count(),
            size_bytes: p.relations.iter().map(|r| r.size).sum(),
            estimated_rows: p.relations.iter().map(|r| r.estimated_rows).sum(),
            rows: 0,
            bytes: 0,
            seconds: 0.0,
            snapshot: match &p.action {
                Action::Resumed(s) => Some(s.clone()),
                _ => snapshot.map(str::to_owned),
            },
        })
        .collect()
}

/// Whether a table copied at `snapshot` by an interrupted copy may be kept: every change it
/// lacks (a transaction not visible in the snapshot, so not below its xmin) must still be
/// captured, i.e. nothing at or above its xmin was purged (`purged_below`, the source's purge
/// horizon). The copy's registry entry held purge back from before the snapshot, unless the
/// target was dropped from the registry since; in doubt (a transaction that stayed open across
/// an earlier acknowledgement and the snapshot also fails this), the table is copied again.
fn resumable(snapshot: &str, purged_below: Option<u64>) -> bool {
    let xmin: Option<u64> = snapshot.split(':').next().and_then(|x| x.parse().ok());
    match (xmin, purged_below) {
        (_, None) => true,
        (Some(x), Some(p)) => p <= x,
        (None, Some(_)) => false,
    }
}

/// Orders snapshots taken one after the other on one server, oldest first: a later snapshot
/// has a larger or equal xmax, and with an equal xmax (no transaction id handed out between
/// them) fewer transactions in progress.
fn snapshot_order(snapshot: &str) -> (u64, std::cmp::Reverse<usize>) {
    let mut parts = snapshot.split(':');
    let _xmin = parts.next();
    let xmax = parts.next().and_then(|x| x.parse().ok()).unwrap_or(0);
    let xip = parts
        .next()
        .map(|l| l.split(',').filter(|x| !x.is_empty()).count())
        .unwrap_or(0);
    (xmax, std::cmp::Reverse(xip))
}

/// Names as people read them, for quoted names returned by a catalog check.
fn human_names(tables: &[&CapturedTable], quoted: &[String]) -> Vec<String> {
    quoted
        .iter()
        .map(|n| {
            tables
                .iter()
                .find(|t| t.name.to_string() == *n)
                .map_or_else(|| n.clone(), |t| t.name.human())
        })
        .collect()
}

/// A copy session may sit in an open transaction for as long as the copy lasts (the snapshot's
/// exporter, the progress row's holder, a job between pieces): a server or role default
/// `idle_in_transaction_session_timeout` must not end it, nor `statement_timeout` a long COPY.
async fn no_idle_timeout(s: &Session) -> Result<(), SyncError> {
    s.batch(
        "SET idle_in_transaction_session_timeout = 0; SET statement_timeout = 0",
        "clearing the session's timeouts for a long copy",
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_resumed_only_when_nothing_it_lacks_was_purged() {
        assert!(resumable("100:105:100", None));
        assert!(resumable("100:105:100", Some(90)));
        assert!(resumable("100:105:100", Some(100)));
        assert!(!resumable("100:105:100", Some(101)));
        assert!(!resumable("garbage", Some(1)));
    }

    #[test]
    fn snapshots_order_oldest_first() {
        let a = "100:105:100,102";
        let b = "100:105:100";
        let c = "104:110:";
        let mut v = vec![c, b, a];
        v.sort_by_key(|s| snapshot_order(s));
        assert_eq!(v, vec![a, b, c]);
    }
}
