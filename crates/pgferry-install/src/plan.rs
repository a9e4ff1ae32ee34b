//! Planning an install: which tables, which SQL, all read inside the install transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use pgferry_core::artifact::{
    self, delta_column_type, delta_columns_expr, CaptureMode, Dialect, KeyForm, SCHEMA,
    SCHEMA_VERSION, TRUNCATE_FUNCTION, TRUNCATE_TRIGGER,
};
use pgferry_core::catalog::{self, Key, TableInfo, TableKind};
use pgferry_core::ident::literal;
use pgferry_core::{Ident, QualifiedName, TablePattern};
use serde::Serialize;
use tokio_postgres::types::Oid;
use tokio_postgres::Transaction;

use crate::{
    render, DeltaColumn, InstallError, CAPTURE_FUNCTION_SQL, CAPTURE_GUARD_MARK, CAPTURE_GUARD_SQL,
    CAPTURE_ROW_DELTA_SQL, CAPTURE_ROW_SQL, CAPTURE_STATEMENT_SQL, DELTA_COLUMNS_SQL,
    SCHEMA_V1_SQL,
};

/// What to install.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Tables to capture; empty means every table.
    pub tables: Vec<TablePattern>,
    /// Tables to leave out.
    pub exclude: Vec<TablePattern>,
    /// Print the SQL, change nothing.
    pub dry_run: bool,
    /// How long to wait for a table lock before giving up (a long transaction holding one).
    pub lock_timeout: Duration,
    /// Delta columns (see [`crate::delta_column`]). A table named here is captured even if
    /// `tables` does not select it; for a table named here, these are its delta columns from
    /// now on (a captured table whose set changes gets its capture regenerated). Tables not
    /// named keep theirs.
    pub delta_columns: Vec<DeltaColumn>,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            tables: Vec::new(),
            exclude: Vec::new(),
            dry_run: false,
            lock_timeout: Duration::from_secs(10),
            delta_columns: Vec::new(),
        }
    }
}

/// A table install starts capturing.
#[derive(Clone, Debug, Serialize)]
pub struct AddedTable {
    pub table: QualifiedName,
    pub table_id: i32,
    /// Statement-level triggers with transition tables, or a row-level trigger.
    pub mode: CaptureMode,
    pub key: Vec<Ident>,
    /// Partitions covered through this table (when partitioned).
    pub partitions: Vec<QualifiedName>,
    pub sequences: Vec<QualifiedName>,
    /// Its delta columns, in the order `pgferry.delta.delta_old`/`delta_new` hold them.
    pub delta_columns: Vec<Ident>,
}

/// A captured table whose delta columns install changed: its capture function and triggers
/// were regenerated (row mode).
#[derive(Clone, Debug, Serialize)]
pub struct DeltaColumnsChange {
    pub table: QualifiedName,
    pub delta_columns: Vec<Ident>,
    pub previous: Vec<Ident>,
    /// The capture mode before (a statement-mode table moves to row mode).
    pub previous_mode: CaptureMode,
}

/// What install did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Serialize)]
pub struct InstallReport {
    pub dry_run: bool,
    /// The pgferry schema was created by this install.
    pub created_schema: bool,
    pub added: Vec<AddedTable>,
    /// Tables that matched and were captured already.
    pub already_captured: Vec<QualifiedName>,
    /// Captured tables (among `already_captured`) whose delta columns changed.
    pub delta_columns_changed: Vec<DeltaColumnsChange>,
    /// Partitions attached since the last install that got their TRUNCATE trigger now.
    pub new_partitions: Vec<QualifiedName>,
    /// pgferry triggers found missing on captured tables and recreated.
    pub repaired: Vec<String>,
    /// Captured tables whose capture function predated the guard that skips pgferry's own
    /// apply (`sql/capture_guard.sql`) and was regenerated with it.
    pub guarded: Vec<QualifiedName>,
    /// Registered tables that no longer exist.
    pub missing_tables: Vec<QualifiedName>,
    pub node_id: Option<String>,
    /// The SQL, statement by statement, with what each does.
    #[serde(skip)]
    pub statements: Vec<(String, String)>,
}

pub(crate) struct Plan {
    pub report: InstallReport,
}

struct Registered {
    table_id: i32,
    mode: CaptureMode,
    columns: Vec<(Ident, String, KeyForm)>,
    delta_columns: Vec<Ident>,
}

