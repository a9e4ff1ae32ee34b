//! Cutover: steps 6–8 of a migration made safe. The source's writes are frozen, every target
//! is drained to one final snapshot, sequences are carried, and what the final round touched is
//! verified, all inside a write outage measured and reported in seconds.
//!
//! The order, and why:
//! 1. **Preflight, nothing changed yet**: capture, every target registered and able to take
//!    rounds, the source not cut over already, no other cutover running (a session advisory
//!    lock), each target's lag at most `max_lag` (a long final round would lengthen the outage).
//! 2. **Daemons taken over**: a daemon replicating from the source holds its sync's advisory
//!    lock; cutover ends that session and holds the lock itself, so the daemon stands by
//!    instead of racing the final round. (Racing would still be exact — rounds serialise on the
//!    target's progress row — but its purge could remove the capture rows the check reads.)
//! 3. **Catch-up** before the freeze: a round per target, so the final one is small.
//! 4. **Freeze** ([`crate::freeze`]): the outage starts here.
//! 5. **Final round** per target, at a snapshot taken after the freeze committed: it holds
//!    every write the source will ever have. Targets are drained concurrently.
//! 6. **Sequences** set on every target from the frozen source.
//! 7. **Check**: the rows of every key the final round touched, compared by hash, plus every
//!    table's row count ([`crate::verify::check_touched`]). A full `pgferry verify` runs after
//!    the outage.
//! 8. **Done**: the cutover is recorded `done` — the source stays frozen and the engine refuses
//!    to replicate from it — and the outage ends. Then, outside it, the targets' pgferry schema
//!    (their progress rows) is removed and the source's capture rows are purged.
//!
//! Any failure from step 4 to step 8 unfreezes the source (it is writable again, and its
//! capture goes on), so nothing is lost; targets keep whatever rounds they committed, each an
//! exact source state, and go on from there.
//!
//! With `reverse` ([`crate::reverse`]), step 7 is followed, still inside the outage and before
//! step 8, by the capture installed on the target and the source registered as its target, so
//! that the target's writes flow back to the source from the moment applications may write
//! them. A target frozen by a cutover of its own is refused, unless that cutover records this
//! source as the database it follows back: then this cutover is the way back, and the target is
//! unfrozen right after step 8, inside the outage (the source is then frozen for good, the
//! target writable: a failure in between leaves both frozen, and says so).

use std::time::{Duration, Instant};

use pgferry_core::artifact::SCHEMA;
use pgferry_core::{catalog, Dsn, Session};
use serde::Serialize;

use crate::error::q;
use crate::freeze;
use crate::registry::CapturedTable;
use crate::round::{self, RoundOutcome};
use crate::verify::TouchedVerdict;
use crate::{prepare_target, purge, round_with_retries, sequence, target, SourceInfo, SyncError};

/// Key of the session advisory lock one cutover of a source holds (`pg_try_advisory_lock`).
const CUTOVER_LOCK_KEY: i64 = 0x7067_6665_7272_7903;

/// How long a final round waits for another applier (a daemon finishing its round in flight)
/// before giving up.
const APPLIER_WAIT: Duration = Duration::from_secs(30);

/// Options of a cutover.
#[derive(Clone, Debug)]
pub struct CutoverOptions {
    /// How long the freeze waits for the captured tables' locks (writers inside a
    /// transaction must finish first). The wait is part of the outage.
    pub lock_timeout: Duration,
    /// Refuse to start when a target is further behind than this.
    pub max_lag: Duration,
    /// Compare every table's row count inside the freeze (a scan of every table on both
    /// sides); the final round's keys are always compared.
    pub counts: bool,
    /// Check everything, freeze nothing.
    pub dry_run: bool,
    /// Install capture on the (single) target and register the source as its target before
    /// the applications are released: the way back ([`crate::reverse`]).
    pub reverse: bool,
}

