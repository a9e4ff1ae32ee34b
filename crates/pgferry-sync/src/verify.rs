//! Verifying a target against its source: per table, a row count and an order-independent
//! checksum of normalised rows on both sides, narrowed to the key ranges that differ and, in
//! the end, to the differing keys.
//!
//! What makes the comparison fair:
//! - **One snapshot per side.** The source is read in one `REPEATABLE READ` transaction, the
//!   target in another; parallel jobs import those transactions' exported snapshots, so every
//!   table is compared at the same two moments.
//! - **Live sources.** The target holds the source's state at its applied snapshot P (read in
//!   the target's transaction). Keys with changes pending between P and the source's snapshot —
//!   the round rule — are left out on both sides and counted, not reported as differences. A
//!   table with a TRUNCATE pending is skipped whole.
//! - **Stable forms.** Rows are hashed from text forms fixed by the session settings on both
//!   sides, except floats, hashed from their binary send form (their text differs between
//!   PostgreSQL 11 and 12 even with the same `extra_float_digits`). Key ranges are cut and
//!   compared in `COLLATE "C"` order, so differing collations do not move boundaries.

use std::collections::BTreeMap;
use std::time::Instant;

use pgferry_core::ident::literal;
use pgferry_core::{Dsn, Session, TablePattern};
use serde::Serialize;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

use crate::error::q;
use crate::registry::CapturedTable;
use crate::schema::{checked_columns, SharedColumn};
use crate::{round, source_info, SyncError};

/// Ranges with at most this many rows on either side are compared key by key.
const LIST_BELOW: i64 = 500;
/// Ranges a differing range is cut into.
const FANOUT: i64 = 16;
/// Differing keys reported per table (the rest are counted).
const REPORTED_KEYS: usize = 20;
/// Pending keys a table may have for the live comparison (they are held in memory).
const MAX_PENDING_KEYS: usize = 200_000;

/// What to verify.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Captured tables to compare; empty means all.
    pub tables: Vec<TablePattern>,
    /// Tables compared at once.
    pub jobs: usize,
}

/// One difference found.
#[derive(Clone, Debug, Serialize)]
pub struct Difference {
    /// `missing on target`, `extra on target` or `different`.
    pub kind: &'static str,
    /// The key, as text: `42`, or `(42, eu)` for a composite key.
    pub key: String,
}

/// The verdict for one table.
#[derive(Clone, Debug, Serialize)]
pub struct TableVerdict {
    pub table: String,
    pub source_rows: u64,
    pub target_rows: u64,
    /// Keys left out because changes to them are pending (a live source).
    pub skipped_pending: u64,
    /// The whole table was skipped: a TRUNCATE of it is pending.
    pub skipped_truncate: bool,
    pub equal: bool,
    /// Differing keys, at most 20.
    pub differences: Vec<Difference>,
    /// Differences beyond those listed.
    pub more_differences: u64,
    /// Two-way syncs: differing keys a `skip` conflict rule left unsettled (recorded in
    /// `pgferry.conflict` on either node); they do not make the table different.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unsettled: Vec<Difference>,
    pub seconds: f64,
}

/// The outcome of a verification.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub source: String,
    pub target: String,
    /// The source snapshot the target held while compared (None: it applied nothing yet).
    pub applied_snapshot: Option<String>,
    pub equal: bool,
    pub tables: Vec<TableVerdict>,
    pub seconds: f64,
}

