//! pgferry's sync engine: targets catch up with a source in **rounds, each applied at one
//! source snapshot**, with row state moved by COPY.
//!
//! A round reads, in one `REPEATABLE READ READ ONLY` source transaction, the keys the capture
//! recorded since the target's last snapshot and the rows for those keys at the round's
//! snapshot; it deletes those keys on the target and copies the rows in, in one target
//! transaction that also records the new snapshot. So a target only ever shows states the source
//! was in, nothing is lost or applied twice whatever the commit order or crash, and re-applying
//! is harmless (which is what makes catch-up over a restored dump correct). See [`round`] for the
//! invariants and `docs/sync.md` for the design.
//!
//! The library entry point for one-shot catch-up is [`sync_once`]; it returns the same
//! [`SyncReport`] the CLI prints.

mod check;
pub mod conflict;
mod copy;
pub mod cutover;
pub mod daemon;
mod error;
pub mod freeze;
pub mod initial;
mod mesh;
pub mod pace;
mod purge;
mod registry;
pub mod reverse;
pub mod round;
mod schema;
mod sequence;
pub mod sequence_partition;
pub mod status;
mod target;
pub mod two_way;
pub mod verify;

pub use check::check_target;
pub use error::SyncError;
pub use round::{RoundOutcome, TableApplied};
pub use target::{default_name, drop_target, reserve};

use std::collections::BTreeMap;
use std::time::Instant;

use pgferry_core::artifact::{Dialect, SCHEMA};
use pgferry_core::{catalog, Dsn, Session};
use serde::Serialize;

/// Options of a catch-up.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Accept tables captured after a target registered (their rows were loaded by hand).
    pub accept_new_tables: bool,
    /// Commit a round holding more changes than this table by table, each table at the same
    /// snapshot with its own progress. Off by default; never used when foreign keys are checked
    /// on the target. Gives up, until the round ends, the guarantee that all tables of the
    /// target are at one common snapshot.
    pub split_rounds_above: Option<u64>,
    /// The daemon: the longest pause after a round that applied many changes
    /// ([`pace::round_pause`]); zero starts every round at once. Default
    /// [`DEFAULT_MAX_ROUND_PAUSE`].
    pub max_round_pause: std::time::Duration,
    /// The daemon: the pause tried, and kept while it raises the source's change rate, when
    /// nearly every round is paced ([`pace::Pacer`]); zero (or not above `max_round_pause`) never
    /// tries it. Default [`DEFAULT_SATURATED_ROUND_PAUSE`].
    pub saturated_round_pause: std::time::Duration,
}

/// The default of [`SyncOptions::max_round_pause`].
pub const DEFAULT_MAX_ROUND_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);
/// The default of [`SyncOptions::saturated_round_pause`].
pub const DEFAULT_SATURATED_ROUND_PAUSE: std::time::Duration =
    std::time::Duration::from_millis(200);

impl Default for SyncOptions {
    fn default() -> Self {
        SyncOptions {
            accept_new_tables: false,
            split_rounds_above: None,
            max_round_pause: DEFAULT_MAX_ROUND_PAUSE,
            saturated_round_pause: DEFAULT_SATURATED_ROUND_PAUSE,
        }
    }
}

/// What a catch-up did for one target.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    /// The target, as `user@host:port/db`.
    pub target: String,
    /// The target's name in the source's registry.
    pub name: String,
    /// The target's node identity.
    pub node_id: String,
    pub rounds: u64,
    /// The source snapshot the target now holds.
    pub snapshot: String,
    /// Per table with changes.
    pub tables: Vec<TableApplied>,
    /// Rows copied in, all tables.
    pub rows: u64,
    /// Sequences moved forward on the target.
    pub sequences_advanced: u64,
    /// Whether the round was committed table by table (`--split-rounds-above`).
    pub split: bool,
    pub seconds: f64,
}

