//! Continuous replication: the loop `pgferry run` drives, for tools that embed pgferry too.
//!
//! A sync (one source, its targets) runs as a supervisor and one task per target:
//! - **One active daemon per sync.** The supervisor holds a session advisory lock on the source,
//!   keyed by the sync's identity ([`SyncSpec::lock_key`]); a second daemon for the same sync
//!   waits as a standby and takes over within a second or two of the lock's release (the
//!   server releases it when the holder's session ends, however the holder died). A daemon that
//!   lost its lock session stops its rounds; one that lost it mid-round is fenced on the target
//!   by the round's progress check (the next applier finds a snapshot it did not start from).
//! - **Rounds, exactly as `sync --once`.** Each target task runs the engine's rounds (one source
//!   snapshot each, one target transaction each), so everything `round` guarantees holds here;
//!   a round interrupted by a crash, a lost connection or a shutdown rolls back and is redone.
//! - **Wake-up by a cheap poll.** A target task asks the source whether capture rows are pending
//!   for it (a scan of the capture table, which purge keeps small); after a round it asks again
//!   at once, and while nothing comes it waits longer and longer, up to the poll interval. The
//!   capture measured per-row NOTIFY at 2.24x the cost of a bulk UPDATE against 1.56x without:
//!   polling keeps that cost off the application's writes. An idle target still gets a round
//!   every [`HEARTBEAT`], so its progress (and the source's purge) moves on.
//! - **Paced under load** ([`crate::pace`]). A round that applied only a few changes is
//!   followed by the next at once (latency first); after a larger one the next waits a little,
//!   in proportion to its changes and at most [`SyncOptions::max_round_pause`], so that under a
//!   heavy load each round carries more changes and the per-round costs (snapshot, statements,
//!   two commits) are paid less often: those rounds, not the changes, were most of what
//!   replication cost a saturated source. When nearly every round is paced, a longer pause
//!   ([`SyncOptions::saturated_round_pause`]) is tried, and kept while the source commits more
//!   under it.
//! - **Outages.** Any error ends the task's connections; it reconnects with capped exponential
//!   backoff and resumes from the target's own progress. One log line per change of state, not
//!   per retry. A target that stays down holds back purge of its backlog and nothing else.
//! - **Shutdown.** Cancelling the token lets a round in flight finish for up to
//!   [`SHUTDOWN_GRACE`], then drops it (its transactions roll back).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pgferry_core::{Dsn, ErrorClass, Session, TablePattern};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{pace, purge, round, sequence, target, SourceInfo, SyncError, SyncOptions};

/// An idle target gets a round at least this often.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// The poll interval while the source is busy, and how long after its last change it counts
/// as busy. A poll is one count over the (purged, small) capture table.
const BUSY_POLL: Duration = Duration::from_millis(1);
const BUSY_SPELL: Duration = Duration::from_secs(2);
/// How often a target's progress is acknowledged to the source, and its sequences carried
/// forward, while rounds run.
const ACK_EVERY: Duration = Duration::from_millis(500);

/// How long a round in flight may go on after shutdown was asked for.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Reconnection backoff: first pause and cap.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// How often a standby tries the lock, and the active daemon checks it still holds it.
const LOCK_POLL: Duration = Duration::from_secs(1);
/// The advisory lock namespace of syncs (the first half of the two-key lock).
pub const SYNC_LOCK_CLASS: i32 = 0x7067_6679; // "pgfy"

/// One sync: a source and the targets it replicates to.
#[derive(Clone, Debug)]
pub struct SyncSpec {
    /// The sync's identity: the advisory lock that lets one daemon be active is derived from it.
    pub name: String,
    pub source: Dsn,
    pub targets: Vec<Dsn>,
    /// Captured tables this sync replicates; empty means all.
    pub tables: Vec<TablePattern>,
    pub options: SyncOptions,
    /// The longest wait between two polls of the source while it is idle.
    pub poll_interval: Duration,
    /// A direction of a two-way sync (see [`crate::two_way::Mesh::specs`]).
    pub two_way: Option<TwoWay>,
}

