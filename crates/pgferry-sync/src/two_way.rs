//! Two-way (multi-node) syncs: every node is both a source and a target of every other.
//!
//! Invariants, and why they hold:
//! - **No loops.** Rows pgferry applies are written under `session_replication_role = replica`,
//!   where the capture triggers do not fire: an applied row is never captured again, so it does
//!   not travel back. Two-way syncs therefore require that role on every node, and a sync of
//!   three or more nodes is a full mesh (every node exchanges with every other), not a ring.
//! - **Each direction is an ordinary round** (one source snapshot, one target transaction, the
//!   progress row in it), so a crash at any moment neither loses a change nor applies one twice;
//!   what two-way adds is the conflict check inside the target's transaction ([`crate::conflict`]).
//! - **Sequences are not copied**: that would hand out the same values on two nodes (see
//!   `sequence_partition`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use pgferry_core::artifact::Dialect;
use pgferry_core::{Dsn, Session};
use serde::Serialize;

use crate::conflict::{self, Decision, Exchange, Rules};
use crate::error::q;
use crate::{round, target, SourceInfo, SyncError, TableApplied};

/// What two-way syncs add to a node's schema pgferry (change times, the conflict record).
const TWO_WAY_SQL: &str = include_str!("../../../sql/two_way.sql");

/// A node of a two-way sync.
#[derive(Clone, Debug)]
pub struct Node {
    /// The name rules and reports use (`prefer:NAME`).
    pub name: String,
    pub dsn: Dsn,
}

/// One direction of an exchange: the changes of `from` applied to `to`.
#[derive(Clone, Debug, Serialize)]
pub struct DirectionReport {
    pub from: String,
    pub to: String,
    /// The snapshot of `from` that `to` now holds.
    pub snapshot: String,
    pub tables: Vec<TableApplied>,
    pub rows: u64,
    pub conflicts: Vec<Decision>,
    pub seconds: f64,
}

/// What one exchange round trip did.
#[derive(Clone, Debug, Serialize)]
pub struct ExchangeReport {
    pub nodes: Vec<String>,
    pub directions: Vec<DirectionReport>,
    pub rows: u64,
    pub conflicts: usize,
    /// Capture rows purged on the nodes because every peer has them.
    pub purged: u64,
    pub seconds: f64,
}

