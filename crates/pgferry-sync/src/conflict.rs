//! Conflicts of two-way (multi-node) syncs: a key changed on two nodes since they last
//! exchanged changes, found and decided inside the round transaction of the node applying
//! (`local`) the changes of the other (`remote`).
//!
//! Invariants, and why they hold:
//! - **Found under lock.** Before a table's rows move, the local node locks its rows of every
//!   incoming key (`SELECT … FOR UPDATE`), then reads its own capture rows for those keys that
//!   the remote has not applied yet: those whose transaction is not visible in the snapshot of
//!   the local node that the remote last applied, read on the remote at the round's snapshot.
//!   A local transaction that changed such a row either committed before the lock (its capture
//!   row is read) or waits for the round to commit and then changes the row the round left; a
//!   local insert of a new key racing the round makes the round's COPY fail on the key and the
//!   round start over. So a local change racing a round is never overwritten unseen.
//! - **A group is decided whole.** A key change links its old and new key; the keys linked, on
//!   either node, to a key both nodes changed form one conflict and get one winner.
//! - **Both nodes decide alike.** A rule looks only at the two sides' changes and the node
//!   names, so when each node finds the same conflict in its own round (rounds of both
//!   directions may run at once), both keep the same winner.
//! - **The outcome ships once.** Remote wins: the local node takes the remote's rows for every
//!   key of the group and drops its own unshipped capture rows for them, so its losing change
//!   never ships. Local wins: the local node keeps its rows and records the group's keys as
//!   changed in its own capture, in the round's transaction, so its state reaches every peer —
//!   also one that received the losing change from elsewhere. Skip: both keep their rows, and
//!   the local node drops its unshipped capture rows, so neither side changes that key until a
//!   later change ships.
//! - **Every decision is recorded** in `pgferry.conflict` in the same transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pgferry_core::artifact::Dialect;
use pgferry_core::ident::literal;
use pgferry_core::{QualifiedName, TablePattern};
use serde::Serialize;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::error::q;
use crate::registry::CapturedTable;
use crate::SyncError;

/// How a conflict is decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// That node's row state wins (between two other nodes, the one listed first).
    Prefer(String),
    /// The later change wins, per row; ties go to the node whose name sorts last.
    Latest,
    /// The round stops and applies nothing.
    Abort,
    /// Neither side changes the key; recorded until a later change settles it.
    Skip,
    /// `FUNCTION(local jsonb, remote jsonb, local_node text, remote_node text) RETURNS jsonb`
    /// returns the winning row image (or a merged one, or NULL for "deleted").
    Custom(QualifiedName),
}

impl Rule {
    pub fn parse(text: &str) -> Result<Rule, String> {
        let text = text.trim();
        match text {
            "latest" => return Ok(Rule::Latest),
            "abort" => return Ok(Rule::Abort),
            "skip" => return Ok(Rule::Skip),
            _ => {}
        }
        if let Some(node) = text.strip_prefix("prefer:") {
            if node.is_empty() {
                return Err("prefer: needs a node name (prefer:NODE)".into());
            }
            return Ok(Rule::Prefer(node.to_owned()));
        }
        if let Some(f) = text.strip_prefix("custom:") {
            let (schema, name) = match f.split_once('.') {
                Some((s, n)) => (s, n),
                None => ("public", f),
            };
            if name.is_empty() || schema.is_empty() {
                return Err("custom: needs a function name (custom:SCHEMA.FUNCTION)".into());
            }
            return Ok(Rule::Custom(QualifiedName::new(schema, name)));
        }
        Err(format!(
            "unknown conflict rule {text:?}: use prefer:NODE, latest, abort, skip or custom:FUNCTION"
        ))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Prefer(n) => write!(f, "prefer:{n}"),
            Rule::Latest => f.write_str("latest"),
            Rule::Abort => f.write_str("abort"),
            Rule::Skip => f.write_str("skip"),
            Rule::Custom(n) => write!(f, "custom:{}", n.human()),
        }
    }
}

/// A sync's conflict rule and its per-table overrides (the first matching pattern wins).
#[derive(Clone, Debug)]
pub struct Rules {
    pub default: Rule,
    pub tables: Vec<(TablePattern, Rule)>,
}

impl Rules {
    pub fn new(default: Rule) -> Rules {
        Rules {
            default,
            tables: Vec::new(),
        }
    }

    /// Parses an override `PATTERN=RULE`.
    pub fn parse_override(text: &str) -> Result<(TablePattern, Rule), String> {
        let (pattern, rule) = text
            .split_once('=')
            .ok_or_else(|| format!("{text:?} is not TABLE=RULE"))?;
        let pattern = TablePattern::parse(pattern).map_err(|e| e.to_string())?;
        Ok((pattern, Rule::parse(rule)?))
    }

    pub fn for_table(&self, name: &QualifiedName) -> &Rule {
        self.tables
            .iter()
            .find(|(p, _)| p.matches(name.schema.as_str(), name.name.as_str()))
            .map_or(&self.default, |(_, r)| r)
    }

    /// Every rule in use.
    pub fn all(&self) -> impl Iterator<Item = &Rule> {
        std::iter::once(&self.default).chain(self.tables.iter().map(|(_, r)| r))
    }
}

/// A conflict decided by a round, as reports show it.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub table: String,
    /// The keys of the group (text form of each key column).
    pub keys: Vec<Vec<Option<String>>>,
    pub local: String,
    pub remote: String,
    pub rule: String,
    /// A node name, `merged` or `skip`.
    pub winner: String,
    /// `key` (the same key changed on both nodes) or `unique:INDEX` (two keys whose rows
    /// collide in a unique index).
    pub kind: String,
}

/// What a round of a two-way sync needs to find and decide conflicts.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// The applying node's name, and the source's.
    pub local: String,
    pub remote: String,
    /// The sync's nodes in order (`prefer:` between two other nodes: the first listed wins).
    pub order: Vec<String>,
    /// The applying node's identity: the source's `pgferry.applied` row for it says which of
    /// the applying node's changes the source already has.
    pub local_node_id: String,
    /// The source's identity (its `node_id`).
    pub remote_node_id: String,
    pub rules: Rules,
    pub local_dialect: Dialect,
    /// The applying node's captured tables, by quoted name.
    pub local_tables: BTreeMap<String, CapturedTable>,
    /// SQL expressions of a capture row `d`'s time, on each side.
    pub local_time: String,
    /// The applying session may set `deadlock_timeout` (a superuser, or granted SET on it).
    pub deadlock_timeout: bool,
    pub remote_time: String,
}

/// The time of capture row `d`: the time of the change it carries when a decision wrote it
/// (`origin_at`), else its commit time where `track_commit_timestamp` is on (and the commit
/// still known), else the time the capture recorded.
pub(crate) fn time_expr(commit_ts: bool) -> String {
    if commit_ts {
        micros(
            "COALESCE(d.origin_at, pg_catalog.pg_xact_commit_timestamp(((d.xid::text::pg_catalog.int8 % 4294967296)::text)::pg_catalog.xid), d.changed_at)",
        )
    } else {
        micros("COALESCE(d.origin_at, d.changed_at)")
    }
}

/// Microseconds since the epoch of the `timestamptz` expression `e`, exact on every version
/// (a float of the whole epoch is not).
pub(crate) fn micros(e: &str) -> String {
    format!(
        "(pg_catalog.date_part('epoch', pg_catalog.date_trunc('second', {e}))::pg_catalog.int8 * 1000000
          + pg_catalog.date_part('microseconds', {e})::pg_catalog.int8 % 1000000)"
    )
}

/// The `timestamptz` of `micros` (microseconds since the epoch), exactly.
pub(crate) fn from_micros(micros: &str) -> String {
    format!(
        "(pg_catalog.to_timestamp({micros} / 1000000) + ({micros} % 1000000) * '1 microsecond'::pg_catalog.interval)"
    )
}

