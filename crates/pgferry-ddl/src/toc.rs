//! The table of contents of a pg_dump archive, and choosing entries from it.
//!
//! `pg_restore -l` lists one entry a line: `ID; CLASS OID DESC SCHEMA NAME OWNER`. Schema, name
//! and owner are printed raw, so a name with spaces cannot be told from its neighbours: entries
//! are therefore recognised by their first three fields only, the dump ID and the catalog
//! address (the `pg_class` OID of the catalog and the object's OID on the source), which
//! [`crate::selection`] decides about. Entries without a catalog address (comments, `OWNED BY`,
//! partition `ATTACH`es, grants) follow the entries they depend on: their dependencies are the
//! `-- Dependencies:` lines of `pg_restore --verbose`'s script, read only from the header that
//! follows a `-- TOC entry ID (class …` line of a listed entry, each ID at most once (a function
//! body that imitates a header makes the run fail, never choose differently).

use std::collections::{HashMap, HashSet};

use crate::DdlError;

/// One entry of an archive's table of contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u32,
    /// The catalog holding the object (`pg_class`'s OID of it), 0 for entries without one.
    pub class: u32,
    pub oid: u32,
    /// A sequence's `OWNED BY`, which depends on the sequence only but names its owning column.
    pub owned_by: bool,
}

fn unexpected(reason: String) -> DdlError {
    DdlError::UnexpectedOutput {
        tool: "pg_restore".to_owned(),
        reason,
    }
}

/// Parses `pg_restore -l` output.
pub fn parse_list(text: &str) -> Result<Vec<Entry>, DdlError> {
    let mut entries = Vec::new();
    for line in text.lines() {
        if line.starts_with(';') || line.trim().is_empty() {
            continue;
        }
        let bad = || unexpected(format!("a TOC line reads {line:?}"));
        let (id, rest) = line.split_once("; ").ok_or_else(bad)?;
        let mut fields = rest.splitn(3, ' ');
        let class = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let oid = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let desc = fields.next().ok_or_else(bad)?;
        entries.push(Entry {
            id: id.parse().map_err(|_| bad())?,
            class,
            oid,
            owned_by: class == 0 && desc.starts_with("SEQUENCE OWNED BY "),
        });
    }
    Ok(entries)
}

/// The dependencies of each entry, from the headers of `pg_restore --verbose`'s script.
pub fn parse_dependencies(
    script: &str,
    entries: &[Entry],
) -> Result<HashMap<u32, Vec<u32>>, DdlError> {
    let listed: HashMap<u32, &Entry> = entries.iter().map(|e| (e.id, e)).collect();
    let mut deps = HashMap::new();
    let mut seen = HashSet::new();
    let mut lines = script.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(header) = line.strip_prefix("-- TOC entry ") else {
            continue;
        };
        // `ID (class CLASS OID OID)`
        let parsed = header.split_once(" (class ").and_then(|(id, rest)| {
            let (class, oid) = rest.strip_suffix(')')?.split_once(" OID ")?;
            Some((
                id.parse::<u32>().ok()?,
                class.parse().ok()?,
                oid.parse().ok()?,
            ))
        });
        let Some((id, class, oid)) = parsed else {
            continue;
        };
        let Some(entry) = listed.get(&id).filter(|e| e.class == class && e.oid == oid) else {
            continue;
        };
        if !seen.insert(entry.id) {
            return Err(unexpected(format!(
                "entry {id} has two headers in its script (an object's text imitates one?)"
            )));
        }
        if let Some(list) = lines
            .peek()
            .and_then(|l| l.strip_prefix("-- Dependencies: "))
        {
            let ids = list
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .map_err(|_| unexpected(format!("dependencies of entry {id} read {list:?}")))?;
            deps.insert(id, ids);
        }
    }
    Ok(deps)
}

/// The entries to restore, in the archive's order: those with a catalog address that `keep`
/// accepts, then, without one, those whose dependencies are all chosen (at least one), except
/// an `OWNED BY` whose sequence `owner_kept` rejects (its owning table is not created).
pub fn choose(
    entries: &[Entry],
    deps: &HashMap<u32, Vec<u32>>,
    keep: impl Fn(u32, u32) -> bool,
    owner_kept: impl Fn(u32) -> bool,
) -> Vec<u32> {
    let by_id: HashMap<u32, &Entry> = entries.iter().map(|e| (e.id, e)).collect();
    let mut chosen: HashSet<u32> = entries
        .iter()
        .filter(|e| e.class != 0 && keep(e.class, e.oid))
        .map(|e| e.id)
        .collect();
    // Entries without an address may depend on each other: repeat until nothing changes.
    loop {
        let before = chosen.len();
        for e in entries.iter().filter(|e| e.class == 0) {
            let Some(d) = deps.get(&e.id).filter(|d| !d.is_empty()) else {
                continue;
            };
            if chosen.contains(&e.id) || !d.iter().all(|id| chosen.contains(id)) {
                continue;
            }
            if e.owned_by {
                let sequence = d
                    .iter()
                    .filter_map(|id| by_id.get(id))
                    .find(|s| s.class != 0);
                if !sequence.is_some_and(|s| owner_kept(s.oid)) {
                    continue;
                }
            }
            chosen.insert(e.id);
        }
        if chosen.len() == before {
            break;
        }
    }
    entries
        .iter()
        .filter(|e| chosen.contains(&e.id))
        .map(|e| e.id)
        .collect()
}