/// Checks the node list and the rules: at least two nodes, unique names, `prefer:` naming a
/// node.
pub fn validate(nodes: &[Node], rules: &Rules) -> Result<(), SyncError> {
    let bad = |reason: String| Err(SyncError::TwoWayConfig { reason });
    if nodes.len() < 2 {
        return bad("a two-way sync needs at least two nodes (--node NAME=DSN, twice)".into());
    }
    for (i, n) in nodes.iter().enumerate() {
        if n.name.is_empty() {
            return bad("a node needs a name (--node NAME=DSN)".into());
        }
        if nodes[..i].iter().any(|m| m.name == n.name) {
            return bad(format!("node name {:?} is given twice", n.name));
        }
    }
    for r in rules.all() {
        if let conflict::Rule::Prefer(p) = r {
            if !nodes.iter().any(|n| n.name == *p) {
                return bad(format!(
                    "rule prefer:{p} names no node of the sync (nodes: {})",
                    nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// A node connected and ready to exchange.
pub(crate) struct Prepared {
    pub name: String,
    pub dsn: Dsn,
    pub session: Session,
    pub probe: Session,
    pub info: SourceInfo,
    /// `track_commit_timestamp` is on.
    pub commit_ts: bool,
}

/// Connects to a node and prepares it: capture installed, the replica role allowed, the
/// two-way additions to its schema made.
pub(crate) async fn prepare(node: &Node) -> Result<Prepared, SyncError> {
    let mut session = Session::connect(&node.dsn, "sync").await?;
    let probe = Session::connect(&node.dsn, "sync probe").await?;
    let info = crate::source_info(&session, &[]).await?;
    if !target::may_set_replica_role(&session).await? {
        return Err(SyncError::TwoWayNeedsReplicaRole {
            node: node.name.clone(),
        });
    }
    add_schema(&mut session).await?;
    let commit_ts: bool = session
        .client
        .query_one(
            "SELECT pg_catalog.current_setting('track_commit_timestamp')::bool",
            &[],
        )
        .await
        .map_err(session.on_err("reading track_commit_timestamp"))?
        .get(0);
    Ok(Prepared {
        name: node.name.clone(),
        dsn: node.dsn.clone(),
        session,
        probe,
        info,
        commit_ts,
    })
}

/// Adds what two-way syncs need to the node's schema pgferry, once.
async fn add_schema(s: &mut Session) -> Result<(), SyncError> {
    let label = s.target.clone();
    let ready: bool = s
        .client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                             WHERE attrelid = 'pgferry.delta'::pg_catalog.regclass
                               AND attname = 'changed_at' AND atthasdef AND NOT attisdropped)
                AND pg_catalog.to_regclass('pgferry.conflict') IS NOT NULL",
            &[],
        )
        .await
        .map_err(q(&label, "checking the node's two-way schema"))?
        .get(0);
    if ready {
        return Ok(());
    }
    let tx = s
        .begin_locked(Duration::from_secs(10))
        .await
        .map_err(SyncError::Core)?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'")
        .await
        .map_err(q(&label, "setting lock_timeout"))?;
    tx.batch_execute(TWO_WAY_SQL)
        .await
        .map_err(q(&label, "adding two-way support to schema pgferry"))?;
    tx.commit()
        .await
        .map_err(q(&label, "committing two-way support"))?;
    tracing::info!(node = %label, "added two-way support to schema pgferry");
    Ok(())
}

/// Refuses nodes whose captured tables differ: every table captured on one node must be
/// captured, with the same key, on every other.
pub(crate) fn check_tables(nodes: &[Prepared]) -> Result<(), SyncError> {
    for a in nodes {
        for b in nodes {
            if a.name == b.name {
                continue;
            }
            for t in a.info.tables.values() {
                let Some(other) = b.info.tables.values().find(|o| o.name == t.name) else {
                    return Err(SyncError::NotCapturedOnPeer {
                        table: t.name.human(),
                        node: b.name.clone(),
                    });
                };
                let shape = |k: &crate::registry::CapturedTable| {
                    k.key
                        .iter()
                        .map(|(c, ty, _)| format!("{} {ty}", c.human()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if shape(t) != shape(other) {
                    return Err(SyncError::KeyMismatch {
                        table: t.name.human(),
                        this: a.name.clone(),
                        this_key: shape(t),
                        other: b.name.clone(),
                        other_key: shape(other),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The conflict context of the direction `from` → `to`.
pub(crate) fn exchange(
    from: &Prepared,
    to: &Prepared,
    to_node_id: &str,
    to_version: u32,
    rules: &Rules,
    order: &[String],
) -> Exchange {
    Exchange {
        local: to.name.clone(),
        remote: from.name.clone(),
        order: order.to_vec(),
        local_node_id: to_node_id.to_owned(),
        rules: rules.clone(),
        local_dialect: Dialect::new(to_version),
        local_tables: to
            .info
            .tables
            .values()
            .map(|t| (t.name.to_string(), t.clone()))
            .collect::<BTreeMap<_, _>>(),
        local_time: conflict::time_expr(to.commit_ts),
        remote_time: conflict::time_expr(from.commit_ts),
    }
}

/// One exchange round trip: for every ordered pair of nodes, one round applying the changes of
/// the first to the second (conflicts decided by `rules`), then capture rows every peer has
/// are purged. Sequences are not copied.
pub async fn exchange_once(nodes: &[Node], rules: &Rules) -> Result<ExchangeReport, SyncError> {
    validate(nodes, rules)?;
    let started = Instant::now();
    let mut prepared = Vec::with_capacity(nodes.len());
    for n in nodes {
        prepared.push(prepare(n).await?);
    }
    check_tables(&prepared)?;
    let order: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let mut report = ExchangeReport {
        nodes: order.clone(),
        directions: Vec::new(),
        rows: 0,
        conflicts: 0,
        purged: 0,
        seconds: 0.0,
    };
    for from in 0..prepared.len() {
        for to in 0..prepared.len() {
            if from == to {
                continue;
            }
            let d_started = Instant::now();
            let crate::PreparedTarget {
                session: mut dst,
                registered: reg,
                entry,
            } = crate::prepare_target(
                &prepared[from].session,
                &prepared[from].info,
                &prepared[to].dsn,
                &crate::SyncOptions::default(),
            )
            .await?;
            let ex = exchange(
                &prepared[from],
                &prepared[to],
                &reg.node_id,
                dst.server_version,
                rules,
                &order,
            );
            let src = &mut prepared[from];
            let ctx = round::RoundContext {
                dialect: src.info.dialect,
                source_node: &src.info.node_id,
                previous: reg.applied.as_deref(),
                tables: &src.info.tables,
                skipped: &src.info.skipped,
                replica_role: true,
                versions: (src.session.server_version, dst.server_version),
                split_above: None,
                two_way: Some(&ex),
            };
            let outcome =
                crate::round_with_retries(&mut src.session, &src.probe, &mut dst, &ctx).await?;
            target::acknowledge(&src.session, &entry.name, &outcome.snapshot).await?;
            let rows: u64 = outcome.tables.iter().map(|t| t.rows).sum();
            let conflicts: Vec<Decision> = outcome
                .tables
                .iter()
                .flat_map(|t| t.conflicts.iter().cloned())
                .collect();
            report.rows += rows;
            report.conflicts += conflicts.len();
            report.directions.push(DirectionReport {
                from: src.name.clone(),
                to: prepared[to].name.clone(),
                snapshot: outcome.snapshot,
                tables: outcome.tables,
                rows,
                conflicts,
                seconds: d_started.elapsed().as_secs_f64(),
            });
        }
    }
    for p in &prepared {
        report.purged += crate::purge::purge(&p.session, true).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
