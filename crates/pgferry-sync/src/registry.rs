//! The source's registry of captured tables and sequences, as the sync engine needs it.

use pgferry_core::artifact::{delta_columns_expr, KeyForm};
use pgferry_core::{Ident, QualifiedName};
use tokio_postgres::GenericClient;

/// A key as the capture records it: one text per key column, in its `KeyForm`.
pub type Key = Vec<Option<String>>;

/// A captured table and how its keys are recorded.
#[derive(Clone, Debug)]
pub struct CapturedTable {
    pub table_id: i32,
    pub name: QualifiedName,
    /// Key columns: name, SQL type (`format_type`), text form in the capture.
    pub key: Vec<(Ident, String, KeyForm)>,
    /// Delta columns (two-way syncs: they merge instead of overwriting), in the order of the
    /// `numeric[]` values `pgferry.delta.delta_old` and `delta_new` hold for this table's
    /// capture rows; empty for most tables, and on a source installed before delta columns
    /// existed. See `pgferry_install::DeltaColumn`.
    // Read by the two-way merge in `conflict`, which lands separately.
    pub delta_columns: Vec<Ident>,
}

impl CapturedTable {
    /// The recorded `column` (`key` or `old_key`, a `text[]`) turned back into typed key
    /// values, one output column per key column, named as the key column.
    pub fn restore(&self, column: &str) -> String {
        self.restore_each(|i| format!("{column}[{}]", i + 1))
    }

    /// Typed key values from one text expression per key column (`text(i)` for the i-th,
    /// counted from 0), each named as its key column.
    fn restore_each(&self, text: impl Fn(usize) -> String) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, (c, ty, form))| format!("{} AS {c}", form.restore_expr(&text(i), ty)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The query listing this table's pending key images among the capture rows `d` that
    /// match `pending` (`round::pending_condition`): the key of every change but
    /// TRUNCATEs, and the old key of every key change. Not deduplicated (a key changed twice
    /// comes twice: deduplicating on the source costs more than the duplicates do). `typed`:
    /// the key columns restored to their types; otherwise the recorded `text[]`, one column.
    pub fn pending_keys(&self, pending: &str, typed: bool) -> String {
        let (new, old) = if typed {
            (self.restore("d.key"), self.restore("d.old_key"))
        } else {
            ("d.key".to_owned(), "d.old_key".to_owned())
        };
        let id = self.table_id;
        format!(
            "SELECT {new} FROM pgferry.delta d WHERE {pending} AND d.table_id = {id} AND d.op <> 'T'
             UNION ALL
             SELECT {old} FROM pgferry.delta d WHERE {pending} AND d.table_id = {id} AND d.old_key IS NOT NULL"
        )
    }

    /// [`Self::pending_keys`] (untyped) of several tables at once, in one scan of the capture
    /// table: rows of a key's `text[]` and its table's id; `$1` the tables' ids (`int4[]`).
    pub fn pending_keys_of_tables(pending: &str) -> String {
        format!(
            "SELECT k.key, d.table_id FROM pgferry.delta d
               CROSS JOIN LATERAL (VALUES (CASE WHEN d.op <> 'T' THEN d.key END), (d.old_key)) AS k (key)
              WHERE {pending} AND d.table_id = ANY($1) AND k.key IS NOT NULL"
        )
    }

    /// Recorded keys (rows whose first column is a key's `text[]`, as [`Self::pending_keys`]
    /// returns untyped) split into one list per key column: the parameters of
    /// [`Self::keys_from_params`].
    pub fn key_params(&self, rows: &[tokio_postgres::Row]) -> Vec<Vec<Option<String>>> {
        let keys: Vec<Key> = rows.iter().map(|r| r.get(0)).collect();
        self.key_columns(&keys)
    }

    /// Recorded keys split into one list per key column: the parameters of
    /// [`Self::keys_from_params`].
    pub fn key_columns(&self, keys: &[Key]) -> Vec<Vec<Option<String>>> {
        let mut values: Vec<Vec<Option<String>>> =
            vec![Vec::with_capacity(keys.len()); self.key.len()];
        for key in keys {
            for (i, column) in values.iter_mut().enumerate() {
                column.push(key.get(i).cloned().flatten());
            }
        }
        values
    }

    /// A query of typed keys from [`Self::key_params`] bound as `$1`, `$2`, … (one `text[]`
    /// per key column), each output column named as its key column.
    pub fn keys_from_params(&self) -> String {
        self.keys_from(|i| format!("${}::text[]", i + 1))
    }

    /// [`Self::keys_from_params`] with the values written into the query as constants, for a
    /// statement that takes no parameters (`COPY (query) TO STDOUT`).
    pub fn keys_from_literals(&self, values: &[Vec<Option<String>>]) -> String {
        self.keys_from(|i| pgferry_core::ident::text_array_literal(&values[i]))
    }

    /// The typed keys of one `text[]` expression per key column (`array(i)`, counted from 0).
    fn keys_from(&self, array: impl Fn(usize) -> String) -> String {
        let n = self.key.len();
        // Schema-qualified, a multi-argument unnest must be spelled as ROWS FROM of one-argument
        // unnests (`pg_catalog.unnest(a, b)` exists only as the FROM-clause special form).
        let unnests: Vec<String> = (0..n)
            .map(|i| format!("pg_catalog.unnest({})", array(i)))
            .collect();
        let names: Vec<String> = (0..n).map(|i| format!("k{i}")).collect();
        format!(
            "SELECT {} FROM ROWS FROM ({}) AS u({})",
            self.restore_each(|i| format!("u.k{i}")),
            unnests.join(", "),
            names.join(", ")
        )
    }
}

