//! Catalog introspection: user tables, their replication keys, partitions and sequences.
//!
//! OIDs are used only inside one transaction to join catalog rows; nothing pgferry stores
//! refers to an OID, because OIDs change on restore.

use std::collections::HashMap;

use tokio_postgres::types::Oid;
use tokio_postgres::GenericClient;

use crate::artifact::KeyForm;
use crate::error::Error;
use crate::ident::{Ident, QualifiedName};

/// Schemas never captured.
pub const SYSTEM_SCHEMAS_SQL: &str =
    "n.nspname <> ALL (ARRAY['pg_catalog','information_schema','pgferry','bucardo']) \
     AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'";

/// One key column of a replication key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KeyColumn {
    pub name: Ident,
    /// `format_type()` of the column, e.g. `timestamp with time zone`, `public."My Domain"`.
    pub sql_type: String,
    pub form: KeyForm,
}

/// The replication key of a table: its primary key, else a unique index over NOT NULL columns.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Key {
    pub index: Ident,
    pub primary: bool,
    pub columns: Vec<KeyColumn>,
}

/// What kind of table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    Ordinary,
    Partitioned,
}

/// A user table as the catalog describes it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableInfo {
    #[serde(skip)]
    pub oid: Oid,
    pub name: QualifiedName,
    pub kind: TableKind,
    /// The direct parent when this table is a partition.
    pub parent: Option<QualifiedName>,
    #[serde(skip)]
    pub parent_oid: Option<Oid>,
    /// The chosen replication key, if the table has a usable one.
    pub key: Option<Key>,
    /// Why an otherwise usable key cannot be used (an unsupported key column type).
    pub key_problem: Option<String>,
    pub owner: String,
    /// Whether the connected role may create triggers on the table.
    pub can_trigger: bool,
    /// Tables that belong to an extension are not captured by default.
    pub extension_member: bool,
    /// Part of a legacy inheritance tree (`INHERITS`), as parent or child.
    pub inheritance: bool,
}

fn q(ctx: &str, target: &str, e: tokio_postgres::Error) -> Error {
    Error::Query {
        context: ctx.to_owned(),
        target: target.to_owned(),
        source: e,
    }
}