/// The units of capture: tables captured as a whole.
fn capture_units(
    tables: &[TableInfo],
    dialect: Dialect,
) -> (Vec<usize>, HashMap<usize, Vec<usize>>) {
    let mut children: HashMap<Oid, Vec<usize>> = HashMap::new();
    for (i, t) in tables.iter().enumerate() {
        if let Some(p) = t.parent_oid {
            children.entry(p).or_default().push(i);
        }
    }
    fn descendants(
        i: usize,
        tables: &[TableInfo],
        children: &HashMap<Oid, Vec<usize>>,
        out: &mut Vec<usize>,
    ) {
        for &c in children.get(&tables[i].oid).into_iter().flatten() {
            out.push(c);
            descendants(c, tables, children, out);
        }
    }
    let mut units = Vec::new();
    let mut covered = HashMap::new();
    let mut stack: Vec<usize> = (0..tables.len())
        .filter(|&i| tables[i].parent_oid.is_none())
        .collect();
    stack.reverse();
    while let Some(i) = stack.pop() {
        let t = &tables[i];
        let whole = t.kind == TableKind::Ordinary
            || (dialect.partitioned_parent_capture()
                && (t.key.is_some() || t.key_problem.is_some()));
        if whole {
            let mut d = Vec::new();
            descendants(i, tables, &children, &mut d);
            covered.insert(i, d);
            units.push(i);
        } else {
            let mut c = children.get(&t.oid).cloned().unwrap_or_default();
            c.reverse();
            stack.extend(c);
        }
    }
    units.sort_by(|a, b| tables[*a].name.cmp(&tables[*b].name));
    (units, covered)
}

