//! `pgferry cutover` and `pgferry unfreeze`.

use std::time::Duration;

use pgferry_core::Session;
use pgferry_sync::cutover::{CutoverOptions, CutoverReport};

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct CutoverArgs {
    /// The captured source (the old system): frozen for good when the cutover succeeds.
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// A target to drain and hand over to (repeatable).
    #[arg(long = "target", value_name = "DSN", required = true)]
    pub targets: Vec<String>,
    /// Give up the freeze after this many seconds waiting for the captured tables' locks
    /// (transactions that already wrote to them must end first); the wait counts in the outage.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub lock_timeout: f64,
    /// Refuse to start when a target is further behind than this (its final round would
    /// lengthen the outage).
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub max_lag: f64,
    /// Inside the freeze, compare only the keys the final round touched, not every table's
    /// row count (a scan of every table on both sides). Run `pgferry verify` afterwards.
    #[arg(long)]
    pub no_counts: bool,
    /// Check everything (capture, targets, lag, daemons), freeze nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Open a way back: before the applications are released, install capture on the (single)
    /// target and register the source as its target, so the target's writes can be replicated
    /// back (`pgferry run --source TARGET --target SOURCE`) while the source stays frozen for
    /// applications; `pgferry cutover` in the other direction then returns without losing a
    /// write. Needs the replica role on the source.
    #[arg(long)]
    pub reverse: bool,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 cut over; 1 refused or failed and rolled back (the source is writable, nothing
/// lost); 6 failed and the source could not be unfrozen; 2–5 as every command, before any
/// change.
pub async fn cutover(a: CutoverArgs) -> Result<Code, Failure> {
    let source = parse_dsn(&a.source)?;
    let targets = a
        .targets
        .iter()
        .map(|t| parse_dsn(t))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = CutoverOptions {
        lock_timeout: seconds("--lock-timeout", a.lock_timeout)?,
        max_lag: seconds("--max-lag", a.max_lag)?,
        counts: !a.no_counts,
        dry_run: a.dry_run,
        reverse: a.reverse,
    };
    let report = pgferry_sync::cutover::cutover(&source, &targets, &opts)
        .await
        .map_err(|e| {
            let class = e.class();
            let mut f = Failure::new(e, class);
            // Whatever stopped it before the freeze, nothing changed.
            f.refused |= class == pgferry_core::ErrorClass::Transient;
            f
        })?;
    if a.json {
        output::json(&report);
    } else {
        print(&report);
    }
    Ok(match (report.ok, report.source_state) {
        (true, _) => Code::Ok,
        (false, "writable") => Code::Refused,
        (false, _) => Code::Frozen,
    })
}

fn seconds(flag: &str, v: f64) -> Result<Duration, Failure> {
    if v.is_finite() && v > 0.0 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(Failure::usage(format!(
            "{flag} must be a positive number of seconds"
        )))
    }
}

fn print(r: &CutoverReport) {
    let what = if r.dry_run {
        "cutover dry run"
    } else {
        "cutover"
    };
    println!("{what} of {}", r.source);
    for s in &r.steps {
        println!(
            "  {} {:<12} {:>8.3} s{}{}",
            if s.ok { "ok    " } else { "FAILED" },
            s.step,
            s.seconds,
            if s.in_outage { "  (outage)" } else { "" },
            s.detail
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default()
        );
    }
    for t in &r.targets {
        println!(
            "  target {} ({}): lag {:.1} s, {} pending at start; final round {} changes, {} rows; {} sequences set",
            t.target, t.name, t.lag_seconds, t.pending, t.final_changes, t.final_rows, t.sequences_advanced
        );
        for v in t.checked.iter().filter(|v| !v.equal) {
            println!("    DIFFERENT {}", v.table);
            for d in &v.differences {
                println!("      {}: key {}", d.kind, d.key);
            }
        }
    }
    for d in &r.daemons_taken_over {
        println!("  took over daemon {d}");
    }
    if !r.left_behind.is_empty() {
        println!(
            "  registered targets not in this cutover (left where they are): {}",
            r.left_behind.join(", ")
        );
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    if r.dry_run {
        println!("ready: a cutover would freeze the source's captured tables now");
        return;
    }
    match (r.ok, r.outage_seconds) {
        (true, Some(o)) => {
            println!(
                "cut over: write outage {o:.3} s; the source is frozen (read-only) for good; start the application on the target(s), then run `pgferry verify`"
            );
            for t in &r.returned {
                println!("the way back: {t} is writable again and takes the application's writes (its capture goes on)");
            }
            if let Some(b) = &r.reverse {
                println!(
                    "the way back is open: {} captures every write and {} (frozen for applications) is registered as its target; replicate them back now, and keep it running:\n  {}\nto return to the old database later without losing a write:\n  {}",
                    b.captured_on, b.follower, b.replicate, b.way_back
                );
            }
        }
        _ if r.failed_step == Some("return") => println!(
            "the cutover is done (the source is frozen for good), but the database it returns to is STILL FROZEN ({}): run `pgferry unfreeze --source …` on it",
            r.error.as_deref().unwrap_or("?")
        ),
        _ => {
            println!(
                "FAILED at {}: {}",
                r.failed_step.unwrap_or("?"),
                r.error.as_deref().unwrap_or("?")
            );
            match r.source_state {
                "writable" => println!(
                    "the source is writable again (outage {:.3} s); nothing was lost: capture goes on",
                    r.outage_seconds.unwrap_or(0.0)
                ),
                _ => println!(
                    "the source is STILL FROZEN: run `pgferry unfreeze --source …` to make it writable"
                ),
            }
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct UnfreezeArgs {
    /// The source a cutover froze.
    #[arg(long, value_name = "DSN")]
    pub source: String,
    #[command(flatten)]
    pub change: crate::ChangeArgs,
}

/// Makes a frozen source writable again (after an interrupted cutover, or to roll a finished
/// one back): drops the freeze triggers and marks its cutovers `unfrozen`, in one transaction
/// (a database that followed the new one back also forgets its capture's old targets and rows).
pub async fn unfreeze(a: UnfreezeArgs) -> Result<Code, Failure> {
    let source = parse_dsn(&a.source)?;
    let mut s = Session::connect(&source, "unfreeze").await.map_err(|e| {
        let class = e.class();
        Failure::new(e, class)
    })?;
    let (done, statements) =
        pgferry_sync::freeze::unfreeze(&mut s, "pgferry unfreeze", a.change.dry_run)
            .await
            .map_err(|e| {
                let class = e.class();
                Failure::new(e, class)
            })?;
    if a.change.json {
        output::json(&serde_json::json!({
            "source": s.target,
            "dry_run": a.change.dry_run,
            "triggers": done.triggers,
            "cutovers": done.cutovers,
            "forgotten_targets": done.forgotten_targets,
            "capture_rows_dropped": done.capture_rows_dropped,
            "statements": statements,
        }));
    } else if a.change.dry_run {
        for st in &statements {
            println!("{st};");
        }
    } else if done.triggers == 0 {
        println!("{}: not frozen; nothing to do", s.target);
    } else {
        println!(
            "{}: writable again ({} freeze triggers dropped)",
            s.target, done.triggers
        );
        if !done.forgotten_targets.is_empty() || done.capture_rows_dropped > 0 {
            println!(
                "  it had followed the new database back: its capture forgot its old targets ({}) and {} capture rows; stop any `pgferry run` replicating into it",
                done.forgotten_targets.join(", "),
                done.capture_rows_dropped
            );
        }
    }
    Ok(Code::Ok)
}