/// The two-way sync a [`SyncSpec`] belongs to, and which of its nodes is the source.
#[derive(Clone, Debug)]
pub struct TwoWay {
    pub mesh: Arc<crate::two_way::Mesh>,
    pub source: String,
}

impl SyncSpec {
    /// The default identity of a sync given by DSNs only: its targets' registry names, sorted.
    pub fn default_name(targets: &[Dsn]) -> String {
        let mut names: Vec<String> = targets.iter().map(target::default_name).collect();
        names.sort();
        names.join(",")
    }

    /// The second key of the sync's advisory lock (`pg_try_advisory_lock(SYNC_LOCK_CLASS,
    /// key)`): a stable hash of the sync's name.
    pub fn lock_key(&self) -> i32 {
        (pgferry_core::ident::stable_hash(&self.name) & 0x7fff_ffff) as i32
    }
}

/// Whether this daemon is the sync's active one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Starting,
    /// Another daemon holds the sync's lock; this one waits to take over.
    Standby,
    Active,
    Stopped,
}

/// What a target task knows of its target, for status pages and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetState {
    /// `user@host:port/db`.
    pub target: String,
    /// Connected and applying (false while it reconnects).
    pub up: bool,
    /// The last error, while the target is down.
    pub error: Option<String>,
    /// The source snapshot the target holds.
    pub snapshot: Option<String>,
    pub rounds: u64,
    pub rows: u64,
    pub changes: u64,
    /// Capture rows pending for the target at the last poll.
    pub pending: u64,
    pub last_round_seconds: f64,
    pub last_round_at: Option<SystemTime>,
    /// Time rounds waited after a large round ([`crate::pace`]), in all.
    pub paused_seconds: f64,
    /// Rounds wait the longer pause, which raised the source's change rate ([`crate::pace`]).
    pub long_pauses: bool,
    /// When the target was last known to hold every change committed on the source before
    /// that moment (a poll that found nothing pending, or the start of a round).
    #[serde(skip)]
    pub fresh_at: Option<Instant>,
}

impl TargetState {
    /// Replication lag: how far behind the source the target may be, in seconds.
    pub fn lag_seconds(&self) -> Option<f64> {
        self.fresh_at.map(|t| t.elapsed().as_secs_f64())
    }
}

/// What a sync's daemon is doing.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyncState {
    pub name: String,
    pub source: String,
    pub role: Role,
    pub targets: Vec<TargetState>,
    /// Capture rows kept on the source: counted up to 100,000, above that the statistics'
    /// estimate.
    pub capture_rows: Option<u64>,
}

/// A running sync's observable state.
pub type StateReceiver = watch::Receiver<SyncState>;

