//! Table patterns: `schema.table` with `*` (any run of characters) and `?` (one character).
//!
//! Parts are read the way SQL reads identifiers: unquoted letters fold to lower case, and a
//! double-quoted part is taken literally, so `"my.schema"."t*"` names the table `t*` in the
//! schema `my.schema`. A pattern without a dot matches the table name in every schema.

use std::fmt;

use crate::error::Error;
use crate::ident::DottedError;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Char(char),
    Star,
    One,
}

/// A parsed table pattern.
#[derive(Clone, PartialEq, Eq)]
pub struct TablePattern {
    text: String,
    schema: Vec<Tok>,
    table: Vec<Tok>,
}

impl fmt::Debug for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TablePattern({})", self.text)
    }
}

impl fmt::Display for TablePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TablePattern {
    pub fn parse(text: &str) -> Result<TablePattern, Error> {
        let bad = |reason: &str| Error::Pattern {
            pattern: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut parts: Vec<Vec<Tok>> = crate::ident::split_dotted(text)
            .map_err(|e| {
                bad(match e {
                    DottedError::UnquotedWhiteSpace => {
                        "unquoted white space; quote the name (\"my table\")"
                    }
                    DottedError::UnterminatedQuote => "unterminated double quote",
                })
            })?
            .into_iter()
            .map(|part| {
                part.into_iter()
                    .map(|(c, quoted)| match c {
                        '*' if !quoted => Tok::Star,
                        '?' if !quoted => Tok::One,
                        c => Tok::Char(c),
                    })
                    .collect()
            })
            .collect();
        let (schema, table) = match parts.len() {
            1 => (vec![Tok::Star], parts.pop().expect("one part")),
            2 => {
                let t = parts.pop().expect("two parts");
                (parts.pop().expect("two parts"), t)
            }
            _ => return Err(bad(
                "more than one unquoted '.'; quote names that contain a dot (\"my.schema\".table)",
            )),
        };
        if schema.is_empty() || table.is_empty() {
            return Err(bad("empty schema or table name"));
        }
        Ok(TablePattern {
            text: text.to_owned(),
            schema,
            table,
        })
    }

    /// Whether the pattern matches a table, given its names as stored in the catalog.
    pub fn matches(&self, schema: &str, table: &str) -> bool {
        glob(&self.schema, &schema.chars().collect::<Vec<_>>())
            && glob(&self.table, &table.chars().collect::<Vec<_>>())
    }
}

fn glob(p: &[Tok], s: &[char]) -> bool {
    // Iterative wildcard matching with backtracking to the last star.
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(Tok::Char(c)) if *c == s[si] => {
                pi += 1;
                si += 1;
            }
            Some(Tok::One) => {
                pi += 1;
                si += 1;
            }
            Some(Tok::Star) => {
                star = Some((pi, si));
                pi += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|t| *t == Tok::Star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str, t: &str) -> bool {
        TablePattern::parse(p).unwrap().matches(s, t)
    }

    #[test]
    fn globs_and_quotes() {
        assert!(m("public.*", "public", "orders"));
        assert!(m("Public.Ord*", "public", "orders"));
        assert!(!m("\"Public\".ord*", "public", "orders"));
        assert!(m("\"my.schema\".\"t*\"", "my.schema", "t*"));
        assert!(!m("\"my.schema\".\"t*\"", "my.schema", "tx"));
        assert!(m("orders", "sales", "orders"));
        assert!(m("*.o?ders", "x", "orders"));
        assert!(m("s.\"a\"\"b\"", "s", "a\"b"));
        assert!(m("s.*x*y", "s", "axbxy"));
        assert!(!m("s.*x*y", "s", "axbx"));
    }

    #[test]
    fn rejects_bad_patterns() {
        for p in ["a.b.c", "\"open", "", "a.", "my table"] {
            assert!(TablePattern::parse(p).is_err(), "{p}");
        }
    }
}
