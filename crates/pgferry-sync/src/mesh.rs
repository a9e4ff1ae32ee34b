//! Meshes of three or more nodes: a conflict between two peers ends the same on every other.
//!
//! Two nodes that changed one key settle it between themselves ([`crate::conflict`]). A third
//! node receives both changes on two independent streams, in either order, possibly long after
//! the two decided: applying whichever arrives last would leave it with the loser. So a node
//! remembers where a row a round applied came from (**provenance**, `pgferry.row_origin`, written
//! in the round's transaction): the peer, the transactions behind the row, the time of the latest
//! and the row version the round wrote (its `xmin`). A change of that key arriving later from
//! another peer which had not applied those transactions (its `pgferry.applied`, read at the
//! round's snapshot) was made without knowing them: a conflict, decided here by the sync's rule.
//! The rules look only at the two changes (times, node names; a custom function at the two rows),
//! so this node keeps the row the two peers keep.
//!
//! Why that is enough: rounds move row *state*. A peer that had applied the held transactions
//! ships its current row, which already is the outcome of its own decision about them (the
//! held row, or its own kept one, recorded as changed again); only a peer that had not applied
//! them can ship a row made without knowing them. A local write since the round (the row's
//! `xmin` differs) makes the row this node's own, which its own conflict check covers.
//!
//! Provenance is kept until every other peer has applied the transactions behind it; two-node
//! syncs keep none and pay nothing for it.

use std::collections::BTreeMap;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::conflict::{self, Exchange, Key, Plan, Sides};
use crate::error::q;
use crate::registry::CapturedTable;
use crate::SyncError;

/// What a round of a mesh of three or more nodes reads on its source, at the round's snapshot.
#[derive(Debug, Default)]
pub(crate) struct SourceView {
    /// The source's progress on each node it applies: node id → snapshot.
    pub applied: BTreeMap<String, String>,
}

impl SourceView {
    /// Whether the source had applied every one of node `node_id`'s transactions `xids`.
    fn knows(&self, node_id: &str, xids: &[String]) -> bool {
        self.applied
            .get(node_id)
            .is_some_and(|s| xids.iter().all(|x| visible(x, s)))
    }
}

/// Whether `ex`'s sync is a mesh of three or more nodes.
pub(crate) fn applies(ex: &Exchange) -> bool {
    ex.order.len() > 2
}