/// Runs a sync until `cancel` fires: waits as a standby while another daemon is active, then
/// replicates to every target. Returns when every task has stopped (at most about
/// [`SHUTDOWN_GRACE`] after cancellation). `state` receives every change of state.
pub async fn run(spec: SyncSpec, cancel: CancellationToken, state: watch::Sender<SyncState>) {
    let spec = Arc::new(spec);
    state.send_modify(|s| {
        s.name = spec.name.clone();
        s.source = spec.source.redacted();
        s.targets = spec
            .targets
            .iter()
            .map(|t| TargetState {
                target: t.redacted(),
                ..TargetState::default()
            })
            .collect();
    });
    let state = Arc::new(state);
    let mut announced_standby = false;
    let mut backoff = Backoff::default();
    while !cancel.is_cancelled() {
        let lock = match acquire(&spec).await {
            Ok(Some(session)) => session,
            Ok(None) => {
                if !announced_standby {
                    tracing::info!(sync = %spec.name, "standing by: another daemon is active for this sync");
                    announced_standby = true;
                    state.send_modify(|s| s.role = Role::Standby);
                    metrics::gauge!("pgferry_active", "sync" => spec.name.clone()).set(0.0);
                }
                sleep_or_cancel(LOCK_POLL, &cancel).await;
                continue;
            }
            Err(e) => {
                backoff.failed(&spec.name, "source", &e);
                backoff.wait(&cancel).await;
                continue;
            }
        };
        backoff.recovered(&spec.name, "source");
        announced_standby = false;
        tracing::info!(sync = %spec.name, source = %spec.source.redacted(), "active: replicating");
        state.send_modify(|s| s.role = Role::Active);
        metrics::gauge!("pgferry_active", "sync" => spec.name.clone()).set(1.0);

        let active = cancel.child_token();
        let tracker = TaskTracker::new();
        for (i, dsn) in spec.targets.iter().enumerate() {
            tracker.spawn(target_task(
                spec.clone(),
                i,
                dsn.clone(),
                active.clone(),
                state.clone(),
            ));
        }
        tracker.spawn(source_task(spec.clone(), active.clone(), state.clone()));
        tracker.close();
        // Hold the lock until cancelled or lost.
        loop {
            tokio::select! {
                _ = active.cancelled() => break,
                _ = tokio::time::sleep(LOCK_POLL) => {
                    let alive = tokio::time::timeout(Duration::from_secs(5), lock.client.simple_query("")).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        tracing::warn!(sync = %spec.name, "lost the sync's lock session on the source: stopping rounds, then trying to take the lock again");
                        active.cancel();
                        break;
                    }
                }
            }
        }
        tracker.wait().await;
        drop(lock);
        metrics::gauge!("pgferry_active", "sync" => spec.name.clone()).set(0.0);
    }
    state.send_modify(|s| s.role = Role::Stopped);
}

/// Tries the sync's lock in a session of its own; `None` when another daemon holds it.
async fn acquire(spec: &SyncSpec) -> Result<Option<Session>, SyncError> {
    let session = Session::connect(&spec.source, "run lock").await?;
    let got: bool = session
        .client
        .query_one(
            "SELECT pg_catalog.pg_try_advisory_lock($1, $2)",
            &[&SYNC_LOCK_CLASS, &spec.lock_key()],
        )
        .await
        .map_err(session.on_err("taking the sync's lock"))?
        .get(0);
    Ok(got.then_some(session))
}

/// Ticks (for lag), purge, and the capture table's size, once a second, for as long as the
/// daemon is active.
async fn source_task(
    spec: Arc<SyncSpec>,
    cancel: CancellationToken,
    state: Arc<watch::Sender<SyncState>>,
) {
    let mut backoff = Backoff::default();
    while !cancel.is_cancelled() {
        let result = async {
            let session = Session::connect(&spec.source, "ticker").await?;
            // Capture rows purged (dead in the table) since its last VACUUM.
            let mut dead: u64 = 0;
            loop {
                purge::tick(&session).await?;
                let purged = purge::purge(&session, false).await?;
                if purged > 0 {
                    metrics::counter!("pgferry_purged_rows_total", "sync" => spec.name.clone())
                        .increment(purged);
                }
                dead += purged;
                if dead >= VACUUM_AFTER {
                    let clock = Instant::now();
                    purge::vacuum(&session).await?;
                    tracing::debug!(sync = %spec.name, dead, seconds = clock.elapsed().as_secs_f64(), "capture table vacuumed");
                    dead = 0;
                }
                let kept = capture_rows(&session).await?;
                metrics::gauge!("pgferry_capture_rows", "sync" => spec.name.clone())
                    .set(kept as f64);
                state.send_modify(|s| s.capture_rows = Some(kept));
                backoff.recovered(&spec.name, "source (ticks and purge)");
                if sleep_or_cancel(Duration::from_secs(1), &cancel).await {
                    return Ok::<(), SyncError>(());
                }
            }
        }
        .await;
        if let Err(e) = result {
            backoff.failed(&spec.name, "source (ticks and purge)", &e);
            backoff.wait(&cancel).await;
        }
    }
}

