//! The source's registry of captured tables and sequences, as the sync engine needs it.

use pgferry_core::artifact::KeyForm;
use pgferry_core::{Ident, QualifiedName};
use tokio_postgres::GenericClient;

/// A captured table and how its keys are recorded.
#[derive(Clone, Debug)]
pub struct CapturedTable {
    pub table_id: i32,
    pub name: QualifiedName,
    /// Key columns: name, SQL type (`format_type`), text form in the capture.
    pub key: Vec<(Ident, String, KeyForm)>,
}

impl CapturedTable {
    /// The recorded `column` (`key` or `old_key`) turned back into typed key values.
    pub fn restore(&self, column: &str) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, (c, ty, form))| {
                format!(
                    "{} AS {c}",
                    form.restore_expr(&format!("{column}[{}]", i + 1), ty)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub async fn captured_tables(
    client: &impl GenericClient,
    target: &str,
) -> Result<Vec<CapturedTable>, pgferry_core::Error> {
    let rows = client
        .query(
            "SELECT table_id, schema_name, table_name, key_columns, key_types, key_forms
               FROM pgferry.captured_table ORDER BY table_id",
            &[],
        )
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