impl Default for CutoverOptions {
    fn default() -> Self {
        CutoverOptions {
            lock_timeout: Duration::from_secs(5),
            max_lag: Duration::from_secs(30),
            counts: true,
            dry_run: false,
            reverse: false,
        }
    }
}

/// One step of a cutover, timed.
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub step: &'static str,
    pub seconds: f64,
    pub ok: bool,
    /// Whether the step ran while writes were frozen.
    pub in_outage: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What cutover did for one target.
#[derive(Clone, Debug, Serialize)]
pub struct CutoverTarget {
    pub target: String,
    /// The target's name in the source's registry.
    pub name: String,
    /// How far behind it was when cutover started (seconds).
    pub lag_seconds: f64,
    /// Changes pending for it when cutover started.
    pub pending: u64,
    /// The final snapshot it holds.
    pub snapshot: Option<String>,
    /// Changes and rows of the final round (inside the outage).
    pub final_changes: u64,
    pub final_rows: u64,
    pub sequences_advanced: u64,
    /// The check inside the freeze, per table.
    pub checked: Vec<TouchedVerdict>,
}

/// What a cutover did.
#[derive(Clone, Debug, Serialize)]
pub struct CutoverReport {
    pub source: String,
    pub ok: bool,
    pub dry_run: bool,
    /// Seconds during which writes to the source were refused or waited, until the targets
    /// were complete and checked (None when no freeze happened).
    pub outage_seconds: Option<f64>,
    /// `cut over` (frozen for good), `writable`, or `frozen` (a failed cutover that could not
    /// unfreeze it: run `pgferry unfreeze`).
    pub source_state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub steps: Vec<Step>,
    pub targets: Vec<CutoverTarget>,
    /// Daemon sessions ended to take their syncs over.
    pub daemons_taken_over: Vec<String>,
    /// Relations (tables and partitions) that refuse writes.
    pub frozen_relations: usize,
    /// Registered targets of the source that were not part of this cutover: they stay where
    /// they are.
    pub left_behind: Vec<String>,
    /// Things that did not stop the cutover but need a look.
    pub warnings: Vec<String>,
    /// `--reverse`: the way back that is now open.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverse: Option<crate::reverse::ReverseReport>,
    /// Targets that were frozen following the source back, made writable at the end (the way
    /// back).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub returned: Vec<String>,
    pub seconds: f64,
}

/// One target's sessions.
struct Lane {
    src: Session,
    probe: Session,
    dst: Session,
    name: String,
    replica_role: bool,
    applied: Option<String>,
    /// Frozen, following the source back: unfrozen at the end (the way back).
    returning: bool,
    report: CutoverTarget,
}

