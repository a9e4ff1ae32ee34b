//! Delta columns: columns of a two-way sync that merge instead of overwriting. When two nodes
//! changed one since they last exchanged changes, the result is local + (remote new − remote
//! old), so two concurrent withdrawals on two nodes both count.
//!
//! The capture records, for such columns only, their values before and after each change
//! (`pgferry.delta.delta_old` / `delta_new`, `numeric[]` aligned with
//! `pgferry.captured_table.delta_columns`; see `sql/delta_columns.sql`). A table with delta
//! columns is captured by a row-level trigger whatever its kind: statement-level transition
//! tables hold the old and the new rows as two sets, which cannot be paired once an UPDATE
//! changes keys. Tables without delta columns keep their capture exactly as it was.

use std::fmt;

use pgferry_core::ident::{split_dotted, DottedError};
use pgferry_core::{Ident, QualifiedName};
use serde::Serialize;

/// A column declared as a delta column: `SCHEMA.TABLE.COLUMN`, or `TABLE.COLUMN` in schema
/// `public`. Names are read as SQL reads identifiers: unquoted letters fold to lower case,
/// double-quoted parts are literal (`"My Schema"."Acct"."Balance"`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DeltaColumn {
    pub table: QualifiedName,
    pub column: Ident,
}

impl DeltaColumn {
    pub fn parse(text: &str) -> Result<DeltaColumn, String> {
        let bad = |reason: &str| format!("delta column {text:?}: {reason}");
        let parts: Vec<String> = split_dotted(text)
            .map_err(|e| {
                bad(match e {
                    DottedError::UnquotedWhiteSpace => {
                        "unquoted white space; quote the name (\"my column\")"
                    }
                    DottedError::UnterminatedQuote => "unterminated double quote",
                })
            })?
            .into_iter()
            .map(|part| part.into_iter().map(|(c, _)| c).collect())
            .collect();
        if parts.iter().any(String::is_empty) {
            return Err(bad("empty name; write SCHEMA.TABLE.COLUMN or TABLE.COLUMN"));
        }
        let mut parts = parts.into_iter();
        let (schema, table, column) =
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(t), Some(c), None, None) => ("public".to_owned(), t, c),
                (Some(s), Some(t), Some(c), None) => (s, t, c),
                _ => return Err(bad(
                    "write SCHEMA.TABLE.COLUMN or TABLE.COLUMN (schema public); quote names that \
                     contain a dot (\"my.table\".col)",
                )),
            };
        Ok(DeltaColumn {
            table: QualifiedName::new(schema, table),
            column: Ident::new(column),
        })
    }

    /// `schema.table.column` for people to read.
    pub fn human(&self) -> String {
        format!("{}.{}", self.table.human(), self.column.human())
    }
}

impl fmt::Display for DeltaColumn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.human())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> (String, String, String) {
        let d = DeltaColumn::parse(text).unwrap();
        (
            d.table.schema.as_str().to_owned(),
            d.table.name.as_str().to_owned(),
            d.column.as_str().to_owned(),
        )
    }

    #[test]
    fn reads_names_as_sql_does() {
        assert_eq!(
            p("Acct.Balance"),
            ("public".into(), "acct".into(), "balance".into())
        );
        assert_eq!(p("s.t.c"), ("s".into(), "t".into(), "c".into()));
        assert_eq!(
            p("\"My.Schema\".\"T \"\"x\".\"Bal\""),
            ("My.Schema".into(), "T \"x".into(), "Bal".into())
        );
    }

    #[test]
    fn rejects_malformed_names() {
        for t in ["c", "a.b.c.d", "a..c", "\"open.c", "my table.c", "", "t."] {
            assert!(DeltaColumn::parse(t).is_err(), "{t}");
        }
    }
}
