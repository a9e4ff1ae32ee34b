//! What the captured tables need on a target, read from the source's catalog.
//!
//! The **tables** are the captured tables chosen, every partition below a chosen partitioned
//! table (their rows live there), and every table above a chosen one (a partition or an
//! inheritance child cannot exist without its parent; on PostgreSQL 10 the partitions are
//! captured, not their parent). The **sequences** are those the tables own (serial, identity),
//! those their column defaults name, and those registered in `pgferry.captured_sequence`.
//!
//! Attached to the tables are their indexes, constraints, column defaults, triggers (not
//! pgferry's nor Bucardo's: they call functions in schemas `pgferry` and `bucardo`), row
//! security policies and extended statistics. One of these that depends on a relation outside
//! the tables and sequences (a foreign key to a table that is not captured, a policy reading
//! another table) is **left out** and reported, rather than pulling that table in. Rules are
//! left out.
//!
//! Everything else is what those objects depend on, found by following `pg_depend` from them:
//! schemas, types, domains, enums, collations, functions (of defaults, checks and triggers) and
//! extensions (the objects an extension made lead to the extension). Only objects made after
//! `initdb` are followed (OIDs from 16384: the built-in ones exist everywhere), and never into
//! another table.
//!
//! Objects are named by their catalog address (catalog and OID) within one run: the same
//! addresses label pg_dump's archive entries (see [`crate::toc`]). Nothing keeps an OID.

use std::collections::{HashMap, HashSet};

use pgferry_core::{QualifiedName, Session};
use serde::Serialize;
use tokio_postgres::types::Oid;
use tokio_postgres::Transaction;

use crate::DdlError;

/// Why a table is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A captured table.
    Captured,
    /// A partition of a captured partitioned table.
    Partition,
    /// The parent of a captured partition or inheritance child.
    Parent,
}

/// A table to create.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedTable {
    #[serde(serialize_with = "human")]
    pub table: QualifiedName,
    pub role: Role,
}

fn human<S: serde::Serializer>(n: &QualifiedName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&n.human())
}

/// An object attached to the tables that is not created, and why.
#[derive(Clone, Debug, Serialize)]
pub struct LeftOut {
    /// As PostgreSQL describes it, e.g. `constraint orders_customer_fkey on table orders`.
    pub object: String,
    pub reason: String,
}

/// An object the tables need (beyond the tables and sequences themselves) that may already
/// exist on the target.
#[derive(Clone, Debug)]
pub struct Needed {
    pub class: Oid,
    pub oid: Oid,
    /// As PostgreSQL describes it: `schema app`, `type app.mood`, `function app.f(integer)`.
    pub describe: String,
    /// How to look it up on the target: a quoted qualified name (types, collations), a
    /// function signature with qualified argument types, or a plain name (schemas,
    /// extensions). None for other catalogs, which are never looked up.
    pub lookup: Option<(Lookup, String)>,
}

/// The kinds of objects looked up on the target before creating them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Schema,
    Type,
    Function,
    Collation,
    Extension,
}

impl Lookup {
    /// The word the plan's query and the target's lookup use for the kind.
    fn as_str(self) -> &'static str {
        match self {
            Lookup::Schema => "schema",
            Lookup::Type => "type",
            Lookup::Function => "function",
            Lookup::Collation => "collation",
            Lookup::Extension => "extension",
        }
    }

    fn parse(word: &str) -> Option<Lookup> {
        [
            Lookup::Schema,
            Lookup::Type,
            Lookup::Function,
            Lookup::Collation,
            Lookup::Extension,
        ]
        .into_iter()
        .find(|l| l.as_str() == word)
    }
}

/// Everything [`plan`] found.
#[derive(Debug, Default)]
pub struct Plan {
    pub tables: Vec<PlannedTable>,
    pub sequences: Vec<QualifiedName>,
    /// Captured tables of the registry that the source no longer has.
    pub missing: Vec<QualifiedName>,
    /// Catalog addresses of everything to create: tables, sequences, what is attached to the
    /// tables, and every object they depend on.
    pub keep: HashSet<(Oid, Oid)>,
    /// Objects in `keep` other than tables, sequences and what is attached to the tables.
    pub needed: Vec<Needed>,
    /// Sequences in `keep` owned by a column of a table that is not created.
    pub owned_elsewhere: HashSet<Oid>,
    pub left_out: Vec<LeftOut>,
}

