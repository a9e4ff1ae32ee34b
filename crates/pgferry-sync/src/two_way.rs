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
/// What meshes of three or more nodes add (a decision's origin and settled changes).
const TWO_WAY_2_SQL: &str = include_str!("../../../sql/two_way_2.sql");

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
        // Three or more nodes: a change made after another arrived can meet a third node's
        // change that beat the first on one node and lost to it on another; only an order
        // of changes that agrees with the order they were made in (the time) settles every
        // node alike (crate::mesh).
        if nodes.len() > 2 && !matches!(r, conflict::Rule::Latest | conflict::Rule::Abort) {
            return bad(format!(
                "rule {r} is for syncs of two nodes; a sync of {} nodes takes latest or abort \
                 (node preferences and functions of two rows can disagree across three nodes: \
                 docs/conflicts.md)",
                nodes.len()
            ));
        }
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

/// A two-way sync as the daemon runs it: one [`crate::daemon::SyncSpec`] per node (the node as
/// source, every other as target), each carrying this.
#[derive(Clone, Debug)]
pub struct Mesh {
    /// Every node of the sync, in order (`prefer:` between two other nodes: the first listed).
    pub nodes: Vec<Node>,
    pub rules: Rules,
    /// Delta columns the sync requires every node to declare (`pgferry install
    /// --delta-column`): the sync refuses nodes that do not.
    pub delta_columns: Vec<pgferry_install::DeltaColumn>,
}

impl Mesh {
    /// The daemon's syncs of this mesh: per node, a sync named `NAME:NODE` replicating the
    /// node to every other, each with `options`.
    pub fn specs(
        self,
        name: &str,
        poll_interval: Duration,
        options: &crate::SyncOptions,
    ) -> Result<Vec<crate::daemon::SyncSpec>, SyncError> {
        validate(&self.nodes, &self.rules)?;
        let mesh = std::sync::Arc::new(self);
        Ok(mesh
            .nodes
            .iter()
            .map(|n| crate::daemon::SyncSpec {
                name: format!("{name}:{}", n.name),
                source: n.dsn.clone(),
                targets: mesh
                    .nodes
                    .iter()
                    .filter(|o| o.name != n.name)
                    .map(|o| o.dsn.clone())
                    .collect(),
                tables: Vec::new(),
                options: options.clone(),
                poll_interval,
                two_way: Some(crate::daemon::TwoWay {
                    mesh: mesh.clone(),
                    source: n.name.clone(),
                }),
            })
            .collect())
    }

    /// The names of the targets of `source`'s sync, in the order of its targets.
    pub fn peers(&self, source: &str) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|o| o.name != source)
            .map(|o| o.name.clone())
            .collect()
    }

    fn order(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }
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
                AND pg_catalog.to_regclass('pgferry.conflict') IS NOT NULL
                AND pg_catalog.to_regclass('pgferry.row_origin') IS NOT NULL",
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
    tx.batch_execute(TWO_WAY_2_SQL)
        .await
        .map_err(q(&label, "adding two-way support to schema pgferry"))?;
    tx.commit()
        .await
        .map_err(q(&label, "committing two-way support"))?;
    tracing::info!(node = %label, "added two-way support to schema pgferry");
    Ok(())
}

/// Delta columns merge two nodes' changes: a sync of more nodes refuses tables that have them.
fn in_pairs(nodes: usize, node: &str, info: &SourceInfo) -> Result<(), SyncError> {
    match info.tables.values().find(|t| !t.delta_columns.is_empty()) {
        Some(t) if nodes > 2 => Err(SyncError::DeltaColumnsInMesh {
            table: t.name.human(),
            node: node.to_owned(),
            nodes,
        }),
        _ => Ok(()),
    }
}

/// Whether `track_commit_timestamp` is on.
async fn commit_ts(s: &Session) -> Result<bool, SyncError> {
    Ok(s.client
        .query_one(
            "SELECT pg_catalog.current_setting('track_commit_timestamp')::bool",
            &[],
        )
        .await
        .map_err(s.on_err("reading track_commit_timestamp"))?
        .get(0))
}

/// One end of a direction: its session, name and what it captures.
pub(crate) struct End<'a> {
    pub session: &'a mut Session,
    pub name: &'a str,
}