/// The capture table is vacuumed once purge has deleted this many rows since its last VACUUM:
/// every few seconds under load (a few hundred KiB of dead rows), never while idle.
const VACUUM_AFTER: u64 = 5_000;

/// Up to this many capture rows, [`capture_rows`] counts them (a scan that stops there: a few
/// milliseconds); beyond, it reads the statistics' estimate.
const CAPTURE_ROWS_COUNTED: i64 = 100_000;

/// Capture rows kept on the source: exact up to [`CAPTURE_ROWS_COUNTED`], which is where a
/// healthy daemon keeps it (purge runs every second); above, when a target is down or far
/// behind, the statistics' live-row estimate (at least the counted bound), which is cheap
/// whatever the backlog but lags by up to a statistics interval.
async fn capture_rows(session: &Session) -> Result<u64, SyncError> {
    let n: i64 = session
        .client
        .query_one(
            "WITH c AS (SELECT count(*) AS n FROM (SELECT FROM pgferry.delta LIMIT $1) s)
             SELECT CASE WHEN c.n < $1 THEN c.n
                         ELSE greatest(c.n, (SELECT s.n_live_tup FROM pg_catalog.pg_stat_user_tables s
                                              WHERE s.schemaname = 'pgferry' AND s.relname = 'delta'))
                    END
               FROM c",
            &[&CAPTURE_ROWS_COUNTED],
        )
        .await
        .map_err(session.on_err("counting the capture rows kept"))?
        .get(0);
    Ok(n.max(0) as u64)
}

/// Replicates to one target until cancelled, reconnecting after any error.
async fn target_task(
    spec: Arc<SyncSpec>,
    index: usize,
    dsn: Dsn,
    cancel: CancellationToken,
    state: Arc<watch::Sender<SyncState>>,
) {
    let label = dsn.redacted();
    let mut backoff = Backoff::default();
    // Sequences reported missing on this target: reported once while the daemon runs.
    let mut missing_sequences = std::collections::BTreeSet::new();
    while !cancel.is_cancelled() {
        let result = follow(
            &spec,
            index,
            &dsn,
            &cancel,
            &state,
            &mut backoff,
            &mut missing_sequences,
        )
        .await;
        match result {
            Ok(()) => break,
            Err(e) => {
                metrics::counter!("pgferry_errors_total", "sync" => spec.name.clone(), "target" => label.clone(), "class" => class_label(e.class()))
                    .increment(1);
                state.send_modify(|s| {
                    let t = &mut s.targets[index];
                    t.up = false;
                    t.error = Some(e.to_string());
                });
                metrics::gauge!("pgferry_target_up", "sync" => spec.name.clone(), "target" => label.clone()).set(0.0);
                backoff.failed(&spec.name, &label, &e);
                backoff.wait(&cancel).await;
            }
        }
    }
}