/// Lists every ordinary and partitioned table outside the system schemas (and pgferry's and
/// Bucardo's own), with its key.
pub async fn user_tables(
    client: &impl GenericClient,
    server_version: u32,
    target: &str,
) -> Result<Vec<TableInfo>, Error> {
    let sql = format!(
        "SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text,
                pg_catalog.pg_get_userbyid(c.relowner)::text,
                pg_catalog.has_table_privilege(c.oid, 'TRIGGER'),
                EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
                          AND d.objid = c.oid AND d.deptype = 'e'),
                i.inhparent, pn.nspname::text, pc.relname::text,
                NOT c.relispartition AND (c.relhassubclass AND c.relkind = 'r'
                    OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits ih WHERE ih.inhrelid = c.oid))
           FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           LEFT JOIN pg_catalog.pg_inherits i ON i.inhrelid = c.oid AND c.relispartition
           LEFT JOIN pg_catalog.pg_class pc ON pc.oid = i.inhparent
           LEFT JOIN pg_catalog.pg_namespace pn ON pn.oid = pc.relnamespace
          WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS_SQL}
          ORDER BY 2, 3"
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| q("listing tables", target, e))?;
    let mut tables: Vec<TableInfo> = rows
        .iter()
        .map(|r| {
            let parent = match (r.get::<_, Option<String>>(8), r.get::<_, Option<String>>(9)) {
                (Some(s), Some(t)) => Some(QualifiedName::new(s, t)),
                _ => None,
            };
            TableInfo {
                oid: r.get(0),
                name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                kind: if r.get::<_, String>(3) == "p" {
                    TableKind::Partitioned
                } else {
                    TableKind::Ordinary
                },
                parent,
                parent_oid: r.get(7),
                key: None,
                key_problem: None,
                owner: r.get(4),
                can_trigger: r.get(5),
                extension_member: r.get(6),
                inheritance: r.get(10),
            }
        })
        .collect();

    // Candidate key indexes: primary first, then unique non-partial, non-expression, valid,
    // immediate indexes; one row per key column.
    let nkey = if server_version >= 110000 {
        "x.indnkeyatts"
    } else {
        "x.indnatts"
    };
    let sql = format!(
        "SELECT x.indrelid, ic.relname::text, x.indisprimary, k.ord::int4, a.attname::text,
                pg_catalog.format_type(a.atttypid, a.atttypmod), bt.typname::text,
                bt.typcategory::text, a.attnotnull
           FROM pg_catalog.pg_index x
           JOIN pg_catalog.pg_class c ON c.oid = x.indrelid
           JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
           CROSS JOIN LATERAL pg_catalog.unnest(x.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
           JOIN pg_catalog.pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
           JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
           JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
          WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS_SQL}
            AND (x.indisprimary OR x.indisunique) AND x.indpred IS NULL AND x.indexprs IS NULL
            AND x.indisvalid AND x.indimmediate AND k.ord <= {nkey}
          ORDER BY 1, 3 DESC, 2, 4"
    );
    let path = set_search_path(client, "pg_catalog", target).await?;
    // On an error the transaction is aborted anyway: nothing to restore.
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| q("reading keys", target, e))?;
    set_search_path(client, &path, target).await?;
    // (table oid, index name) -> (primary, all not null, columns, problem)
    type Candidate = (bool, bool, Vec<KeyColumn>, Option<String>);
    let mut candidates: HashMap<Oid, Vec<(String, Candidate)>> = HashMap::new();
    for r in &rows {
        let table: Oid = r.get(0);
        let index: String = r.get(1);
        let list = candidates.entry(table).or_default();
        if list.last().map(|(n, _)| n != &index).unwrap_or(true) {
            list.push((index.clone(), (r.get(2), true, Vec::new(), None)));
        }
        let cand = &mut list.last_mut().expect("pushed").1;
        let col: String = r.get(4);
        let base: String = r.get(6);
        let category: String = r.get(7);
        let not_null: bool = r.get(8);
        cand.1 &= not_null;
        let sql_type: String = r.get(5);
        match KeyForm::for_type(&base, &category) {
            Ok(form) => cand.2.push(KeyColumn {
                name: Ident::new(col),
                sql_type,
                form,
            }),
            Err(why) => {
                cand.3.get_or_insert_with(|| {
                    format!(
                        "key column {} is of type {sql_type}: {why}",
                        Ident::new(col)
                    )
                });
            }
        }
    }
    for t in &mut tables {
        let Some(list) = candidates.remove(&t.oid) else {
            continue;
        };
        // Usable: primary key, or unique over NOT NULL columns. Prefer primary, then fewest
        // columns, then index name (the query's order gives primary first).
        let mut usable: Vec<&(String, Candidate)> =
            list.iter().filter(|(_, c)| c.0 || c.1).collect();
        usable
            .sort_by_key(|(name, c)| (!c.0, c.2.len() + usize::from(c.3.is_some()), name.clone()));
        if let Some((name, c)) = usable.iter().find(|(_, c)| c.3.is_none()) {
            t.key = Some(Key {
                index: Ident::new(name.clone()),
                primary: c.0,
                columns: c.2.clone(),
            });
        } else if let Some((_, c)) = usable.first() {
            t.key_problem = c.3.clone();
        }
    }
    Ok(tables)
}

/// A column of a user table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ColumnInfo {
    pub name: Ident,
    /// `format_type()` of the column, for messages.
    pub sql_type: String,
    /// `pg_type.typname` of the column's type, or of its base type for a domain.
    pub base_type: String,
}