/// Refuses a node that does not declare every delta column the sync requires.
fn declares(
    name: &str,
    info: &SourceInfo,
    required: &[pgferry_install::DeltaColumn],
) -> Result<(), SyncError> {
    for d in required {
        let found = info
            .tables
            .values()
            .any(|t| t.name == d.table && t.delta_columns.contains(&d.column));
        if !found {
            return Err(SyncError::TwoWayConfig {
                reason: format!(
                    "node {name} does not declare {} as a delta column, which the sync requires; nothing was applied\nfix: pgferry install --source <{name}> --delta-column {}",
                    d.human(),
                    d.human()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses `b` unless it captures every table `a` replicates, with the same key.
fn same_tables(a: (&str, &SourceInfo), b: (&str, &SourceInfo)) -> Result<(), SyncError> {
    let shape = |k: &crate::registry::CapturedTable| {
        k.key
            .iter()
            .map(|(c, ty, _)| format!("{} {ty}", c.human()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for t in a.1.tables.values() {
        let Some(other) = b.1.tables.values().find(|o| o.name == t.name) else {
            return Err(SyncError::NotCapturedOnPeer {
                table: t.name.human(),
                node: b.0.to_owned(),
            });
        };
        if t.delta_columns != other.delta_columns {
            let list = |k: &crate::registry::CapturedTable| {
                k.delta_columns
                    .iter()
                    .map(|c| c.human())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(SyncError::TwoWayConfig {
                reason: format!(
                    "table {} has delta columns ({}) on node {} but ({}) on node {}: declare the same on every node (pgferry install --source … --delta-column {}.COLUMN); nothing was applied",
                    t.name.human(),
                    list(t),
                    a.0,
                    list(other),
                    b.0,
                    t.name.human()
                ),
            });
        }
        if shape(t) != shape(other) {
            return Err(SyncError::KeyMismatch {
                table: t.name.human(),
                this: a.0.to_owned(),
                this_key: shape(t),
                other: b.0.to_owned(),
                other_key: shape(other),
            });
        }
    }
    Ok(())
}

/// Refuses a node where rows pgferry applies would be captured again: its role may not set
/// the replica role (`replica_role`) and its capture functions lack the guard that skips
/// pgferry's own apply (installed before the guard; `pgferry install` regenerates them).
async fn no_loop(node: &str, s: &Session, replica_role: bool) -> Result<(), SyncError> {
    if replica_role || target::capture_guarded(s).await? {
        return Ok(());
    }
    Err(SyncError::TwoWayNeedsReplicaRole {
        node: node.to_owned(),
    })
}

/// Prepares the direction `from` → `to` of a two-way sync and returns its conflict context:
/// rows applied to `to` not captured again (the replica role on `to`, `to_replica_role` as
/// registration found it, or guarded capture), the two-way additions on both nodes, every
/// table `from` replicates captured on `to` with the same key.
pub(crate) async fn direction(
    from: End<'_>,
    from_info: &SourceInfo,
    to: End<'_>,
    to_replica_role: bool,
    mesh: &Mesh,
) -> Result<Exchange, SyncError> {
    no_loop(to.name, to.session, to_replica_role).await?;
    add_schema(from.session).await?;
    add_schema(to.session).await?;
    let to_info = crate::source_info(to.session, &[]).await?;
    same_tables((from.name, from_info), (to.name, &to_info))?;
    declares(from.name, from_info, &mesh.delta_columns)?;
    declares(to.name, &to_info, &mesh.delta_columns)?;
    in_pairs(mesh.nodes.len(), to.name, &to_info)?;
    let (from_ts, to_ts) = (commit_ts(from.session).await?, commit_ts(to.session).await?);
    let deadlock_timeout = target::may_set(to.session, "deadlock_timeout").await?;
    Ok(Exchange {
        local: to.name.to_owned(),
        remote: from.name.to_owned(),
        order: mesh.order(),
        local_node_id: to_info.node_id.clone(),
        remote_node_id: from_info.node_id.clone(),
        rules: mesh.rules.clone(),
        local_dialect: Dialect::new(to.session.server_version),
        local_tables: to_info
            .tables
            .into_values()
            .map(|t| (t.name.to_string(), t))
            .collect::<BTreeMap<_, _>>(),
        local_time: conflict::time_expr(to_ts),
        deadlock_timeout,
        remote_time: conflict::time_expr(from_ts),
    })
}

/// One exchange round trip: for every ordered pair of nodes, one round applying the changes of
/// the first to the second (conflicts decided by the mesh's rules), then capture rows every peer has
/// are purged. Sequences are not copied.
pub async fn exchange_once(mesh: &Mesh) -> Result<ExchangeReport, SyncError> {
    let all: Vec<(usize, usize)> = (0..mesh.nodes.len())
        .flat_map(|from| (0..mesh.nodes.len()).map(move |to| (from, to)))
        .filter(|(from, to)| from != to)
        .collect();
    exchange_in_order(mesh, &all).await
}

/// Rounds of the given directions only, in this order (`(from, to)`: indexes into the mesh's
/// nodes), then the purge: what [`exchange_once`] does for every pair. For tools and tests
/// that need a particular order of arrivals.
pub async fn exchange_in_order(
    mesh: &Mesh,
    directions: &[(usize, usize)],
) -> Result<ExchangeReport, SyncError> {
    let nodes = &mesh.nodes;
    validate(nodes, &mesh.rules)?;
    let started = Instant::now();
    let mut sources = Vec::with_capacity(nodes.len());
    for n in nodes {
        let session = Session::connect(&n.dsn, "sync").await?;
        let probe = Session::connect(&n.dsn, "sync probe").await?;
        let info = crate::source_info(&session, &[]).await?;
        sources.push((session, probe, info));
    }
    // Every pair checked before anything is applied.
    for (i, a) in sources.iter().enumerate() {
        declares(&nodes[i].name, &a.2, &mesh.delta_columns)?;
        in_pairs(nodes.len(), &nodes[i].name, &a.2)?;
        no_loop(
            &nodes[i].name,
            &a.0,
            target::may_set_replica_role(&a.0).await?,
        )
        .await?;
        for (j, b) in sources.iter().enumerate() {
            if i != j {
                same_tables((&nodes[i].name, &a.2), (&nodes[j].name, &b.2))?;
            }
        }
    }
    let mut report = ExchangeReport {
        nodes: mesh.order(),
        directions: Vec::new(),
        rows: 0,
        conflicts: 0,
        purged: 0,
        seconds: 0.0,
    };
    for &(from, to) in directions {
        if from == to || from >= nodes.len() || to >= nodes.len() {
            continue;
        }
        let d_started = Instant::now();
        let (src, probe, info) = &mut sources[from];
        let crate::PreparedTarget {
            session: mut dst,
            registered: reg,
            entry,
        } = crate::prepare_target(src, info, &nodes[to].dsn, &crate::SyncOptions::default())
            .await?;
        let ex = direction(
            End {
                session: src,
                name: &nodes[from].name,
            },
            info,
            End {
                session: &mut dst,
                name: &nodes[to].name,
            },
            reg.replica_role,
            mesh,
        )
        .await?;
        let ctx = round::RoundContext {
            two_way: Some(&ex),
            ..round::RoundContext::new(
                info,
                reg.applied.as_deref(),
                reg.replica_role,
                (src.server_version, dst.server_version),
            )
        };
        let outcome = crate::round_with_retries(src, probe, &mut dst, &ctx).await?;
        target::acknowledge(src, &entry.name, &outcome.snapshot).await?;
        let rows: u64 = outcome.tables.iter().map(|t| t.rows).sum();
        let conflicts: Vec<Decision> = outcome
            .tables
            .iter()
            .flat_map(|t| t.conflicts.iter().cloned())
            .collect();
        report.rows += rows;
        report.conflicts += conflicts.len();
        report.directions.push(DirectionReport {
            from: nodes[from].name.clone(),
            to: nodes[to].name.clone(),
            snapshot: outcome.snapshot,
            tables: outcome.tables,
            rows,
            conflicts,
            seconds: d_started.elapsed().as_secs_f64(),
        });
    }
    for (session, _, _) in &sources {
        report.purged += crate::purge::purge(session, true).await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Everything that would stop a two-way sync, every problem at once: each node reachable with
/// capture installed and the replica role allowed or its capture guarded, and the same tables
/// captured with the same key on every node.
pub async fn check(mesh: &Mesh) -> Vec<SyncError> {
    let mut problems = Vec::new();
    if let Err(e) = validate(&mesh.nodes, &mesh.rules) {
        problems.push(e);
    }
    let mut infos = Vec::new();
    for n in &mesh.nodes {
        let found = async {
            let s = Session::connect(&n.dsn, "check").await?;
            let info = crate::source_info(&s, &[]).await?;
            let role = target::may_set_replica_role(&s).await?;
            let loops = no_loop(&n.name, &s, role).await;
            Ok::<_, SyncError>((info, loops))
        }
        .await;
        match found {
            Ok((info, loops)) => {
                if let Err(e) = declares(&n.name, &info, &mesh.delta_columns) {
                    problems.push(e);
                }
                if let Err(e) = in_pairs(mesh.nodes.len(), &n.name, &info) {
                    problems.push(e);
                }
                if let Err(e) = loops {
                    problems.push(e);
                }
                infos.push((n.name.as_str(), info));
            }
            Err(e) => problems.push(e),
        }
    }
    for (i, a) in infos.iter().enumerate() {
        for (j, b) in infos.iter().enumerate() {
            if i != j {
                if let Err(e) = same_tables((a.0, &a.1), (b.0, &b.1)) {
                    problems.push(e);
                }
            }
        }
    }
    problems
}