/// Connects, then runs rounds whenever changes are pending; returns Ok when cancelled.
async fn follow(
    spec: &SyncSpec,
    index: usize,
    dsn: &Dsn,
    cancel: &CancellationToken,
    state: &watch::Sender<SyncState>,
    backoff: &mut Backoff,
    missing_sequences: &mut std::collections::BTreeSet<String>,
) -> Result<(), SyncError> {
    let label = dsn.redacted();
    let mut src = Session::connect(&spec.source, "run").await?;
    let probe = Session::connect(&spec.source, "run probe").await?;
    // No parallel plans for the rounds' and polls' scans of the capture table: worker start-up
    // costs more than these scans (measured: a bloated capture table past a few MiB switched
    // them to parallel plans, and rounds took 60-100 ms instead of ~20), and the workers
    // compete with the application for the source's cores.
    for s in [&src, &probe] {
        s.batch(
            "SET max_parallel_workers_per_gather = 0",
            "turning parallel plans off",
        )
        .await?;
    }
    let info: SourceInfo = crate::source_info(&src, &spec.tables).await?;
    let prepared = crate::prepare_target(&src, &info, dsn, &spec.options).await?;
    let mut dst = prepared.session;
    let exchange = match &spec.two_way {
        Some(tw) => {
            let peers = tw.mesh.peers(&tw.source);
            Some(
                crate::two_way::direction(
                    crate::two_way::End {
                        session: &mut src,
                        name: &tw.source,
                    },
                    &info,
                    crate::two_way::End {
                        session: &mut dst,
                        name: &peers[index],
                    },
                    prepared.registered.replica_role,
                    &tw.mesh,
                )
                .await?,
            )
        }
        None => None,
    };
    backoff.recovered(&spec.name, &label);
    let mut previous = prepared.registered.applied.clone();
    let name = prepared.entry.name;
    let ids: Vec<i32> = info.tables.keys().copied().collect();
    tracing::info!(sync = %spec.name, target = %label, snapshot = previous.as_deref().unwrap_or("none"), "target connected");
    // A new connection starts with the normal pacing.
    let mut pacer = pace::Pacer::new(
        spec.options.max_round_pause,
        spec.options.saturated_round_pause,
        Instant::now(),
    );
    let was_long = state.borrow().targets[index].long_pauses;
    state.send_modify(|s| {
        let t = &mut s.targets[index];
        t.up = true;
        t.error = None;
        t.snapshot = previous.clone();
        t.long_pauses = false;
    });
    metrics::gauge!("pgferry_target_up", "sync" => spec.name.clone(), "target" => label.clone())
        .set(1.0);
    if was_long {
        metrics::gauge!("pgferry_long_pauses", "sync" => spec.name.clone(), "target" => label.clone())
            .set(0.0);
    }
    let mut wait = Duration::ZERO;
    // The tables of the last round that applied changes: the next round locks them before its
    // snapshot, which spares it the check for a TRUNCATE after it (round.rs).
    let mut expected: Vec<i32> = Vec::new();
    let mut last_round = Instant::now() - HEARTBEAT;
    let mut last_change = Instant::now() - BUSY_SPELL;
    let mut chained = false;
    // Acknowledgements (which let the source purge) are written at most every ACK_EVERY:
    // the target's own progress row is the truth, and an acknowledgement is a write
    // transaction on the source.
    let mut unacked: Option<String> = None;
    let mut last_ack = Instant::now() - ACK_EVERY;
    // Sequences are carried forward on the same beat (not after every round: that was four
    // more statements between two rounds), every sequence once per connection, so none that a
    // round touched before a reconnection stays behind.
    // Two-way syncs copy no sequence: that would hand out the same values on two nodes.
    let mut unadvanced: Vec<&crate::registry::CapturedSequence> = if exchange.is_some() {
        Vec::new()
    } else {
        info.sequences.iter().collect()
    };
    loop {
        if (unacked.is_some() || !unadvanced.is_empty())
            && (last_ack.elapsed() >= ACK_EVERY || cancel.is_cancelled())
        {
            if let Some(snapshot) = unacked.take() {
                target::acknowledge(&src, &name, &snapshot).await?;
            }
            if !unadvanced.is_empty() {
                sequence::advance(&src, &dst, &unadvanced, missing_sequences).await?;
                unadvanced.clear();
            }
            last_ack = Instant::now();
        }
        if cancel.is_cancelled() {
            return Ok(());
        }
        // While rounds bring changes, the next round starts at once: its own reading of the
        // pending changes is the poll (a poll scans the capture table as a round does, so
        // polling between back-to-back rounds would double the source's cost).
        if chained {
            chained = false;
        } else {
            let polled_at = Instant::now();
            let pending = pending_count(&src, &info, &ids, previous.as_deref()).await?;
            metrics::gauge!("pgferry_pending_changes", "sync" => spec.name.clone(), "target" => label.clone())
                .set(pending as f64);
            state.send_modify(|s| {
                let t = &mut s.targets[index];
                t.pending = pending;
                if pending == 0 {
                    t.fresh_at = Some(polled_at);
                }
            });
            if pending == 0 && last_round.elapsed() < HEARTBEAT {
                // Busy sources get polled every millisecond; idle ones less and less often.
                wait = if last_change.elapsed() < BUSY_SPELL {
                    BUSY_POLL
                } else {
                    (wait * 2).clamp(BUSY_POLL, spec.poll_interval)
                };
                // Cancelled or not, the top of the loop acknowledges and decides.
                sleep_or_cancel(wait, cancel).await;
                continue;
            }
        }
        wait = Duration::ZERO;
        let started = Instant::now();
        let ctx = round::RoundContext {
            split_above: spec.options.split_rounds_above,
            two_way: exchange.as_ref(),
            lock_first: &expected,
            ..round::RoundContext::new(
                &info,
                previous.as_deref(),
                prepared.registered.replica_role,
                (src.server_version, dst.server_version),
            )
        };
        let outcome = {
            let round = crate::round_with_retries(&mut src, &probe, &mut dst, &ctx);
            tokio::pin!(round);
            tokio::select! {
                r = &mut round => r?,
                _ = cancel.cancelled() => {
                    match tokio::time::timeout(SHUTDOWN_GRACE, &mut round).await {
                        Ok(r) => r?,
                        Err(_) => {
                            tracing::warn!(sync = %spec.name, target = %label, "shutdown: the round in flight was rolled back");
                            return Ok(());
                        }
                    }
                }
            }
        };
        unacked = Some(outcome.snapshot.clone());
        if !outcome.table_ids.is_empty() {
            expected.clone_from(&outcome.table_ids);
        }
        // Two-way syncs copy no sequence (each node hands out its own values).
        let touched = if exchange.is_some() {
            Vec::new()
        } else {
            crate::sequences_of(&info, &outcome)
        };
        for s in touched {
            if !unadvanced.iter().any(|u| std::ptr::eq(*u, s)) {
                unadvanced.push(s);
            }
        }
        last_round = Instant::now();
        let seconds = started.elapsed().as_secs_f64();
        let rows: u64 = outcome.tables.iter().map(|t| t.rows).sum();
        let changes: u64 = outcome.tables.iter().map(|t| t.changes).sum();
        let labels = [("sync", spec.name.clone()), ("target", label.clone())];
        metrics::counter!("pgferry_rounds_total", &labels).increment(1);
        metrics::histogram!("pgferry_round_duration_seconds", &labels).record(seconds);
        for t in &outcome.tables {
            let labels = [
                ("sync", spec.name.clone()),
                ("target", label.clone()),
                ("table", t.table.clone()),
            ];
            metrics::counter!("pgferry_rows_applied_total", &labels).increment(t.rows);
            metrics::counter!("pgferry_changes_applied_total", &labels).increment(t.changes);
            if !t.conflicts.is_empty() {
                metrics::counter!("pgferry_conflicts_total", &labels)
                    .increment(t.conflicts.len() as u64);
            }
        }
        if changes > 0 {
            last_change = Instant::now();
            chained = true;
            tracing::debug!(sync = %spec.name, target = %label, changes, rows, seconds, snapshot = %outcome.snapshot, "round applied");
        }
        let (pause, decision) = pacer.after_round(started, changes);
        let long = decision.map(|d| {
            log_pacing(&spec.name, &label, d);
            let long = d.mode == pace::Mode::Long;
            metrics::gauge!("pgferry_long_pauses", &labels).set(if long { 1.0 } else { 0.0 });
            long
        });
        state.send_modify(|s| {
            let t = &mut s.targets[index];
            if let Some(long) = long {
                t.long_pauses = long;
            }
            t.snapshot = Some(outcome.snapshot.clone());
            t.rounds += 1;
            t.rows += rows;
            t.changes += changes;
            t.last_round_seconds = seconds;
            t.last_round_at = Some(SystemTime::now());
            t.fresh_at = Some(started);
        });
        previous = Some(outcome.snapshot);
        if !pause.is_zero() {
            metrics::histogram!("pgferry_round_pause_seconds", &labels).record(pause.as_secs_f64());
            state.send_modify(|s| s.targets[index].paused_seconds += pause.as_secs_f64());
            // Cancelled or not, the top of the loop acknowledges and decides.
            sleep_or_cancel(pause, cancel).await;
        }
    }
}