/// A key in its recorded text form.
pub(crate) type Key = Vec<Option<String>>;

/// One capture row of either side.
#[derive(Clone, Debug)]
struct Change {
    key: Key,
    old_key: Option<Key>,
    op: String,
    /// Microseconds since the epoch.
    at: Option<i64>,
}

/// How a group was decided.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Remote,
    Local,
    Skip,
    /// The local node wrote a merged row (custom rule); it ships like a local win.
    Merged,
}

/// A conflict group and its decision.
#[derive(Debug)]
pub(crate) struct Group {
    /// The node whose change the local side stands for: the local node, or (a third node's
    /// decision, [`crate::mesh`]) the peer its row came from.
    local_node: String,
    /// Decided by a third node between two peers' changes: nothing to carry out but the
    /// record (the two peers settle it between themselves).
    third: bool,
    keys: Vec<Key>,
    local_keys: BTreeSet<Key>,
    remote_keys: BTreeSet<Key>,
    local: Vec<Change>,
    remote: Vec<Change>,
    local_rows: serde_json::Value,
    remote_rows: serde_json::Value,
    outcome: Outcome,
    winner: String,
    rule: String,
    /// A unique clash: the unique index, the remote's key and the local key whose rows
    /// collide in it (None: a conflict on the key itself).
    clash: Option<(String, Key, Key)>,
    /// Delta columns merged: what the losing side changed in each (the sum of its changes'
    /// new − old), added to the winner's value on this node.
    delta: Option<Vec<Option<String>>>,
}

impl Group {
    fn kind(&self) -> String {
        match &self.clash {
            Some((index, _, _)) => format!("unique:{index}"),
            None => "key".into(),
        }
    }
}

/// The decisions of one table of a round, and what they ask of the apply.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    groups: Vec<Group>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Adds a decided group, and logs it.
    fn push(&mut self, g: Group, table: &str, ex: &Exchange) {
        tracing::info!(
            table,
            keys = ?g.keys,
            local = %g.local_node,
            remote = %ex.remote,
            kind = %g.kind(),
            rule = %g.rule,
            winner = %g.winner,
            third_node = g.third,
            "conflict decided"
        );
        self.groups.push(g);
    }

    /// Adds the decisions of `other`.
    pub fn extend(&mut self, other: Plan) {
        self.groups.extend(other.groups);
    }

    /// Keys the bulk apply must leave alone (the local node keeps its rows).
    pub fn excluded(&self) -> Vec<Key> {
        self.groups
            .iter()
            .filter(|g| g.outcome != Outcome::Remote)
            .flat_map(|g| g.keys.iter().cloned())
            .collect()
    }

    pub fn decisions(&self, table: &str, ex: &Exchange) -> Vec<Decision> {
        self.groups
            .iter()
            .map(|g| Decision {
                table: table.to_owned(),
                keys: g.keys.clone(),
                local: g.local_node.clone(),
                remote: ex.remote.clone(),
                rule: g.rule.clone(),
                winner: g.winner.clone(),
                kind: g.kind(),
            })
            .collect()
    }
}

/// `(VALUES (ARRAY[…]::text[]), …) AS x(key)`: keys as a relation, for the few keys of
/// conflicts (inlined: a source's COPY takes no parameters).
pub(crate) fn keys_relation(keys: &[Key]) -> String {
    let rows: Vec<String> = keys
        .iter()
        .map(|k| {
            let items: Vec<String> = k
                .iter()
                .map(|v| v.as_deref().map_or_else(|| "NULL".into(), literal))
                .collect();
            format!("(ARRAY[{}]::pg_catalog.text[])", items.join(", "))
        })
        .collect();
    format!("(VALUES {}) AS x(key)", rows.join(", "))
}

/// The condition "the row `t`'s key is among `keys`", typed as table `table`'s key.
pub(crate) fn key_in(table: &CapturedTable, keys: &[Key]) -> String {
    format!(
        "{} IN (SELECT {} FROM {})",
        key_tuple(table, "t"),
        table.restore("x.key"),
        keys_relation(keys)
    )
}

/// `alias.k` or `(alias.k1, alias.k2)`.
pub(crate) fn key_tuple(table: &CapturedTable, alias: &str) -> String {
    let cols: Vec<String> = table
        .key
        .iter()
        .map(|(c, _, _)| format!("{alias}.{c}"))
        .collect();
    if cols.len() == 1 {
        cols[0].clone()
    } else {
        format!("({})", cols.join(", "))
    }
}

/// The recorded key `column` (a `text[]`) as a typed tuple `(k1, k2)` of `table`'s key.
pub(crate) fn restored_tuple(table: &CapturedTable, column: &str) -> String {
    let items: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, (_, ty, form))| form.restore_expr(&format!("{column}[{}]", i + 1), ty))
        .collect();
    format!("({})", items.join(", "))
}

/// The row `t`'s key in its recorded text form.
fn key_text(table: &CapturedTable, alias: &str) -> String {
    let items: Vec<String> = table
        .key
        .iter()
        .map(|(c, _, form)| form.capture_expr(&format!("{alias}.{c}")))
        .collect();
    format!("ARRAY[{}]::pg_catalog.text[]", items.join(", "))
}

/// `FROM … WHERE …` of the keys (`y.key`) the row changes of `table_id` matching `cond` touch,
/// old keys of key changes included, one row per capture row and key (`d`: the capture row).
pub(crate) fn touched_keys(cond: &str, table_id: i32) -> String {
    format!(
        "FROM pgferry.delta d CROSS JOIN LATERAL (VALUES (d.key), (d.old_key)) AS y(key)
         WHERE {cond} AND d.table_id = {table_id} AND d.op <> 'T' AND y.key IS NOT NULL"
    )
}

/// Capture rows matching `cond` whose key or old key is among `keys`.
fn changes_sql(table_id: i32, cond: &str, time: &str, keys: &[Key]) -> String {
    let rel = keys_relation(keys);
    format!(
        "SELECT d.key, d.old_key, d.op::text, {time} FROM pgferry.delta d
          WHERE {cond} AND d.table_id = {table_id} AND d.op <> 'T'
            AND (d.key IN (SELECT x.key FROM {rel}) OR d.old_key IN (SELECT x.key FROM {rel}))"
    )
}

fn to_changes(rows: &[tokio_postgres::Row]) -> Vec<Change> {
    rows.iter()
        .map(|r| Change {
            key: r.get(0),
            old_key: r.get(1),
            op: r.get(2),
            at: r.get(3),
        })
        .collect()
}

/// How many times [`probe`] tries to lock a large table's rows (it holds the rows of the
/// tables before it meanwhile) before the round gives up and starts over.
const LOCK_TRIES: u32 = 3;

/// `SELECT … FOR UPDATE NOWAIT` of `local_t`'s rows whose key is in `incoming` (a relation of
/// typed keys), in key order.
pub(crate) fn lock_sql(local_t: &CapturedTable, incoming: &str) -> String {
    let tuple = key_tuple(local_t, "t");
    let cols: Vec<String> = local_t
        .key
        .iter()
        .map(|(c, _, _)| format!("k.{c}"))
        .collect();
    format!(
        "SELECT 1 FROM {} AS t WHERE {tuple} IN (SELECT {} FROM {incoming} AS k) ORDER BY {tuple} FOR UPDATE OF t NOWAIT",
        local_t.name,
        cols.join(", ")
    )
}

