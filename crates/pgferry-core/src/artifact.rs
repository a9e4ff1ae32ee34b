//! What pgferry puts in a database: the one definition shared by `install`, `uninstall`, `clean`
//! and the sync engine, so that removal finds exactly what installation made.
//!
//! Everything lives in one schema, [`SCHEMA`]. The only objects outside it are triggers on user
//! tables, all named with [`TRIGGER_PREFIX`] and all calling functions in [`SCHEMA`]; a trigger is
//! recognised as pgferry's by both marks, never by name alone, so a user's trigger that happens
//! to share the prefix is left alone.

use crate::ident::{generated_name, Ident, QualifiedName};

/// The schema that holds everything pgferry installs.
pub const SCHEMA: &str = "pgferry";
/// The schema version this build installs and understands. Upgrades are new SQL files.
pub const SCHEMA_VERSION: i32 = 1;
/// Prefix of every trigger pgferry puts on a user table.
pub const TRIGGER_PREFIX: &str = "pgferry_";
/// How a table's changes are captured; see `sql/capture_function.sql` for why each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptureMode {
    /// Statement-level triggers reading transition tables, plus a row-level trigger for key
    /// changes: ordinary tables outside any inheritance tree.
    Statement,
    /// One row-level trigger: partitioned tables, partitions, inheritance parents and children.
    Row,
}

impl CaptureMode {
    /// The capture triggers (besides the TRUNCATE trigger) a table of this mode carries.
    pub fn triggers(self) -> &'static [&'static str] {
        match self {
            CaptureMode::Statement => &[
                "pgferry_insert",
                "pgferry_update",
                "pgferry_delete",
                "pgferry_key_change",
            ],
            CaptureMode::Row => &[ROW_TRIGGER],
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Statement => "statement",
            CaptureMode::Row => "row",
        }
    }

    pub fn parse(s: &str) -> Option<CaptureMode> {
        match s {
            "statement" => Some(CaptureMode::Statement),
            "row" => Some(CaptureMode::Row),
            _ => None,
        }
    }
}
/// The statement-level TRUNCATE trigger on a captured table and on each of its partitions.
pub const TRUNCATE_TRIGGER: &str = "pgferry_truncate";
/// The function behind every TRUNCATE trigger.
pub const TRUNCATE_FUNCTION: &str = "capture_truncate";
/// Key for `pg_advisory_xact_lock` taken by install, uninstall and clean.
pub const INSTALL_LOCK_KEY: i64 = 0x7067_6665_7272_7901; // "pgferry" + 1

/// Key for the advisory lock under which a source's registry of targets is read and written.
pub const REGISTRY_LOCK_KEY: i64 = 0x7067_6665_7272_7902;

/// Bucardo's schema, removed by `clean --bucardo`.
pub const BUCARDO_SCHEMA: &str = "bucardo";
/// Name patterns (SQL `LIKE`) of the triggers Bucardo puts on user tables.
pub const BUCARDO_TRIGGER_PATTERNS: &[&str] = &[
    "bucardo_delta",
    "bucardo_kick_%",
    "bucardo_note_trunc_%",
    "btrunc_%",
];

/// `pgferry.<name>`.
pub fn object(name: &str) -> QualifiedName {
    QualifiedName::new(SCHEMA, name)
}

/// The capture function of one table: a prefix, a readable part of the table name and a stable
/// hash of `schema.table`, at most 63 bytes.
pub fn capture_function(table: &QualifiedName) -> QualifiedName {
    let hashed = format!("{}.{}", table.schema.as_str(), table.name.as_str());
    QualifiedName {
        schema: Ident::new(SCHEMA),
        name: generated_name("capture_", table.name.as_str(), &hashed),
    }
}

/// The trigger of a table captured in [`CaptureMode::Row`], which is also how a table with delta
/// columns is captured whatever its kind.
pub const ROW_TRIGGER: &str = "pgferry_capture";

