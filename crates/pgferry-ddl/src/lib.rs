//! Creating on a target the schema of a source's captured tables: what `pgferry schema` does,
//! so that a target can be filled by `pgferry copy` or a data-only restore and then caught up.
//!
//! **How.** pg_dump writes the source's whole schema (`--schema-only`, custom format, UTF8);
//! pgferry chooses the archive entries the captured tables need ([`selection`] reads which from
//! the source's catalog, [`toc`] matches them to the archive's table of contents); pg_restore
//! turns exactly those into SQL; and that script runs on the target **in one transaction**, so a
//! failure leaves the target as it was. pg_dump, not pgferry, writes every `CREATE`: it knows
//! every server version's syntax, and its output is what a DBA would have restored.
//!
//! **What.** The captured tables (with the partitions of partitioned ones and the parents of
//! partitions), their sequences, indexes, constraints, defaults, triggers, policies and
//! statistics, and the schemas, types, domains, enums, collations, functions and extensions
//! those depend on. Not pgferry's schema and triggers, nor Bucardo's, nor tables that are not
//! captured; a foreign key (or a policy) that needs a table that is not created is left out
//! and reported. Schemas, types, functions, collations and extensions that already exist on the
//! target are used as they are; a table or sequence that already exists is refused, before
//! anything is changed.
//!
//! **Owners and grants.** By default everything is created owned by the target's connecting
//! role and without the source's grants (`--no-owner --no-privileges`): the source's roles need
//! not exist on the target. [`SchemaOptions::privileges`] keeps both (the roles must exist).

mod error;
mod selection;
mod toc;
mod tool;

pub use error::DdlError;
pub use selection::{LeftOut, PlannedTable, Role};
pub use tool::Tools;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgferry_core::artifact::SCHEMA;
use pgferry_core::{catalog, Dsn, QualifiedName, Session, TablePattern};
use serde::Serialize;

/// What to create.
#[derive(Clone, Debug, Default)]
pub struct SchemaOptions {
    /// Captured tables to create; empty means all.
    pub tables: Vec<TablePattern>,
    /// Work out and return the SQL, change nothing.
    pub dry_run: bool,
    /// The pg_dump to use (pg_restore is taken from its directory); None: the best installed.
    pub pg_dump: Option<PathBuf>,
    /// Keep the source's owners and grants (`ALTER … OWNER`, `GRANT`): the roles must exist.
    pub privileges: bool,
    /// How long pg_dump waits for a lock on a source table (`--lock-wait-timeout`).
    pub lock_timeout: Duration,
}

/// What was (or, in a dry run, would be) created.
#[derive(Clone, Debug, Serialize)]
pub struct SchemaReport {
    pub source: String,
    pub target: String,
    pub dry_run: bool,
    /// The pg_dump used, and its version.
    pub pg_dump: Tools,
    pub tables: Vec<PlannedTable>,
    pub sequences: Vec<String>,
    /// Other objects created: schemas, types, functions, extensions…
    pub objects: Vec<String>,
    /// Objects the tables need that the target already had: used as they are.
    pub reused: Vec<String>,
    /// Objects attached to the tables that are not created, and why.
    pub left_out: Vec<LeftOut>,
    /// Captured tables of the source's registry that no longer exist on the source.
    pub missing_on_source: Vec<String>,
    /// The SQL run (dry run: that would run) on the target, in one transaction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sql: Option<String>,
    pub seconds: f64,
}