/// Runs the [`lock_sql`] `statements` (each with its `text[]` parameters), all or nothing:
/// when an application holds one of the rows, every lock taken is released (back to a
/// savepoint) and the whole set tried again a moment later, at most `max_tries` times; then
/// the lock timeout is returned (the round starts over). The round never waits for a row
/// while holding others, so it never deadlocks with an application that takes the same rows
/// in another order (pgbench: tellers, then branches): each such deadlock cost a
/// deadlock_timeout and a whole round.
pub(crate) async fn lock_rows(
    ttx: &Transaction<'_>,
    statements: &[(String, Vec<Vec<Option<String>>>)],
    max_tries: u32,
    label: &str,
) -> Result<(), SyncError> {
    let mut tries = 0u32;
    loop {
        // Sent together, run in order.
        let sp = ttx.batch_execute("SAVEPOINT pgferry_lock");
        let locks = futures_util::future::try_join_all(statements.iter().map(|(sql, values)| {
            let params: Vec<(&(dyn ToSql + Sync), Type)> = values
                .iter()
                .map(|v| (v as &(dyn ToSql + Sync), Type::TEXT_ARRAY))
                .collect();
            async move { ttx.query_typed(sql, &params).await }
        }));
        let (sp, locked) = tokio::join!(sp, locks);
        match sp.and(locked.map(|_| ())) {
            Ok(()) => break,
            Err(e)
                if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
                    && tries < max_tries =>
            {
                tries += 1;
                ttx.batch_execute("ROLLBACK TO SAVEPOINT pgferry_lock")
                    .await
                    .map_err(q(label, "locking the round's rows"))?;
                let pause = 500 + 250 * u64::from(tries.min(16));
                tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
            }
            Err(e) => return Err(q(label, "locking the round's rows")(e)),
        }
    }
    if tries > 0 {
        tracing::debug!(tries, "rows locked once applications released them");
    }
    Ok(())
}

/// The labels of the source (remote) and target (local) sessions, for errors.
pub(crate) type Labels<'a> = (&'a str, &'a str);

/// One table of a two-way round as the conflict code sees it: the source's and the target's
/// transactions, the exchange, the table on each side, the conditions selecting the round's
/// capture rows on the source (`pending`) and the target's own rows the source has not applied
/// (`unshipped`), and the sessions' labels for errors.
#[derive(Clone, Copy)]
pub(crate) struct Sides<'a> {
    pub stx: &'a Transaction<'a>,
    pub ttx: &'a Transaction<'a>,
    pub ex: &'a Exchange,
    pub remote_t: &'a CapturedTable,
    pub local_t: &'a CapturedTable,
    pub pending: &'a str,
    pub unshipped: &'a str,
    pub labels: Labels<'a>,
}

/// Locks the local rows of the incoming keys (`incoming`: a relation of typed keys, with its
/// parameters) and reads the local node's unshipped changes to them (`unshipped`: the condition
/// on local capture rows `d`). Empty: no conflict in this table.
pub(crate) async fn probe(
    ttx: &Transaction<'_>,
    local_t: &CapturedTable,
    incoming: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
    locked: bool,
    unshipped: &str,
    target_label: &str,
) -> Result<Vec<Key>, SyncError> {
    let name = &local_t.name;
    let cols: Vec<String> = local_t
        .key
        .iter()
        .map(|(c, _, _)| format!("k.{c}"))
        .collect();
    let restore_tuple = |column: &str| restored_tuple(local_t, column);
    let probe = format!(
        "SELECT DISTINCT y.key FROM (
             SELECT d.key, d.old_key FROM pgferry.delta d
              WHERE {unshipped} AND d.table_id = {id} AND d.op <> 'T'
                AND ({new} IN (SELECT {c} FROM {incoming} AS k)
                     OR (d.old_key IS NOT NULL AND {old} IN (SELECT {c} FROM {incoming} AS k)))) AS x
           CROSS JOIN LATERAL (VALUES (x.key), (x.old_key)) AS y(key)
          WHERE y.key IS NOT NULL",
        id = local_t.table_id,
        new = restore_tuple("d.key"),
        old = restore_tuple("d.old_key"),
        c = cols.join(", "),
    );
    let human = name.human();
    if !locked {
        let lock = lock_sql(local_t, incoming);
        lock_rows(ttx, &[(lock, Vec::new())], LOCK_TRIES, target_label).await?;
    }
    // After the locks: this statement sees every local commit made before they were granted.
    let rows = ttx.query_typed(&probe, params).await.map_err(q(
        target_label,
        format!("looking for local changes to {human}"),
    ))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Decides the conflicts of one table, given the local node's keys [`probe`] found. `pending`