/// What a catch-up did.
#[derive(Clone, Debug, Serialize)]
pub struct SyncReport {
    pub source: String,
    pub targets: Vec<TargetReport>,
    pub rounds: u64,
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_second: f64,
    /// Capture rows purged on the source because every registered target has them.
    pub purged: u64,
}

/// What a round needs to know about the source, read once per connection.
pub(crate) struct SourceInfo {
    pub node_id: String,
    pub dialect: Dialect,
    /// The captured tables this sync replicates, by table id.
    pub tables: BTreeMap<i32, registry::CapturedTable>,
    /// Captured tables this sync leaves out (table patterns), by table id.
    pub skipped: std::collections::BTreeSet<i32>,
    pub sequences: Vec<registry::CapturedSequence>,
}

/// Reads the source's identity, captured tables (those matching `patterns`, all when empty)
/// and sequences; refuses a source without capture.
pub(crate) async fn source_info(
    src: &Session,
    patterns: &[pgferry_core::TablePattern],
) -> Result<SourceInfo, SyncError> {
    let label = &src.target;
    if !catalog::schema_exists(&src.client, SCHEMA, label).await? {
        return Err(SyncError::NotInstalled {
            source_db: label.clone(),
        });
    }
    let node_id: String = src
        .client
        .query_one("SELECT node_id FROM pgferry.installation", &[])
        .await
        .map_err(|e| src.err("reading the source's identity", e))?
        .get(0);
    let mut tables = BTreeMap::new();
    let mut skipped = std::collections::BTreeSet::new();
    for t in registry::captured_tables(&src.client, label).await? {
        let wanted = patterns.is_empty()
            || patterns
                .iter()
                .any(|p| p.matches(t.name.schema.as_str(), t.name.name.as_str()));
        if wanted {
            tables.insert(t.table_id, t);
        } else {
            skipped.insert(t.table_id);
        }
    }
    let sequences = registry::captured_sequences(&src.client, label)
        .await?
        .into_iter()
        .filter(|s| tables.contains_key(&s.table_id))
        .collect();
    Ok(SourceInfo {
        node_id,
        dialect: Dialect::new(src.server_version),
        tables,
        skipped,
        sequences,
    })
}

/// A target registered with a source and checked, ready for rounds.
pub(crate) struct PreparedTarget {
    pub session: Session,
    pub registered: target::Registered,
    pub entry: target::Entry,
}

/// Connects to a target, registers it on first use (target side and the source's registry)
/// and checks it can take this source's rounds: no tables captured after it registered, and
/// the replica role where the tables need it.
pub(crate) async fn prepare_target(
    src: &Session,
    info: &SourceInfo,
    dsn: &Dsn,
    opts: &SyncOptions,
) -> Result<PreparedTarget, SyncError> {
    freeze::refuse_cut_over(src).await?;
    let mut dst = Session::connect(dsn, "sync").await?;
    let reg = target::register(&mut dst, &info.node_id, &src.target).await?;
    let entry = match target::registry_entry(
        src,
        &reg.node_id,
        &target::default_name(dsn),
        reg.applied.as_deref(),
        opts.accept_new_tables,
    )
    .await
    {
        // The target's progress read at registration may be stale: another applier that
        // committed a round since also acknowledged it. That is not a target gone back.
        Err(SyncError::WentBack { target: name }) => {
            let now: Option<String> = dst
                .client
                .query_one(
                    "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1",
                    &[&info.node_id],
                )
                .await
                .map_err(dst.on_err("reading the target's progress"))?
                .get(0);
            return Err(if now != reg.applied {
                SyncError::AnotherApplier {
                    target: dst.target.clone(),
                }
            } else {
                SyncError::WentBack { target: name }
            });
        }
        other => other?,
    };
    let added_later: Vec<String> = info
        .tables
        .values()
        .filter(|t| !entry.table_ids.contains(&t.table_id))
        .map(|t| t.name.human())
        .collect();
    if !added_later.is_empty() {
        return Err(SyncError::TablesAddedLater {
            target: entry.name,
            tables: added_later,
        });
    }
    if !reg.replica_role {
        let names: Vec<String> = info.tables.values().map(|t| t.name.to_string()).collect();
        // Rounds set pgferry.apply: guarded capture skips them.
        let blocked = target::needs_replica_role(&dst, &names, true).await?;
        let human = |quoted: &String| {
            info.tables
                .values()
                .find(|t| t.name.to_string() == *quoted)
                .map_or_else(|| quoted.clone(), |t| t.name.human())
        };
        if !blocked.tables.is_empty() {
            return Err(SyncError::NeedsReplicaRole {
                target: dst.target.clone(),
                tables: blocked.tables.iter().map(human).collect(),
            });
        }
        if !blocked.unguarded.is_empty() {
            return Err(SyncError::UnguardedCapture {
                target: dst.target.clone(),
                tables: blocked.unguarded.iter().map(human).collect(),
            });
        }
    }
    Ok(PreparedTarget {
        session: dst,
        registered: reg,
        entry,
    })
}