/// One log line for a decision of the pacer: info when the pacing changed, debug for a trial
/// that changed nothing.
fn log_pacing(sync: &str, target: &str, d: pace::Decision) {
    let (long, normal) = d.rates.unwrap_or_default();
    let (long, normal) = (long.round(), normal.round());
    match (d.changed, d.rates.is_some(), d.mode) {
        (false, _, mode) => {
            tracing::debug!(sync = %sync, target = %target, ?mode, changes_per_second_long = long, changes_per_second_normal = normal, "pacing: trial of the longer pause")
        }
        (true, false, _) => {
            tracing::info!(sync = %sync, target = %target, "pacing: the load fell; back to the normal pauses")
        }
        (true, true, pace::Mode::Long) => {
            tracing::info!(sync = %sync, target = %target, changes_per_second_long = long, changes_per_second_normal = normal, "pacing: the source commits more with longer pauses between rounds; keeping them")
        }
        (true, true, pace::Mode::Normal) => {
            tracing::info!(sync = %sync, target = %target, changes_per_second_long = long, changes_per_second_normal = normal, "pacing: longer pauses no longer raise the source's commit rate; back to the normal pauses")
        }
    }
}

/// Capture rows pending for a target at `previous` (committed, not yet applied).
async fn pending_count(
    src: &Session,
    info: &SourceInfo,
    ids: &[i32],
    previous: Option<&str>,
) -> Result<u64, SyncError> {
    let condition = round::pending_condition(info.dialect, previous)?;
    let n: i64 = src
        .client
        .query_typed_one(
            &format!(
                "SELECT count(*) FROM pgferry.delta d WHERE d.table_id = ANY($1) AND {condition}"
            ),
            &[(&ids, tokio_postgres::types::Type::INT4_ARRAY)],
        )
        .await
        .map_err(src.on_err("polling for pending changes"))?
        .get(0);
    Ok(n as u64)
}