/// Reads the [`SourceView`] at the round's snapshot.
pub(crate) async fn read_source(
    stx: &Transaction<'_>,
    label: &str,
) -> Result<SourceView, SyncError> {
    let applied = stx
        .query_typed(
            "SELECT source_node_id, snapshot FROM pgferry.applied WHERE snapshot IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(label, "reading the source's progress on its peers"))?;
    Ok(SourceView {
        applied: applied.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

/// What [`check`] found for one table.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// The temporary table staging the remote's transactions and time per key of the round.
    pub stage: String,
    /// Keys whose row came from another peer: decided here against that peer's change, not
    /// against this node's own older changes.
    pub covered: Vec<Key>,
    /// Conflicts between the remote's change and the peer this node's row came from.
    pub plan: Plan,
}

/// A join giving, as `cur.xmin`, the version (xmin) of `local_t`'s row whose key is the
/// recorded key `column`, NULL when there is no such row.
fn current_version(local_t: &CapturedTable, column: &str) -> String {
    format!(
        "LEFT JOIN LATERAL (SELECT t.xmin::text AS xmin FROM {} AS t WHERE {} = {}) AS cur ON true",
        local_t.name,
        conflict::key_tuple(local_t, "t"),
        conflict::restored_tuple(local_t, column)
    )
}

/// Provenance `r` still describes the row (joined by [`current_version`]): no local write
/// since the round (or the row the round deleted is still absent).
const STILL_APPLIED: &str = "r.row_xmin IS NOT DISTINCT FROM cur.xmin";

/// Checks one table's incoming keys (its rows already locked) against provenance. `pending`
/// selects the round's capture rows of `remote_t` on the source.
pub(crate) async fn check(s: Sides<'_>, view: &SourceView) -> Result<Checked, SyncError> {
    let Sides {
        stx,
        ttx,
        ex,
        remote_t,
        local_t,
        pending,
        labels,
        ..
    } = s;
    let (_, target_label) = labels;
    let human = local_t.name.human();
    let stage = format!("pgferry_origin_{}", local_t.table_id);
    ttx.batch_execute(&format!(
        "DROP TABLE IF EXISTS pg_temp.{stage};
         CREATE TEMP TABLE {stage} (key text[], xids text[], micros bigint) ON COMMIT DROP"
    ))
    .await
    .map_err(q(target_label, format!("staging the origins of {human}")))?;
    crate::copy::pass_through(
        stx,
        &format!(
            "COPY (SELECT y.key, pg_catalog.array_agg(d.xid::text), pg_catalog.max({time})
                    {touched} GROUP BY y.key) TO STDOUT",
            time = ex.remote_time,
            touched = conflict::touched_keys(pending, remote_t.table_id),
        ),
        ttx,
        &format!("COPY pg_temp.{stage} FROM STDIN"),
    )
    .await
    .map_err(q(target_label, format!("staging the origins of {human}")))?;
    let origins_sql = format!(
        "SELECT o.key, r.node, r.node_id, r.xids, {held_at}, o.micros
           FROM pg_temp.{stage} AS o
           JOIN pgferry.row_origin AS r ON r.table_id = $1 AND r.key = o.key AND r.node_id <> $2
           {cur}
          WHERE {STILL_APPLIED}",
        held_at = conflict::micros("r.changed_at"),
        cur = current_version(local_t, "o.key"),
    );
    let origins = ttx
        .query_typed(
            &origins_sql,
            &[
                (&local_t.table_id, Type::INT4),
                (&ex.remote_node_id, Type::TEXT),
            ],
        )
        .await
        .map_err(q(target_label, format!("reading the origins of {human}")))?;
    let mut covered = Vec::new();
    let mut cases = Vec::new();
    for r in &origins {
        let key: Key = r.get(0);
        covered.push(key.clone());
        // Made without knowing the held row's changes: the source had not applied them all.
        if !view.knows(&r.get::<_, String>(2), &r.get::<_, Vec<String>>(3)) {
            cases.push(conflict::ThirdParty {
                key,
                held: r.get(1),
                held_at: r.get(4),
                remote_at: r.get(5),
            });
        }
    }
    let plan = if cases.is_empty() {
        Plan::default()
    } else {
        conflict::third_party(s, cases).await?
    };
    Ok(Checked {
        stage,
        covered,
        plan,
    })
}

/// Keys of `local_t` whose row this node holds from a peer other than the source, through
/// transactions the source had not applied at the round's snapshot (`view`): changes made
/// concurrently with everything the source did since, such as its TRUNCATE.
pub(crate) async fn unknown_to_source(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    view: &SourceView,
    local_t: &CapturedTable,
    label: &str,
) -> Result<Vec<Key>, SyncError> {
    let rows = ttx
        .query_typed(
            &format!(
                "SELECT r.key, r.node_id, r.xids FROM pgferry.row_origin AS r {cur}
                  WHERE r.table_id = $1 AND r.node_id <> $2 AND {STILL_APPLIED}",
                cur = current_version(local_t, "r.key"),
            ),
            &[
                (&local_t.table_id, Type::INT4),
                (&ex.remote_node_id, Type::TEXT),
            ],
        )
        .await
        .map_err(q(
            label,
            format!("reading the origins of {}", local_t.name.human()),
        ))?;
    Ok(rows
        .iter()
        .filter(|r| !view.knows(&r.get::<_, String>(1), &r.get::<_, Vec<String>>(2)))
        .map(|r| r.get(0))
        .collect())
}

/// Whether transaction `xid` is visible in `snapshot` (`xmin:xmax:xip,…`, as both
/// `pg_snapshot` and `txid_snapshot` print): committed before the snapshot was taken.
/// Unreadable input counts as not visible (the safe side: a conflict is checked).
pub(crate) fn visible(xid: &str, snapshot: &str) -> bool {
    let Ok(xid) = xid.parse::<u64>() else {
        return false;
    };
    let mut parts = snapshot.splitn(3, ':');
    let (Some(xmin), Some(xmax)) = (
        parts.next().and_then(|x| x.parse::<u64>().ok()),
        parts.next().and_then(|x| x.parse::<u64>().ok()),
    ) else {
        return false;
    };
    if xid < xmin {
        return true;
    }
    if xid >= xmax {
        return false;
    }
    !parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|x| !x.is_empty())
        .any(|x| x.parse::<u64>().ok() == Some(xid))
}

/// Remembers where the rows of the table's applied keys came from (every staged key but
/// `excluded`, which the round left alone).
pub(crate) async fn remember(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    local_t: &CapturedTable,
    stage: &str,
    excluded: &[Key],
    label: &str,
) -> Result<(), SyncError> {
    let keep = if excluded.is_empty() {
        String::new()
    } else {
        format!(
            "WHERE o.key NOT IN (SELECT x.key FROM {})",
            conflict::keys_relation(excluded)
        )
    };
    let waiting: Vec<&str> = ex
        .order
        .iter()
        .map(String::as_str)
        .filter(|n| *n != ex.local && *n != ex.remote)
        .collect();
    let sql = format!(
        "INSERT INTO pgferry.row_origin AS r (table_id, key, node, node_id, xids, changed_at, row_xmin, waiting)
         SELECT $1, o.key, $2, $3, o.xids, {at}, cur.xmin, $4
           FROM pg_temp.{stage} AS o {cur}
          {keep}
         ON CONFLICT (table_id, key) DO UPDATE
            SET node = excluded.node, node_id = excluded.node_id, xids = excluded.xids,
                changed_at = excluded.changed_at, row_xmin = excluded.row_xmin,
                waiting = excluded.waiting",
        at = conflict::from_micros("o.micros"),
        cur = current_version(local_t, "o.key"),
    );
    let params: [(&(dyn ToSql + Sync), Type); 4] = [
        (&local_t.table_id, Type::INT4),
        (&ex.remote, Type::TEXT),
        (&ex.remote_node_id, Type::TEXT),
        (&waiting, Type::TEXT_ARRAY),
    ];
    ttx.execute_typed(&sql, &params).await.map_err(q(
        label,
        format!("remembering the origins of {}", local_t.name.human()),
    ))?;
    Ok(())
}

/// At the end of a round, forgets provenance every other peer has now applied (the source
/// has, per `view`), or that waits only for nodes no longer in the sync.
pub(crate) async fn forget(
    ttx: &Transaction<'_>,
    ex: &Exchange,
    view: &SourceView,
    label: &str,
) -> Result<(), SyncError> {
    let dialect = ex.local_dialect;
    let applied: Vec<serde_json::Value> = view
        .applied
        .iter()
        .filter(|(id, _)| **id != ex.local_node_id)
        .map(|(id, s)| serde_json::json!({ "node_id": id, "snapshot": s }))
        .collect();
    let applied = serde_json::Value::Array(applied).to_string();
    let sql = format!(
        "UPDATE pgferry.row_origin AS r SET waiting = pg_catalog.array_remove(r.waiting, $1)
           FROM pg_catalog.jsonb_to_recordset($2::text::jsonb) AS p(node_id text, snapshot text)
          WHERE r.node_id = p.node_id AND $1 = ANY (r.waiting)
            AND NOT EXISTS (SELECT 1 FROM pg_catalog.unnest(r.xids) AS x(xid)
                             WHERE NOT {}(x.xid::{}, p.snapshot::{}))",
        dialect.visible_in_snapshot(),
        dialect.xid_type(),
        dialect.snapshot_type()
    );
    let update: [(&(dyn ToSql + Sync), Type); 2] =
        [(&ex.remote, Type::TEXT), (&applied, Type::TEXT)];
    // Also gone: provenance waiting only for nodes no longer in the sync.
    let nodes: [(&(dyn ToSql + Sync), Type); 1] = [(&ex.order, Type::TEXT_ARRAY)];
    // Sent together, run in order (the first error in that order is the cause).
    let (updated, deleted) = tokio::join!(
        ttx.execute_typed(&sql, &update),
        ttx.execute_typed(
            "DELETE FROM pgferry.row_origin WHERE NOT (waiting OPERATOR(pg_catalog.&&) $1)",
            &nodes
        )
    );
    updated
        .and(deleted)
        .map_err(q(label, "forgetting the origins every peer has"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::visible;

    #[test]
    fn visibility_follows_the_snapshot() {
        let s = "100:110:103,107";
        assert!(visible("99", s));
        assert!(visible("100", s));
        assert!(visible("105", s));
        assert!(!visible("103", s));
        assert!(!visible("107", s));
        assert!(!visible("110", s));
        assert!(!visible("200", s));
        assert!(visible("5", "10:10:"));
        assert!(!visible("10", "10:10:"));
        assert!(!visible("x", s));
        assert!(!visible("5", "garbage"));
    }
}