/// Begins a `REPEATABLE READ READ ONLY` transaction on `s`: everything it reads is at one
/// snapshot. `what` names it in errors.
pub(crate) async fn begin_read_only<'a>(
    s: &'a mut Session,
    what: &str,
) -> Result<tokio_postgres::Transaction<'a>, SyncError> {
    let label = s.target.clone();
    s.client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(error::q(&label, what))
}

/// How many times a round may start over because of a TRUNCATE (one that slipped under its
/// snapshot, or one holding a table): with the growing pauses, about 30 s in all.
const MAX_ROUND_RETRIES: u32 = 20;

/// How many times a two-way round may start over after giving way to an application's lock.
const MAX_LOCK_RETRIES: u32 = 1000;

/// Whether `e` is a lock timeout or a deadlock.
fn lock_conflict(e: &SyncError) -> bool {
    use tokio_postgres::error::SqlState;
    sqlstate_in(
        e,
        &[
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::T_R_DEADLOCK_DETECTED,
        ],
    )
}

/// Whether the server error behind `e` has one of `codes`.
fn sqlstate_in(e: &SyncError, codes: &[tokio_postgres::error::SqlState]) -> bool {
    pgferry_core::error::find_db_error(e)
        .and_then(|e| e.code())
        .is_some_and(|c| codes.contains(c))
}

/// How many times a two-way round starts over after a key it inserts was inserted meanwhile by
/// another transaction (another peer's round into the same node, or an application): the next
/// attempt sees that row and decides against it. A key refused again and again is not a race.
const MAX_KEY_RACES: u32 = 5;

/// A unique violation: in a two-way round, after unique clashes were looked for, a key the
/// round inserts that another transaction inserted after the round looked.
fn key_race(e: &SyncError) -> bool {
    sqlstate_in(e, &[tokio_postgres::error::SqlState::UNIQUE_VIOLATION])
}

