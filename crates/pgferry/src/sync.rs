//! `pgferry sync`.

use pgferry_core::{Dsn, ErrorClass};
use pgferry_sync::SyncError;

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct SyncArgs {
    /// The captured source database (libpq URL or key=value string).
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// A target database. Repeatable. Its schema must exist; it is registered on first use.
    #[arg(long = "target", value_name = "DSN", required = true)]
    pub targets: Vec<String>,
    /// Apply every change committed on the source before the command started, then exit.
    /// (Continuous replication is `pgferry run`.)
    #[arg(long)]
    pub once: bool,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
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
    let source = parse_dsn(&a.source)?;
    let targets: Vec<Dsn> = a
        .targets
        .iter()
        .map(|t| parse_dsn(t))
        .collect::<Result<_, _>>()?;
    let report = pgferry_sync::sync_once(&source, &targets)
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
        if t.sequences_advanced > 0 {
            println!("  {} sequence(s) moved forward", t.sequences_advanced);
        }
        if t.tables.is_empty() {
            println!("  nothing new to apply");
        }
    }
    println!(
        "{} rows in {:.2} s ({:.0} rows/s)",
        report.rows, report.seconds, report.rows_per_second
    );
    Ok(Code::Ok)
}