/// selects the remote's capture rows of this round (on `stx`), `unshipped` the local node's
/// (on `ttx`).
pub(crate) async fn plan(s: Sides<'_>, found: Vec<Key>) -> Result<Plan, SyncError> {
    let Sides {
        stx,
        ttx,
        ex,
        remote_t,
        local_t,
        pending,
        unshipped,
        labels,
    } = s;
    let (source_label, target_label) = labels;
    let human = local_t.name.human();
    // The keys linked to the ones found, on either side, until no new key appears (a key
    // changed twice links three keys).
    let mut keys: BTreeSet<Key> = found.into_iter().collect();
    let (mut local, mut remote);
    let mut rounds = 0;
    loop {
        let list: Vec<Key> = keys.iter().cloned().collect();
        let (l, r) = tokio::try_join!(
            async {
                ttx.query(
                    &changes_sql(local_t.table_id, unshipped, &ex.local_time, &list),
                    &[],
                )
                .await
                .map_err(q(target_label, format!("reading local changes to {human}")))
            },
            async {
                stx.query(
                    &changes_sql(remote_t.table_id, pending, &ex.remote_time, &list),
                    &[],
                )
                .await
                .map_err(q(source_label, format!("reading the changes to {human}")))
            }
        )?;
        local = to_changes(&l);
        remote = to_changes(&r);
        let before = keys.len();
        for c in local.iter().chain(&remote) {
            keys.insert(c.key.clone());
            if let Some(o) = &c.old_key {
                keys.insert(o.clone());
            }
        }
        rounds += 1;
        if keys.len() == before || rounds >= 8 {
            break;
        }
    }
    let groups = group(&local, &remote);
    if groups.is_empty() {
        return Ok(Plan::default());
    }
    let all: Vec<Key> = groups.iter().flat_map(|(k, _, _)| k.clone()).collect();
    let (local_rows, remote_rows) =
        tokio::try_join!(images(ttx, local_t, &all, target_label), async {
            images(stx, remote_t, &all, source_label).await
        })?;
    let rule = ex.rules.for_table(&local_t.name).clone();
    let mut plan = Plan::default();
    for (gkeys, li, ri) in groups {
        let l: Vec<Change> = li.iter().map(|&i| local[i].clone()).collect();
        let r: Vec<Change> = ri.iter().map(|&i| remote[i].clone()).collect();
        let side_keys = |cs: &[Change]| -> BTreeSet<Key> {
            cs.iter()
                .flat_map(|c| std::iter::once(c.key.clone()).chain(c.old_key.clone()))
                .collect()
        };
        let pick = |rows: &BTreeMap<Key, serde_json::Value>| -> serde_json::Value {
            serde_json::Value::Array(gkeys.iter().filter_map(|k| rows.get(k).cloned()).collect())
        };
        let mut g = Group {
            local_node: ex.local.clone(),
            third: false,
            local_keys: side_keys(&l),
            remote_keys: side_keys(&r),
            keys: gkeys.clone(),
            local: l,
            remote: r,
            local_rows: pick(&local_rows),
            remote_rows: pick(&remote_rows),
            outcome: Outcome::Skip,
            winner: String::new(),
            rule: rule.to_string(),
            clash: None,
            delta: None,
        };
        g.outcome = decide(ttx, ex, &rule, &g, local_t, target_label).await?;
        g.winner = winner(ex, &g);
        if mergeable(&g, &rule, remote_t, local_t) {
            // Counters: the winner's row, plus what the other side added to each delta column.
            let (tx, table, cond, label) = match g.outcome {
                Outcome::Local => (stx, remote_t, pending, source_label),
                _ => (ttx, local_t, unshipped, target_label),
            };
            g.delta = Some(delta_sums(tx, table, cond, &g.keys[0], label).await?);
            g.rule = format!(
                "{} + delta({})",
                g.rule,
                local_t
                    .delta_columns
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        plan.push(g, &human, ex);
    }
    Ok(plan)
}

/// A third node's case ([`crate::mesh`]): the remote's change of `key` (made at `remote_at`)
/// and the change of peer `held` (made at `held_at`) this node's row came from, neither made
/// knowing the other.
#[derive(Debug)]
pub(crate) struct ThirdParty {
    pub key: Key,
    pub held: String,
    pub held_at: Option<i64>,
    pub remote_at: Option<i64>,
}

/// Decides third-party cases by the table's rule, as the two peers decide them between
/// themselves: the held peer's row kept (left out of the apply), or the remote's applied. A
/// custom function's merged row is not kept here (the apply writes the remote's row): the two
/// peers merge, and their merge reaches this node as their change. Nothing is reshipped.
pub(crate) async fn third_party(s: Sides<'_>, cases: Vec<ThirdParty>) -> Result<Plan, SyncError> {
    let Sides {
        stx,
        ttx,
        ex,
        remote_t,
        local_t,
        labels,
        ..
    } = s;
    let (source_label, target_label) = labels;
    let human = local_t.name.human();
    let keys: Vec<Key> = cases.iter().map(|c| c.key.clone()).collect();
    let (local_rows, remote_rows) = tokio::try_join!(
        images(ttx, local_t, &keys, target_label),
        images(stx, remote_t, &keys, source_label)
    )?;
    let rule = ex.rules.for_table(&local_t.name).clone();
    let mut plan = Plan::default();
    for c in cases {
        let (l, r) = (local_rows.get(&c.key), remote_rows.get(&c.key));
        let change = |at: Option<i64>, present: bool| Change {
            key: c.key.clone(),
            old_key: None,
            op: if present { "U" } else { "D" }.into(),
            at,
        };
        let mut g = Group {
            local_node: c.held.clone(),
            third: true,
            keys: vec![c.key.clone()],
            local_keys: BTreeSet::from([c.key.clone()]),
            remote_keys: BTreeSet::from([c.key.clone()]),
            local: vec![change(c.held_at, l.is_some())],
            remote: vec![change(c.remote_at, r.is_some())],
            local_rows: serde_json::Value::Array(l.into_iter().cloned().collect()),
            remote_rows: serde_json::Value::Array(r.into_iter().cloned().collect()),
            outcome: Outcome::Skip,
            winner: String::new(),
            rule: rule.to_string(),
            clash: None,
            delta: None,
        };
        g.outcome = match decide(ttx, ex, &rule, &g, local_t, target_label).await? {
            Outcome::Merged => Outcome::Remote,
            o => o,
        };
        g.winner = winner(ex, &g);
        plan.push(g, &human, ex);
    }
    Ok(plan)
}

/// Whether a group's delta columns merge: the table has some (declared alike on both nodes),
/// the rule picks a side, and the group is one key that both sides only updated.
fn mergeable(g: &Group, rule: &Rule, remote_t: &CapturedTable, local_t: &CapturedTable) -> bool {
    !local_t.delta_columns.is_empty()
        && local_t.delta_columns == remote_t.delta_columns
        && matches!(rule, Rule::Prefer(_) | Rule::Latest)
        && matches!(g.outcome, Outcome::Remote | Outcome::Local)
        && g.keys.len() == 1
        && g.local
            .iter()
            .chain(&g.remote)
            .all(|c| c.op == "U" && c.old_key.is_none())
}

/// Per delta column of `table`, the sum of (new − old) over the capture rows of `key` matching
/// `cond`: what that side added.
async fn delta_sums(
    tx: &Transaction<'_>,
    table: &CapturedTable,
    cond: &str,
    key: &Key,
    label: &str,
) -> Result<Vec<Option<String>>, SyncError> {
    let sums: Vec<String> = (1..=table.delta_columns.len())
        .map(|i| {
            format!(
                "COALESCE(sum(COALESCE(d.delta_new[{i}], 0) - COALESCE(d.delta_old[{i}], 0)), 0)"
            )
        })
        .collect();
    let sql = format!(
        "SELECT ARRAY[{}]::pg_catalog.text[] FROM pgferry.delta d
          WHERE {cond} AND d.table_id = {} AND d.op = 'U' AND d.key IN (SELECT x.key FROM {})",
        sums.join(", "),
        table.table_id,
        keys_relation(std::slice::from_ref(key))
    );
    Ok(tx
        .query_one(&sql, &[])
        .await
        .map_err(q(
            label,
            format!("summing the delta columns of {}", table.name.human()),
        ))?
        .get(0))
}

/// Whether every delta column's sum is zero (the other side added nothing).
fn all_zero(sums: &[Option<String>]) -> bool {
    sums.iter().all(|v| {
        v.as_deref().is_none_or(|n| {
            n.trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
        })
    })
}

fn winner(ex: &Exchange, g: &Group) -> String {
    match g.outcome {
        Outcome::Remote => ex.remote.clone(),
        Outcome::Local => g.local_node.clone(),
        Outcome::Merged => "merged".into(),
        Outcome::Skip => "skip".into(),
    }
}

/// What [`clashes`] needs of the round's apply of one table.
pub(crate) struct Incoming<'a> {
    /// The typed keys the round applies, as a relation, and its parameters.
    pub relation: &'a str,
    pub params: &'a [(&'a (dyn ToSql + Sync), Type)],
    /// Keys the local node keeps (decided before).
    pub excluded: &'a [Key],
    /// The columns copied, and the source's COPY of the rows the round applies.
    pub columns: &'a [pgferry_core::Ident],
    pub rows_sql: &'a str,
}