pub(crate) async fn plan(
    tx: &Transaction<'_>,
    server_version: u32,
    dialect: Dialect,
    opts: &InstallOptions,
    target: &str,
) -> Result<Plan, InstallError> {
    let q = |ctx: &str, e| pgferry_core::Error::Query {
        context: ctx.to_owned(),
        target: target.to_owned(),
        source: e,
    };
    // What is installed already.
    let schema_exists = catalog::schema_exists(tx, SCHEMA, target).await?;
    let mut registered: HashMap<QualifiedName, Registered> = HashMap::new();
    let mut next_id = 1;
    // Whether sql/delta_columns.sql has been applied.
    let mut has_delta_schema = false;
    // Capture functions (by name) without the guard against pgferry's own apply.
    let mut unguarded: BTreeSet<String> = BTreeSet::new();
    if schema_exists {
        let has_install: bool = tx
            .query_one(
                "SELECT pg_catalog.to_regclass('pgferry.installation') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| q("reading the pgferry schema", e))?
            .get(0);
        if !has_install {
            return Err(InstallError::ForeignSchema);
        }
        let found: i32 = tx
            .query_one("SELECT schema_version FROM pgferry.installation", &[])
            .await
            .map_err(|e| q("reading the installed version", e))?
            .get(0);
        if found > SCHEMA_VERSION {
            return Err(InstallError::NewerSchema {
                found,
                known: SCHEMA_VERSION,
            });
        }
        has_delta_schema = tx
            .query_one(
                "SELECT count(*) = 3 FROM pg_catalog.pg_attribute
                  WHERE NOT attisdropped
                    AND (attrelid = pg_catalog.to_regclass('pgferry.captured_table') AND attname = 'delta_columns'
                         OR attrelid = pg_catalog.to_regclass('pgferry.delta') AND attname IN ('delta_old', 'delta_new'))",
                &[],
            )
            .await
            .map_err(|e| q("looking for delta columns in the pgferry schema", e))?
            .get(0);
        unguarded = tx
            .query(
                "SELECT p.proname::text FROM pg_catalog.pg_proc p
                  WHERE p.pronamespace = 'pgferry'::pg_catalog.regnamespace
                    AND (p.proname = $1 OR p.proname::text IN (SELECT capture_function FROM pgferry.captured_table))
                    AND pg_catalog.strpos(p.prosrc, $2) = 0",
                &[&TRUNCATE_FUNCTION, &CAPTURE_GUARD_MARK],
            )
            .await
            .map_err(|e| q("looking for capture functions without the guard", e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let sql = format!(
            "SELECT c.table_id, c.schema_name, c.table_name, c.key_columns, c.key_types, c.key_forms, c.capture_mode, {}
               FROM pgferry.captured_table c",
            delta_columns_expr("c")
        );
        for r in tx
            .query(&sql, &[])
            .await
            .map_err(|e| q("reading captured tables", e))?
        {
            let id: i32 = r.get(0);
            next_id = next_id.max(id + 1);
            registered.insert(
                QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                Registered {
                    table_id: id,
                    mode: CaptureMode::parse(r.get(6)).unwrap_or(CaptureMode::Row),
                    columns: r
                        .get::<_, Vec<String>>(3)
                        .into_iter()
                        .zip(r.get::<_, Vec<String>>(4))
                        .zip(r.get::<_, Vec<String>>(5))
                        .map(|((c, ty), f)| {
                            (
                                Ident::new(c),
                                ty,
                                KeyForm::parse(&f).unwrap_or(KeyForm::Text),
                            )
                        })
                        .collect(),
                    delta_columns: r
                        .get::<_, Vec<String>>(7)
                        .into_iter()
                        .map(Ident::new)
                        .collect(),
                },
            );
        }
    }

    let tables = catalog::user_tables(tx, server_version, target).await?;
    let (units, covered) = capture_units(&tables, dialect);
    let unit_set: BTreeSet<usize> = units.iter().copied().collect();

    // Tables named by --delta-column: captured whatever the patterns select, unless excluded.
    let mut declared: BTreeMap<QualifiedName, Vec<&DeltaColumn>> = BTreeMap::new();
    for d in &opts.delta_columns {
        let cols = declared.entry(d.table.clone()).or_default();
        if !cols.contains(&d) {
            cols.push(d);
        }
    }
    let mut delta_problems: Vec<String> = Vec::new();
    let mut declared_units: BTreeMap<usize, Vec<&DeltaColumn>> = BTreeMap::new();
    for (name, cols) in &declared {
        let named: Vec<String> = cols.iter().map(|d| d.human()).collect();
        let named = named.join(", ");
        match tables.iter().position(|t| &t.name == name) {
            None => delta_problems.push(format!("{named}: there is no table {}", name.human())),
            Some(i) if !unit_set.contains(&i) => {
                let whole = covered
                    .iter()
                    .find(|(_, d)| d.contains(&i))
                    .map(|(u, _)| tables[*u].name.human());
                delta_problems.push(match whole {
                    Some(o) => format!(
                        "{named}: {} is a partition of {o}, which is captured as a whole: declare the column on {o}",
                        name.human()
                    ),
                    None => format!(
                        "{named}: {} is partitioned and its partitions are captured one by one: declare the column on each partition",
                        name.human()
                    ),
                });
            }
            Some(i) => match opts
                .exclude
                .iter()
                .find(|p| p.matches(name.schema.as_str(), name.name.as_str()))
            {
                Some(p) => delta_problems.push(format!(
                    "{named}: {} is left out by --exclude {p}: drop one of the two",
                    name.human()
                )),
                None => {
                    declared_units.insert(i, cols.clone());
                }
            },
        }
    }

    // Select by patterns.
    let selected: Vec<usize> = units
        .iter()
        .copied()
        .filter(|&i| {
            let t = &tables[i];
            let (s, n) = (t.name.schema.as_str(), t.name.name.as_str());
            let included = if opts.tables.is_empty() {
                !t.extension_member
            } else {
                opts.tables.iter().any(|p| p.matches(s, n))
            };
            (included && !opts.exclude.iter().any(|p| p.matches(s, n)))
                || declared_units.contains_key(&i)
        })
        .collect();
    for p in opts.tables.iter().chain(&opts.exclude) {
        let hit = units
            .iter()
            .any(|&i| p.matches(tables[i].name.schema.as_str(), tables[i].name.name.as_str()));
        if hit {
            continue;
        }
        let hint = tables
            .iter()
            .enumerate()
            .find(|(i, t)| !unit_set.contains(i) && p.matches(t.name.schema.as_str(), t.name.name.as_str()))
            .map(|(i, t)| {
                let owner = covered
                    .iter()
                    .find(|(_, d)| d.contains(&i))
                    .map(|(u, _)| tables[*u].name.human());
                match owner {
                    Some(o) => format!(" ({} is a partition of {o}, which is captured as a whole: name {o} instead)", t.name.human()),
                    None => format!(" ({} is partitioned; its partitions are captured one by one)", t.name.human()),
                }
            })
            .unwrap_or_default();
        return Err(InstallError::NoMatch {
            pattern: p.to_string(),
            hint,
        });
    }

    // Each declared table's delta columns, in the table's column order: numeric, outside the key.
    let mut wanted: HashMap<QualifiedName, Vec<Ident>> = HashMap::new();
    for (&i, cols) in &declared_units {
        let t = &tables[i];
        let columns = catalog::table_columns(tx, &t.name, target).await?;
        let key: Vec<&Ident> = match registered.get(&t.name) {
            Some(r) => r.columns.iter().map(|c| &c.0).collect(),
            None => t
                .key
                .iter()
                .flat_map(|k| k.columns.iter().map(|c| &c.name))
                .collect(),
        };
        let names: BTreeSet<&Ident> = cols.iter().map(|d| &d.column).collect();
        for d in cols {
            let Some(c) = columns.iter().find(|c| c.name == d.column) else {
                let near = columns
                    .iter()
                    .find(|c| c.name.as_str().to_lowercase() == d.column.as_str().to_lowercase())
                    .map(|c| format!(" (did you mean {}? quote names as SQL does)", c.name))
                    .unwrap_or_default();
                delta_problems.push(format!(
                    "{}: {} has no column {}{near}",
                    d.human(),
                    t.name.human(),
                    d.column.human()
                ));
                continue;
            };
            if key.contains(&&c.name) {
                delta_problems.push(format!(
                    "{}: it is part of the replication key of {} (a key identifies the row, it cannot merge); declare another column",
                    d.human(),
                    t.name.human()
                ));
            } else if let Err(why) = delta_column_type(&c.base_type) {
                delta_problems.push(format!("{} is of type {}: {why}", d.human(), c.sql_type));
            }
        }
        wanted.insert(
            t.name.clone(),
            columns
                .iter()
                .filter(|c| names.contains(&c.name))
                .map(|c| c.name.clone())
                .collect(),
        );
    }
    if !delta_problems.is_empty() {
        return Err(InstallError::DeltaColumns {
            problems: delta_problems,
        });
    }

    let mut report = InstallReport {
        dry_run: opts.dry_run,
        created_schema: !schema_exists,
        added: Vec::new(),
        already_captured: Vec::new(),
        delta_columns_changed: Vec::new(),
        new_partitions: Vec::new(),
        repaired: Vec::new(),
        guarded: Vec::new(),
        missing_tables: Vec::new(),
        node_id: None,
        statements: Vec::new(),
    };
    let present: BTreeSet<&QualifiedName> = tables.iter().map(|t| &t.name).collect();
    report.missing_tables = registered
        .keys()
        .filter(|n| !present.contains(n))
        .cloned()
        .collect();
    report.missing_tables.sort();

    // New tables must have a usable key, and we must be allowed to put triggers on them.
    let new: Vec<usize> = selected
        .iter()
        .copied()
        .filter(|&i| !registered.contains_key(&tables[i].name))
        .collect();
    let keyless: Vec<String> = new
        .iter()
        .filter(|&&i| tables[i].key.is_none() && tables[i].key_problem.is_none())
        .map(|&i| tables[i].name.human())
        .collect();
    if !keyless.is_empty() {
        return Err(InstallError::NoKey { tables: keyless });
    }
    let bad_keys: Vec<String> = new
        .iter()
        .filter_map(|&i| {
            tables[i]
                .key_problem
                .as_ref()
                .filter(|_| tables[i].key.is_none())
                .map(|p| format!("{}: {p}", tables[i].name.human()))
        })
        .collect();
    if !bad_keys.is_empty() {
        return Err(InstallError::UnsupportedKey { problems: bad_keys });
    }

    // Existing pgferry triggers, to add only what is missing.
    let existing = catalog::triggers_calling(tx, SCHEMA, &["pgferry\\_%"], target).await?;
    let has_trigger = |t: &QualifiedName, name: &str| {
        existing
            .iter()
            .any(|x| &x.table == t && x.trigger.as_str() == name)
    };

    let mut needs_trigger_priv: Vec<String> = Vec::new();
    let mut stmts: Vec<(String, String)> = Vec::new();
    if !schema_exists {
        stmts.extend(schema_statements(tx, dialect, target).await?);
    }
    if !wanted.is_empty() && !has_delta_schema {
        stmts.push((
            "add delta columns to schema pgferry".into(),
            DELTA_COLUMNS_SQL.to_owned(),
        ));
    }

    if unguarded.contains(TRUNCATE_FUNCTION) {
        stmts.push((
            "give the TRUNCATE capture the guard against pgferry's own apply".into(),
            render(CAPTURE_GUARD_SQL, dialect),
        ));
    }
    // Capture functions this plan (re)writes: they get the guard with the current bodies.
    let mut rewritten: BTreeSet<QualifiedName> = BTreeSet::new();
    let sequences = catalog::table_sequences(tx, target).await?;
    for &i in &selected {
        let t = &tables[i];
        let descendants: Vec<&TableInfo> = covered
            .get(&i)
            .into_iter()
            .flatten()
            .map(|&d| &tables[d])
            .collect();
        if let Some(reg) = registered.get(&t.name) {
            report.already_captured.push(t.name.clone());
            let change = wanted.get(&t.name).filter(|w| **w != reg.delta_columns);
            let capture = Capture {
                table: &t.name,
                function: artifact::capture_function(&t.name),
                table_id: reg.table_id,
                mode: if change.is_some() {
                    CaptureMode::Row
                } else {
                    reg.mode
                },
                columns: reg.columns.clone(),
                delta_columns: change.unwrap_or(&reg.delta_columns).clone(),
            };
            let missing: Vec<&str> = reg
                .mode
                .triggers()
                .iter()
                .copied()
                .filter(|name| !has_trigger(&t.name, name))
                .collect();
            if change.is_some() || !missing.is_empty() {
                rewritten.insert(t.name.clone());
            }
            if let Some(w) = change {
                // Regenerate the capture: statement triggers (if any) give way to the row
                // trigger, whose function records the delta columns; all in this transaction,
                // so every write is captured by the old capture or the new.
                if !t.can_trigger {
                    needs_trigger_priv.push(format!("{} (owner {})", t.name.human(), t.owner));
                }
                if reg.mode != CaptureMode::Row {
                    for name in reg.mode.triggers() {
                        if has_trigger(&t.name, name) {
                            stmts.push((
                                format!(
                                    "drop trigger {name} on {} (now row capture)",
                                    t.name.human()
                                ),
                                format!("DROP TRIGGER {} ON {}", Ident::new(*name), t.name),
                            ));
                        }
                    }
                }
                stmts.push((
                    format!(
                        "regenerate the capture function of {} with delta columns",
                        t.name.human()
                    ),
                    capture.function_sql(dialect, true),
                ));
                for (name, sql) in capture.triggers_sql(dialect) {
                    if !has_trigger(&t.name, name) {
                        stmts.push((format!("trigger {name} on {}", t.name.human()), sql));
                        if missing.contains(&name) {
                            report
                                .repaired
                                .push(format!("{name} on {}", t.name.human()));
                        }
                    }
                }
                stmts.push((
                    format!("record the delta columns of {}", t.name.human()),
                    format!(
                        "UPDATE pgferry.captured_table SET capture_mode = {}, delta_columns = {} WHERE table_id = {}",
                        literal(CaptureMode::Row.as_str()),
                        text_array(w.iter().map(|c| c.as_str().to_owned())),
                        reg.table_id
                    ),
                ));
                report.delta_columns_changed.push(DeltaColumnsChange {
                    table: t.name.clone(),
                    delta_columns: w.clone(),
                    previous: reg.delta_columns.clone(),
                    previous_mode: reg.mode,
                });
            } else if !missing.is_empty() {
                if !t.can_trigger {
                    needs_trigger_priv.push(format!("{} (owner {})", t.name.human(), t.owner));
                }
                stmts.push((
                    format!("recreate the capture function of {}", t.name.human()),
                    capture.function_sql(dialect, true),
                ));
                for (name, sql) in capture.triggers_sql(dialect) {
                    if missing.contains(&name) {
                        stmts.push((
                            format!("recreate trigger {name} on {}", t.name.human()),
                            sql,
                        ));
                        report
                            .repaired
                            .push(format!("{name} on {}", t.name.human()));
                    }
                }
            }
            if !has_trigger(&t.name, TRUNCATE_TRIGGER) {
                stmts.push((
                    format!("recreate the TRUNCATE trigger of {}", t.name.human()),
                    truncate_trigger_sql(&t.name, reg.table_id, false, dialect),
                ));
                report
                    .repaired
                    .push(format!("{TRUNCATE_TRIGGER} on {}", t.name.human()));
            }
            for d in &descendants {
                if !has_trigger(&d.name, TRUNCATE_TRIGGER) {
                    if !d.can_trigger {
                        needs_trigger_priv.push(format!("{} (owner {})", d.name.human(), d.owner));
                    }
                    stmts.push((
                        format!("TRUNCATE trigger on new partition {}", d.name.human()),
                        truncate_trigger_sql(&d.name, reg.table_id, true, dialect),
                    ));
                    report.new_partitions.push(d.name.clone());
                }
            }
            continue;
        }
        if existing
            .iter()
            .any(|x| x.table == t.name && x.trigger.as_str() != TRUNCATE_TRIGGER)
        {
            // Registered under another name: the table was renamed (or the registry edited).
            return Err(InstallError::Unregistered {
                table: t.name.human(),
                stale: report
                    .missing_tables
                    .iter()
                    .map(QualifiedName::human)
                    .collect(),
            });
        }
        let key: &Key = t.key.as_ref().expect("checked above");
        if !t.can_trigger {
            needs_trigger_priv.push(format!("{} (owner {})", t.name.human(), t.owner));
        }
        for d in &descendants {
            if !d.can_trigger {
                needs_trigger_priv.push(format!("{} (owner {})", d.name.human(), d.owner));
            }
        }
        let id = next_id;
        next_id += 1;
        let delta_columns = wanted.get(&t.name).cloned().unwrap_or_default();
        let mode = if t.kind == TableKind::Ordinary
            && t.parent.is_none()
            && !t.inheritance
            && delta_columns.is_empty()
        {
            CaptureMode::Statement
        } else {
            CaptureMode::Row
        };
        let capture = Capture {
            table: &t.name,
            function: artifact::capture_function(&t.name),
            table_id: id,
            mode,
            columns: key
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.sql_type.clone(), c.form))
                .collect(),
            delta_columns,
        };
        let cols = &capture.columns;
        // Registered with delta columns only when it has some: without any, the registry
        // keeps the shape of schema version 1 (sql/delta_columns.sql may not have been applied).
        let (delta_col, delta_value) = if capture.delta_columns.is_empty() {
            (String::new(), String::new())
        } else {
            (
                ", delta_columns".to_owned(),
                format!(
                    ", {}",
                    text_array(capture.delta_columns.iter().map(|c| c.as_str().to_owned()))
                ),
            )
        };
        stmts.push((
            format!("capture function of {}", t.name.human()),
            capture.function_sql(dialect, false),
        ));
        stmts.push((
            format!("register {}", t.name.human()),
            format!(
                "INSERT INTO pgferry.captured_table (table_id, schema_name, table_name, key_columns, key_types, key_forms, capture_function, capture_mode, partitioned{delta_col})
                 VALUES ({id}, {}, {}, {}, {}, {}, {}, {}, {}{delta_value})",
                literal(t.name.schema.as_str()),
                literal(t.name.name.as_str()),
                text_array(cols.iter().map(|c| c.0.as_str().to_owned())),
                text_array(cols.iter().map(|c| c.1.clone())),
                text_array(cols.iter().map(|c| c.2.as_str().to_owned())),
                literal(capture.function.name.as_str()),
                literal(mode.as_str()),
                t.kind == TableKind::Partitioned,
            ),
        ));
        for (name, sql) in capture.triggers_sql(dialect) {
            stmts.push((format!("trigger {name} on {}", t.name.human()), sql));
        }
        stmts.push((
            format!("TRUNCATE trigger on {}", t.name.human()),
            truncate_trigger_sql(&t.name, id, false, dialect),
        ));
        for d in &descendants {
            stmts.push((
                format!("TRUNCATE trigger on partition {}", d.name.human()),
                truncate_trigger_sql(&d.name, id, true, dialect),
            ));
        }
        let mut seqs: Vec<QualifiedName> = sequences
            .iter()
            .filter(|s| s.table == t.name || descendants.iter().any(|d| d.name == s.table))
            .map(|s| s.sequence.clone())
            .collect();
        seqs.sort();
        seqs.dedup();
        for s in &seqs {
            stmts.push((
                format!("register sequence {s}"),
                format!(
                    "INSERT INTO pgferry.captured_sequence (schema_name, sequence_name, table_id) VALUES ({}, {}, {id}) ON CONFLICT DO NOTHING",
                    literal(s.schema.as_str()),
                    literal(s.name.as_str())
                ),
            ));
        }
        report.added.push(AddedTable {
            table: t.name.clone(),
            table_id: id,
            mode,
            key: cols.iter().map(|c| c.0.clone()).collect(),
            partitions: descendants.iter().map(|d| d.name.clone()).collect(),
            sequences: seqs,
            delta_columns: capture.delta_columns.clone(),
        });
    }
    // Every captured table's capture function gets the guard against pgferry's own apply,
    // selected by the patterns or not: CREATE OR REPLACE FUNCTION locks no table, and a
    // function that has it is left alone, so a re-run changes nothing.
    let mut old: Vec<(&QualifiedName, &Registered)> = registered
        .iter()
        .filter(|(name, _)| !rewritten.contains(*name))
        .filter(|(name, _)| unguarded.contains(artifact::capture_function(name).name.as_str()))
        .collect();
    old.sort_by(|a, b| a.0.cmp(b.0));
    for (name, reg) in old {
        let capture = Capture {
            table: name,
            function: artifact::capture_function(name),
            table_id: reg.table_id,
            mode: reg.mode,
            columns: reg.columns.clone(),
            delta_columns: reg.delta_columns.clone(),
        };
        stmts.push((
            format!(
                "regenerate the capture function of {} with the guard against pgferry's own apply",
                name.human()
            ),
            capture.function_sql(dialect, true),
        ));
        report.guarded.push(name.clone());
    }
    if !needs_trigger_priv.is_empty() {
        return Err(InstallError::Privilege {
            what: format!("TRIGGER on {}", needs_trigger_priv.join(", ")),
            fix: "install as the tables' owner, or GRANT TRIGGER ON <table> TO <installing role>"
                .into(),
        });
    }
    if stmts.is_empty() {
        report.statements = stmts;
        return Ok(Plan { report });
    }
    report.statements = stmts;
    Ok(Plan { report })
}

fn text_array(items: impl Iterator<Item = String>) -> String {
    let parts: Vec<String> = items.map(|s| literal(&s)).collect();
    format!("ARRAY[{}]::text[]", parts.join(", "))
}

fn key_array(record: &str, cols: &[(Ident, String, KeyForm)]) -> String {
    let parts: Vec<String> = cols
        .iter()
        .map(|(name, _, form)| form.capture_expr(&format!("{record}.{name}")))
        .collect();
    format!("ARRAY[{}]", parts.join(", "))
}

/// `ARRAY[record.c1::numeric, …]`: the delta columns' values as `pgferry.delta` records them.
fn delta_array(record: &str, cols: &[Ident]) -> String {
    let parts: Vec<String> = cols
        .iter()
        .map(|c| format!("{record}.{c}::pg_catalog.numeric"))
        .collect();
    format!("ARRAY[{}]", parts.join(", "))
}

/// Fills the `@NAME@` placeholders of a body in one pass, so that no value (they hold column
/// names) is searched for placeholders in turn: a column named `@KEY_OLD@` stays a column name.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(at) = rest.find('@') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        match values.iter().find(|(p, _)| tail.starts_with(p)) {
            Some((p, v)) => {
                out.push_str(v);
                rest = &tail[p.len()..];
            }
            None => {
                out.push('@');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The capture of one table: its function and triggers, rendered from `sql/`.
struct Capture<'a> {
    table: &'a QualifiedName,
    function: QualifiedName,
    table_id: i32,
    mode: CaptureMode,
    columns: Vec<(Ident, String, KeyForm)>,
    /// Non-empty only in row mode.
    delta_columns: Vec<Ident>,
}

impl Capture<'_> {
    fn function_sql(&self, dialect: Dialect, replace: bool) -> String {
        let template = match self.mode {
            CaptureMode::Statement => {
                debug_assert!(self.delta_columns.is_empty(), "delta columns need row mode");
                CAPTURE_STATEMENT_SQL
            }
            CaptureMode::Row if self.delta_columns.is_empty() => CAPTURE_ROW_SQL,
            CaptureMode::Row => CAPTURE_ROW_DELTA_SQL,
        };
        let mut values = vec![
            ("@TABLE_ID@", self.table_id.to_string()),
            ("@KEY_NEW@", key_array("NEW", &self.columns)),
            ("@KEY_OLD@", key_array("OLD", &self.columns)),
            ("@KEY_N@", key_array("n", &self.columns)),
            ("@KEY_O@", key_array("o", &self.columns)),
        ];
        if !self.delta_columns.is_empty() {
            values.push(("@DELTA_OLD@", delta_array("OLD", &self.delta_columns)));
            values.push(("@DELTA_NEW@", delta_array("NEW", &self.delta_columns)));
        }
        let body = fill(&render(template, dialect), &values);
        let sql = CAPTURE_FUNCTION_SQL
            .lines()
            .filter(|l| !l.starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n")
            .replace("@FUNCTION@", &self.function.to_string())
            .replace("@BODY@", &literal(&body));
        if replace {
            sql.replacen("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)
        } else {
            sql
        }
    }

    /// `(trigger name, CREATE TRIGGER …)` for each capture trigger of the mode.
    fn triggers_sql(&self, dialect: Dialect) -> Vec<(&'static str, String)> {
        let (table, function, exec) = (self.table, &self.function, dialect.execute());
        let names = self.mode.triggers();
        match self.mode {
            CaptureMode::Row => vec![(
                names[0],
                format!(
                    "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {table} FOR EACH ROW {exec} {function}()",
                    Ident::new(names[0])
                ),
            )],
            CaptureMode::Statement => {
                let cols: Vec<String> = self.columns.iter().map(|c| c.0.to_string()).collect();
                let of = |rec: &str| {
                    let v: Vec<String> = cols.iter().map(|c| format!("{rec}.{c}")).collect();
                    if v.len() == 1 {
                        v[0].clone()
                    } else {
                        format!("ROW({})", v.join(", "))
                    }
                };
                vec![
                    (names[0], format!(
                        "CREATE TRIGGER {} AFTER INSERT ON {table} REFERENCING NEW TABLE AS pgferry_new FOR EACH STATEMENT {exec} {function}()",
                        Ident::new(names[0]))),
                    (names[1], format!(
                        "CREATE TRIGGER {} AFTER UPDATE ON {table} REFERENCING NEW TABLE AS pgferry_new FOR EACH STATEMENT {exec} {function}()",
                        Ident::new(names[1]))),
                    (names[2], format!(
                        "CREATE TRIGGER {} AFTER DELETE ON {table} REFERENCING OLD TABLE AS pgferry_old FOR EACH STATEMENT {exec} {function}()",
                        Ident::new(names[2]))),
                    (names[3], format!(
                        // Not `UPDATE OF <key>`: a BEFORE trigger may change the key without
                        // the statement naming it, and column-specific triggers miss that.
                        "CREATE TRIGGER {} AFTER UPDATE ON {table} FOR EACH ROW WHEN ({} IS DISTINCT FROM {}) {exec} {function}()",
                        Ident::new(names[3]), of("OLD"), of("NEW"))),
                ]
            }
        }
    }
}

fn truncate_trigger_sql(
    table: &QualifiedName,
    table_id: i32,
    partition: bool,
    dialect: Dialect,
) -> String {
    format!(
        "CREATE TRIGGER {} AFTER TRUNCATE ON {table} FOR EACH STATEMENT {} {}('{table_id}', '{}')",
        Ident::new(TRUNCATE_TRIGGER),
        dialect.execute(),
        artifact::object(TRUNCATE_FUNCTION),
        if partition { "partition" } else { "table" }
    )
}

/// The statements that create schema pgferry and this node's identity, after checking that the
/// connected role may: what `install` runs first on a new source, and what the sync engine runs
/// on a new target (a target keeps its identity and progress in the same schema).
pub async fn schema_statements(
    tx: &Transaction<'_>,
    dialect: Dialect,
    target: &str,
) -> Result<Vec<(String, String)>, InstallError> {
    let q = |ctx: &str, e| pgferry_core::Error::Query {
        context: ctx.to_owned(),
        target: target.to_owned(),
        source: e,
    };
    let row = tx
        .query_one(
            "SELECT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE'),
                    pg_catalog.has_function_privilege('pg_catalog.pg_control_system()', 'EXECUTE')",
            &[],
        )
        .await
        .map_err(|e| q("checking privileges", e))?;
    let (can_create, sysid_readable): (bool, bool) = (row.get(0), row.get(1));
    if !can_create {
        return Err(InstallError::Privilege {
            what: "CREATE on the database (to create schema pgferry)".into(),
            fix: "GRANT CREATE ON DATABASE <db> TO <pgferry's role>, or connect as a role that has it".into(),
        });
    }
    let sysid = if sysid_readable {
        "(SELECT system_identifier::text FROM pg_catalog.pg_control_system())"
    } else {
        "NULL"
    };
    Ok(vec![
        ("create schema pgferry".into(), render(SCHEMA_V1_SQL, dialect)),
        (
            "guard the TRUNCATE capture against pgferry's own apply".into(),
            render(CAPTURE_GUARD_SQL, dialect),
        ),
        (
            "record the node identity".into(),
            format!(
                "INSERT INTO pgferry.installation (schema_version, node_id, system_identifier, database_name, server_version_num, pgferry_version)
                 VALUES ({SCHEMA_VERSION}, pg_catalog.md5(pg_catalog.random()::text || pg_catalog.clock_timestamp()::text || pg_catalog.pg_backend_pid()::text),
                         {sysid}, pg_catalog.current_database(), pg_catalog.current_setting('server_version_num')::integer, {})",
                literal(env!("CARGO_PKG_VERSION"))
            ),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_once() {
        let cols = [Ident::new("@KEY_OLD@"), Ident::new("x@")];
        let values = [
            ("@KEY_OLD@", delta_array("OLD", &cols)),
            ("@KEY_O@", "o".to_owned()),
        ];
        assert_eq!(
            fill("a @KEY_OLD@ b @KEY_O@ @ c@", &values),
            "a ARRAY[OLD.\"@KEY_OLD@\"::pg_catalog.numeric, OLD.\"x@\"::pg_catalog.numeric] b o @ c@"
        );
    }
}
