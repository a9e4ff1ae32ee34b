//! `pgferry clean`.

use std::time::Duration;

use pgferry_cleanup::{CleanError, CleanOptions};
use pgferry_core::artifact::Removal;

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::{output, ChangeArgs};

#[derive(Debug, clap::Args)]
pub struct CleanArgs {
    /// The restored copy to clean (libpq URL or key=value string).
    #[arg(long, value_name = "DSN")]
    pub db: String,
    /// Also remove Bucardo's artifacts (schema bucardo and its triggers on user tables).
    #[arg(long)]
    pub bucardo: bool,
    /// Clean even if the database looks like a live source (a pgferry session connected,
    /// recent progress, capture rows being written).
    #[arg(long)]
    pub force: bool,
    /// How long to watch for capture rows being written, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub watch: f64,
    #[command(flatten)]
    pub change: ChangeArgs,
}

fn describe(tool: &str, r: &Removal) {
    for t in &r.triggers {
        println!(
            "  - trigger {} on {} (calls {})",
            t.trigger, t.table, t.function
        );
    }
    if r.schema_found {
        println!(
            "  - schema {tool} ({} tables, sequences and functions)",
            r.schema_objects
        );
    }
}

pub async fn clean(a: CleanArgs) -> Result<Code, Failure> {
    let dsn = parse_dsn(&a.db)?;
    let opts = CleanOptions {
        bucardo: a.bucardo,
        dry_run: a.change.dry_run,
        force: a.force,
        lock_timeout: a.change.lock_timeout(),
        watch: Duration::from_secs_f64(a.watch.max(0.0)),
        ..CleanOptions::default()
    };
    let report = pgferry_cleanup::clean(&dsn, &opts)
        .await
        .map_err(|e: CleanError| {
            let class = e.class();
            Failure::new(e, class)
        })?;
    if a.change.json {
        output::json(&report);
        return Ok(Code::Ok);
    }
    for s in &report.live_signs {
        eprintln!("warning: --force given although {s}");
    }
    if !report.removed_anything() {
        println!(
            "nothing to clean on {}: no pgferry{} artifacts",
            dsn.redacted(),
            if a.bucardo { " or Bucardo" } else { "" }
        );
        return Ok(Code::Ok);
    }
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    println!("{verb} from {}:", dsn.redacted());
    describe("pgferry", &report.pgferry);
    if let Some(b) = &report.bucardo {
        describe("bucardo", b);
    }
    if let Some(node) = &report.pgferry_node_id {
        println!("  - the source's node identity {node}");
    }
    if report.dry_run {
        let stmts = report
            .pgferry
            .statements
            .iter()
            .chain(report.bucardo.iter().flat_map(|b| b.statements.iter()));
        output::sql_script(stmts.map(|s| ("remove", s.as_str())));
    }
    Ok(Code::Ok)
}