pub async fn captured_tables(
    client: &impl GenericClient,
    target: &str,
) -> Result<Vec<CapturedTable>, pgferry_core::Error> {
    let sql = format!(
        "SELECT c.table_id, c.schema_name, c.table_name, c.key_columns, c.key_types, c.key_forms, {}
           FROM pgferry.captured_table c ORDER BY c.table_id",
        delta_columns_expr("c")
    );
    let rows = client
        .query(&sql, &[])
        .await
        .map_err(|e| pgferry_core::Error::Query {
            context: "reading pgferry.captured_table".into(),
            target: target.to_owned(),
            source: e,
        })?;
    Ok(rows
        .iter()
        .map(|r| CapturedTable {
            table_id: r.get(0),
            name: QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
            key: r
                .get::<_, Vec<String>>(3)
                .into_iter()
                .zip(r.get::<_, Vec<String>>(4))
                .zip(r.get::<_, Vec<String>>(5))
                .map(|((c, t), f)| {
                    (
                        Ident::new(c),
                        t,
                        KeyForm::parse(&f).unwrap_or(KeyForm::Text),
                    )
                })
                .collect(),
            delta_columns: r
                .get::<_, Vec<String>>(6)
                .into_iter()
                .map(Ident::new)
                .collect(),
        })
        .collect())
}

/// A registered sequence and the captured table it belongs to.
#[derive(Clone, Debug)]
pub struct CapturedSequence {
    pub name: QualifiedName,
    pub table_id: i32,
}

/// Registered sequences.
pub async fn captured_sequences(
    client: &impl GenericClient,
    target: &str,
) -> Result<Vec<CapturedSequence>, pgferry_core::Error> {
    let rows = client
        .query(
            "SELECT schema_name, sequence_name, table_id FROM pgferry.captured_sequence ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| pgferry_core::Error::Query {
            context: "reading pgferry.captured_sequence".into(),
            target: target.to_owned(),
            source: e,
        })?;
    Ok(rows
        .iter()
        .map(|r| CapturedSequence {
            name: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            table_id: r.get(2),
        })
        .collect())
}