/// The columns of `table` (neither dropped nor system columns), in the table's column order;
/// empty when there is no such table.
pub async fn table_columns(
    client: &impl GenericClient,
    table: &QualifiedName,
    target: &str,
) -> Result<Vec<ColumnInfo>, Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), bt.typname::text
               FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
               JOIN pg_catalog.pg_type bt ON bt.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
            &[&table.schema.as_str(), &table.name.as_str()],
        )
        .await
        .map_err(|e| q("reading columns", target, e))?;
    Ok(rows
        .iter()
        .map(|r| ColumnInfo {
            name: Ident::new(r.get::<_, String>(0)),
            sql_type: r.get(1),
            base_type: r.get(2),
        })
        .collect())
}

/// A sequence used by a table: owned by one of its columns (serial, identity) or named in a
/// column default.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SequenceUse {
    pub sequence: QualifiedName,
    pub table: QualifiedName,
}

/// Every sequence used by a user table.
pub async fn table_sequences(
    client: &impl GenericClient,
    target: &str,
) -> Result<Vec<SequenceUse>, Error> {
    let sql = "SELECT DISTINCT sn.nspname::text, s.relname::text, tn.nspname::text, t.relname::text
           FROM pg_catalog.pg_depend d
           JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
           JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
           JOIN pg_catalog.pg_class t ON t.oid = d.refobjid
           JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
          WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
            AND d.deptype IN ('a', 'i')
         UNION
         SELECT sn.nspname::text, s.relname::text, tn.nspname::text, t.relname::text
           FROM pg_catalog.pg_attrdef ad
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
                AND d.objid = ad.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
           JOIN pg_catalog.pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
           JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
           JOIN pg_catalog.pg_class t ON t.oid = ad.adrelid
           JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
          ORDER BY 1, 2, 3, 4";
    let rows = client
        .query(sql, &[])
        .await
        .map_err(|e| q("listing sequences", target, e))?;
    Ok(rows
        .iter()
        .map(|r| SequenceUse {
            sequence: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            table: QualifiedName::new(r.get::<_, String>(2), r.get::<_, String>(3)),
        })
        .collect())
}

/// A trigger on a user table.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TriggerInfo {
    pub table: QualifiedName,
    pub trigger: Ident,
    pub function: QualifiedName,
}

/// Non-internal triggers whose function lives in `function_schema` and whose name matches one
/// of the `LIKE` patterns.
pub async fn triggers_calling(
    client: &impl GenericClient,
    function_schema: &str,
    name_patterns: &[&str],
    target: &str,
) -> Result<Vec<TriggerInfo>, Error> {
    let patterns: Vec<String> = name_patterns.iter().map(|s| (*s).to_owned()).collect();
    // A partition's clone of a parent's row trigger has tgparentid (13+) or is internal (11, 12);
    // dropping the parent's trigger drops the clones, so clones are left out.
    let rows = client
        .query(
            "SELECT tn.nspname::text, c.relname::text, tg.tgname::text, fn.nspname::text, p.proname::text
               FROM pg_catalog.pg_trigger tg
               JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
               JOIN pg_catalog.pg_namespace tn ON tn.oid = c.relnamespace
               JOIN pg_catalog.pg_proc p ON p.oid = tg.tgfoid
               JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
              WHERE NOT tg.tgisinternal AND fn.nspname = $1
                AND tg.tgname::text LIKE ANY ($2)
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                                 WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass
                                   AND d.objid = tg.oid AND d.deptype = 'P'
                                   AND d.refclassid = 'pg_catalog.pg_trigger'::pg_catalog.regclass)
              ORDER BY 1, 2, 3",
            &[&function_schema, &patterns],
        )
        .await
        .map_err(|e| q("listing triggers", target, e))?;
    Ok(rows
        .iter()
        .map(|r| TriggerInfo {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            trigger: Ident::new(r.get::<_, String>(2)),
            function: QualifiedName::new(r.get::<_, String>(3), r.get::<_, String>(4)),
        })
        .collect())
}