/// The SQL expression, over a row `alias` of `pgferry.captured_table`, of the table's delta
/// columns as `text[]` in their recorded order: empty when it has none, and also on a schema
/// installed before delta columns existed (`sql/delta_columns.sql` adds the column only when
/// a delta column is first declared), so readers need not look at the catalog first.
pub fn delta_columns_expr(alias: &str) -> String {
    format!(
        "ARRAY(SELECT x.c FROM pg_catalog.jsonb_array_elements_text(\
           COALESCE(NULLIF(pg_catalog.to_jsonb({alias}) OPERATOR(pg_catalog.->) 'delta_columns', 'null'::pg_catalog.jsonb), '[]'::pg_catalog.jsonb)) \
           WITH ORDINALITY AS x(c, n) ORDER BY x.n)"
    )
}

/// Whether a column whose base type is `base_type` (`pg_type.typname` of the domain's base
/// type) can be a delta column, whose concurrent changes merge by adding differences: exact
/// integer and decimal types only, recorded as `numeric`.
pub fn delta_column_type(base_type: &str) -> Result<(), String> {
    match base_type {
        "int2" | "int4" | "int8" | "numeric" => Ok(()),
        "float4" | "float8" => Err(
            "floating-point arithmetic is not exact, so merged changes would not add up to the \
             exact total; make the column numeric"
                .into(),
        ),
        _ => Err("only smallint, integer, bigint and numeric columns can be delta columns".into()),
    }
}

/// How a key column's value is written as text in the capture, and read back.
///
/// The capture trigger runs in the writer's session, whose `DateStyle`, `bytea_output` and so on
/// are the writer's. A key is therefore recorded in a form that does not depend on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyForm {
    /// `value::text`: the type's output is independent of session settings.
    Text,
    /// ISO 8601 through JSON (dates, times, timestamps), independent of `DateStyle`.
    Iso,
    /// Hex (bytea), independent of `bytea_output`.
    Hex,
}

impl KeyForm {
    /// Chooses the form for a key column from its base type's name (`pg_type.typname` of the
    /// domain's base type), or explains why the type cannot be a replication key.
    pub fn for_type(base_type: &str, category: &str) -> Result<KeyForm, String> {
        match base_type {
            "date" | "timestamp" | "timestamptz" | "time" | "timetz" => Ok(KeyForm::Iso),
            "bytea" => Ok(KeyForm::Hex),
            "float4" | "float8" => Err("its text form depends on extra_float_digits".into()),
            "interval" => Err("its text form depends on IntervalStyle".into()),
            "money" => Err("its text form depends on lc_monetary".into()),
            _ if category == "A" || category == "C" || category == "R" => Err(
                "arrays, composite and range types are not supported as replication keys".into(),
            ),
            _ => Ok(KeyForm::Text),
        }
    }

    /// The SQL expression, inside a trigger function, that records `value` as text.
    /// Every name is schema-qualified: the function must not depend on `search_path`.
    pub fn capture_expr(self, value: &str) -> String {
        match self {
            KeyForm::Text => format!("{value}::pg_catalog.text"),
            KeyForm::Iso => {
                format!("(pg_catalog.to_jsonb({value}) OPERATOR(pg_catalog.#>>) '{{}}'::pg_catalog.text[])")
            }
            KeyForm::Hex => format!("pg_catalog.encode({value}, 'hex')"),
        }
    }

    /// The SQL expression that turns recorded text back into a value of type `sql_type`.
    pub fn restore_expr(self, text: &str, sql_type: &str) -> String {
        match self {
            KeyForm::Text | KeyForm::Iso => format!("({text})::{sql_type}"),
            KeyForm::Hex => format!("pg_catalog.decode({text}, 'hex')"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KeyForm::Text => "text",
            KeyForm::Iso => "iso",
            KeyForm::Hex => "hex",
        }
    }

    pub fn parse(s: &str) -> Option<KeyForm> {
        match s {
            "text" => Some(KeyForm::Text),
            "iso" => Some(KeyForm::Iso),
            "hex" => Some(KeyForm::Hex),
            _ => None,
        }
    }
}

/// SQL dialect differences between the server versions pgferry supports (10 to 18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialect {
    pub major: u32,
}

impl Dialect {
    pub fn new(server_version: u32) -> Dialect {
        Dialect {
            major: server_version / 10000,
        }
    }