/// Runs one round, starting over (with growing pauses) while a TRUNCATE is in the way.
pub(crate) async fn round_with_retries(
    src: &mut Session,
    probe: &Session,
    dst: &mut Session,
    ctx: &round::RoundContext<'_>,
) -> Result<RoundOutcome, SyncError> {
    // A copy: retries may drop its expected tables.
    let mut ctx = *ctx;
    let mut tries = 0;
    let mut lock_waits = 0;
    let mut key_races = 0;
    loop {
        let result = match round::run(src, probe, dst, &ctx).await {
            // Two-way: the round gave way to an application holding a row it needs (lock
            // timeout, or a deadlock PostgreSQL resolved against it): start over soon.
            Err(e)
                if ctx.two_way.is_some() && lock_conflict(&e) && lock_waits < MAX_LOCK_RETRIES =>
            {
                lock_waits += 1;
                tracing::debug!(
                    tries = lock_waits,
                    "two-way round gave way to an application's lock: starting over"
                );
                let pause = std::time::Duration::from_millis(2 << lock_waits.min(3));
                tokio::time::sleep(pause).await;
                continue;
            }
            Err(e) if ctx.two_way.is_some() && key_race(&e) && key_races < MAX_KEY_RACES => {
                key_races += 1;
                tracing::debug!(
                    tries = key_races,
                    "two-way round met a key inserted meanwhile: starting over"
                );
                tokio::time::sleep(std::time::Duration::from_millis(2 << key_races)).await;
                continue;
            }
            other => other?,
        };
        match result {
            round::RoundResult::Applied(o) => return Ok(o),
            round::RoundResult::Retry if tries < MAX_ROUND_RETRIES => {
                tries += 1;
                // A table expected but locked exclusively (a long ALTER, a VACUUM FULL) may have
                // no changes this time: the next tries lock only the tables they read.
                ctx.lock_first = &[];
                let pause = std::time::Duration::from_millis(20u64 << tries.min(7));
                tokio::time::sleep(pause).await;
            }
            round::RoundResult::Retry => {
                return Err(SyncError::TablesBusy {
                    source_db: src.target.clone(),
                })
            }
        }
    }
}

/// Sequences belonging to the tables a round touched.
pub(crate) fn sequences_of<'a>(
    info: &'a SourceInfo,
    outcome: &RoundOutcome,
) -> Vec<&'a registry::CapturedSequence> {
    info.sequences
        .iter()
        .filter(|s| {
            info.tables.get(&s.table_id).is_some_and(|t| {
                let human = t.name.human();
                outcome.tables.iter().any(|a| a.table == human)
            })
        })
        .collect()
}

/// Applies to each target every change captured on the source that committed before the call,
/// and moves the registered sequences forward. Targets are registered on first use.
pub async fn sync_once(
    source: &Dsn,
    targets: &[Dsn],
    opts: &SyncOptions,
) -> Result<SyncReport, SyncError> {
    let started = Instant::now();
    let mut src = Session::connect(source, "sync").await?;
    let probe = Session::connect(source, "sync probe").await?;
    let source_label = src.target.clone();
    let info = source_info(&src, &[]).await?;
    let _ticker = purge::ticker(source).await?;

    let mut report = SyncReport {
        source: source_label.clone(),
        targets: Vec::new(),
        rounds: 0,
        rows: 0,
        seconds: 0.0,
        rows_per_second: 0.0,
        purged: 0,
    };
    for dsn in targets {
        let t_started = Instant::now();
        let PreparedTarget {
            session: mut dst,
            registered: reg,
            entry,
        } = prepare_target(&src, &info, dsn, opts).await?;
        let ctx = round::RoundContext {
            split_above: opts.split_rounds_above,
            ..round::RoundContext::new(
                &info,
                reg.applied.as_deref(),
                reg.replica_role,
                (src.server_version, dst.server_version),
            )
        };
        let outcome = round_with_retries(&mut src, &probe, &mut dst, &ctx).await?;
        target::acknowledge(&src, &entry.name, &outcome.snapshot).await?;
        let all: Vec<&registry::CapturedSequence> = info.sequences.iter().collect();
        let advanced = sequence::advance(&src, &dst, &all, &mut Default::default()).await?;
        let rows: u64 = outcome.tables.iter().map(|t| t.rows).sum();
        report.rounds += 1;
        report.rows += rows;
        report.targets.push(TargetReport {
            target: dst.target.clone(),
            name: entry.name,
            node_id: reg.node_id,
            rounds: 1,
            snapshot: outcome.snapshot,
            tables: outcome.tables,
            rows,
            sequences_advanced: advanced,
            split: outcome.split,
            seconds: t_started.elapsed().as_secs_f64(),
        });
    }
    report.purged = purge::purge(&src, true).await?;
    report.seconds = started.elapsed().as_secs_f64();
    report.rows_per_second = if report.seconds > 0.0 {
        report.rows as f64 / report.seconds
    } else {
        0.0
    };
    Ok(report)
}
