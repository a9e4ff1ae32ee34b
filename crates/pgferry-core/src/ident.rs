//! Identifiers that reach SQL.
//!
//! Every schema, table, column, function or trigger name that pgferry puts into a SQL text goes
//! through [`Ident`] or [`QualifiedName`], whose `Display` quotes it. There is no other way to put
//! a name into SQL in this code base: a hostile name (quotes, spaces, upper case, reserved words,
//! multibyte characters) is just a name.

use std::fmt;

use postgres_protocol::escape::{escape_identifier, escape_literal};
use serde::Serialize;

/// The longest identifier PostgreSQL keeps, in bytes (`NAMEDATALEN - 1`).
pub const MAX_IDENT_BYTES: usize = 63;

/// One SQL identifier, stored unquoted; `Display` writes it quoted.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Ident(String);

impl Ident {
    /// Wraps a name as PostgreSQL stores it (already case-folded, unquoted).
    pub fn new(name: impl Into<String>) -> Self {
        Ident(name.into())
    }

    /// The name as stored in the catalog.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name for people to read: bare when it is a plain lower-case name, quoted otherwise.
    /// For messages only; SQL always uses the quoted `Display` form.
    pub fn human(&self) -> String {
        let plain = self
            .0
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && self
                .0
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if plain {
            self.0.clone()
        } else {
            self.to_string()
        }
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_identifier(&self.0))
    }
}

impl From<&str> for Ident {
    fn from(s: &str) -> Self {
        Ident::new(s)
    }
}

impl From<String> for Ident {
    fn from(s: String) -> Self {
        Ident(s)
    }
}

/// `schema.name`, each part quoted on display.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct QualifiedName {
    pub schema: Ident,
    pub name: Ident,
}

impl QualifiedName {
    pub fn new(schema: impl Into<Ident>, name: impl Into<Ident>) -> Self {
        QualifiedName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// `schema.name` for people to read (see [`Ident::human`]).
    pub fn human(&self) -> String {
        format!("{}.{}", self.schema.human(), self.name.human())
    }

    /// The name as a SQL string literal, e.g. for `'…'::regclass`.
    pub fn literal(&self) -> String {
        escape_literal(&self.to_string())
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// Why [`split_dotted`] refused a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DottedError {
    /// White space outside double quotes.
    UnquotedWhiteSpace,
    /// A double quote opened and never closed.
    UnterminatedQuote,
}

/// A dotted name (`schema.table`, `"My Schema".t.col`) split into its parts the way SQL reads
/// identifiers: unquoted letters fold to lower case, a double-quoted run is taken literally
/// (`""` inside it is one quote), unquoted white space is refused. Each character comes with
/// whether it was quoted, for callers giving some unquoted characters a meaning (`*` in
/// table patterns). Parts may be empty: what an empty part means is the caller's to say.
pub fn split_dotted(text: &str) -> Result<Vec<Vec<(char, bool)>>, DottedError> {
    let mut parts: Vec<Vec<(char, bool)>> = vec![Vec::new()];
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        let cur = parts.last_mut().expect("one part at least");
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push(('"', true));
                } else {
                    quoted = false;
                }
            } else {
                cur.push((c, true));
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '.' => parts.push(Vec::new()),
            c if c.is_whitespace() => return Err(DottedError::UnquotedWhiteSpace),
            c => cur.extend(c.to_lowercase().map(|l| (l, false))),
        }
    }
    if quoted {
        return Err(DottedError::UnterminatedQuote);
    }
    Ok(parts)
}

/// A SQL string literal (`'…'`, `E'…'` where needed), for the few places where a value cannot be
/// a bound parameter: DDL, and function bodies generated at install time.
pub fn literal(value: &str) -> String {
    escape_literal(value)
}

