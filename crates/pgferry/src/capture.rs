//! `pgferry install` and `pgferry uninstall`.

use pgferry_core::{Dsn, ErrorClass, TablePattern};
use pgferry_install::{DeltaColumn, InstallError, InstallOptions};

use crate::exit::{Code, Failure};
use crate::{output, ChangeArgs};

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// The source database: a libpq URL (postgresql://user@host/db) or key=value string.
    /// The password may come from PGPASSWORD or ~/.pgpass instead.
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// Capture only tables matching PATTERN (`schema.table`, `*` and `?` globs; quote names
    /// as SQL does: `"My.Schema"."t*"`). Repeatable. Default: every table outside the system
    /// schemas.
    #[arg(long = "table", value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// Leave out tables matching PATTERN. Repeatable.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Declare a delta column for two-way syncs: concurrent changes on two nodes merge
    /// (local + remote new - remote old) instead of one overwriting the other; the capture
    /// records its old and new values. SCHEMA.TABLE.COLUMN, or TABLE.COLUMN in schema public;
    /// smallint, integer, bigint or numeric, outside the key. Repeatable. The table is captured
    /// even if --table does not select it; the columns named for a table become its delta
    /// columns (an already captured table gets its capture regenerated).
    #[arg(long = "delta-column", value_name = "SCHEMA.TABLE.COLUMN", value_parser = DeltaColumn::parse)]
    pub delta_columns: Vec<DeltaColumn>,
    #[command(flatten)]
    pub change: ChangeArgs,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The source database (libpq URL or key=value string).
    #[arg(long, value_name = "DSN")]
    pub source: String,
    #[command(flatten)]
    pub change: ChangeArgs,
}

pub fn parse_dsn(text: &str) -> Result<Dsn, Failure> {
    Dsn::parse(text).map_err(|e| Failure::new(e, ErrorClass::Definite))
}

/// `--table` patterns of the commands that read tables (exit 2 on a malformed one).
pub fn table_patterns(list: &[String]) -> Result<Vec<TablePattern>, Failure> {
    list.iter()
        .map(|p| TablePattern::parse(p))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(e.to_string()))
}

fn parse_patterns(list: &[String]) -> Result<Vec<TablePattern>, Failure> {
    list.iter()
        .map(|p| TablePattern::parse(p).map_err(|e| Failure::new(e, ErrorClass::Definite)))
        .collect()
}

fn install_failure(e: InstallError) -> Failure {
    let class = e.class();
    Failure::new(e, class)
}

pub async fn install(a: InstallArgs) -> Result<Code, Failure> {
    let dsn = parse_dsn(&a.source)?;
    let opts = InstallOptions {
        tables: parse_patterns(&a.tables)?,
        exclude: parse_patterns(&a.exclude)?,
        dry_run: a.change.dry_run,
        lock_timeout: a.change.lock_timeout(),
        delta_columns: a.delta_columns,
    };
    let report = pgferry_install::install(&dsn, &opts)
        .await
        .map_err(install_failure)?;
    if a.change.json {
        output::json(&report);
        return Ok(Code::Ok);
    }
    if report.dry_run {
        output::sql_script(
            report
                .statements
                .iter()
                .map(|(w, s)| (w.as_str(), s.as_str())),
        );
        return Ok(Code::Ok);
    }
    let node = report.node_id.as_deref().unwrap_or("-");
    if report.created_schema {
        println!("created schema pgferry on {} (node {node})", dsn.redacted());
    }
    if report.added.is_empty() {
        println!("no new table to capture");
    } else {
        println!("capture added to {} table(s):", report.added.len());
    }
    for t in &report.added {
        let key: Vec<String> = t.key.iter().map(|k| k.human()).collect();
        let mut line = format!("  + {}  key ({})", t.table.human(), key.join(", "));
        if !t.partitions.is_empty() {
            line.push_str(&format!("  partitions: {}", t.partitions.len()));
        }
        if !t.sequences.is_empty() {
            let s: Vec<String> = t.sequences.iter().map(|s| s.human()).collect();
            line.push_str(&format!("  sequences: {}", s.join(", ")));
        }
        if !t.delta_columns.is_empty() {
            line.push_str(&format!("  delta columns: {}", names(&t.delta_columns)));
        }
        println!("{line}");
    }
    for c in &report.delta_columns_changed {
        let was = if c.previous.is_empty() {
            "none".to_owned()
        } else {
            names(&c.previous)
        };
        println!(
            "  ~ {}  delta columns: {} (were: {was}); capture regenerated",
            c.table.human(),
            names(&c.delta_columns)
        );
    }
    let unchanged = report.already_captured.len() - report.delta_columns_changed.len();
    if unchanged > 0 {
        println!("already captured: {unchanged} table(s), unchanged");
    }
    for p in &report.new_partitions {
        println!("  + TRUNCATE capture on new partition {}", p.human());
    }
    for r in &report.repaired {
        println!("  ! repaired missing trigger {r}");
    }
    for g in &report.guarded {
        println!(
            "  ~ {}  capture regenerated with the guard that skips pgferry's own apply",
            g.human()
        );
    }
    for m in &report.missing_tables {
        println!("  ? {} is registered but no longer exists", m.human());
    }
    Ok(Code::Ok)
}

fn names(list: &[pgferry_core::Ident]) -> String {
    list.iter()
        .map(|c| c.human())
        .collect::<Vec<_>>()
        .join(", ")
}

pub async fn uninstall(a: UninstallArgs) -> Result<Code, Failure> {
    let dsn = parse_dsn(&a.source)?;
    let report = pgferry_install::uninstall(&dsn, a.change.dry_run, a.change.lock_timeout())
        .await
        .map_err(install_failure)?;
    if a.change.json {
        output::json(&report);
        return Ok(Code::Ok);
    }
    if report.dry_run {
        output::sql_script(report.statements.iter().map(|s| ("remove", s.as_str())));
        return Ok(Code::Ok);
    }
    if !report.found && report.triggers.is_empty() {
        println!(
            "pgferry is not installed on {}: nothing to remove",
            dsn.redacted()
        );
        return Ok(Code::Ok);
    }
    println!(
        "removed pgferry from {}: {} trigger(s), schema pgferry ({} objects)",
        dsn.redacted(),
        report.triggers.len(),
        report.schema_objects
    );
    Ok(Code::Ok)
}