/// The common part of every query: `sel` (the captured tables chosen, from `$1`/`$2`, schema
/// and name arrays), `tabs`, `seqs` (with `$3`/`$4`, the registered sequences), `inside`
/// (tables, sequences and the tables' indexes), `candidates` (those and the objects attached
/// to the tables), `outside_deps` (attached objects that need a relation outside: never a
/// table or sequence itself, which are always created), `seeds` and `closure`.
const CTES: &str = "
WITH RECURSIVE
sel AS (
    SELECT c.oid FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::text[])) AS s(sch, rel)
        ON n.nspname = s.sch AND c.relname = s.rel
     WHERE c.relkind IN ('r', 'p')),
down AS (
    SELECT oid FROM sel
    UNION
    SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down ON i.inhparent = down.oid
      JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
     WHERE c.relispartition),
up AS (
    SELECT oid FROM sel
    UNION
    SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid),
tabs AS (SELECT oid FROM down UNION SELECT oid FROM up),
seqs AS (
    SELECT d.objid AS oid FROM pg_catalog.pg_depend d
      JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
     WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.deptype IN ('a', 'i') AND d.refobjid IN (SELECT oid FROM tabs)
    UNION
    SELECT d.refobjid FROM pg_catalog.pg_attrdef ad
      JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
           AND d.objid = ad.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
      JOIN pg_catalog.pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
     WHERE ad.adrelid IN (SELECT oid FROM tabs)
    UNION
    SELECT c.oid FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
      JOIN ROWS FROM (pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::text[])) AS s(sch, rel)
        ON n.nspname = s.sch AND c.relname = s.rel
     WHERE c.relkind = 'S'),
inside AS (
    SELECT oid FROM tabs UNION SELECT oid FROM seqs
    UNION SELECT x.indexrelid FROM pg_catalog.pg_index x WHERE x.indrelid IN (SELECT oid FROM tabs)),
candidates(classid, objid) AS (
    SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, oid FROM inside
    UNION ALL
    SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass, co.oid FROM pg_catalog.pg_constraint co
     WHERE co.conrelid IN (SELECT oid FROM tabs)
    UNION ALL
    SELECT 'pg_catalog.pg_attrdef'::pg_catalog.regclass, ad.oid FROM pg_catalog.pg_attrdef ad
     WHERE ad.adrelid IN (SELECT oid FROM tabs)
    UNION ALL
    SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass, tg.oid FROM pg_catalog.pg_trigger tg
      JOIN pg_catalog.pg_proc p ON p.oid = tg.tgfoid
      JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace
     WHERE tg.tgrelid IN (SELECT oid FROM tabs) AND NOT tg.tgisinternal
       AND pn.nspname <> ALL (ARRAY['pgferry', 'bucardo'])
    UNION ALL
    SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass, po.oid FROM pg_catalog.pg_policy po
     WHERE po.polrelid IN (SELECT oid FROM tabs)
    UNION ALL
    SELECT 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass, st.oid FROM pg_catalog.pg_statistic_ext st
     WHERE st.stxrelid IN (SELECT oid FROM tabs)),
outside_deps AS (
    SELECT DISTINCT c.classid, c.objid, d.refobjid AS outside
      FROM candidates c
      JOIN pg_catalog.pg_depend d ON d.classid = c.classid AND d.objid = c.objid
     WHERE c.classid <> 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.deptype = 'n' AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refobjid NOT IN (SELECT oid FROM inside)
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = d.refobjid AND r.relkind <> 'c')),
seeds AS (
    SELECT classid, objid FROM candidates
    EXCEPT
    SELECT classid, objid FROM outside_deps),
closure(classid, objid) AS (
    SELECT classid, objid FROM seeds
    UNION
    SELECT d.refclassid, d.refobjid
      FROM closure k
      JOIN pg_catalog.pg_depend d ON d.classid = k.classid AND d.objid = k.objid
     WHERE d.deptype IN ('n', 'i', 'e') AND d.refobjid >= 16384
       AND (d.refclassid <> 'pg_catalog.pg_class'::pg_catalog.regclass
            OR d.refobjid IN (SELECT oid FROM inside)
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_class r WHERE r.oid = d.refobjid AND r.relkind = 'c')))
";

