//! Planning an install: which tables, which SQL, all read inside the install transaction.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use pgferry_core::artifact::{
    self, CaptureMode, Dialect, KeyForm, SCHEMA, SCHEMA_VERSION, TRUNCATE_FUNCTION,
    TRUNCATE_TRIGGER,
};
use pgferry_core::catalog::{self, Key, TableInfo, TableKind};
use pgferry_core::ident::literal;
use pgferry_core::{Ident, QualifiedName, TablePattern};
use serde::Serialize;
use tokio_postgres::types::Oid;
use tokio_postgres::Transaction;

use crate::{
    render, InstallError, CAPTURE_FUNCTION_SQL, CAPTURE_ROW_SQL, CAPTURE_STATEMENT_SQL,
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
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            tables: Vec::new(),
            exclude: Vec::new(),
            dry_run: false,
            lock_timeout: Duration::from_secs(10),
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
    /// Partitions attached since the last install that got their TRUNCATE trigger now.
    pub new_partitions: Vec<QualifiedName>,
    /// pgferry triggers found missing on captured tables and recreated.
    pub repaired: Vec<String>,
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
        for r in tx
            .query(
                "SELECT table_id, schema_name, table_name, key_columns, key_types, key_forms, capture_mode FROM pgferry.captured_table",
                &[],
            )
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
                            (Ident::new(c), ty, KeyForm::parse(&f).unwrap_or(KeyForm::Text))
                        })
                        .collect(),
                },
            );
        }
    }

    let tables = catalog::user_tables(tx, server_version, target).await?;
    let (units, covered) = capture_units(&tables, dialect);
    let unit_set: BTreeSet<usize> = units.iter().copied().collect();

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
            included && !opts.exclude.iter().any(|p| p.matches(s, n))
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

    let mut report = InstallReport {
        dry_run: opts.dry_run,
        created_schema: !schema_exists,
        added: Vec::new(),
        already_captured: Vec::new(),
        new_partitions: Vec::new(),
        repaired: Vec::new(),
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
            let capture = Capture {
                table: &t.name,
                function: artifact::capture_function(&t.name),
                table_id: reg.table_id,
                mode: reg.mode,
                columns: reg.columns.clone(),
            };
            let missing: Vec<&str> = reg
                .mode
                .triggers()
                .iter()
                .copied()
                .filter(|name| !has_trigger(&t.name, name))
                .collect();
            if !missing.is_empty() {
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
        let mode = if t.kind == TableKind::Ordinary && t.parent.is_none() && !t.inheritance {
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
        };
        let cols = &capture.columns;
        stmts.push((
            format!("capture function of {}", t.name.human()),
            capture.function_sql(dialect, false),
        ));
        stmts.push((
            format!("register {}", t.name.human()),
            format!(
                "INSERT INTO pgferry.captured_table (table_id, schema_name, table_name, key_columns, key_types, key_forms, capture_function, capture_mode, partitioned)
                 VALUES ({id}, {}, {}, {}, {}, {}, {}, {}, {})",
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
        });
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

/// The capture of one table: its function and triggers, rendered from `sql/`.
struct Capture<'a> {
    table: &'a QualifiedName,
    function: QualifiedName,
    table_id: i32,
    mode: CaptureMode,
    columns: Vec<(Ident, String, KeyForm)>,
}

impl Capture<'_> {
    fn function_sql(&self, dialect: Dialect, replace: bool) -> String {
        let template = match self.mode {
            CaptureMode::Statement => CAPTURE_STATEMENT_SQL,
            CaptureMode::Row => CAPTURE_ROW_SQL,
        };
        let body = render(template, dialect)
            .replace("@TABLE_ID@", &self.table_id.to_string())
            .replace("@KEY_NEW@", &key_array("NEW", &self.columns))
            .replace("@KEY_OLD@", &key_array("OLD", &self.columns))
            .replace("@KEY_N@", &key_array("n", &self.columns))
            .replace("@KEY_O@", &key_array("o", &self.columns));
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