/// Unique clashes of one table: a row the round would copy in and a local row of another key
/// that the round leaves in place, equal in a unique index other than the key's. Each pair is
/// decided like a conflict (the remote's change of its key against the local node's change of
/// the other key). Called after the table's apply failed on a unique index (rolled back to a
/// savepoint), so a round without clashes pays nothing for the check.
pub(crate) async fn clashes(s: Sides<'_>, inc: &Incoming<'_>) -> Result<Plan, SyncError> {
    let Sides {
        stx,
        ttx,
        ex,
        remote_t,
        local_t,
        pending,
        unshipped,
        labels,
    } = s;
    let (source_label, target_label) = labels;
    let name = &local_t.name;
    let human = name.human();
    let stage = format!("pgferry_clash_{}", local_t.table_id);
    let cols = inc
        .columns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    ttx.batch_execute(&format!(
        "DROP TABLE IF EXISTS pg_temp.{stage}; CREATE TEMP TABLE {stage} (LIKE {name}) ON COMMIT DROP"
    ))
    .await
    .map_err(q(target_label, format!("staging the rows of {human}")))?;
    crate::copy::pass_through(
        stx,
        inc.rows_sql,
        ttx,
        &format!("COPY pg_temp.{stage} ({cols}) FROM STDIN"),
    )
    .await
    .map_err(q(target_label, format!("staging the rows of {human}")))?;
    // Unique indexes other than the key's: their columns or expressions, their predicate (a
    // partial index), and whether NULLs clash (NULLS NOT DISTINCT, 15+).
    let indexes = ttx
        .query(
            "SELECT c.relname::text,
                    pg_catalog.array_agg(pg_catalog.pg_get_indexdef(i.indexrelid, k.n::int, true) ORDER BY k.n),
                    pg_catalog.pg_get_expr(i.indpred, i.indrelid, true),
                    coalesce((pg_catalog.to_jsonb(i) ->> 'indnullsnotdistinct')::bool, false),
                    i.indexprs IS NULL AND i.indpred IS NULL,
                    (SELECT pg_catalog.array_agg(a.attname::text ORDER BY u.ord)
                       FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS u(attnum, ord)
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = u.attnum
                      WHERE u.ord <= i.indnkeyatts)
               FROM pg_catalog.pg_index i
               JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
              CROSS JOIN LATERAL pg_catalog.generate_series(1, i.indnkeyatts) AS k(n)
              WHERE i.indrelid = pg_catalog.to_regclass($1) AND i.indisunique
              GROUP BY c.relname, i.indpred, i.indrelid, i.indexprs, i.indexrelid, i.indkey, i.indnkeyatts
              ORDER BY 1",
            &[&name.to_string()],
        )
        .await
        .map_err(q(target_label, format!("reading the unique indexes of {human}")))?;
    let key: BTreeSet<&str> = local_t.key.iter().map(|(c, _, _)| c.as_str()).collect();
    let kcols: Vec<String> = local_t
        .key
        .iter()
        .map(|(c, _, _)| format!("k.{c}"))
        .collect();
    let mut pairs: Vec<(String, Key, Key)> = Vec::new();
    for r in &indexes {
        let index: String = r.get(0);
        let items: Vec<String> = r.get(1);
        let predicate: Option<String> = r.get(2);
        let nulls_clash: bool = r.get(3);
        let plain: bool = r.get(4);
        let columns: Option<Vec<String>> = r.get(5);
        // The key's own index.
        let columns: BTreeSet<&str> = columns.iter().flatten().map(String::as_str).collect();
        if plain && columns == key {
            continue;
        }
        // The incoming rows' values of the index, computed where only the staged row is in
        // scope (the items and predicate name columns unqualified), then matched against the
        // local rows with the same expressions: an expression or partial index serves the join.
        let values: Vec<String> = items
            .iter()
            .enumerate()
            .map(|(n, e)| format!("({e}) AS pgferry_v{n}"))
            .collect();
        let eq = if nulls_clash {
            "IS NOT DISTINCT FROM"
        } else {
            "="
        };
        let on: Vec<String> = items
            .iter()
            .enumerate()
            .map(|(n, e)| format!("({e}) {eq} iv.pgferry_v{n}"))
            .collect();
        let (ok, applies) = match &predicate {
            Some(p) => (format!("coalesce(({p}), false)"), format!(" AND ({p})")),
            None => ("true".to_owned(), String::new()),
        };
        let kept = if inc.excluded.is_empty() {
            String::new()
        } else {
            format!(" OR {}", key_in(local_t, inc.excluded))
        };
        let sql = format!(
            "WITH iv AS (SELECT {} AS pgferry_key, {}, {ok} AS pgferry_ok FROM pg_temp.{stage})
             SELECT DISTINCT iv.pgferry_key, {} FROM iv JOIN {name} AS t ON {}
              WHERE iv.pgferry_ok{applies} AND {} <> iv.pgferry_key
                AND ({} NOT IN (SELECT {} FROM {} AS k){kept})",
            key_text(local_t, &format!("pg_temp.{stage}")),
            values.join(", "),
            key_text(local_t, "t"),
            on.join(" AND "),
            key_text(local_t, "t"),
            key_tuple(local_t, "t"),
            kcols.join(", "),
            inc.relation,
        );
        let rows = ttx
            .query_typed(&sql, inc.params)
            .await
            .map_err(q(target_label, format!("looking for clashes in {index}")))?;
        for row in rows {
            pairs.push((index.clone(), row.get(0), row.get(1)));
        }
    }
    let mut plan = Plan::default();
    if pairs.is_empty() {
        return Ok(plan);
    }
    let rule = ex.rules.for_table(&local_t.name).clone();
    for (index, remote_key, local_key) in pairs {
        let (l, r, li, ri) = tokio::try_join!(
            async {
                ttx.query(
                    &changes_sql(
                        local_t.table_id,
                        unshipped,
                        &ex.local_time,
                        std::slice::from_ref(&local_key),
                    ),
                    &[],
                )
                .await
                .map_err(q(target_label, format!("reading local changes to {human}")))
            },
            async {
                stx.query(
                    &changes_sql(
                        remote_t.table_id,
                        pending,
                        &ex.remote_time,
                        std::slice::from_ref(&remote_key),
                    ),
                    &[],
                )
                .await
                .map_err(q(source_label, format!("reading the changes to {human}")))
            },
            images(ttx, local_t, std::slice::from_ref(&local_key), target_label),
            images(
                stx,
                remote_t,
                std::slice::from_ref(&remote_key),
                source_label
            )
        )?;
        let mut g = Group {
            local_node: ex.local.clone(),
            third: false,
            keys: vec![remote_key.clone(), local_key.clone()],
            local_keys: BTreeSet::from([local_key.clone()]),
            remote_keys: BTreeSet::from([remote_key.clone()]),
            local: to_changes(&l),
            remote: to_changes(&r),
            local_rows: serde_json::Value::Array(li.into_values().collect()),
            remote_rows: serde_json::Value::Array(ri.into_values().collect()),
            outcome: Outcome::Skip,
            winner: String::new(),
            rule: rule.to_string(),
            clash: Some((index, remote_key, local_key)),
            delta: None,
        };
        g.outcome = match decide(ttx, ex, &rule, &g, local_t, target_label).await? {
            // A merged row cannot settle two keys wanting one value.
            Outcome::Merged => return Err(SyncError::CustomConflict {
                function: rule.to_string(),
                table: human,
                reason:
                    "it merged the rows of a unique clash (two keys): return one of the two images"
                        .into(),
            }),
            o => o,
        };
        g.winner = winner(ex, &g);
        plan.push(g, &human, ex);
    }
    Ok(plan)
}

/// Removes, before the table is applied again, the local row that lost each clash of `plan`:
/// the local key's row when the remote's row wins, the remote's key's row when the local one
/// wins (the round then leaves that key out).
pub(crate) async fn settle_clashes(
    ttx: &Transaction<'_>,
    local_t: &CapturedTable,
    plan: &Plan,
    label: &str,
) -> Result<(), SyncError> {
    let lost: Vec<Key> = plan
        .groups
        .iter()
        .filter_map(|g| {
            let (_, remote_key, local_key) = g.clash.as_ref()?;
            match g.outcome {
                Outcome::Remote => Some(local_key.clone()),
                Outcome::Local | Outcome::Merged => Some(remote_key.clone()),
                Outcome::Skip => None,
            }
        })
        .collect();
    if lost.is_empty() {
        return Ok(());
    }
    ttx.execute(
        &format!(
            "DELETE FROM {} AS t WHERE {}",
            local_t.name,
            key_in(local_t, &lost)
        ),
        &[],
    )
    .await
    .map_err(q(
        label,
        format!(
            "removing the rows that lost a clash in {}",
            local_t.name.human()
        ),
    ))?;
    Ok(())
}

/// Groups the changes of both sides by linked keys; keeps the groups both sides changed.
/// Returns each group's keys and the indexes of its local and remote changes.
#[allow(clippy::type_complexity)]
fn group(local: &[Change], remote: &[Change]) -> Vec<(Vec<Key>, Vec<usize>, Vec<usize>)> {
    // Union-find over keys.
    let mut ids: BTreeMap<Key, usize> = BTreeMap::new();
    let mut parent: Vec<usize> = Vec::new();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut id = |k: &Key, parent: &mut Vec<usize>| -> usize {
        *ids.entry(k.clone()).or_insert_with(|| {
            parent.push(parent.len());
            parent.len() - 1
        })
    };
    let mut link = |c: &Change, parent: &mut Vec<usize>| -> usize {
        let a = id(&c.key, parent);
        if let Some(o) = &c.old_key {
            let b = id(o, parent);
            let (ra, rb) = (find(parent, a), find(parent, b));
            parent[ra] = rb;
        }
        a
    };
    let l: Vec<usize> = local.iter().map(|c| link(c, &mut parent)).collect();
    let r: Vec<usize> = remote.iter().map(|c| link(c, &mut parent)).collect();
    let mut groups: BTreeMap<usize, (Vec<Key>, Vec<usize>, Vec<usize>)> = BTreeMap::new();
    for (k, &i) in &ids {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().0.push(k.clone());
    }
    for (n, &i) in l.iter().enumerate() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().1.push(n);
    }
    for (n, &i) in r.iter().enumerate() {
        let root = find(&mut parent, i);
        groups.entry(root).or_default().2.push(n);
    }
    groups
        .into_values()
        .filter(|(_, l, r)| !l.is_empty() && !r.is_empty())
        .collect()
}