fn class_label(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Connection => "connection",
        ErrorClass::Authentication => "authentication",
        ErrorClass::Privilege => "privilege",
        ErrorClass::Transient => "transient",
        ErrorClass::Definite => "definite",
    }
}

/// Sleeps, or returns early with `true` when cancelled.
async fn sleep_or_cancel(pause: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => false,
        _ = cancel.cancelled() => true,
    }
}

/// Capped exponential backoff that logs once per change of state, not per retry.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last: Option<String>,
}

impl Backoff {
    fn failed(&mut self, sync: &str, what: &str, e: &SyncError) {
        let text = pgferry_core::error::chain(e);
        if self.last.as_deref() != Some(text.as_str()) {
            tracing::warn!(sync, node = what, class = class_label(e.class()), error = %text, "unavailable: retrying with backoff");
            self.last = Some(text);
        }
        self.failures += 1;
    }

    fn recovered(&mut self, sync: &str, what: &str) {
        if self.last.take().is_some() {
            tracing::info!(sync, node = what, "available again");
        }
        self.failures = 0;
    }

    async fn wait(&self, cancel: &CancellationToken) {
        let exp = BACKOFF_FIRST.saturating_mul(1 << self.failures.min(10).saturating_sub(1));
        sleep_or_cancel(exp.min(BACKOFF_CAP), cancel).await;
    }
}

/// A per-sync summary, keyed by sync name, for `/healthz` and status pages.
pub fn summary(states: &[StateReceiver]) -> BTreeMap<String, SyncState> {
    states
        .iter()
        .map(|r| {
            let s = r.borrow().clone();
            (s.name.clone(), s)
        })
        .collect()
}
