//! `pgferry verify`.

use pgferry_sync::verify::{VerifyOptions, VerifyReport};

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The captured source.
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// The target to compare with it.
    #[arg(long, value_name = "DSN")]
    pub target: String,
    /// Compare only the captured tables matching PATTERN (`schema.table`, `*` and `?`
    /// allowed). Repeatable; default all.
    #[arg(long = "table", value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// Tables compared at once (each job holds one session per side).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub jobs: usize,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Exit 0 when every table is equal, 1 when one differs; errors exit 2 or more (never 1, so a
/// script can tell "different" from "could not compare").
pub async fn verify(a: VerifyArgs) -> Result<Code, Failure> {
    let source = parse_dsn(&a.source).map_err(never_one)?;
    let target = parse_dsn(&a.target).map_err(never_one)?;
    let tables = crate::capture::table_patterns(&a.tables)?;
    let report = pgferry_sync::verify::verify(
        &source,
        &target,
        &VerifyOptions {
            tables,
            jobs: a.jobs,
        },
    )
    .await
    .map_err(|e| {
        let class = e.class();
        never_one(Failure::new(e, class))
    })?;
    if a.json {
        output::json(&report);
    } else {
        print(&report);
    }
    Ok(if report.equal {
        Code::Ok
    } else {
        Code::Refused
    })
}

/// A refusal means "different" to verify's callers: other failures keep their own codes.
fn never_one(mut f: Failure) -> Failure {
    f.refused = false;
    f
}

fn print(r: &VerifyReport) {
    println!(
        "{} against {} (target at source snapshot {})",
        r.target,
        r.source,
        r.applied_snapshot.as_deref().unwrap_or("none")
    );
    for t in &r.tables {
        let skipped = if t.skipped_truncate {
            " (skipped: a TRUNCATE is pending)".to_owned()
        } else if t.skipped_pending > 0 {
            format!(", {} keys with pending changes left out", t.skipped_pending)
        } else {
            String::new()
        };
        println!(
            "  {}  {}  {} rows on the source, {} on the target{skipped}  ({:.2} s)",
            if t.equal { "equal    " } else { "DIFFERENT" },
            t.table,
            t.source_rows,
            t.target_rows,
            t.seconds
        );
        for d in &t.differences {
            println!("      {}: key {}", d.kind, d.key);
        }
        if t.more_differences > 0 {
            println!("      … and {} more", t.more_differences);
        }
        for d in &t.unsettled {
            println!(
                "      {}: key {} (left unsettled by a skip conflict rule: see `pgferry conflicts`)",
                d.kind, d.key
            );
        }
    }
    println!(
        "{} in {:.2} s",
        if r.equal { "equal" } else { "DIFFERENT" },
        r.seconds
    );
}