/// A `text[]` value as a SQL constant (`'{"a","b",NULL}'::pg_catalog.text[]`), for a statement
/// that cannot take bound parameters: `COPY (query) TO STDOUT`. Every element is double-quoted
/// with its backslashes and double quotes escaped (array input syntax), `None` is an unquoted
/// `NULL`, and the whole goes through [`literal`].
pub fn text_array_literal(values: &[Option<String>]) -> String {
    let mut array =
        String::with_capacity(2 + values.iter().flatten().map(|v| v.len() + 3).sum::<usize>());
    array.push('{');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            array.push(',');
        }
        match v {
            None => array.push_str("NULL"),
            Some(v) => {
                array.push('"');
                for c in v.chars() {
                    if c == '"' || c == '\\' {
                        array.push('\\');
                    }
                    array.push(c);
                }
                array.push('"');
            }
        }
    }
    array.push('}');
    format!("{}::pg_catalog.text[]", escape_literal(&array))
}

/// Truncates `s` to at most `max` bytes without splitting a character.
pub fn truncate_bytes(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A stable 64-bit hash (FNV-1a) of a text: the same on every machine and every release, so that
/// generated names survive dumps, restores and upgrades (OIDs do not).
pub fn stable_hash(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A generated object name: `prefix`, a readable part of `readable`, and a stable hash of
/// `hashed`; at most 63 bytes and never split inside a character.
pub fn generated_name(prefix: &str, readable: &str, hashed: &str) -> Ident {
    let hash = format!("{:016x}", stable_hash(hashed));
    let room = MAX_IDENT_BYTES - prefix.len() - hash.len() - 1;
    let readable: String = readable
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { '_' })
        .collect();
    let part = truncate_bytes(&readable, room);
    Ident::new(format!("{prefix}{part}_{hash}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quotes_hostile_names() {
        assert_eq!(Ident::new("a\"b").to_string(), "\"a\"\"b\"");
        let q = QualifiedName::new("My Schema", "select");
        assert_eq!(q.to_string(), "\"My Schema\".\"select\"");
        assert_eq!(q.literal(), "'\"My Schema\".\"select\"'");
        assert_eq!(q.human(), "\"My Schema\".select");
        assert_eq!(QualifiedName::new("public", "t*").human(), "public.\"t*\"");
    }

    proptest! {
        #[test]
        fn quoting_round_trips(name in "\\PC{0,40}") {
            let quoted = Ident::new(name.clone()).to_string();
            prop_assert!(quoted.starts_with('"') && quoted.ends_with('"'));
            let inner = &quoted[1..quoted.len() - 1];
            prop_assert_eq!(inner.replace("\"\"", "\""), name);
        }

        #[test]
        fn text_array_literals_round_trip(values in proptest::collection::vec(proptest::option::of("\\PC{0,12}"), 0..6)) {
            // Undo the SQL string literal (escape_literal: `'…'`, or ` E'…'` with doubled
            // backslashes), then parse the array input syntax back.
            let sql = text_array_literal(&values);
            let body = sql.strip_suffix("::pg_catalog.text[]").unwrap().trim_start();
            let (body, backslashes) = match body.strip_prefix('E') {
                Some(b) => (b, true),
                None => (body, false),
            };
            let mut text = body[1..body.len() - 1].replace("''", "'");
            if backslashes {
                text = text.replace("\\\\", "\\");
            }
            let braced = text.starts_with('{') && text.ends_with('}');
            prop_assert!(braced, "not an array: {}", text);
            let mut parsed: Vec<Option<String>> = Vec::new();
            let mut chars = text[1..text.len() - 1].chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '"' => {
                        let mut v = String::new();
                        loop {
                            match chars.next().unwrap() {
                                '\\' => v.push(chars.next().unwrap()),
                                '"' => break,
                                c => v.push(c),
                            }
                        }
                        parsed.push(Some(v));
                    }
                    'N' => {
                        for expected in "ULL".chars() {
                            prop_assert_eq!(chars.next(), Some(expected));
                        }
                        parsed.push(None);
                    }
                    ',' => {}
                    c => prop_assert!(false, "unexpected {:?}", c),
                }
            }
            prop_assert_eq!(parsed, values);
        }

        #[test]
        fn generated_names_fit(prefix in "[a-z_]{1,10}", name in "\\PC{0,80}") {
            let n = generated_name(&prefix, &name, &name);
            prop_assert!(n.as_str().len() <= MAX_IDENT_BYTES);
            prop_assert!(n.as_str().starts_with(&prefix));
            prop_assert_eq!(n.clone(), generated_name(&prefix, &name, &name));
        }
    }
}
