//! `pgferry schema`.

use std::path::PathBuf;

use pgferry_ddl::{DdlError, Role, SchemaOptions, SchemaReport};

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::{output, ChangeArgs};

#[derive(Debug, clap::Args)]
pub struct SchemaArgs {
    /// The captured source, whose schema is read with pg_dump.
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// The target to create the tables on (it must not have them yet).
    #[arg(long, value_name = "DSN")]
    pub target: String,
    /// Create only the captured tables matching PATTERN (`schema.table`, `*` and `?`
    /// allowed). Repeatable; default all captured tables.
    #[arg(long = "table", value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// The pg_dump to use (its pg_restore must be beside it); it must be at least as new as the
    /// source's server. Default: the newest installed one not newer than the target, found in
    /// /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and PATH.
    #[arg(long, value_name = "PATH", env = "PGFERRY_PG_DUMP")]
    pub pg_dump: Option<PathBuf>,
    /// Keep the source's owners and grants. By default the target's connecting role owns
    /// everything created and no grant is copied; with this flag every role they name must
    /// exist on the target (`pg_dumpall --roles-only` of the source, run on the target).
    #[arg(long)]
    pub privileges: bool,
    #[command(flatten)]
    pub change: ChangeArgs,
}

pub async fn schema(a: SchemaArgs) -> Result<Code, Failure> {
    let source = parse_dsn(&a.source)?;
    let target = parse_dsn(&a.target)?;
    let tables = crate::capture::table_patterns(&a.tables)?;
    let opts = SchemaOptions {
        tables,
        dry_run: a.change.dry_run,
        pg_dump: a.pg_dump,
        privileges: a.privileges,
        lock_timeout: a.change.lock_timeout(),
    };
    let report = pgferry_ddl::create_schema(&source, &target, &opts)
        .await
        .map_err(|e: DdlError| {
            let refused = e.is_refusal();
            let class = e.class();
            let mut f = Failure::new(e, class);
            f.refused = refused;
            f
        })?;
    if a.change.json {
        output::json(&report);
    } else if let Some(sql) = &report.sql {
        // A dry run prints a script psql can run: the summary as comments, then the SQL.
        for line in summary(&report).lines() {
            println!("-- {line}");
        }
        println!("BEGIN;");
        print!("{sql}");
        println!("-- dry run: nothing was changed");
        println!("ROLLBACK;");
    } else {
        print!("{}", summary(&report));
    }
    Ok(Code::Ok)
}

fn summary(r: &SchemaReport) -> String {
    let captured = r.tables.iter().filter(|t| t.role == Role::Captured).count();
    let mut out = format!(
        "{} on {} the schema of {captured} captured table(s) of {} (pg_dump {} at {}, one transaction):\n",
        if r.dry_run { "would create" } else { "created" },
        r.target,
        r.source,
        r.pg_dump.version,
        r.pg_dump.pg_dump.display(),
    );
    for t in &r.tables {
        let role = match t.role {
            Role::Captured => "",
            Role::Partition => "  (partition)",
            Role::Parent => "  (parent of a captured table)",
        };
        out.push_str(&format!("  + table {}{role}\n", t.table.human()));
    }
    for s in &r.sequences {
        out.push_str(&format!("  + sequence {s}\n"));
    }
    for o in &r.objects {
        out.push_str(&format!("  + {o}\n"));
    }
    for o in &r.reused {
        out.push_str(&format!("  = {o} (already on the target, used as it is)\n"));
    }
    for l in &r.left_out {
        out.push_str(&format!("  - {}: left out, {}\n", l.object, l.reason));
    }
    for m in &r.missing_on_source {
        out.push_str(&format!(
            "  ! {m}: captured, but no longer exists on the source\n"
        ));
    }
    out.push_str(&format!("in {:.2} s\n", r.seconds));
    out
}