/// Row images (`to_jsonb`) of `keys` present in `table`, by key.
async fn images(
    tx: &Transaction<'_>,
    table: &CapturedTable,
    keys: &[Key],
    label: &str,
) -> Result<BTreeMap<Key, serde_json::Value>, SyncError> {
    let sql = format!(
        "SELECT {}, pg_catalog.to_jsonb(t)::text FROM {} AS t WHERE {}",
        key_text(table, "t"),
        table.name,
        key_in(table, keys)
    );
    let rows = tx.query(&sql, &[]).await.map_err(q(
        label,
        format!("reading conflicting rows of {}", table.name.human()),
    ))?;
    Ok(rows
        .iter()
        .map(|r| {
            let image: String = r.get(1);
            (
                r.get(0),
                serde_json::from_str(&image).unwrap_or(serde_json::Value::Null),
            )
        })
        .collect())
}

/// The latest time among `changes` (None: none recorded).
fn latest(changes: &[Change]) -> Option<i64> {
    changes.iter().filter_map(|c| c.at).max()
}

/// Applies `rule` to a group.
async fn decide(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    rule: &Rule,
    g: &Group,
    local_t: &CapturedTable,
    target_label: &str,
) -> Result<Outcome, SyncError> {
    let remote_first = |a: &str, b: &str| {
        let pos = |n: &str| ex.order.iter().position(|o| o == n).unwrap_or(usize::MAX);
        pos(a) < pos(b)
    };
    Ok(match rule {
        Rule::Prefer(n) if *n == ex.remote => Outcome::Remote,
        Rule::Prefer(n) if *n == g.local_node => Outcome::Local,
        Rule::Prefer(_) => {
            if remote_first(&ex.remote, &g.local_node) {
                Outcome::Remote
            } else {
                Outcome::Local
            }
        }
        Rule::Latest => {
            let r = (latest(&g.remote), ex.remote.as_str());
            let l = (latest(&g.local), g.local_node.as_str());
            if r > l {
                Outcome::Remote
            } else {
                Outcome::Local
            }
        }
        Rule::Skip => Outcome::Skip,
        Rule::Abort => {
            return Err(SyncError::ConflictAborted {
                table: local_t.name.human(),
                keys: show_keys(&g.keys),
                local: g.local_node.clone(),
                remote: ex.remote.clone(),
            })
        }
        Rule::Custom(function) => {
            let one = |v: &serde_json::Value| match v {
                serde_json::Value::Array(a) if g.keys.len() == 1 => {
                    a.first().cloned().unwrap_or(serde_json::Value::Null)
                }
                other => other.clone(),
            };
            let (l, r) = (one(&g.local_rows), one(&g.remote_rows));
            let sql =
                format!("SELECT ({function}($1::text::jsonb, $2::text::jsonb, $3, $4))::text");
            let (lt, rt) = (l.to_string(), r.to_string());
            let row = ttx
                .query_one(&sql, &[&lt, &rt, &g.local_node, &ex.remote])
                .await
                .map_err(q(
                    target_label,
                    format!("calling conflict function {}", function.human()),
                ))?;
            let out: Option<String> = row.get(0);
            let out: serde_json::Value = out
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| SyncError::CustomConflict {
                    function: function.human(),
                    table: local_t.name.human(),
                    reason: format!("it returned something that is not JSON: {e}"),
                })?
                .unwrap_or(serde_json::Value::Null);
            if out == r {
                Outcome::Remote
            } else if out == l {
                Outcome::Local
            } else if g.keys.len() == 1 && out.is_object() {
                merge(ttx, local_t, &g.keys, &out, target_label).await?;
                Outcome::Merged
            } else {
                return Err(SyncError::CustomConflict {
                    function: function.human(),
                    table: local_t.name.human(),
                    reason: "it returned neither row image, nor a merged row of a single key"
                        .into(),
                });
            }
        }
    })
}

/// Writes a merged row image over the local row of `keys` (one key).
async fn merge(
    ttx: &Transaction<'_>,
    local_t: &CapturedTable,
    keys: &[Key],
    image: &serde_json::Value,
    label: &str,
) -> Result<(), SyncError> {
    let name = &local_t.name;
    let image = image.to_string();
    ttx.execute(
        &format!("DELETE FROM {name} AS t WHERE {}", key_in(local_t, keys)),
        &[],
    )
    .await
    .map_err(q(label, format!("replacing the row of {}", name.human())))?;
    ttx.execute(
        &format!(
            "INSERT INTO {name} SELECT * FROM pg_catalog.jsonb_populate_record(NULL::{name}, $1::text::jsonb)"
        ),
        &[&image],
    )
    .await
    .map_err(q(label, format!("writing the merged row of {}", name.human())))?;
    Ok(())
}