/// Creates on `target` the schema of the captured tables of `source` (those matching
/// `opts.tables`), in one transaction. Refuses, changing nothing, when any of those tables or
/// their sequences already exists on the target.
pub async fn create_schema(
    source: &Dsn,
    target: &Dsn,
    opts: &SchemaOptions,
) -> Result<SchemaReport, DdlError> {
    let started = Instant::now();
    let mut src = Session::connect(source, "schema").await?;
    let (tables, sequences) = captured(&src, &opts.tables).await?;
    let mut dst = Session::connect(target, "schema").await?;
    let tools = tool::find(opts.pg_dump.as_deref(), src.major(), dst.major())?;
    tracing::debug!(pg_dump = %tools.pg_dump.display(), version = %tools.version, "pg_dump chosen");
    let plan = selection::plan(&mut src, &tables, &sequences).await?;
    let missing_on_source: Vec<String> = plan.missing.iter().map(|t| t.human()).collect();
    if plan.tables.is_empty() {
        return Err(DdlError::NothingToCreate {
            source_db: src.target.clone(),
            missing: missing_on_source,
        });
    }
    let relations: Vec<&QualifiedName> = plan
        .tables
        .iter()
        .map(|t| &t.table)
        .chain(&plan.sequences)
        .collect();
    refuse_existing(&dst.client, &dst.target, &relations).await?;
    let reused = selection::existing_on_target(&mut dst, &plan.needed).await?;

    let dir = tempfile::Builder::new()
        .prefix("pgferry-schema-")
        .tempdir()
        .map_err(|source| DdlError::Io {
            context: "creating a temporary directory for pg_dump's archive".to_owned(),
            source,
        })?;
    let archive = dir.path().join("schema.dump");
    dump(source, &tools, &archive, dir.path(), opts.lock_timeout).await?;
    let restore = Restore {
        tools: &tools,
        archive: &archive,
        privileges: opts.privileges,
    };
    let entries = toc::parse_list(&restore.run(&["--list"]).await?)?;
    let deps = toc::parse_dependencies(&restore.run(&["--verbose"]).await?, &entries)?;
    let ids = toc::choose(
        &entries,
        &deps,
        |class, oid| plan.keep.contains(&(class, oid)) && !reused.contains(&(class, oid)),
        |sequence| !plan.owned_elsewhere.contains(&sequence),
    );
    let list = dir.path().join("restore.list");
    std::fs::write(&list, toc::list_file(&ids)).map_err(|source| DdlError::Io {
        context: format!("writing {}", list.display()),
        source,
    })?;
    let script = toc::strip_restrict(
        &restore
            .run(&[&format!("--use-list={}", list.display())])
            .await?,
    )?;

    // The objects that have an entry in the archive (array types, an extension's own types
    // have none: they come with their base type or extension).
    let chosen: HashSet<u32> = ids.iter().copied().collect();
    let in_archive: HashSet<(u32, u32)> = entries
        .iter()
        .filter(|e| e.class != 0)
        .map(|e| (e.class, e.oid))
        .collect();
    let archived = |class, oid| in_archive.contains(&(class, oid));
    let chosen_addresses: HashSet<(u32, u32)> = entries
        .iter()
        .filter(|e| chosen.contains(&e.id))
        .map(|e| (e.class, e.oid))
        .collect();
    let mut report = SchemaReport {
        source: src.target.clone(),
        target: dst.target.clone(),
        dry_run: opts.dry_run,
        pg_dump: tools.clone(),
        tables: plan.tables.clone(),
        sequences: plan.sequences.iter().map(|s| s.human()).collect(),
        objects: plan
            .needed
            .iter()
            .filter(|n| chosen_addresses.contains(&(n.class, n.oid)))
            .map(|n| n.describe.clone())
            .collect(),
        reused: plan
            .needed
            .iter()
            .filter(|n| reused.contains(&(n.class, n.oid)) && archived(n.class, n.oid))
            .map(|n| n.describe.clone())
            .collect(),
        left_out: plan.left_out.clone(),
        missing_on_source,
        sql: None,
        seconds: 0.0,
    };
    if opts.dry_run {
        report.sql = Some(script);
    } else {
        let label = dst.target.clone();
        let create = |source| DdlError::Create {
            target: label.clone(),
            source,
        };
        let tx = dst.client.transaction().await.map_err(create)?;
        // Checked again where it counts: inside the transaction that creates them.
        refuse_existing(&tx, &label, &relations).await?;
        tx.batch_execute(&script).await.map_err(create)?;
        tx.commit().await.map_err(create)?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The captured tables matching `patterns` (all when empty), and the sequences registered for
/// them. Every pattern must match a captured table.
async fn captured(
    src: &Session,
    patterns: &[TablePattern],
) -> Result<(Vec<QualifiedName>, Vec<QualifiedName>), DdlError> {
    if !catalog::schema_exists(&src.client, SCHEMA, &src.target).await? {
        return Err(DdlError::NotInstalled {
            source_db: src.target.clone(),
        });
    }
    let rows = src
        .client
        .query(
            "SELECT table_id, schema_name, table_name FROM pgferry.captured_table ORDER BY 2, 3",
            &[],
        )
        .await
        .map_err(src.on_err("reading pgferry.captured_table"))?;
    let all: Vec<(i32, QualifiedName)> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            )
        })
        .collect();
    let matches =
        |p: &TablePattern, t: &QualifiedName| p.matches(t.schema.as_str(), t.name.as_str());
    if let Some(p) = patterns
        .iter()
        .find(|p| !all.iter().any(|(_, t)| matches(p, t)))
    {
        return Err(DdlError::PatternMatchesNothing {
            pattern: p.to_string(),
            source_db: src.target.clone(),
        });
    }
    let (ids, tables): (Vec<i32>, Vec<QualifiedName>) = all
        .into_iter()
        .filter(|(_, t)| patterns.is_empty() || patterns.iter().any(|p| matches(p, t)))
        .unzip();
    let sequences = src
        .client
        .query(
            "SELECT schema_name, sequence_name FROM pgferry.captured_sequence
              WHERE table_id = ANY ($1) ORDER BY 1, 2",
            &[&ids],
        )
        .await
        .map_err(src.on_err("reading pgferry.captured_sequence"))?
        .iter()
        .map(|r| QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok((tables, sequences))
}