/// Reads the plan for `tables` (captured, chosen) and `sequences` (registered for them) in one
/// read-only transaction, with `search_path = pg_catalog` so that every name outside
/// `pg_catalog` comes out schema-qualified.
pub async fn plan(
    src: &mut Session,
    tables: &[QualifiedName],
    sequences: &[QualifiedName],
) -> Result<Plan, DdlError> {
    let label = src.target.clone();
    let tx = src
        .client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(|e| query_err(&label, "starting a read-only transaction", e))?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(|e| query_err(&label, "setting search_path", e))?;
    let split = |names: &[QualifiedName]| -> (Vec<String>, Vec<String>) {
        names
            .iter()
            .map(|n| (n.schema.as_str().to_owned(), n.name.as_str().to_owned()))
            .unzip()
    };
    let (ts, tn) = split(tables);
    let (ss, sn) = split(sequences);
    let q = Query {
        tx: &tx,
        label: &label,
        params: [&ts, &tn, &ss, &sn],
    };
    let mut plan = Plan::default();

    let rows = q
        .rows(
            "reading the tables to create",
            "SELECT n.nspname::text, c.relname::text,
                    CASE WHEN c.oid IN (SELECT oid FROM sel) THEN 'captured'
                         WHEN c.oid IN (SELECT oid FROM down) THEN 'partition' ELSE 'parent' END
               FROM tabs t JOIN pg_class c ON c.oid = t.oid JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY 1, 2",
        )
        .await?;
    let mut found = HashSet::new();
    for r in &rows {
        let table = QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1));
        let role = match r.get::<_, &str>(2) {
            "captured" => Role::Captured,
            "partition" => Role::Partition,
            _ => Role::Parent,
        };
        if role == Role::Captured {
            found.insert(table.clone());
        }
        plan.tables.push(PlannedTable { table, role });
    }
    plan.missing = tables
        .iter()
        .filter(|t| !found.contains(*t))
        .cloned()
        .collect();

    let rows = q
        .rows(
            "reading the sequences to create",
            "SELECT n.nspname::text, c.relname::text,
                    EXISTS (SELECT 1 FROM pg_depend d
                             WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                               AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                               AND d.refobjid NOT IN (SELECT oid FROM tabs)),
                    c.oid
               FROM seqs s JOIN pg_class c ON c.oid = s.oid JOIN pg_namespace n ON n.oid = c.relnamespace
              ORDER BY 1, 2",
        )
        .await?;
    for r in &rows {
        plan.sequences.push(QualifiedName::new(
            r.get::<_, String>(0),
            r.get::<_, String>(1),
        ));
        if r.get::<_, bool>(2) {
            plan.owned_elsewhere.insert(r.get(3));
        }
    }

    let rows = q
        .rows(
            "reading what the tables depend on",
            "SELECT k.classid, k.objid, pg_describe_object(k.classid, k.objid, 0),
                    k.objid IN (SELECT objid FROM candidates WHERE classid = k.classid),
                    CASE k.classid
                    WHEN 'pg_namespace'::regclass THEN
                        (SELECT 'schema ' || nspname FROM pg_namespace WHERE oid = k.objid)
                    WHEN 'pg_type'::regclass THEN
                        (SELECT 'type ' || format('%I.%I', n.nspname, t.typname)
                           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = k.objid)
                    WHEN 'pg_proc'::regclass THEN
                        (SELECT 'function ' || format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes))
                           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = k.objid)
                    WHEN 'pg_collation'::regclass THEN
                        (SELECT 'collation ' || format('%I.%I', n.nspname, c.collname)
                           FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace WHERE c.oid = k.objid)
                    WHEN 'pg_extension'::regclass THEN
                        (SELECT 'extension ' || extname FROM pg_extension WHERE oid = k.objid)
                    END
               FROM closure k
              ORDER BY 3",
        )
        .await?;
    for r in &rows {
        let (class, oid): (Oid, Oid) = (r.get(0), r.get(1));
        plan.keep.insert((class, oid));
        if r.get::<_, bool>(3) {
            continue;
        }
        let lookup = r.get::<_, Option<String>>(4).and_then(|l| {
            let (kind, name) = l.split_once(' ')?;
            Some((Lookup::parse(kind)?, name.to_owned()))
        });
        plan.needed.push(Needed {
            class,
            oid,
            describe: r.get(2),
            lookup,
        });
    }

    let rows = q
        .rows(
            "reading what is left out",
            "SELECT pg_describe_object(o.classid, o.objid, 0),
                    string_agg(pg_describe_object('pg_class'::regclass, o.outside, 0), ', ' ORDER BY 1)
               FROM outside_deps o
              GROUP BY 1 ORDER BY 1",
        )
        .await?;
    for r in &rows {
        plan.left_out.push(LeftOut {
            object: r.get(0),
            reason: format!(
                "depends on {}, which is not created (not captured, or not chosen)",
                r.get::<_, String>(1)
            ),
        });
    }
    let rules: Vec<String> = q
        .rows(
            "reading rules",
            "SELECT pg_describe_object('pg_rewrite'::regclass, r.oid, 0) FROM pg_rewrite r
              WHERE r.ev_class IN (SELECT oid FROM tabs) AND r.rulename <> '_RETURN' ORDER BY 1",
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    plan.left_out
        .extend(rules.into_iter().map(|object| LeftOut {
            object,
            reason:
                "rules are not created; add them by hand if the application needs them".to_owned(),
        }));
    tx.commit()
        .await
        .map_err(|e| query_err(&label, "ending the read-only transaction", e))?;
    Ok(plan)
}