/// The list file for `pg_restore -L`: one chosen entry ID a line, in order.
pub fn list_file(ids: &[u32]) -> String {
    ids.iter().map(|id| format!("{id};\n")).collect()
}

/// Removes the `\restrict KEY` … `\unrestrict KEY` pair that pg_dump and pg_restore 17.6, 16.10,
/// 15.14, 14.19, 13.22 and later put around a script (psql meta-commands, which a server does
/// not take): the first line if it is `\restrict KEY`, and the last `\unrestrict KEY` line with
/// the same key, nothing else. Any other line starting with a backslash outside a statement is
/// not expected in a schema-only script and refused.
pub fn strip_restrict(script: &str) -> Result<String, DdlError> {
    let mut lines: Vec<&str> = script.lines().collect();
    let key = lines
        .iter()
        .position(|l| !l.trim().is_empty() && !l.starts_with("--"))
        .and_then(|i| {
            let key = lines[i].strip_prefix("\\restrict ")?.trim().to_owned();
            lines.remove(i);
            Some(key)
        });
    if let Some(key) = key {
        let end = format!("\\unrestrict {key}");
        let at = lines
            .iter()
            .rposition(|l| l.trim_end() == end)
            .ok_or_else(|| unexpected("\\restrict without its \\unrestrict".to_owned()))?;
        lines.remove(at);
    }
    if let Some(meta) = lines
        .iter()
        .find(|l| l.starts_with("\\connect") || l.starts_with("\\restrict"))
    {
        return Err(unexpected(format!(
            "a psql meta-command in the script: {meta}"
        )));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = ";
; Archive created at 2026-11-27 02:58:56 UTC
;
7; 2615 16385 SCHEMA - Sch\"ema. *x postgres
946; 1247 16540 TYPE app mood postgres
226; 1259 16551 SEQUENCE public customers_id_seq postgres
227; 1259 16552 TABLE public customers postgres
3676; 0 0 COMMENT public TABLE customers postgres
3678; 0 0 SEQUENCE OWNED BY public customers_id_seq postgres
233; 1259 16598 TABLE public notcap postgres
3399; 0 0 TABLE ATTACH public events_eu postgres
3472; 2606 16603 FK CONSTRAINT public notcap notcap_c_fkey postgres
";

    const VERBOSE: &str = "--
-- TOC entry 3676 (class 0 OID 0)
-- Dependencies: 227
-- Name: TABLE customers; Type: COMMENT; Schema: public; Owner: postgres
--

COMMENT ON TABLE public.customers IS 'the customers';

--
-- TOC entry 3678 (class 0 OID 0)
-- Dependencies: 226
--

--
-- TOC entry 3399 (class 0 OID 0)
-- Dependencies: 233 227
--
";

    #[test]
    fn entries_by_address_and_the_rest_by_dependencies() {
        let entries = parse_list(LIST).unwrap();
        assert_eq!(entries.len(), 9);
        assert_eq!(
            entries[1],
            Entry {
                id: 946,
                class: 1247,
                oid: 16540,
                owned_by: false
            }
        );
        assert!(entries[5].owned_by && !entries[1].owned_by);
        let deps = parse_dependencies(VERBOSE, &entries).unwrap();
        assert_eq!(deps[&3399], [233, 227]);
        let keep = |class: u32, oid: u32| class == 1259 && [16551, 16552].contains(&oid);
        // The comment follows its table; the ATTACH needs notcap too.
        assert_eq!(
            choose(&entries, &deps, keep, |_| true),
            [226, 227, 3676, 3678]
        );
        // An OWNED BY whose owning table is not created stays out.
        assert_eq!(choose(&entries, &deps, keep, |_| false), [226, 227, 3676]);
        assert_eq!(list_file(&[226, 227]), "226;\n227;\n");
    }

    #[test]
    fn an_imitated_header_fails_the_run() {
        let entries = parse_list(LIST).unwrap();
        let forged = format!("{VERBOSE}\n-- TOC entry 3399 (class 0 OID 0)\n-- Dependencies: 1\n");
        assert!(parse_dependencies(&forged, &entries).is_err());
        // A header of an entry not listed, or with another address, is not one.
        let other = "-- TOC entry 3399 (class 1259 OID 5)\n-- Dependencies: 1\n-- TOC entry 1 (class 0 OID 0)\n";
        assert!(parse_dependencies(other, &entries).unwrap().is_empty());
    }

    #[test]
    fn restrict_lines_are_removed_and_nothing_else() {
        let script = "--\n-- PostgreSQL database dump\n--\n\n\\restrict abc123\n\nSET x = 1;\nCREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$\nSELECT '\\unrestrict abc123'\n$$;\n\n\\unrestrict abc123\n";
        let out = strip_restrict(script).unwrap();
        assert!(!out.contains("\\restrict"), "{out}");
        assert!(out.contains("SELECT '\\unrestrict abc123'"), "{out}");
        assert!(!out.contains("\n\\unrestrict"), "{out}");
        // Older tools print none.
        assert_eq!(strip_restrict("SET x = 1;\n").unwrap(), "SET x = 1;\n");
        assert!(strip_restrict("\\connect db\nSET x = 1;\n").is_err());
    }
}