/// Refuses when any of `relations` exists on the target.
async fn refuse_existing(
    dst: &impl tokio_postgres::GenericClient,
    label: &str,
    relations: &[&QualifiedName],
) -> Result<(), DdlError> {
    let existing = selection::relations_on_target(dst, label, relations).await?;
    if existing.is_empty() {
        Ok(())
    } else {
        Err(DdlError::AlreadyExists {
            target: label.to_owned(),
            existing,
        })
    }
}

/// `pg_dump --schema-only` of the source into `archive` (custom format, UTF8), connected through
/// the environment and a passfile in `dir`. pgferry's and Bucardo's schemas are left out.
async fn dump(
    source: &Dsn,
    tools: &Tools,
    archive: &Path,
    dir: &Path,
    lock_timeout: Duration,
) -> Result<(), DdlError> {
    let env = source.client_env("pgferry schema")?;
    let passfile = tool::passfile(dir, &env)?;
    let args = vec![
        "--schema-only".to_owned(),
        "--format=custom".to_owned(),
        "--encoding=UTF8".to_owned(),
        "--no-sync".to_owned(),
        format!("--lock-wait-timeout={}", lock_timeout.as_millis().max(1)),
        format!("--exclude-schema={SCHEMA}"),
        format!(
            "--exclude-schema={}",
            pgferry_core::artifact::BUCARDO_SCHEMA
        ),
        format!("--file={}", archive.display()),
    ];
    tool::run(&tools.pg_dump, args, Some((&env, passfile.as_deref()))).await?;
    Ok(())
}

/// pg_restore runs over the archive, each printing SQL (or the list) on its standard output.
struct Restore<'a> {
    tools: &'a Tools,
    archive: &'a Path,
    privileges: bool,
}

impl Restore<'_> {
    async fn run(&self, extra: &[&str]) -> Result<String, DdlError> {
        let mut args: Vec<String> = vec![
            "--no-tablespaces".into(),
            "--no-security-labels".into(),
            "--no-publications".into(),
            "--no-subscriptions".into(),
        ];
        if !self.privileges {
            args.extend(["--no-owner".into(), "--no-privileges".into()]);
        }
        // pg_restore 12 and later need `-f -` for standard output; older ones take `-` as a
        // file name.
        if self.tools.major >= 12 && !extra.contains(&"--list") {
            args.push("--file=-".into());
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push(self.archive.display().to_string());
        let out = tool::run(&self.tools.pg_restore, args, None).await?;
        String::from_utf8(out).map_err(|_| DdlError::UnexpectedOutput {
            tool: "pg_restore".to_owned(),
            reason: "its output is not UTF-8 although the archive was dumped as UTF8".to_owned(),
        })
    }
}