/// Keys for people to read: `(1)`, `(a, 2)`.
pub fn show_keys(keys: &[Key]) -> String {
    keys.iter()
        .map(|k| {
            let items: Vec<&str> = k.iter().map(|v| v.as_deref().unwrap_or("NULL")).collect();
            format!("({})", items.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// After the bulk apply: carries out every decision of `plan` on the local node, in `ttx`, and
/// records it.
pub(crate) async fn carry_out(
    s: Sides<'_>,
    columns: &[pgferry_core::Ident],
    plan: &Plan,
) -> Result<(), SyncError> {
    let Sides {
        stx,
        ttx,
        ex,
        remote_t,
        local_t,
        unshipped,
        labels,
        ..
    } = s;
    let (_, target_label) = labels;
    let name = &local_t.name;
    let human = name.human();
    let cols = columns
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // Gathered over the groups, then one statement each: a round with many conflicts pays per
    // table, not per conflict.
    let mut dropped: Vec<Key> = Vec::new();
    let mut reshipped: Vec<Reship> = Vec::new();
    for g in plan.groups.iter().filter(|g| !g.third) {
        let group_keys: Vec<Key> = g.keys.clone();
        if let Some((_, remote_key, local_key)) = &g.clash {
            // The losing row is gone here (see [`settle_clashes`]); its key is recorded as
            // changed, so it goes on every node.
            let lost = match g.outcome {
                Outcome::Remote => Some(local_key),
                Outcome::Local | Outcome::Merged => Some(remote_key),
                Outcome::Skip => None,
            };
            reshipped.extend(lost.map(|k| Reship {
                key: k.clone(),
                at: None,
            }));
            continue;
        }
        match g.outcome {
            Outcome::Remote => {
                // Keys only the local node changed take the remote's rows too.
                let extra: Vec<Key> = g
                    .local_keys
                    .iter()
                    .filter(|k| !g.remote_keys.contains(*k))
                    .cloned()
                    .collect();
                if !extra.is_empty() {
                    ttx.execute(
                        &format!("DELETE FROM {name} AS t WHERE {}", key_in(local_t, &extra)),
                        &[],
                    )
                    .await
                    .map_err(q(
                        target_label,
                        format!("taking the remote rows of {human}"),
                    ))?;
                    crate::copy::pass_through(
                        stx,
                        &format!(
                            "COPY (SELECT {} FROM {} AS t WHERE {}) TO STDOUT",
                            columns
                                .iter()
                                .map(|c| format!("t.{c}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            remote_t.name,
                            key_in(remote_t, &extra)
                        ),
                        ttx,
                        &format!("COPY {name} ({cols}) FROM STDIN"),
                    )
                    .await
                    .map_err(q(
                        target_label,
                        format!("copying the remote rows of {human}"),
                    ))?;
                }
                // The losing change must not ship — but merged delta columns keep it: its
                // capture rows carry what it added, which the other node may still need.
                if g.delta.is_none() {
                    dropped.extend(group_keys.iter().cloned());
                }
            }
            Outcome::Local | Outcome::Merged => {
                // The group's keys are recorded as changed here, so the local state ships —
                // unless both nodes already hold the same rows (and no delta column adds
                // anything): shipping them would only start the exchange over.
                let adds = g.delta.as_ref().is_some_and(|d| !all_zero(d));
                if adds || g.outcome == Outcome::Merged || g.local_rows != g.remote_rows {
                    // Judged as the winning change, not as a new one (a merge is new).
                    let at = match g.outcome {
                        Outcome::Local if g.delta.is_none() => latest(&g.local),
                        _ => None,
                    };
                    reshipped.extend(group_keys.iter().map(|k| Reship { key: k.clone(), at }));
                }
            }
            Outcome::Skip => {
                dropped.extend(group_keys.iter().cloned());
            }
        }
        if let Some(sums) = &g.delta {
            // The winner's row is here now; the other side's additions go on top, and the
            // merged row ships to every node.
            let set: Vec<String> = local_t
                .delta_columns
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c} = t.{c} + ${}::text::pg_catalog.numeric", i + 1))
                .collect();
            let params: Vec<&(dyn ToSql + Sync)> =
                sums.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            ttx.execute(
                &format!(
                    "UPDATE {name} AS t SET {} WHERE {}",
                    set.join(", "),
                    key_in(local_t, &group_keys)
                ),
                &params,
            )
            .await
            .map_err(q(
                target_label,
                format!("merging the delta columns of {human}"),
            ))?;
            // Shipping: the local capture rows of the key are kept (above), so the merged
            // row ships with what they added.
        }
    }
    // Drops first: the rows reshipped next are this transaction's own, "unshipped" too.
    if !dropped.is_empty() {
        drop_unshipped(ttx, local_t, unshipped, &dropped, target_label).await?;
    }
    if !reshipped.is_empty() {
        reship(ttx, ex, local_t, &reshipped, target_label).await?;
    }
    record(ttx, ex, local_t, &plan.groups, target_label).await
}

/// A key a decision records as changed on the local node.
struct Reship {
    key: Key,
    /// The time of the winning change it carries (None: the decision's own time).
    at: Option<i64>,
}

/// Records `keys` as changed on the local node, in the round's transaction: the local state of
/// those keys ships to every peer, judged by the `latest` rule as the change it carries.
async fn reship(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    local_t: &CapturedTable,
    keys: &[Reship],
    label: &str,
) -> Result<(), SyncError> {
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|r| serde_json::json!({ "key": r.key, "micros": r.at }))
        .collect();
    let rows = serde_json::Value::Array(rows).to_string();
    let sql = format!(
        "INSERT INTO pgferry.delta (xid, table_id, op, key, origin_at)
         SELECT {}, {}, 'U',
                ARRAY(SELECT e.v FROM pg_catalog.jsonb_array_elements_text(r.key) WITH ORDINALITY AS e(v, n) ORDER BY e.n),
                {}
           FROM pg_catalog.jsonb_to_recordset($1::text::jsonb) AS r(key jsonb, micros bigint)",
        ex.local_dialect.current_xid(),
        local_t.table_id,
        from_micros("r.micros"),
    );
    ttx.execute(&sql, &[&rows]).await.map_err(q(
        label,
        format!("recording the kept rows of {}", local_t.name.human()),
    ))?;
    Ok(())
}

/// Drops the local node's unshipped capture rows of `keys`: its change lost (or was skipped)
/// and must not ship.
async fn drop_unshipped(
    ttx: &Transaction<'_>,
    local_t: &CapturedTable,
    unshipped: &str,
    keys: &[Key],
    label: &str,
) -> Result<(), SyncError> {
    let rel = keys_relation(keys);
    ttx.execute(
        &format!(
            "DELETE FROM pgferry.delta d WHERE {unshipped} AND d.table_id = {} AND d.op <> 'T'
               AND (d.key IN (SELECT x.key FROM {rel}) OR d.old_key IN (SELECT x.key FROM {rel}))",
            local_t.table_id
        ),
        &[],
    )
    .await
    .map_err(q(
        label,
        format!(
            "dropping the lost local changes of {}",
            local_t.name.human()
        ),
    ))?;
    Ok(())
}

fn ops(changes: &[Change]) -> String {
    let mut ops: Vec<&str> = changes.iter().map(|c| c.op.as_str()).collect();
    ops.dedup();
    ops.join(",")
}

/// Records `groups` in `pgferry.conflict`, in one statement.
async fn record(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    table: &CapturedTable,
    groups: &[Group],
    label: &str,
) -> Result<(), SyncError> {
    if groups.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = groups
        .iter()
        .map(|g| {
            serde_json::json!({
                "local_node": g.local_node,
                "keys": g.keys,
                "local_ops": ops(&g.local),
                "remote_ops": ops(&g.remote),
                "local_rows": g.local_rows,
                "remote_rows": g.remote_rows,
                "local_micros": latest(&g.local),
                "remote_micros": latest(&g.remote),
                "rule": g.rule,
                "winner": g.winner,
                "kind": g.kind(),
            })
        })
        .collect();
    let rows = serde_json::Value::Array(rows).to_string();
    let (human, schema, relation) = (
        table.name.human(),
        table.name.schema.as_str(),
        table.name.name.as_str(),
    );
    ttx.execute(
        "INSERT INTO pgferry.conflict (table_name, keys, local_node, remote_node, local_ops, remote_ops,
                                       local_rows, remote_rows, local_changed_at, remote_changed_at, rule, winner, kind,
                                       schema_name, relation_name)
         SELECT $1, r.keys, r.local_node, $2, r.local_ops, r.remote_ops, r.local_rows, r.remote_rows,
                pg_catalog.to_timestamp(r.local_micros / 1000000.0), pg_catalog.to_timestamp(r.remote_micros / 1000000.0),
                r.rule, r.winner, r.kind, $3, $4
           FROM pg_catalog.jsonb_to_recordset($5::text::jsonb)
             AS r(local_node text, keys jsonb, local_ops text, remote_ops text, local_rows jsonb, remote_rows jsonb,
                  local_micros bigint, remote_micros bigint, rule text, winner text, kind text)",
        &[&human, &ex.remote, &schema, &relation, &rows],
    )
    .await
    .map_err(q(label, "recording the conflicts"))?;
    Ok(())
}

/// A conflict as recorded in `pgferry.conflict`.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub conflict_id: i64,
    /// RFC 3339, UTC, microseconds.
    pub decided_at: String,
    pub table: String,
    pub keys: serde_json::Value,
    pub local_node: String,
    pub remote_node: String,
    pub local_ops: String,
    pub remote_ops: String,
    pub local_rows: serde_json::Value,
    pub remote_rows: serde_json::Value,
    pub local_changed_at: Option<String>,
    pub remote_changed_at: Option<String>,
    pub rule: String,
    /// A node name, `merged` or `skip`.
    pub winner: String,
    /// `key` or `unique:INDEX`.
    pub kind: String,
    /// When `pgferry conflicts resolve` settled a skip, and how.
    pub settled_at: Option<String>,
    pub settled_by: Option<String>,
}

/// Whether the database records conflicts (`pgferry.conflict`: it took part in a two-way
/// sync).
pub(crate) async fn recorded(
    client: &impl tokio_postgres::GenericClient,
    label: &str,
) -> Result<bool, SyncError> {
    Ok(client
        .query_one(
            "SELECT pg_catalog.to_regclass('pgferry.conflict') IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(label, "looking for pgferry.conflict"))?
        .get(0))
}

/// Which conflicts [`list`] returns.
#[derive(Clone, Debug)]
pub enum Since {
    All,
    /// Decided at or after this time (any form `timestamptz` accepts).
    Time(String),
    /// Decided within this long before now.
    Ago(std::time::Duration),
}

/// The conflicts recorded on the node `dsn`, oldest first. A database that never took part
/// in a two-way sync has none.
pub async fn list(dsn: &pgferry_core::Dsn, since: &Since) -> Result<Vec<Record>, SyncError> {
    let s = pgferry_core::Session::connect(dsn, "conflicts").await?;
    if !recorded(&s.client, &s.target).await? {
        return Ok(Vec::new());
    }
    let (time, ago) = match since {
        Since::All => (None, None),
        Since::Time(t) => (Some(t.clone()), None),
        Since::Ago(d) => (None, Some(d.as_secs_f64())),
    };
    let ts = |c: &str| {
        format!("pg_catalog.to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
    };
    let rows = s
        .client
        .query(
            &format!(
                "SELECT conflict_id, {}, table_name, keys::text, local_node, remote_node, local_ops, remote_ops,
                        local_rows::text, remote_rows::text, {}, {}, rule, winner, kind, {}, settled_by
                   FROM pgferry.conflict
                  WHERE decided_at >= COALESCE($1::text::timestamptz, '-infinity')
                    AND decided_at >= COALESCE(pg_catalog.now() - pg_catalog.make_interval(secs => $2::float8), '-infinity')
                  ORDER BY conflict_id",
                ts("decided_at"),
                ts("local_changed_at"),
                ts("remote_changed_at"),
                ts("settled_at")
            ),
            &[&time, &ago],
        )
        .await
        .map_err(s.on_err("reading pgferry.conflict"))?;
    let json = |t: String| serde_json::from_str(&t).unwrap_or(serde_json::Value::Null);
    Ok(rows
        .iter()
        .map(|r| Record {
            conflict_id: r.get(0),
            decided_at: r.get(1),
            table: r.get(2),
            keys: json(r.get(3)),
            local_node: r.get(4),
            remote_node: r.get(5),
            local_ops: r.get(6),
            remote_ops: r.get(7),
            local_rows: json(r.get(8)),
            remote_rows: json(r.get(9)),
            local_changed_at: r.get(10),
            remote_changed_at: r.get(11),
            rule: r.get(12),
            winner: r.get(13),
            kind: r.get(14),
            settled_at: r.get(15),
            settled_by: r.get(16),
        })
        .collect())
}

/// What `pgferry conflicts resolve` did.
#[derive(Clone, Debug, Serialize)]
pub struct Resolved {
    pub conflict_id: i64,
    pub table: String,
    pub keys: Vec<Key>,
    /// The node whose rows now ship to the other.
    pub kept: String,
    /// Whether the record was already settled (nothing done).
    pub already_settled: bool,
}

/// Settles conflict `id` recorded on `db` (typically a `skip`): the rows of its keys on node
/// `keep` ship to the other node at the next exchange, as if changed there now. `keep` is the
/// record's local node (`db` itself) or its remote node, reached at `remote`.
pub async fn resolve(
    db: &pgferry_core::Dsn,
    id: i64,
    keep: &str,
    remote: Option<&pgferry_core::Dsn>,
) -> Result<Resolved, SyncError> {
    let mut s = pgferry_core::Session::connect(db, "conflicts resolve").await?;
    let label = s.target.clone();
    let bad = |reason: String| SyncError::TwoWayConfig { reason };
    let row = if recorded(&s.client, &label).await? {
        s.client
            .query_opt(
                "SELECT local_node, remote_node, schema_name, relation_name, keys::text, table_name,
                        settled_at IS NOT NULL
                   FROM pgferry.conflict WHERE conflict_id = $1",
                &[&id],
            )
            .await
            .map_err(q(&label, "reading the conflict"))?
    } else {
        None
    }
    .ok_or_else(|| {
        bad(format!(
            "no conflict #{id} is recorded on {label} (see `pgferry conflicts --db …`)"
        ))
    })?;
    let (local, remote_node): (String, String) = (row.get(0), row.get(1));
    let (schema, relation): (String, String) = (row.get(2), row.get(3));
    let keys: Vec<Key> = serde_json::from_str(&row.get::<_, String>(4)).unwrap_or_default();
    let table: String = row.get(5);
    let mut out = Resolved {
        conflict_id: id,
        table,
        keys: keys.clone(),
        kept: keep.to_owned(),
        already_settled: row.get(6),
    };
    if out.already_settled {
        return Ok(out);
    }
    let mut other;
    let on: &mut pgferry_core::Session = if keep == local {
        &mut s
    } else if keep == remote_node {
        let dsn = remote.ok_or_else(|| {
            bad(format!(
                "conflict #{id} is between {local} (this database) and {remote_node}: to keep {remote_node}'s rows, give its connection with --node {remote_node}=DSN"
            ))
        })?;
        other = pgferry_core::Session::connect(dsn, "conflicts resolve").await?;
        &mut other
    } else {
        return Err(bad(format!(
            "conflict #{id} is between {local} and {remote_node}: --keep names one of them"
        )));
    };
    let on_label = on.target.clone();
    let dialect = Dialect::new(on.server_version);
    let tx = on
        .client
        .transaction()
        .await
        .map_err(q(&on_label, "starting the resolution"))?;
    let table_id: Option<i32> = tx
        .query_opt(
            "SELECT table_id FROM pgferry.captured_table WHERE schema_name = $1 AND table_name = $2",
            &[&schema, &relation],
        )
        .await
        .map_err(q(&on_label, "finding the captured table"))?
        .map(|r| r.get(0));
    let table_id = table_id.ok_or_else(|| SyncError::NotCapturedOnPeer {
        table: out.table.clone(),
        node: keep.to_owned(),
    })?;
    tx.execute(
        &format!(
            "INSERT INTO pgferry.delta (xid, table_id, op, key) SELECT {}, {table_id}, 'U', x.key FROM {}",
            dialect.current_xid(),
            keys_relation(&keys)
        ),
        &[],
    )
    .await
    .map_err(q(&on_label, "recording the kept rows"))?;
    tx.commit()
        .await
        .map_err(q(&on_label, "committing the resolution"))?;
    let by = format!("pgferry conflicts resolve: kept {keep}");
    s.client
        .execute(
            "UPDATE pgferry.conflict SET settled_at = pg_catalog.clock_timestamp(), settled_by = $2
              WHERE conflict_id = $1",
            &[&id, &by],
        )
        .await
        .map_err(q(&label, "marking the conflict settled"))?;
    out.already_settled = false;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(v: &str) -> Key {
        vec![Some(v.to_owned())]
    }

    fn change(key: &str, old: Option<&str>) -> Change {
        Change {
            key: k(key),
            old_key: old.map(k),
            op: "U".into(),
            at: None,
        }
    }

    #[test]
    fn rules_parse() {
        assert_eq!(Rule::parse("latest").unwrap(), Rule::Latest);
        assert_eq!(Rule::parse("prefer:a").unwrap(), Rule::Prefer("a".into()));
        assert!(Rule::parse("prefer:").is_err());
        assert!(Rule::parse("newest").is_err());
        assert_eq!(
            Rule::parse("custom:s.f").unwrap().to_string(),
            "custom:s.f".to_owned()
        );
    }

    #[test]
    fn groups_follow_key_changes() {
        // Remote changed 1 -> 2; local updated 1 and, separately, 3 (not incoming).
        let remote = vec![change("2", Some("1"))];
        let local = vec![change("1", None), change("3", None)];
        let g = group(&local, &remote);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].0, vec![k("1"), k("2")]);
        assert_eq!(g[0].1, vec![0]);
        assert_eq!(g[0].2, vec![0]);
    }

    #[test]
    fn keys_relation_quotes() {
        let rel = keys_relation(&[vec![Some("a'b".into()), None]]);
        assert!(rel.contains("'a''b'"), "{rel}");
        assert!(rel.contains("NULL"), "{rel}");
    }
}
