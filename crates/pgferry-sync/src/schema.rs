//! Checking a target's tables against the source's before rows are copied.

use pgferry_core::Ident;
use tokio_postgres::Transaction;

use crate::registry::CapturedTable;
use crate::SyncError;

struct Column {
    name: String,
    /// For messages only (its text depends on the session's search_path).
    sql_type: String,
    /// What is compared: the type's schema and name and the modifier, the same on every
    /// server whatever its search_path.
    identity: (String, String, i32),
    generated: bool,
}

async fn columns(
    tx: &Transaction<'_>,
    table: &str,
    server_version: u32,
    label: &str,
) -> Result<Vec<Column>, SyncError> {
    let generated = if server_version >= 120000 {
        "a.attgenerated <> ''"
    } else {
        "false"
    };
    let rows = tx
        .query(
            &format!(
                "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod),
                        n.nspname::text, ty.typname::text, a.atttypmod, {generated}
                   FROM pg_catalog.pg_attribute a
                   JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
                   JOIN pg_catalog.pg_namespace n ON n.oid = ty.typnamespace
                  WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum"
            ),
            &[&table],
        )
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: format!("reading the columns of {table}"),
                target: label.to_owned(),
                source: e,
            })
        })?;
    Ok(rows
        .iter()
        .map(|r| Column {
            name: r.get(0),
            sql_type: r.get(1),
            identity: (r.get(2), r.get(3), r.get(4)),
            generated: r.get(5),
        })
        .collect())
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
    let name = table.name.to_string();
    let (src, dst) = tokio::try_join!(
        columns(source, &name, versions.0, labels.0),
        columns(target, &name, versions.1, labels.1)
    )?;
    if dst.is_empty() {
        return Err(SyncError::MissingTable {
            table: table.name.human(),
            target: labels.1.to_owned(),
        });
    }
    let mut out = Vec::new();
    for c in src.iter().filter(|c| !c.generated) {
        let Some(d) = dst.iter().find(|d| d.name == c.name) else {
            return Err(SyncError::MissingColumn {
                table: table.name.human(),
                column: Ident::new(c.name.clone()).human(),
                target: labels.1.to_owned(),
            });
        };
        if d.identity != c.identity {
            return Err(SyncError::TypeMismatch {
                table: table.name.human(),
                column: Ident::new(c.name.clone()).human(),
                source_type: c.sql_type.clone(),
                target_type: d.sql_type.clone(),
                target: labels.1.to_owned(),
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