/// Compares every captured table (or those matching `opts.tables`) of `source` and `target`.
pub async fn verify(
    source: &Dsn,
    target: &Dsn,
    opts: &VerifyOptions,
) -> Result<VerifyReport, SyncError> {
    let started = Instant::now();
    let mut src = Session::connect(source, "verify").await?;
    let info = source_info(&src, &opts.tables).await?;
    let mut dst = Session::connect(target, "verify").await?;
    let (slabel, tlabel) = (src.target.clone(), dst.target.clone());
    // The target's transaction first: the applied snapshot read in it matches the rows it sees.
    let ttx = crate::begin_read_only(&mut dst, "starting a repeatable read transaction").await?;
    let registered: bool = ttx
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.applied') IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(&tlabel, "looking for the target's progress"))?
        .get(0);
    let applied: Option<String> = if registered {
        ttx.query_opt(
            "SELECT snapshot FROM pgferry.applied WHERE source_node_id = $1",
            &[&info.node_id],
        )
        .await
        .map_err(q(&tlabel, "reading the target's progress"))?
        .and_then(|r| r.get(0))
    } else {
        None
    };
    let tsnap: String = ttx
        .query_one("SELECT pg_catalog.pg_export_snapshot()", &[])
        .await
        .map_err(q(&tlabel, "exporting the target's snapshot"))?
        .get(0);
    let stx = crate::begin_read_only(&mut src, "starting a repeatable read transaction").await?;
    let ssnap: String = stx
        .query_one("SELECT pg_catalog.pg_export_snapshot()", &[])
        .await
        .map_err(q(&slabel, "exporting the source's snapshot"))?
        .get(0);

    let tables: Vec<&CapturedTable> = info.tables.values().collect();
    let queue = std::sync::Mutex::new(tables.into_iter());
    let jobs = opts.jobs.max(1);
    let ctx = Ctx {
        pending: applied
            .as_deref()
            .map(|p| round::pending_condition(info.dialect, Some(p)))
            .transpose()?
            .unwrap_or_else(|| "true".to_owned()),
        labels: (slabel.clone(), tlabel.clone()),
    };
    let workers = (0..jobs).map(|_| async {
        let mut s = Session::connect(source, "verify").await?;
        let mut t = Session::connect(target, "verify").await?;
        let versions = (s.server_version, t.server_version);
        let sw = import(&mut s, &ssnap).await?;
        let tw = import(&mut t, &tsnap).await?;
        let mut verdicts = Vec::new();
        loop {
            let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
            let Some(table) = next else { break };
            verdicts.push(compare(&ctx, &sw, &tw, table, versions).await?);
        }
        Ok::<_, SyncError>(verdicts)
    });
    let mut verdicts: Vec<TableVerdict> = futures_util::future::try_join_all(workers)
        .await?
        .into_iter()
        .flatten()
        .collect();
    verdicts.sort_by(|a, b| a.table.cmp(&b.table));
    let mut skipped = skipped_keys(&stx, &slabel).await?;
    skipped.extend(skipped_keys(&ttx, &tlabel).await?);
    if !skipped.is_empty() {
        for v in &mut verdicts {
            let (unsettled, rest): (Vec<Difference>, Vec<Difference>) = v
                .differences
                .drain(..)
                .partition(|d| skipped.contains(&(v.table.clone(), d.key.clone())));
            v.differences = rest;
            if !unsettled.is_empty() && v.differences.is_empty() && v.more_differences == 0 {
                v.equal = true;
            }
            v.unsettled = unsettled;
        }
    }
    drop((stx, ttx));
    Ok(VerifyReport {
        source: slabel,
        target: tlabel,
        applied_snapshot: applied,
        equal: verdicts.iter().all(|v| v.equal),
        tables: verdicts,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Keys a `skip` conflict rule left unsettled, recorded on one node of a two-way sync, as
/// (table, key as [`Difference`] shows it).
async fn skipped_keys(
    tx: &Transaction<'_>,
    label: &str,
) -> Result<std::collections::BTreeSet<(String, String)>, SyncError> {
    if !crate::conflict::recorded(tx, label).await? {
        return Ok(Default::default());
    }
    let rows = tx
        .query(
            "SELECT c.table_name, k.key::text
               FROM pgferry.conflict c, pg_catalog.jsonb_array_elements(c.keys) AS k(key)
              WHERE c.winner = 'skip' AND c.settled_at IS NULL",
            &[],
        )
        .await
        .map_err(q(label, "reading skipped conflicts"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let table: String = r.get(0);
            let key: Vec<Option<String>> = serde_json::from_str(&r.get::<_, String>(1)).ok()?;
            let shown = if key.len() == 1 {
                key[0].clone().unwrap_or_default()
            } else {
                format!(
                    "({})",
                    key.iter()
                        .map(|v| v.clone().unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            };
            Some((table, shown))
        })
        .collect())
}

struct Ctx {
    /// The SQL condition on capture rows `d` pending for the target.
    pending: String,
    labels: (String, String),
}

async fn import<'a>(s: &'a mut Session, snapshot: &str) -> Result<Transaction<'a>, SyncError> {
    let label = s.target.clone();
    let tx = crate::begin_read_only(s, "starting a repeatable read transaction").await?;
    tx.batch_execute(&format!("SET TRANSACTION SNAPSHOT {}", literal(snapshot)))
        .await
        .map_err(q(&label, "importing the verification's snapshot"))?;
    Ok(tx)
}

/// A key range: above `lo` (exclusive) and up to `hi` (inclusive); None is unbounded.
#[derive(Clone, Debug, Default)]
struct Range {
    lo: Option<Vec<String>>,
    hi: Option<Vec<String>>,
}

/// SQL pieces for one table.
struct Shape {
    name: String,
    /// `t.a COLLATE "C", t.b`: the key in comparison order.
    order: String,
    /// Key columns' SQL types and whether they collate.
    key: Vec<(String, String, bool)>,
    /// The key as text columns.
    key_text: String,
    row_hash: String,
}

impl Shape {
    fn bound(&self, values: &[String]) -> String {
        let parts: Vec<String> = self
            .key
            .iter()
            .zip(values)
            .map(|((_, ty, collates), v)| {
                let c = if *collates { " COLLATE \"C\"" } else { "" };
                format!("{}::{ty}{c}", literal(v))
            })
            .collect();
        format!("ROW({})", parts.join(", "))
    }

    /// The conditions keeping (`op` `IN`) or leaving out (`NOT IN`) the recorded keys that
    /// `pending_sql` lists: on the source read from the capture, on the target from the same
    /// keys bound as parameters ([`CapturedTable::key_params`]).
    fn key_conditions(
        &self,
        table: &CapturedTable,
        pending_sql: &str,
        op: &str,
    ) -> (String, String) {
        let tuple = self
            .key
            .iter()
            .map(|k| k.0.clone())
            .collect::<Vec<_>>()
            .join(", ");
        (
            format!(
                "({tuple}) {op} (SELECT {} FROM ({pending_sql}) AS p(k))",
                table.restore("p.k")
            ),
            format!("({tuple}) {op} ({})", table.keys_from_params()),
        )
    }

    fn range(&self, r: &Range) -> String {
        let me = format!("ROW({})", self.order);
        let mut parts = vec!["true".to_owned()];
        if let Some(lo) = &r.lo {
            parts.push(format!("{me} > {}", self.bound(lo)));
        }
        if let Some(hi) = &r.hi {
            parts.push(format!("{me} <= {}", self.bound(hi)));
        }
        parts.join(" AND ")
    }
}

/// Normalised text of a column for hashing.
fn normalised(c: &SharedColumn) -> String {
    let col = format!("t.{}", c.name);
    match (c.type_schema.as_str(), c.type_name.as_str()) {
        ("pg_catalog", "float4" | "float8") => {
            format!("pg_catalog.float8send({col}::float8)")
        }
        ("pg_catalog", "_float4" | "_float8") => format!(
            "pg_catalog.array_to_string(ARRAY(SELECT pg_catalog.encode(pg_catalog.float8send(x::float8), 'hex')
                FROM pg_catalog.unnest({col}) AS x), ',', 'N')"
        ),
        ("pg_catalog", "money") => format!("{col}::numeric::text"),
        _ => format!("{col}::text"),
    }
}