/// Runs one of the plan's queries after [`CTES`], with the four name arrays bound.
struct Query<'a> {
    tx: &'a Transaction<'a>,
    label: &'a str,
    params: [&'a Vec<String>; 4],
}

impl Query<'_> {
    async fn rows(
        &self,
        context: &str,
        select: &str,
    ) -> Result<Vec<tokio_postgres::Row>, DdlError> {
        let [a, b, c, d] = self.params;
        self.tx
            .query(&format!("{CTES}{select}"), &[a, b, c, d])
            .await
            .map_err(|e| query_err(self.label, context, e))
    }
}

fn query_err(label: &str, context: &str, source: tokio_postgres::Error) -> DdlError {
    DdlError::Core(pgferry_core::Error::Query {
        context: context.to_owned(),
        target: label.to_owned(),
        source,
    })
}

/// Which of `needed` already exist on the target (by name), looked up in one query with
/// `search_path = pg_catalog`, so that names are written as the plan wrote them. Catalog
/// comparisons, not `to_regtype`/`to_regprocedure`, which raise errors before PostgreSQL 16
/// when a name's type or schema does not exist.
pub async fn existing_on_target(
    dst: &mut Session,
    needed: &[Needed],
) -> Result<HashSet<(Oid, Oid)>, DdlError> {
    let asked: Vec<(&Needed, Lookup, &str)> = needed
        .iter()
        .filter_map(|n| n.lookup.as_ref().map(|(k, name)| (n, *k, name.as_str())))
        .collect();
    let kinds: Vec<&str> = asked.iter().map(|(_, k, _)| k.as_str()).collect();
    let names: Vec<&str> = asked.iter().map(|(_, _, name)| *name).collect();
    let label = dst.target.clone();
    let tx = dst
        .client
        .transaction()
        .await
        .map_err(|e| query_err(&label, "starting a transaction", e))?;
    tx.batch_execute("SET LOCAL search_path = pg_catalog")
        .await
        .map_err(|e| query_err(&label, "setting search_path", e))?;
    let rows = tx
        .query(
            "SELECT CASE u.kind
                    WHEN 'schema' THEN EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = u.name)
                    WHEN 'type' THEN EXISTS (
                        SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                         WHERE format('%I.%I', n.nspname, t.typname) = u.name)
                    WHEN 'function' THEN EXISTS (
                        SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                         WHERE format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)) = u.name)
                    WHEN 'collation' THEN EXISTS (
                        SELECT 1 FROM pg_collation c JOIN pg_namespace n ON n.oid = c.collnamespace
                         WHERE format('%I.%I', n.nspname, c.collname) = u.name)
                    ELSE EXISTS (SELECT 1 FROM pg_extension WHERE extname = u.name)
                    END
               FROM ROWS FROM (unnest($1::text[]), unnest($2::text[])) WITH ORDINALITY AS u(kind, name, i)
              ORDER BY u.i",
            &[&kinds, &names],
        )
        .await
        .map_err(|e| query_err(&label, "looking up types, functions and schemas on the target", e))?;
    tx.commit()
        .await
        .map_err(|e| query_err(&label, "ending a read-only transaction", e))?;
    Ok(asked
        .iter()
        .zip(&rows)
        .filter(|(_, r)| r.get::<_, bool>(0))
        .map(|((n, _, _), _)| (n.class, n.oid))
        .collect())
}

/// Which of `relations` (tables and sequences) already exist on the target.
pub async fn relations_on_target(
    dst: &impl tokio_postgres::GenericClient,
    label: &str,
    relations: &[&QualifiedName],
) -> Result<Vec<String>, DdlError> {
    let quoted: Vec<String> = relations.iter().map(|r| r.to_string()).collect();
    let rows = dst
        .query(
            "SELECT u.i::int4 FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(name, i)
              WHERE pg_catalog.to_regclass(u.name) IS NOT NULL ORDER BY u.i",
            &[&quoted],
        )
        .await
        .map_err(|e| query_err(label, "looking for the tables on the target", e))?;
    let by_index: HashMap<usize, &&QualifiedName> = relations.iter().enumerate().collect();
    Ok(rows
        .iter()
        .filter_map(|r| by_index.get(&(r.get::<_, i32>(0) as usize - 1)))
        .map(|n| n.human())
        .collect())
}