/// Cuts `targets` over from `source` (see the module documentation). Returns `Err` when it
/// refused or failed before freezing anything (nothing changed); once the freeze has begun it
/// returns a report, `ok` or not, that says what failed and where the source stands.
pub async fn cutover(
    source: &Dsn,
    targets: &[Dsn],
    opts: &CutoverOptions,
) -> Result<CutoverReport, SyncError> {
    let started = Instant::now();
    let mut ctl = Session::connect(source, "cutover").await?;
    let label = ctl.target.clone();
    let mut report = CutoverReport {
        source: label.clone(),
        ok: false,
        dry_run: opts.dry_run,
        outage_seconds: None,
        source_state: "writable",
        failed_step: None,
        error: None,
        steps: Vec::new(),
        targets: Vec::new(),
        daemons_taken_over: Vec::new(),
        frozen_relations: 0,
        left_behind: Vec::new(),
        warnings: Vec::new(),
        reverse: None,
        returned: Vec::new(),
        seconds: 0.0,
    };
    if opts.reverse && targets.len() != 1 {
        return Err(SyncError::ReverseRefused {
            reason: format!(
                "it takes one --target (got {}): the old database follows one new database back",
                targets.len()
            ),
        });
    }

    // 1. Checks.
    let t = Instant::now();
    let info = crate::source_info(&ctl, &[]).await?;
    freeze::refuse_cut_over(&ctl).await?;
    let got: bool = ctl
        .client
        .query_one(
            "SELECT pg_catalog.pg_try_advisory_lock($1)",
            &[&CUTOVER_LOCK_KEY],
        )
        .await
        .map_err(ctl.on_err("taking the cutover lock"))?
        .get(0);
    if !got {
        return Err(SyncError::CutoverRunning { source_db: label });
    }
    let _ticker = purge::ticker(source).await?;
    let mut lanes = Vec::with_capacity(targets.len());
    for dsn in targets {
        lanes.push(open_lane(source, dsn, &info).await?);
    }
    let plan = match (opts.reverse, lanes.first()) {
        (true, Some(l)) if l.returning => {
            return Err(SyncError::ReverseRefused {
                reason: format!(
                    "{} follows {label} back, so this cutover is the way back itself; it returns to {} without --reverse",
                    l.report.target, l.report.target
                ),
            })
        }
        (true, Some(_)) => {
            Some(crate::reverse::preflight(&ctl, &info, &targets[0], opts.lock_timeout).await?)
        }
        _ => None,
    };
    let ours: Vec<&str> = lanes.iter().map(|l| l.name.as_str()).collect();
    report.left_behind = ctl
        .client
        .query("SELECT name FROM pgferry.target ORDER BY name", &[])
        .await
        .map_err(ctl.on_err("reading the source's registry of targets"))?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|n| !ours.contains(&n.as_str()))
        .collect();
    step(&mut report, "preflight", t, false, None);

    // 2. Lag.
    let t = Instant::now();
    for lane in &mut lanes {
        let (pending, lag) = lag(&lane.src, &lane.dst, &info, lane.applied.as_deref()).await?;
        lane.report.pending = pending;
        lane.report.lag_seconds = lag;
        if lag > opts.max_lag.as_secs_f64() {
            return Err(SyncError::LagTooHigh {
                target: lane.report.target.clone(),
                lag,
                max: opts.max_lag.as_secs_f64(),
            });
        }
    }
    step(&mut report, "lag", t, false, None);

    let tables: Vec<&CapturedTable> = info.tables.values().collect();
    if opts.dry_run {
        let t = Instant::now();
        let daemons = daemons(&ctl).await?;
        let detail = if daemons.is_empty() {
            "no daemon replicates from the source".to_owned()
        } else {
            format!(
                "would take over: {}",
                daemons
                    .iter()
                    .map(|d| d.describe())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        step(&mut report, "daemons", t, false, Some(detail));
        if plan.is_some() {
            step(
                &mut report,
                "reverse",
                Instant::now(),
                false,
                Some(format!(
                    "would install capture on {} ({} tables) and register the source as its target",
                    lanes[0].report.target,
                    info.tables.len()
                )),
            );
        }
        let slow = opts.lock_timeout.as_secs_f64() / 2.0;
        for h in freeze::lock_holders(&ctl, &tables, slow).await? {
            report.warnings.push(format!(
                "{h} holds a write lock on a captured table: a freeze now would wait for it (at most --lock-timeout)"
            ));
        }
        report.ok = true;
        report.targets = lanes.into_iter().map(|l| l.report).collect();
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // 3. Daemons.
    let t = Instant::now();
    report.daemons_taken_over = take_over_daemons(&ctl).await?;
    step(&mut report, "daemons", t, false, None);

    // 4. Catch-up before the freeze (its failure changes nothing either).
    let t = Instant::now();
    futures_util::future::try_join_all(lanes.iter_mut().map(|l| drain(l, &info))).await?;
    step(&mut report, "catch-up", t, false, None);

    // 5.–8. Inside the outage.
    let names: Vec<String> = lanes.iter().map(|l| l.name.clone()).collect();
    let outage = Instant::now();
    let frozen = match freeze::freeze(&mut ctl, &tables, &names, opts.lock_timeout).await {
        Ok(f) => f,
        Err(e) => return Err(e),
    };
    report.frozen_relations = frozen.relations;
    report.source_state = "frozen";
    step(
        &mut report,
        "freeze",
        outage,
        true,
        Some(format!("{} relations refuse writes", frozen.relations)),
    );
    let mut progress = crate::reverse::Progress::default();
    let back = Back {
        source,
        plan: plan.as_ref(),
    };
    let inside = inside_freeze(
        &mut lanes,
        &info,
        &ctl,
        frozen.cutover_id,
        opts,
        (&back, &mut progress),
        &mut report,
    )
    .await;
    match inside {
        Ok(()) => {
            report.source_state = "cut over";
            report.ok = true;
            return_targets(&mut lanes, &label, &mut report).await;
            report.outage_seconds = Some(outage.elapsed().as_secs_f64());
        }
        Err((at, t, e)) => {
            report.failed_step = Some(at);
            report.error = Some(e.to_string());
            step(&mut report, at, t, true, Some(e.to_string()));
            if let Some(s) = report.steps.last_mut() {
                s.ok = false;
            }
            let t = Instant::now();
            let note = format!("cutover failed at {at}: {e}");
            match unfreeze_after_failure(source, &mut ctl, &note).await {
                Ok(()) => {
                    report.source_state = "writable";
                    step(&mut report, "unfreeze", t, true, None);
                }
                Err(u) => {
                    report.warnings.push(format!(
                        "the source could not be made writable again: {u}; run `pgferry unfreeze --source …`"
                    ));
                    step(&mut report, "unfreeze", t, true, Some(u.to_string()));
                    if let Some(s) = report.steps.last_mut() {
                        s.ok = false;
                    }
                }
            }
            if let (Some(plan), true) = (&plan, progress.started()) {
                report
                    .warnings
                    .extend(crate::reverse::undo(&progress, plan, &ctl).await);
            }
            report.outage_seconds = Some(outage.elapsed().as_secs_f64());
            report.targets = lanes.into_iter().map(|l| l.report).collect();
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
    }

    // 9. After the outage: the targets' progress rows, the source's capture rows.
    let t = Instant::now();
    for lane in &mut lanes {
        if let Err(e) = release_target(lane, &info.node_id).await {
            report.warnings.push(format!(
                "{}: its pgferry progress could not be removed: {e}",
                lane.report.target
            ));
        }
    }
    if let Err(e) = purge::purge(&ctl, true).await {
        report
            .warnings
            .push(format!("the source's capture rows were not purged: {e}"));
    }
    step(&mut report, "release", t, false, None);
    report.targets = lanes.into_iter().map(|l| l.report).collect();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// What the reverse step needs: the source's DSN, and the checks `--reverse` made (None without
/// it).
struct Back<'a> {
    source: &'a Dsn,
    plan: Option<&'a crate::reverse::Plan>,
}

/// Steps 5 to 8 (and `--reverse`'s step before 8); on failure, the step that failed and why.
async fn inside_freeze(
    lanes: &mut [Lane],
    info: &SourceInfo,
    ctl: &Session,
    cutover_id: i64,
    opts: &CutoverOptions,
    (back, progress): (&Back<'_>, &mut crate::reverse::Progress),
    report: &mut CutoverReport,
) -> Result<(), (&'static str, Instant, SyncError)> {
    let t = Instant::now();
    failpoint("final round")
        .await
        .map_err(|e| ("final round", t, e))?;
    let since: Vec<Option<String>> = lanes.iter().map(|l| l.applied.clone()).collect();
    futures_util::future::try_join_all(lanes.iter_mut().map(|l| drain(l, info)))
        .await
        .map_err(|e| ("final round", t, e))?;
    let rows: u64 = lanes.iter().map(|l| l.report.final_rows).sum();
    step(report, "final round", t, true, Some(format!("{rows} rows")));

    let t = Instant::now();
    failpoint("sequences")
        .await
        .map_err(|e| ("sequences", t, e))?;
    let all: Vec<&crate::registry::CapturedSequence> = info.sequences.iter().collect();
    for lane in lanes.iter_mut() {
        let mut missing = std::collections::BTreeSet::new();
        lane.report.sequences_advanced =
            sequence::advance(&lane.src, &lane.dst, &all, &mut missing)
                .await
                .map_err(|e| ("sequences", t, e))?;
    }
    step(report, "sequences", t, true, None);

    let t = Instant::now();
    failpoint("check").await.map_err(|e| ("check", t, e))?;
    let checks = lanes.iter_mut().zip(&since).map(|(l, s)| {
        crate::verify::check_touched(&mut l.src, &mut l.dst, info, s.as_deref(), opts.counts)
    });
    let verdicts = futures_util::future::try_join_all(checks)
        .await
        .map_err(|e| ("check", t, e))?;
    let mut different = Vec::new();
    for (lane, v) in lanes.iter_mut().zip(verdicts) {
        for t in v.iter().filter(|t| !t.equal) {
            different.push(format!("{} on {}", t.table, lane.report.target));
        }
        lane.report.checked = v;
    }
    if !different.is_empty() {
        return Err(("check", t, SyncError::CutoverMismatch { tables: different }));
    }
    let touched: u64 = lanes
        .iter()
        .flat_map(|l| l.report.checked.iter())
        .map(|t| t.touched_keys)
        .sum();
    step(
        report,
        "check",
        t,
        true,
        Some(format!(
            "{touched} touched keys{}",
            if opts.counts {
                " and row counts equal"
            } else {
                " equal"
            }
        )),
    );

    // --reverse: the target captures, with the source registered, before anyone may write to
    // it (that is step 8).
    if let Some(plan) = back.plan {
        let t = Instant::now();
        failpoint("reverse").await.map_err(|e| ("reverse", t, e))?;
        let opened =
            crate::reverse::open(plan, back.source, ctl, info, opts.lock_timeout, progress)
                .await
                .map_err(|e| ("reverse", t, e))?;
        let detail = format!(
            "{} captures {} tables ({} added); {} registered as its target",
            opened.captured_on, opened.tables, opened.capture_added, opened.follower
        );
        report.reverse = Some(opened);
        step(report, "reverse", t, true, Some(detail));
    }

    let t = Instant::now();
    failpoint("done").await.map_err(|e| ("done", t, e))?;
    let followed_by = back.plan.and(progress.target_node.as_deref());
    freeze::mark_done(ctl, cutover_id, followed_by)
        .await
        .map_err(|e| ("done", t, e))?;
    step(report, "done", t, true, None);
    Ok(())
}

/// The way back, after step 8: every target that was frozen following the source back is
/// unfrozen (and forgets its capture's stale targets and rows, [`freeze::unfreeze`]). The
/// source is cut over by now, so a failure here cannot roll back: the report says which target
/// is still frozen and how to unfreeze it.
async fn return_targets(lanes: &mut [Lane], source_label: &str, report: &mut CutoverReport) {
    let t = Instant::now();
    let mut returned = Vec::new();
    let mut failed = Vec::new();
    for lane in lanes.iter_mut().filter(|l| l.returning) {
        let note = format!("the way back: {source_label} was cut over to this database");
        match freeze::unfreeze(&mut lane.dst, &note, false).await {
            Ok((u, _)) => {
                if !u.forgotten_targets.is_empty() {
                    report.warnings.push(format!(
                        "{}: its capture forgot its old targets ({}) and {} capture rows: they predate the writes it took back; give them a fresh copy to replicate to them again",
                        lane.report.target,
                        u.forgotten_targets.join(", "),
                        u.capture_rows_dropped
                    ));
                }
                returned.push(lane.report.target.clone());
            }
            Err(e) => failed.push((lane.report.target.clone(), e)),
        }
    }
    if returned.is_empty() && failed.is_empty() {
        return;
    }
    let detail = format!("writable again: {}", returned.join(", "));
    report.returned = returned;
    step(report, "return", t, true, Some(detail));
    if !failed.is_empty() {
        if let Some(s) = report.steps.last_mut() {
            s.ok = false;
        }
        report.ok = false;
        report.failed_step = Some("return");
        report.error = Some(
            failed
                .iter()
                .map(|(t, e)| format!("{t} could not be unfrozen: {e}"))
                .collect::<Vec<_>>()
                .join("; "),
        );
        for (t, _) in &failed {
            report.warnings.push(format!(
                "{t} is STILL FROZEN although the source is cut over: run `pgferry unfreeze --source …` on it"
            ));
        }
    }
}

/// Fault injection for the tests of failure at each step inside the freeze:
/// `PGFERRY_FAILPOINT="STEP"` makes that step fail, `"STEP:pause=SECONDS"` pauses before it
/// (e.g. to kill a target meanwhile). Unset in production.
async fn failpoint(at: &'static str) -> Result<(), SyncError> {
    let Ok(spec) = std::env::var("PGFERRY_FAILPOINT") else {
        return Ok(());
    };
    let (name, action) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
    if name != at {
        return Ok(());
    }
    if let Some(secs) = action.strip_prefix("pause=") {
        let secs: f64 = secs.parse().unwrap_or(1.0);
        tracing::warn!(step = at, secs, "failpoint: pausing");
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        return Ok(());
    }
    Err(SyncError::Injected { step: at })
}

async fn open_lane(source: &Dsn, dsn: &Dsn, info: &SourceInfo) -> Result<Lane, SyncError> {
    // A target that never applied a round from this source is refused, not registered: its
    // lag is unknown, and a dry run must change nothing.
    {
        let dst = Session::connect(dsn, "cutover").await?;
        let synced: bool = dst
            .client
            .query_one(
                "SELECT pg_catalog.to_regclass('pgferry.applied') IS NOT NULL",
                &[],
            )
            .await
            .map_err(dst.on_err("looking for the target's progress"))?
            .get(0);
        let synced = synced
            && dst
                .client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pgferry.applied WHERE source_node_id = $1 AND snapshot IS NOT NULL)",
                    &[&info.node_id],
                )
                .await
                .map_err(dst.on_err("reading the target's progress"))?
                .get::<_, bool>(0);
        if !synced {
            return Err(SyncError::NeverSynced {
                target: dst.target.clone(),
            });
        }
    }
    let src = Session::connect(source, "cutover").await?;
    let probe = Session::connect(source, "cutover probe").await?;
    let prepared = prepare_target(&src, info, dsn, &crate::SyncOptions::default()).await?;
    let target = prepared.session.target.clone();
    let returning =
        crate::reverse::returning(&prepared.session, &info.node_id, &src.target).await?;
    Ok(Lane {
        src,
        probe,
        name: prepared.entry.name.clone(),
        replica_role: prepared.registered.replica_role,
        applied: prepared.registered.applied.clone(),
        returning,
        dst: prepared.session,
        report: CutoverTarget {
            target,
            name: prepared.entry.name,
            lag_seconds: 0.0,
            pending: 0,
            snapshot: None,
            final_changes: 0,
            final_rows: 0,
            sequences_advanced: 0,
            checked: Vec::new(),
        },
    })
}

/// Changes pending for a target, and how old the oldest is in seconds: from the source's ticks
/// where one saw it commit, else the time since the target last applied (an upper bound).
async fn lag(
    src: &Session,
    dst: &Session,
    info: &SourceInfo,
    applied: Option<&str>,
) -> Result<(u64, f64), SyncError> {
    let condition = round::pending_condition(info.dialect, applied)?;
    let ids: Vec<i32> = info.tables.keys().copied().collect();
    let row = src
        .client
        .query_one(
            &format!(
                "SELECT count(*), min(d.xid::text::int8)::text FROM pgferry.delta d
                  WHERE d.table_id = ANY($1) AND {condition}"
            ),
            &[&ids],
        )
        .await
        .map_err(src.on_err("counting pending changes"))?;
    let pending = row.get::<_, i64>(0) as u64;
    let Some(oldest) = row.get::<_, Option<String>>(1) else {
        return Ok((0, 0.0));
    };
    let by_tick = crate::status::committed_seconds_ago(src, info.dialect, &oldest).await?;
    if let Some(s) = by_tick {
        return Ok((pending, s.max(0.0)));
    }
    let since_applied: Option<f64> = dst
        .client
        .query_one(
            "SELECT extract(epoch FROM pg_catalog.now() - applied_at)::float8 FROM pgferry.applied WHERE source_node_id = $1",
            &[&info.node_id],
        )
        .await
        .map_err(dst.on_err("reading the target's progress"))?
        .get(0);
    // Never applied and no tick: unknown, so as old as can be.
    Ok((pending, since_applied.unwrap_or(f64::INFINITY).max(0.0)))
}

/// Runs a round to a new snapshot, waiting for another applier (a daemon's round in flight)
/// to finish if there is one, and acknowledges it on the source.
async fn drain(lane: &mut Lane, info: &SourceInfo) -> Result<(), SyncError> {
    let deadline = Instant::now() + APPLIER_WAIT;
    let outcome: RoundOutcome = loop {
        let ctx = round::RoundContext::new(
            info,
            lane.applied.as_deref(),
            lane.replica_role,
            (lane.src.server_version, lane.dst.server_version),
        );
        match round_with_retries(&mut lane.src, &lane.probe, &mut lane.dst, &ctx).await {
            Ok(o) => break o,
            Err(SyncError::AnotherApplier { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                lane.applied = lane
                    .dst
                    .client
                    .query_one(
                        "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1",
                        &[&info.node_id],
                    )
                    .await
                    .map_err(lane.dst.on_err("reading the target's progress"))?
                    .get(0);
            }
            Err(e) => return Err(e),
        }
    };
    target::acknowledge(&lane.src, &lane.name, &outcome.snapshot).await?;
    lane.applied = Some(outcome.snapshot.clone());
    lane.report.snapshot = Some(outcome.snapshot.clone());
    lane.report.final_changes = outcome.tables.iter().map(|t| t.changes).sum();
    lane.report.final_rows = outcome.tables.iter().map(|t| t.rows).sum();
    Ok(())
}

/// A daemon's sync lock held on the source.
struct Daemon {
    pid: i32,
    key: i32,
    application: String,
}

impl Daemon {
    fn describe(&self) -> String {
        format!("pid {} ({:?})", self.pid, self.application)
    }
}

/// Daemons holding a sync lock on the source (other than this session).
async fn daemons(ctl: &Session) -> Result<Vec<Daemon>, SyncError> {
    let rows = ctl
        .client
        .query(
            "SELECT l.pid, l.objid::int8, coalesce(a.application_name, '')
               FROM pg_catalog.pg_locks l
               LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                AND l.classid::int8 = $1
                AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
                AND l.pid <> pg_catalog.pg_backend_pid()",
            &[&i64::from(crate::daemon::SYNC_LOCK_CLASS)],
        )
        .await
        .map_err(ctl.on_err("looking for daemons"))?;
    Ok(rows
        .iter()
        .map(|r| Daemon {
            pid: r.get(0),
            key: r.get::<_, i64>(1) as u32 as i32,
            application: r.get(2),
        })
        .collect())
}

/// Ends the sessions of daemons replicating from the source and holds their sync locks, so
/// they stand by for the rest of the cutover (and, once it is done, refuse to replicate).
async fn take_over_daemons(ctl: &Session) -> Result<Vec<String>, SyncError> {
    let mut taken = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = daemons(ctl).await?;
        if found.is_empty() {
            return Ok(taken);
        }
        for d in &found {
            let ended = ctl
                .client
                .query_one("SELECT pg_catalog.pg_terminate_backend($1)", &[&d.pid])
                .await;
            match ended {
                Ok(r) if r.get::<_, bool>(0) => {
                    tracing::info!(pid = d.pid, application = %d.application, "cutover: took a daemon's sync over");
                    taken.push(d.describe());
                }
                _ => {
                    return Err(SyncError::DaemonRunning {
                        source_db: ctl.target.clone(),
                        holder: d.describe(),
                    })
                }
            }
        }
        // The lock frees when the ended session exits; a standby daemon may try for it too.
        loop {
            let mut all = true;
            for d in &found {
                let got: bool = ctl
                    .client
                    .query_one(
                        "SELECT pg_catalog.pg_try_advisory_lock($1, $2)",
                        &[&crate::daemon::SYNC_LOCK_CLASS, &d.key],
                    )
                    .await
                    .map_err(ctl.on_err("taking a sync's lock"))?
                    .get(0);
                all &= got;
            }
            if all || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if Instant::now() > deadline {
            let left = daemons(ctl).await?;
            if let Some(d) = left.first() {
                return Err(SyncError::DaemonRunning {
                    source_db: ctl.target.clone(),
                    holder: d.describe(),
                });
            }
        }
    }
}

/// Unfreezes after a failure: through the cutover's session, or a new one if it is gone.
async fn unfreeze_after_failure(
    source: &Dsn,
    ctl: &mut Session,
    note: &str,
) -> Result<(), SyncError> {
    if freeze::unfreeze(ctl, note, false).await.is_ok() {
        return Ok(());
    }
    let mut fresh = Session::connect(source, "cutover unfreeze").await?;
    freeze::unfreeze(&mut fresh, note, false).await.map(|_| ())
}

/// Removes the target's progress for this source: the whole schema pgferry when the target
/// holds nothing else of pgferry's (no capture of its own), otherwise its progress row.
async fn release_target(lane: &mut Lane, source_node: &str) -> Result<(), SyncError> {
    let label = lane.dst.target.clone();
    let has_schema = catalog::schema_exists(&lane.dst.client, SCHEMA, &label).await?;
    if !has_schema {
        return Ok(());
    }
    let own_capture: bool = lane
        .dst
        .client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.captured_table') IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(&label, "looking for a capture of the target's own"))?
        .get(0);
    let own_capture = own_capture
        && lane
            .dst
            .client
            .query_one("SELECT EXISTS (SELECT 1 FROM pgferry.captured_table)", &[])
            .await
            .map_err(q(&label, "looking for a capture of the target's own"))?
            .get::<_, bool>(0);
    let tx = lane
        .dst
        .begin_locked(Duration::from_secs(10))
        .await
        .map_err(SyncError::Core)?;
    if own_capture {
        tx.execute(
            "DELETE FROM pgferry.applied WHERE source_node_id = $1",
            &[&source_node],
        )
        .await
        .map_err(q(&label, "removing the target's progress"))?;
    } else {
        let removal = pgferry_core::artifact::pgferry_removal(&tx, &label).await?;
        for s in &removal.statements {
            tx.batch_execute(s)
                .await
                .map_err(q(&label, "removing pgferry from the target"))?;
        }
    }
    tx.commit()
        .await
        .map_err(q(&label, "committing the target's release"))?;
    Ok(())
}

fn step(
    report: &mut CutoverReport,
    name: &'static str,
    started: Instant,
    in_outage: bool,
    detail: Option<String>,
) {
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        step = name,
        seconds,
        detail = detail.as_deref().unwrap_or(""),
        "cutover"
    );
    report.steps.push(Step {
        step: name,
        seconds,
        ok: true,
        in_outage,
        detail,
    });
}