/// The SQL pieces of one table's comparison, after checking both sides have its columns.
async fn shape(
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    table: &CapturedTable,
    versions: (u32, u32),
    labels: (&str, &str),
) -> Result<Shape, SyncError> {
    let (sl, tl) = labels;
    let columns = checked_columns(stx, ttx, table, versions, (sl, tl)).await?;
    let key_names: Vec<String> = table
        .key
        .iter()
        .map(|(c, _, _)| c.as_str().to_owned())
        .collect();
    let collates: BTreeMap<String, bool> = stx
        .query(
            "SELECT a.attname::text, ty.typcollation <> 0 FROM pg_catalog.pg_attribute a
               JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
              WHERE a.attrelid = pg_catalog.to_regclass($1) AND a.attname = ANY($2)",
            &[&table.name.to_string(), &key_names],
        )
        .await
        .map_err(q(sl, "reading the key's collations"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let key: Vec<(String, String, bool)> = table
        .key
        .iter()
        .map(|(c, ty, _)| {
            (
                format!("t.{c}"),
                ty.clone(),
                collates.get(c.as_str()).copied().unwrap_or(false),
            )
        })
        .collect();
    Ok(Shape {
        name: table.name.to_string(),
        order: key
            .iter()
            .map(|(c, _, coll)| {
                if *coll {
                    format!("{c} COLLATE \"C\"")
                } else {
                    c.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        key_text: key
            .iter()
            .map(|(c, _, _)| format!("{c}::text"))
            .collect::<Vec<_>>()
            .join(", "),
        row_hash: format!(
            "pg_catalog.md5(ROW({})::text)",
            columns
                .iter()
                .map(normalised)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        key,
    })
}

async fn compare(
    ctx: &Ctx,
    stx: &Transaction<'_>,
    ttx: &Transaction<'_>,
    table: &CapturedTable,
    versions: (u32, u32),
) -> Result<TableVerdict, SyncError> {
    let started = Instant::now();
    let (sl, tl) = (&ctx.labels.0, &ctx.labels.1);
    let human = table.name.human();
    let shape = shape(stx, ttx, table, versions, (sl, tl)).await?;

    // Keys pending for the target are left out on both sides.
    let id = table.table_id;
    let pending = &ctx.pending;
    let truncate: bool = stx
        .query_one(
            &format!(
                "SELECT EXISTS (SELECT 1 FROM pgferry.delta d WHERE {pending} AND d.table_id = {id} AND d.op = 'T')"
            ),
            &[],
        )
        .await
        .map_err(q(sl, "looking for pending TRUNCATEs"))?
        .get(0);
    if truncate {
        return Ok(TableVerdict {
            table: human,
            source_rows: 0,
            target_rows: 0,
            skipped_pending: 0,
            skipped_truncate: true,
            equal: true,
            differences: Vec::new(),
            more_differences: 0,
            unsettled: Vec::new(),
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let pending_sql = table.pending_keys(pending, false);
    let rows = stx
        .query(&pending_sql, &[])
        .await
        .map_err(q(sl, "reading the pending keys"))?;
    if rows.len() > MAX_PENDING_KEYS {
        return Err(SyncError::TooBusyToVerify {
            table: human,
            pending: rows.len() as u64,
        });
    }
    let values = table.key_params(&rows);
    let skipped = rows.len() as u64;
    let (s_excl, t_excl) = if skipped == 0 {
        ("true".to_owned(), "true".to_owned())
    } else {
        shape.key_conditions(table, &pending_sql, "NOT IN")
    };
    let params: Vec<&(dyn ToSql + Sync)> = if skipped == 0 {
        Vec::new()
    } else {
        values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
    };
    let sides = Sides {
        stx,
        ttx,
        shape: &shape,
        s_excl: &s_excl,
        t_excl: &t_excl,
        params: &params,
        labels: (sl, tl),
    };
    let whole = Range::default();
    let (s_sum, t_sum) = sides.sums(&whole).await?;
    let mut differences = Vec::new();
    let mut more = 0;
    if s_sum != t_sum {
        sides
            .narrow(&whole, (s_sum.0, t_sum.0), 0, &mut differences, &mut more)
            .await?;
    }
    Ok(TableVerdict {
        table: human,
        source_rows: s_sum.0 as u64,
        target_rows: t_sum.0 as u64,
        skipped_pending: skipped,
        skipped_truncate: false,
        equal: s_sum == t_sum,
        differences,
        more_differences: more,
        unsettled: Vec::new(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Both sides of one table's comparison.
struct Sides<'a> {
    stx: &'a Transaction<'a>,
    ttx: &'a Transaction<'a>,
    shape: &'a Shape,
    /// The condition each side's rows must meet: pending keys left out (verify), or only the keys
    /// a final round touched (the cutover's check).
    s_excl: &'a str,
    t_excl: &'a str,
    params: &'a [&'a (dyn ToSql + Sync)],
    labels: (&'a str, &'a str),
}

impl Sides<'_> {
    /// Runs the query `sql(exclusion)` on both sides at once (the target's with the pending
    /// keys as parameters).
    async fn on_both(
        &self,
        sql: impl Fn(&str) -> String,
        what: &str,
    ) -> Result<(Vec<tokio_postgres::Row>, Vec<tokio_postgres::Row>), SyncError> {
        let (ssql, tsql) = (sql(self.s_excl), sql(self.t_excl));
        tokio::try_join!(
            async {
                self.stx
                    .query(&ssql, &[])
                    .await
                    .map_err(q(self.labels.0, what))
            },
            async {
                self.ttx
                    .query(&tsql, self.params)
                    .await
                    .map_err(q(self.labels.1, what))
            }
        )
    }

    /// (rows, checksum) of a range on each side.
    async fn sums(&self, r: &Range) -> Result<((i64, String), (i64, String)), SyncError> {
        let (s, t) = self
            .on_both(
                |excl| {
                    format!(
                        "SELECT count(*), coalesce(sum(('x' || pg_catalog.substr(h, 1, 15))::bit(60)::bigint), 0)::text
                           FROM (SELECT {} AS h FROM {} AS t WHERE {} AND {excl}) AS s",
                        self.shape.row_hash,
                        self.shape.name,
                        self.shape.range(r)
                    )
                },
                "checksumming rows",
            )
            .await?;
        let first = |rows: &[tokio_postgres::Row]| (rows[0].get(0), rows[0].get(1));
        Ok((first(&s), first(&t)))
    }

    /// Cuts a differing range into smaller ones until they are small enough to list.
    async fn narrow(
        &self,
        r: &Range,
        counts: (i64, i64),
        depth: u32,
        out: &mut Vec<Difference>,
        more: &mut u64,
    ) -> Result<(), SyncError> {
        if counts.0.max(counts.1) <= LIST_BELOW || depth >= 4 {
            return self.list(r, out, more).await;
        }
        // Boundaries from the side with more rows in the range.
        let (tx, excl, params, label, n) = if counts.0 >= counts.1 {
            (self.stx, self.s_excl, &[][..], self.labels.0, counts.0)
        } else {
            (self.ttx, self.t_excl, self.params, self.labels.1, counts.1)
        };
        let step = (n + FANOUT - 1) / FANOUT;
        let rows = tx
            .query(
                &format!(
                    "SELECT {} FROM (SELECT t.*, row_number() OVER (ORDER BY {}) AS pgferry_rn FROM {} AS t WHERE {} AND {excl}) AS t
                      WHERE pgferry_rn % {step} = 0 ORDER BY pgferry_rn",
                    self.shape.key_text,
                    self.shape.order,
                    self.shape.name,
                    self.shape.range(r)
                ),
                params,
            )
            .await
            .map_err(q(label, "cutting key ranges"))?;
        let mut bounds: Vec<Vec<String>> = rows
            .iter()
            .map(|row| (0..row.len()).map(|i| row.get::<_, String>(i)).collect())
            .collect();
        bounds.dedup();
        let mut lo = r.lo.clone();
        let mut pieces = Vec::new();
        for b in bounds {
            pieces.push(Range {
                lo: lo.clone(),
                hi: Some(b.clone()),
            });
            lo = Some(b);
        }
        pieces.push(Range {
            lo,
            hi: r.hi.clone(),
        });
        for piece in pieces {
            let (s, t) = self.sums(&piece).await?;
            if s != t {
                Box::pin(self.narrow(&piece, (s.0, t.0), depth + 1, out, more)).await?;
            }
        }
        Ok(())
    }

    /// Compares a small range key by key.
    async fn list(
        &self,
        r: &Range,
        out: &mut Vec<Difference>,
        more: &mut u64,
    ) -> Result<(), SyncError> {
        let (s, t) = self
            .on_both(
                |excl| {
                    format!(
                        "SELECT ROW({})::text, {} FROM {} AS t WHERE {} AND {excl}",
                        self.shape.key_text,
                        self.shape.row_hash,
                        self.shape.name,
                        self.shape.range(r)
                    )
                },
                "listing rows",
            )
            .await?;
        let ours: BTreeMap<String, String> = s.iter().map(|r| (r.get(0), r.get(1))).collect();
        let theirs: BTreeMap<String, String> = t.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut found = Vec::new();
        for (k, h) in &ours {
            match theirs.get(k) {
                None => found.push(("missing on target", k)),
                Some(th) if th != h => found.push(("different", k)),
                _ => {}
            }
        }
        for k in theirs.keys().filter(|k| !ours.contains_key(*k)) {
            found.push(("extra on target", k));
        }
        for (kind, key) in found {
            if out.len() < REPORTED_KEYS {
                out.push(Difference {
                    kind,
                    key: display_key(key),
                });
            } else {
                *more += 1;
            }
        }
        Ok(())
    }
}

/// `(42)` → `42`; composite keys keep their parentheses.
fn display_key(row_text: &str) -> String {
    let inner = row_text
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .unwrap_or(row_text);
    if inner.contains(',') {
        row_text.to_owned()
    } else {
        inner.trim_matches('"').to_owned()
    }
}

/// One table of the check cutover runs inside its freeze.
#[derive(Clone, Debug, Serialize)]
pub struct TouchedVerdict {
    pub table: String,
    /// Key images the final round touched (the whole table when it replayed a TRUNCATE).
    pub touched_keys: u64,
    /// Whether the final round replayed a TRUNCATE, so the whole table was compared.
    pub whole_table: bool,
    /// Row counts of the whole table, when counted.
    pub source_rows: Option<u64>,
    pub target_rows: Option<u64>,
    pub equal: bool,
    pub differences: Vec<Difference>,
    pub more_differences: u64,
}

/// The check inside a cutover's freeze: on a frozen source and a drained target, compares the
/// rows of every key with a change after `since` (the snapshot the target held before its final
/// round: those the final round touched), and with `counts` every table's row count. Cost
/// follows the final round (plus one count per table): tables it did not touch are only counted.
pub(crate) async fn check_touched(
    src: &mut Session,
    dst: &mut Session,
    info: &crate::SourceInfo,
    since: Option<&str>,
    counts: bool,
) -> Result<Vec<TouchedVerdict>, SyncError> {
    let (sl, tl) = (src.target.clone(), dst.target.clone());
    let versions = (src.server_version, dst.server_version);
    let pending = round::pending_condition(info.dialect, since)?;
    let stx = crate::begin_read_only(src, "starting a repeatable read transaction").await?;
    let ttx = crate::begin_read_only(dst, "starting a repeatable read transaction").await?;
    let ids: Vec<i32> = info.tables.keys().copied().collect();
    let touched: BTreeMap<i32, bool> = stx
        .query(
            &format!(
                "SELECT d.table_id, bool_or(d.op = 'T') FROM pgferry.delta d
                  WHERE {pending} AND d.table_id = ANY($1) GROUP BY 1"
            ),
            &[&ids],
        )
        .await
        .map_err(q(&sl, "listing the tables the final round touched"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut verdicts = Vec::new();
    for table in info.tables.values() {
        let truncated = touched.get(&table.table_id).copied();
        if truncated.is_none() && !counts {
            continue;
        }
        let mut v = TouchedVerdict {
            table: table.name.human(),
            touched_keys: 0,
            whole_table: truncated == Some(true),
            source_rows: None,
            target_rows: None,
            equal: true,
            differences: Vec::new(),
            more_differences: 0,
        };
        if counts {
            let sql = format!("SELECT count(*) FROM {}", table.name);
            let (s, t) = tokio::try_join!(
                async {
                    stx.query_one(&sql, &[])
                        .await
                        .map_err(q(&sl, "counting rows"))
                },
                async {
                    ttx.query_one(&sql, &[])
                        .await
                        .map_err(q(&tl, "counting rows"))
                }
            )?;
            let (s, t) = (s.get::<_, i64>(0) as u64, t.get::<_, i64>(0) as u64);
            v.source_rows = Some(s);
            v.target_rows = Some(t);
            v.equal = s == t;
        }
        if let Some(whole) = truncated {
            let shape = shape(&stx, &ttx, table, versions, (&sl, &tl)).await?;
            let pending_sql = table.pending_keys(&pending, false);
            let rows = if whole {
                Vec::new()
            } else {
                stx.query(&pending_sql, &[])
                    .await
                    .map_err(q(&sl, "reading the touched keys"))?
            };
            v.touched_keys = rows.len() as u64;
            let values = table.key_params(&rows);
            let (s_incl, t_incl) = if whole {
                ("true".to_owned(), "true".to_owned())
            } else {
                shape.key_conditions(table, &pending_sql, "IN")
            };
            let params: Vec<&(dyn ToSql + Sync)> = if whole {
                Vec::new()
            } else {
                values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
            };
            let sides = Sides {
                stx: &stx,
                ttx: &ttx,
                shape: &shape,
                s_excl: &s_incl,
                t_excl: &t_incl,
                params: &params,
                labels: (&sl, &tl),
            };
            let all = Range::default();
            let (s_sum, t_sum) = sides.sums(&all).await?;
            if whole {
                v.touched_keys = s_sum.0 as u64;
            }
            if s_sum != t_sum {
                v.equal = false;
                sides
                    .narrow(
                        &all,
                        (s_sum.0, t_sum.0),
                        0,
                        &mut v.differences,
                        &mut v.more_differences,
                    )
                    .await?;
            }
        }
        verdicts.push(v);
    }
    Ok(verdicts)
}