/// Objects outside `schema` that depend on objects inside it (views over its tables, a user's
/// trigger calling one of its functions), described by `pg_describe_object`. Triggers whose name
/// matches one of `own_triggers` (SQL `LIKE`) are the schema's own and left out.
pub async fn external_dependents(
    client: &impl GenericClient,
    schema: &str,
    own_triggers: &[&str],
    target: &str,
) -> Result<Vec<String>, Error> {
    let own: Vec<String> = own_triggers.iter().map(|s| (*s).to_owned()).collect();
    let rows = client
        .query(
            "WITH inside AS (
                 SELECT 'pg_catalog.pg_class'::pg_catalog.regclass AS classid, c.oid
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = $1
                 UNION ALL
                 SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass, p.oid
                   FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                  WHERE n.nspname = $1
                 UNION ALL
                 SELECT 'pg_catalog.pg_type'::pg_catalog.regclass, t.oid
                   FROM pg_catalog.pg_type t JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace
                  WHERE n.nspname = $1)
             SELECT DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid)
               FROM pg_catalog.pg_depend d
               JOIN inside i ON i.classid = d.refclassid AND i.oid = d.refobjid
              WHERE d.deptype IN ('n', 'a')
                AND NOT (d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND EXISTS (
                        SELECT 1 FROM pg_catalog.pg_trigger tg
                          JOIN pg_catalog.pg_class tc ON tc.oid = tg.tgrelid
                          JOIN pg_catalog.pg_namespace tn ON tn.oid = tc.relnamespace
                         WHERE tg.oid = d.objid AND (tg.tgname::text LIKE ANY ($2) OR tn.nspname = $1)))
                AND NOT EXISTS (SELECT 1 FROM inside j WHERE j.classid = d.classid AND j.oid = d.objid)
                AND NOT (d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND EXISTS (
                        SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                         WHERE c.oid = d.objid AND n.nspname = $1))
                AND NOT (d.classid IN ('pg_catalog.pg_attrdef'::pg_catalog.regclass,
                                       'pg_catalog.pg_constraint'::pg_catalog.regclass,
                                       'pg_catalog.pg_rewrite'::pg_catalog.regclass,
                                       'pg_catalog.pg_index'::pg_catalog.regclass)
                         AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend o
                                      JOIN inside k ON k.classid = o.refclassid AND k.oid = o.refobjid
                                     WHERE o.classid = d.classid AND o.objid = d.objid AND o.deptype IN ('a','i')))
              ORDER BY 1",
            &[&schema, &own],
        )
        .await
        .map_err(|e| q("reading dependencies", target, e))?;
    Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
}

/// Whether a schema exists.
pub async fn schema_exists(
    client: &impl GenericClient,
    schema: &str,
    target: &str,
) -> Result<bool, Error> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .map_err(|e| q("looking for a schema", target, e))?;
    Ok(row.get(0))
}

/// Sets `search_path` for the rest of the current transaction and returns the previous value.
///
/// `format_type()` leaves out the schema of a type visible on the session's `search_path`, so
/// the same column reads `mood` on one session and `app.mood` on another. Catalog reads that
/// record or compare type names run with `search_path = pg_catalog`, where every type outside
/// `pg_catalog` is printed schema-qualified, the same everywhere.
pub async fn set_search_path(
    client: &impl GenericClient,
    path: &str,
    target: &str,
) -> Result<String, Error> {
    let old: String = client
        .query_one("SELECT pg_catalog.current_setting('search_path')", &[])
        .await
        .map_err(|e| q("reading search_path", target, e))?
        .get(0);
    client
        .execute(
            "SELECT pg_catalog.set_config('search_path', $1, true)",
            &[&path],
        )
        .await
        .map_err(|e| q("setting search_path", target, e))?;
    Ok(old)
}