    /// The type of the capture's transaction id column.
    pub fn xid_type(self) -> &'static str {
        if self.major >= 13 {
            "pg_catalog.xid8"
        } else {
            "pg_catalog.int8"
        }
    }

    /// The writing transaction's 64-bit id.
    pub fn current_xid(self) -> &'static str {
        if self.major >= 13 {
            "pg_catalog.pg_current_xact_id()"
        } else {
            "pg_catalog.txid_current()"
        }
    }

    /// The type of a stored snapshot.
    pub fn snapshot_type(self) -> &'static str {
        if self.major >= 13 {
            "pg_catalog.pg_snapshot"
        } else {
            "pg_catalog.txid_snapshot"
        }
    }

    /// The current snapshot.
    pub fn current_snapshot(self) -> &'static str {
        if self.major >= 13 {
            "pg_catalog.pg_current_snapshot()"
        } else {
            "pg_catalog.txid_current_snapshot()"
        }
    }

    /// The function telling whether a transaction id is visible in a snapshot.
    pub fn visible_in_snapshot(self) -> &'static str {
        if self.major >= 13 {
            "pg_catalog.pg_visible_in_snapshot"
        } else {
            "pg_catalog.txid_visible_in_snapshot"
        }
    }

    /// `EXECUTE FUNCTION` (11+) or `EXECUTE PROCEDURE` (10).
    pub fn execute(self) -> &'static str {
        if self.major >= 11 {
            "EXECUTE FUNCTION"
        } else {
            "EXECUTE PROCEDURE"
        }
    }

    /// Whether a partitioned table can carry row triggers and a primary key (11+).
    pub fn partitioned_parent_capture(self) -> bool {
        self.major >= 11
    }
}

/// How to remove pgferry from a database: what `uninstall` and `clean` both run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Removal {
    /// pgferry triggers on user tables (`pgferry_*` calling a function in schema pgferry).
    pub triggers: Vec<crate::catalog::TriggerInfo>,
    /// Whether schema pgferry exists.
    pub schema_found: bool,
    /// Tables, sequences and functions inside schema pgferry.
    pub schema_objects: usize,
    /// Objects outside the schema that depend on it: removal must refuse while there are any.
    pub dependents: Vec<String>,
    /// The statements, in order.
    pub statements: Vec<String>,
}

/// Plans the removal of every pgferry object: the pgferry triggers on user tables, then the
/// schema. Clones of a partitioned parent's trigger go with the parent's.
pub async fn pgferry_removal(
    client: &impl tokio_postgres::GenericClient,
    target: &str,
) -> Result<Removal, crate::Error> {
    removal(client, SCHEMA, &["pgferry\\_%"], target).await
}

/// Plans the removal of a replication tool's artifacts: the triggers on user tables whose name
/// matches `trigger_patterns` (SQL `LIKE`) and whose function lives in `schema`, then `schema`.
pub async fn removal(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    trigger_patterns: &[&str],
    target: &str,
) -> Result<Removal, crate::Error> {
    let triggers =
        crate::catalog::triggers_calling(client, schema, trigger_patterns, target).await?;
    let mut r = Removal {
        statements: triggers
            .iter()
            .map(|t| format!("DROP TRIGGER {} ON {}", t.trigger, t.table))
            .collect(),
        triggers,
        ..Removal::default()
    };
    r.schema_found = crate::catalog::schema_exists(client, schema, target).await?;
    if !r.schema_found {
        return Ok(r);
    }
    r.dependents =
        crate::catalog::external_dependents(client, schema, trigger_patterns, target).await?;
    let objects: i64 = client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relkind IN ('r', 'S', 'p'))
                  + (SELECT count(*) FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                      WHERE n.nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(|e| crate::Error::Query {
            context: format!("counting the objects in schema {schema}"),
            target: target.to_owned(),
            source: e,
        })?
        .get(0);
    r.schema_objects = objects as usize;
    r.statements
        .push(format!("DROP SCHEMA {} CASCADE", Ident::new(schema)));
    Ok(r)
}
