//! Checking a target's tables against the source's before rows are copied.

use pgferry_core::Ident;
use tokio_postgres::Transaction;

use crate::registry::CapturedTable;
use crate::SyncError;

pub(crate) struct Column {
    name: String,
    /// For messages only (its text depends on the session's search_path).
    sql_type: String,
    /// What is compared: the type's schema and name and the modifier, the same on every
    /// server whatever its search_path.
    identity: (String, String, i32),
    generated: bool,
}

/// The columns of each of `tables` (quoted names), in one query whatever their number: a
/// round with several tables pays one catalog query, and its planning, per side. A table that
/// does not exist gets no columns.
pub(crate) async fn columns(
    tx: &Transaction<'_>,
    tables: &[String],
    server_version: u32,
    label: &str,
) -> Result<Vec<Vec<Column>>, SyncError> {
    let generated = if server_version >= 120000 {
        "a.attgenerated <> ''"
    } else {
        "false"
    };
    let rows = tx
        .query_typed(
            &format!(
                "SELECT u.i::int4, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                        n.nspname::text, ty.typname::text, a.atttypmod, {generated}
                   FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(name, i)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = pg_catalog.to_regclass(u.name)
                   JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
                   JOIN pg_catalog.pg_namespace n ON n.oid = ty.typnamespace
                  WHERE a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY u.i, a.attnum"
            ),
            &[(&tables, tokio_postgres::types::Type::TEXT_ARRAY)],
        )
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: format!("reading the columns of {}", tables.join(", ")),
                target: label.to_owned(),
                source: e,
            })
        })?;
    let mut out: Vec<Vec<Column>> = tables.iter().map(|_| Vec::new()).collect();
    for r in &rows {
        let i: i32 = r.get(0);
        out[i as usize - 1].push(Column {
            name: r.get(1),
            sql_type: r.get(2),
            identity: (r.get(3), r.get(4), r.get(5)),
            generated: r.get(6),
        });
    }
    Ok(out)
}

/// The columns to copy for `table`: every source column that is not generated (the target
/// computes its generated columns), after checking that the target has each, with the same
/// type. Errors name the table and the column.
pub(crate) async fn columns_to_copy(
    source: &Transaction<'_>,
    target: &Transaction<'_>,
    table: &CapturedTable,
    versions: (u32, u32),
    labels: (&str, &str),
) -> Result<Vec<Ident>, SyncError> {
    Ok(checked_columns(source, target, table, versions, labels)
        .await?
        .into_iter()
        .map(|c| c.name)
        .collect())
}

/// A column both sides have with the same type.
pub(crate) struct SharedColumn {
    pub name: Ident,
    /// The type's schema and name (`pg_catalog`, `float8`).
    pub type_schema: String,
    pub type_name: String,
}

/// [`columns_to_copy`], with each column's type.
pub(crate) async fn checked_columns(
    source: &Transaction<'_>,
    target: &Transaction<'_>,
    table: &CapturedTable,
    versions: (u32, u32),
    labels: (&str, &str),
) -> Result<Vec<SharedColumn>, SyncError> {
    let mut all = checked_columns_of(source, target, &[table], versions, labels).await?;
    Ok(all.pop().unwrap_or_default())
}

/// [`checked_columns`] for several tables at once (one catalog query per side), in the order
/// of `tables`.
async fn checked_columns_of(
    source: &Transaction<'_>,
    target: &Transaction<'_>,
    tables: &[&CapturedTable],
    versions: (u32, u32),
    labels: (&str, &str),
) -> Result<Vec<Vec<SharedColumn>>, SyncError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = tables.iter().map(|t| t.name.to_string()).collect();
    let (src, dst) = tokio::try_join!(
        columns(source, &names, versions.0, labels.0),
        columns(target, &names, versions.1, labels.1)
    )?;
    compare_all(tables, &src, &dst, labels.1)
}

/// [`checked_columns_of`] from the columns [`columns`] read on each side.
pub(crate) fn compare_all(
    tables: &[&CapturedTable],
    src: &[Vec<Column>],
    dst: &[Vec<Column>],
    target_label: &str,
) -> Result<Vec<Vec<SharedColumn>>, SyncError> {
    tables
        .iter()
        .zip(src.iter().zip(dst))
        .map(|(t, (s, d))| compare(t, s, d, target_label))
        .collect()
}

/// Checks that the target has every non-generated source column of `table` with the same type;
/// returns the columns to copy (those the target does not generate).
fn compare(
    table: &CapturedTable,
    src: &[Column],
    dst: &[Column],
    target_label: &str,
) -> Result<Vec<SharedColumn>, SyncError> {
    if dst.is_empty() {
        return Err(SyncError::MissingTable {
            table: table.name.human(),
            target: target_label.to_owned(),
        });
    }
    let mut out = Vec::new();
    for c in src.iter().filter(|c| !c.generated) {
        let Some(d) = dst.iter().find(|d| d.name == c.name) else {
            return Err(SyncError::MissingColumn {
                table: table.name.human(),
                column: Ident::new(c.name.clone()).human(),
                target: target_label.to_owned(),
            });
        };
        if d.identity != c.identity {
            return Err(SyncError::TypeMismatch {
                table: table.name.human(),
                column: Ident::new(c.name.clone()).human(),
                source_type: c.sql_type.clone(),
                target_type: d.sql_type.clone(),
                target: target_label.to_owned(),
            });
        }
        if !d.generated {
            out.push(SharedColumn {
                name: Ident::new(c.name.clone()),
                type_schema: c.identity.0.clone(),
                type_name: c.identity.1.clone(),
            });
        }
    }
    Ok(out)
}
