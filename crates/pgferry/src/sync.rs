//! `pgferry sync`.

use pgferry_core::{Dsn, ErrorClass};
use pgferry_sync::SyncError;

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The captured source database (libpq URL or key=value string).
    #[arg(long, value_name = "DSN", required_unless_present = "nodes")]
    pub source: Option<String>,
    /// A target database. Repeatable. Its schema must exist; it is registered on first use.
    #[arg(long = "target", value_name = "DSN", required_unless_present = "nodes")]
    pub targets: Vec<String>,
    #[command(flatten)]
    pub two_way: crate::two_way::TwoWayArgs,
    /// Apply every change committed on the source before the command started, then exit.
    /// (Continuous replication is `pgferry run`.)
    #[arg(long)]
    pub once: bool,
    /// Accept tables that were added to the capture after a target registered, once their
    /// current rows have been loaded into the target by other means.
    #[arg(long)]
    pub accept_new_tables: bool,
    /// Commit a round holding more than ROWS changes table by table (each table at the same
    /// source snapshot, with its own progress). Off by default, and never used when foreign
    /// keys are checked on the target: until the round ends, the target's tables are not at one
    /// common snapshot.
    #[arg(long, value_name = "ROWS")]
    pub split_rounds_above: Option<u64>,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum TargetCommand {
    /// Reserve a target on the source before its copy is taken, so that nothing it will need
    /// is purged (do this before the dump or snapshot).
    Add {
        /// The captured source.
        #[arg(long, value_name = "DSN")]
        source: String,
        /// The future target; only its name is used (`dbname@host:port`, or --name).
        #[arg(long, value_name = "DSN", required_unless_present = "name")]
        target: Option<String>,
        /// The registry name, instead of the one derived from --target.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a target from the source's registry, releasing the capture rows it holds back.
    Drop {
        #[arg(long, value_name = "DSN")]
        source: String,
        /// The target's registry name or node id (see `pgferry status`).
        name: String,
    },
}

pub async fn target(cmd: TargetCommand) -> Result<Code, Failure> {
    let fail = |e: SyncError| {
        let class = e.class();
        Failure::new(e, class)
    };
    match cmd {
        TargetCommand::Add {
            source,
            target,
            name,
        } => {
            let source = parse_dsn(&source)?;
            let name = match (name, target) {
                (Some(n), _) => n,
                (None, Some(t)) => pgferry_sync::default_name(&parse_dsn(&t)?),
                (None, None) => unreachable!("clap requires one"),
            };
            let added = pgferry_sync::reserve(&source, &name).await.map_err(fail)?;
            if added {
                println!(
                    "reserved target {name:?} on {}: capture rows are kept for it from now on",
                    source.redacted()
                );
            } else {
                println!(
                    "target {name:?} was already registered on {}",
                    source.redacted()
                );
            }
            Ok(Code::Ok)
        }
        TargetCommand::Drop { source, name } => {
            let source = parse_dsn(&source)?;
            if pgferry_sync::drop_target(&source, &name)
                .await
                .map_err(fail)?
            {
                println!("dropped target {name:?} from {}", source.redacted());
                Ok(Code::Ok)
            } else {
                Err(Failure::new(
                    anyhow::anyhow!("no target {name:?} on {}", source.redacted()),
                    ErrorClass::Definite,
                ))
            }
        }
    }
}

pub async fn sync(a: SyncArgs) -> Result<Code, Failure> {
    if !a.once {
        return Err(Failure::new(
            anyhow::anyhow!(
                "pgferry sync needs --once (continuous replication is the daemon, `pgferry run`)"
            ),
            ErrorClass::Definite,
        ));
    }
    if !a.two_way.nodes.is_empty() {
        return crate::two_way::sync(&a).await;
    }
    let source = parse_dsn(a.source.as_deref().unwrap_or_default())?;
    let targets: Vec<Dsn> = a
        .targets
        .iter()
        .map(|t| parse_dsn(t))
        .collect::<Result<_, _>>()?;
    let opts = pgferry_sync::SyncOptions {
        accept_new_tables: a.accept_new_tables,
        split_rounds_above: a.split_rounds_above,
        ..Default::default()
    };
    let report = pgferry_sync::sync_once(&source, &targets, &opts)
        .await
        .map_err(|e: SyncError| {
            let class = e.class();
            Failure::new(e, class)
        })?;
    if a.json {
        output::json(&report);
        return Ok(Code::Ok);
    }
    for t in &report.targets {
        println!(
            "{} is at source snapshot {} ({} round, {} rows in {:.2} s)",
            t.target, t.snapshot, t.rounds, t.rows, t.seconds
        );
        for table in &t.tables {
            println!(
                "  {}  {} changes, {} keys, {} rows copied{}",
                table.table,
                table.changes,
                table.keys,
                table.rows,
                if table.truncated {
                    ", TRUNCATE replayed"
                } else {
                    ""
                }
            );
        }
        if t.split {
            println!("  round committed table by table (--split-rounds-above)");
        }
        if t.sequences_advanced > 0 {
            println!("  {} sequence(s) moved forward", t.sequences_advanced);
        }
        if t.tables.is_empty() {
            println!("  nothing new to apply");
        }
    }
    println!(
        "{} rows in {:.2} s ({:.0} rows/s); {} applied capture rows purged on the source",
        report.rows, report.seconds, report.rows_per_second, report.purged
    );
    Ok(Code::Ok)
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The captured source: shows every registered target, its pending changes per table and
    /// the age of the oldest one.
    #[arg(long, value_name = "DSN", required_unless_present = "target")]
    pub source: Option<String>,
    /// A target: shows its own progress (what it applied from each source).
    #[arg(long, value_name = "DSN")]
    pub target: Option<String>,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

fn ago(s: Option<f64>) -> String {
    s.map(|s| format!("{s:.1} s ago"))
        .unwrap_or_else(|| "never".into())
}

pub async fn status(a: StatusArgs) -> Result<Code, Failure> {
    let fail = |e: SyncError| {
        let class = e.class();
        Failure::new(e, class)
    };
    if let Some(t) = &a.target {
        let rows = pgferry_sync::status::target_status(&parse_dsn(t)?)
            .await
            .map_err(fail)?;
        if a.json {
            output::json(&rows);
        } else if rows.is_empty() {
            println!("not a pgferry target yet (nothing applied)");
        } else {
            for r in &rows {
                println!(
                    "from {} (node {}): snapshot {}, {} rounds, last applied {}",
                    r.source,
                    r.source_node_id,
                    r.snapshot.as_deref().unwrap_or("-"),
                    r.rounds,
                    ago(r.applied_seconds_ago)
                );
            }
        }
        return Ok(Code::Ok);
    }
    let source = parse_dsn(a.source.as_deref().unwrap_or_default())?;
    let st = pgferry_sync::status::source_status(&source)
        .await
        .map_err(fail)?;
    if a.json {
        output::json(&st);
        return Ok(Code::Ok);
    }
    println!(
        "{} (node {}): {} captured tables, {} capture rows kept",
        st.source, st.node_id, st.captured_tables, st.capture_rows
    );
    if let Some(c) = &st.cutover {
        match c.state.as_str() {
            "done" => println!(
                "  CUT OVER at {} to {}: frozen for good, no longer replicates (`pgferry unfreeze` to undo)",
                c.finished_at.as_deref().unwrap_or(&c.frozen_at),
                c.targets.join(", ")
            ),
            "frozen" => println!(
                "  FROZEN since {} by a cutover that is running or was interrupted: writes to captured tables are refused (`pgferry cutover` again, or `pgferry unfreeze`)",
                c.frozen_at
            ),
            _ => {}
        }
    }
    if st.targets.is_empty() {
        println!("  no target registered (nothing is purged until one is)");
    }
    for t in &st.targets {
        let state = if t.reserved_only {
            "reserved, never synced (holds back purge)".to_owned()
        } else {
            format!("acknowledged {}", ago(t.acked_seconds_ago))
        };
        let oldest = t
            .oldest_pending_seconds
            .map(|s| format!(", oldest pending {s:.1} s old"))
            .unwrap_or_default();
        println!(
            "  target {}: {state}; {} pending{oldest}",
            t.name, t.pending
        );
        for p in &t.tables {
            println!("    {}  {} pending", p.table, p.pending);
        }
    }
    Ok(Code::Ok)
}
