//! Sequences in two-way syncs: every node hands out values of its own.
//!
//! A one-way sync carries sequences forward (`sequence`), because only the source hands out
//! values. In a two-way sync every node inserts, so copying sequences would make two nodes hand
//! out the same key, and the rows would collide (or, worse, overwrite each other) when they
//! meet. Instead each node keeps its own sequence, and the sequences are **interleaved**:
//!
//! > With `N` nodes (or an increment `N` larger than their number, leaving residues free for
//! > nodes added later), in the order given, every partitioned sequence has `INCREMENT BY N` on
//! > every node, and node `i` (counted from 0) hands out only values `≡ i (mod N)`, all above
//! > every value any node had handed out or held in the sequence's columns when it was
//! > partitioned.
//!
//! Two nodes then never hand out the same value: their future values differ modulo `N`, and
//! their past values lie below every future one. The restart values are `base + i`, `base` the
//! smallest multiple of `N` above every node's position (`last_value`, `is_called`) and above
//! the largest value in the columns that take their values from the sequence (its owning column,
//! columns whose default names it): a restored copy may hold rows beyond its sequence.
//!
//! The residue depends on the node's position only, never on the values found, so a re-run
//! recognises its own work and changes nothing: a sequence whose increment is `N`, whose next
//! value is `≡ i (mod N)` and whose columns hold no value of that residue at or above it is left
//! alone. A left-alone sequence must also lie above everything the sequences being changed may
//! have handed out (a re-run after a partial failure), otherwise it is moved up as well.
//!
//! Only sequences registered in `pgferry.captured_sequence` on every node are partitioned; those
//! registered on some nodes only are reported as skipped (their tables are not replicated both
//! ways, and what is right for them is the operator's call), not refused.
//!
//! All or nothing: every sequence on every node is read and checked before anything changes
//! (descending and cycling sequences, and a `MAXVALUE` below the restart value, are refused with
//! the sequence and node named, every problem at once). A plan that changes nothing (a re-run)
//! stops there, without a lock. Otherwise each node opens one transaction that locks the
//! sequences (any `ALTER SEQUENCE` takes the lock `nextval` waits for, until the commit), and the
//! whole plan is made again from what is read under the locks of every node, so no writer can
//! go past the values chosen before they take effect; only then is each node's transaction
//! given its restarts and committed. Writers wait for that moment (at most `LOCK_TIMEOUT` for
//! each lock). Backends that cached values (`CACHE` > 1) use them up first; those values lie
//! below the new ones, as `last_value` counts them. A commit that fails after others succeeded
//! leaves a state a re-run completes (the committed nodes are recognised as partitioned).

//! [`collisions`] answers the converse question for `pgferry check`: which registered sequences
//! could hand out the same value on two nodes as they stand.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use pgferry_core::artifact::SCHEMA;
use pgferry_core::{catalog, Dsn, Ident, QualifiedName, Session};
use serde::Serialize;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::error::q;
use crate::registry;
use crate::SyncError;

/// How long a node's transaction waits for the lock on a sequence (writers holding it in long
/// transactions) before the partition fails, having changed nothing.
const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// The fix named by every [`Collision`].
pub const COLLISION_FIX: &str = "give each node its own values with `--sequence-partition` \
     (the same INCREMENT BY on every node, a different start per node; see docs/sequences-two-way.md)";

/// What [`partition`] did (or, in a dry run, would do).
#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    /// The nodes, in the order that gives each its residue.
    pub nodes: Vec<String>,
    /// `N`, every partitioned sequence's `INCREMENT BY`: the number of nodes, or more.
    pub increment: i64,
    pub dry_run: bool,
    /// One entry per partitioned sequence per node, by sequence then node.
    pub sequences: Vec<SequenceOnNode>,
    /// Sequences registered on some nodes only: not partitioned.
    pub skipped: Vec<SkippedSequence>,
    /// How many (sequence, node) pairs were changed (would be, in a dry run).
    pub changed: u64,
}

/// One sequence on one node.
#[derive(Clone, Debug, Serialize)]
pub struct SequenceOnNode {
    pub sequence: String,
    pub node: String,
    /// This node's values are `≡ residue (mod new_increment)`.
    pub residue: i64,
    pub old_increment: i64,
    pub new_increment: i64,
    /// The `RESTART WITH` (and `START WITH`) value set; `None` when left alone.
    pub restart: Option<i64>,
    /// The next value the node hands out afterwards.
    pub next_value: i64,
    /// Changed (in a dry run: would be).
    pub changed: bool,
}

/// A sequence registered on some of the nodes only.
#[derive(Clone, Debug, Serialize)]
pub struct SkippedSequence {
    pub sequence: String,
    pub registered_on: Vec<String>,
    /// Nodes where it is not registered in `pgferry.captured_sequence`, or does not exist.
    pub missing_on: Vec<String>,
}

/// Why a sequence cannot be partitioned on a node ([`SyncError::SequencePartitionRefused`]).
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub sequence: String,
    pub node: String,
    pub reason: RefusalReason,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RefusalReason {
    /// A negative increment.
    Descending { increment: i64 },
    /// `CYCLE`: after wrapping around it would hand out other nodes' values.
    Cycles,
    /// The restart value is above the sequence's `MAXVALUE`.
    BeyondMaxvalue { restart: i128, maxvalue: i64 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, n) = (&self.sequence, &self.node);
        match &self.reason {
            RefusalReason::Descending { increment } => write!(
                f,
                "sequence {s} on node {n} is descending (INCREMENT BY {increment}): only ascending sequences are interleaved\n  \
                 fix: leave its table out of the two-way sync, or give each node a disjoint range by hand (MINVALUE/MAXVALUE)"
            ),
            RefusalReason::Cycles => write!(
                f,
                "sequence {s} on node {n} has CYCLE: after wrapping around it would hand out other nodes' values\n  \
                 fix: ALTER SEQUENCE … NO CYCLE on every node (or split its range between the nodes by hand)"
            ),
            RefusalReason::BeyondMaxvalue { restart, maxvalue } => write!(
                f,
                "sequence {s} on node {n} would restart at {restart}, above its MAXVALUE {maxvalue}\n  \
                 fix: raise its MAXVALUE on every node (ALTER SEQUENCE … AS bigint NO MAXVALUE; for a serial or identity column, ALTER TABLE … ALTER COLUMN … TYPE bigint first)"
            ),
        }
    }
}

/// The refusals of [`SyncError::SequencePartitionRefused`], one per line.
pub(crate) fn describe(refusals: &[Refusal]) -> String {
    refusals
        .iter()
        .map(|r| format!("- {r}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A sequence registered on several nodes whose value streams overlap: two nodes could hand
/// out the same value.
#[derive(Clone, Debug, Serialize)]
pub struct Collision {
    pub sequence: String,
    /// The nodes whose streams overlap another node's, in the order given.
    pub nodes: Vec<String>,
    /// A value two of them can both hand out (the smallest of the first such pair).
    pub example: i64,
    pub reason: String,
    pub fix: String,
}

impl fmt::Display for Collision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sequence {} can hand out the same values on nodes {}: {}\nfix: {}",
            self.sequence,
            self.nodes.join(", "),
            self.reason,
            self.fix
        )
    }
}

/// Gives every sequence registered on every node its interleaved values: `INCREMENT BY N`, `N`
/// the number of nodes, and node `i` of `nodes` (in that order) restarted at `base + i` (see
/// the module doc). `dry_run`: reads and reports only. Refuses with every problem at once,
/// having changed nothing, descending and cycling sequences and a `MAXVALUE` too small; refuses
/// fewer than two nodes, and the same database (node identity) twice.
pub async fn partition(
    nodes: &[(String, Dsn)],
    dry_run: bool,
) -> Result<PartitionReport, SyncError> {
    partition_with_increment(nodes, nodes.len() as i64, dry_run).await
}

/// [`partition`] with an increment `n` of at least the number of nodes: residues `nodes.len()`
/// to `n - 1` stay free for nodes added later, which can then be partitioned in (listed after
/// the first ones, with the same `n`) without changing the increment of the others.
pub async fn partition_with_increment(
    nodes: &[(String, Dsn)],
    n: i64,
    dry_run: bool,
) -> Result<PartitionReport, SyncError> {
    if nodes.len() < 2 || n < nodes.len() as i64 {
        return Err(SyncError::PartitionIncrement {
            nodes: nodes.len(),
            increment: n,
        });
    }
    let mut conns = connect(nodes).await?;
    refuse_same_node(&conns).await?;
    let registered = registered(&conns).await?;
    let everywhere: Vec<QualifiedName> = union(&registered)
        .into_iter()
        .filter(|s| registered.iter().all(|r| r.contains(s)))
        .collect();
    let names: Vec<String> = conns.iter().map(|c| c.name.clone()).collect();
    let mut skipped = skipped(&conns, &registered, &everywhere);

    // Read and check everything without a lock: a refusal or a plan that changes nothing
    // (a re-run) never blocks a writer.
    let states = futures_util::future::try_join_all(conns.iter().enumerate().map(|(i, c)| {
        read_states(
            &c.session.client,
            &c.session.target,
            &everywhere,
            Some((n, i as i64)),
        )
    }))
    .await?;
    let unlocked = evaluate(&names, n, &everywhere, states);
    if !unlocked.refusals.is_empty() {
        return Err(SyncError::SequencePartitionRefused {
            refusals: unlocked.refusals,
        });
    }
    if dry_run || unlocked.plans.iter().all(|p| !p.changes()) {
        skipped.extend(unlocked.skipped);
        return Ok(report(&names, n, dry_run, &unlocked.plans, skipped));
    }

    // Then again under the locks, which stop every nextval on the sequences until the commit:
    // what is read now no writer can go past before the restarts take effect.
    let planned: Vec<QualifiedName> = unlocked.plans.iter().map(|p| p.name.clone()).collect();
    let labels: Vec<String> = conns.iter().map(|c| c.session.target.clone()).collect();
    let mut txs = Vec::new();
    for (c, label) in conns.iter_mut().zip(&labels) {
        let tx = c
            .session
            .client
            .transaction()
            .await
            .map_err(q(label, "starting a transaction"))?;
        // ALTER SEQUENCE takes the lock that nextval waits for; NO CYCLE changes nothing here
        // (cycling sequences were refused above).
        let lock: String = planned
            .iter()
            .map(|s| format!("ALTER SEQUENCE {s} NO CYCLE;"))
            .collect();
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'; {lock}",
            LOCK_TIMEOUT.as_millis()
        ))
        .await
        .map_err(q(label, "locking the sequences to partition"))?;
        txs.push(tx);
    }
    let states = futures_util::future::try_join_all(
        txs.iter()
            .zip(&labels)
            .enumerate()
            .map(|(i, (tx, label))| read_states(tx, label, &planned, Some((n, i as i64)))),
    )
    .await?;
    let locked = evaluate(&names, n, &planned, states);
    if !locked.refusals.is_empty() {
        for (tx, label) in txs.into_iter().zip(&labels) {
            tx.rollback()
                .await
                .map_err(q(label, "rolling back the sequence partition"))?;
        }
        return Err(SyncError::SequencePartitionRefused {
            refusals: locked.refusals,
        });
    }
    for (i, (tx, label)) in txs.iter().zip(&labels).enumerate() {
        let restart: String = locked
            .plans
            .iter()
            .filter_map(|p| {
                p.plan.restart[i].map(|r| {
                    format!(
                        "ALTER SEQUENCE {} INCREMENT BY {n} START WITH {r} RESTART WITH {r};",
                        p.name
                    )
                })
            })
            .collect();
        if !restart.is_empty() {
            tx.batch_execute(&restart)
                .await
                .map_err(q(label, "restarting the sequences to partition"))?;
        }
    }
    for (tx, label) in txs.into_iter().zip(&labels) {
        tx.commit()
            .await
            .map_err(q(label, "committing the sequence partition"))?;
    }
    skipped.extend(locked.skipped);
    let report = report(&names, n, false, &locked.plans, skipped);
    tracing::info!(
        nodes = names.len(),
        changed = report.changed,
        "sequences partitioned"
    );
    Ok(report)
}

/// One sequence's plan, with what was read of it on every node.
struct Planned {
    name: QualifiedName,
    states: Vec<State>,
    plan: Plan,
}

impl Planned {
    fn changes(&self) -> bool {
        self.plan.restart.iter().any(Option::is_some)
    }
}

/// Plans, refusals and sequences missing on some node, from what was read of `names` on
/// every node (`states[i][k]`: sequence `k` on node `i`).
struct Evaluation {
    plans: Vec<Planned>,
    skipped: Vec<SkippedSequence>,
    refusals: Vec<Refusal>,
}

fn evaluate(
    nodes: &[String],
    n: i64,
    names: &[QualifiedName],
    mut states: Vec<Vec<Option<State>>>,
) -> Evaluation {
    let mut out = Evaluation {
        plans: Vec::new(),
        skipped: Vec::new(),
        refusals: Vec::new(),
    };
    for (k, name) in names.iter().enumerate() {
        let found: Vec<Option<State>> = states.iter_mut().map(|s| s[k].take()).collect();
        if found.iter().any(Option::is_none) {
            // Registered everywhere, but the sequence itself is gone on some node.
            out.skipped.push(SkippedSequence {
                sequence: name.human(),
                registered_on: nodes.to_vec(),
                missing_on: nodes
                    .iter()
                    .zip(&found)
                    .filter(|(_, s)| s.is_none())
                    .map(|(node, _)| node.clone())
                    .collect(),
            });
            continue;
        }
        let found: Vec<State> = found.into_iter().flatten().collect();
        match plan(n, &found.iter().collect::<Vec<_>>()) {
            Ok(plan) => out.plans.push(Planned {
                name: name.clone(),
                states: found,
                plan,
            }),
            Err(reasons) => out
                .refusals
                .extend(reasons.into_iter().map(|(i, reason)| Refusal {
                    sequence: name.human(),
                    node: nodes[i].clone(),
                    reason,
                })),
        }
    }
    out
}

/// The sequences registered on two or more of `nodes` whose value streams, as they stand, can
/// hand out the same value on two nodes (e.g. `INCREMENT BY 1` on both, or the same increment
/// and the same residue). Changes nothing.
pub async fn collisions(nodes: &[(String, Dsn)]) -> Result<Vec<Collision>, SyncError> {
    let conns = connect(nodes).await?;
    let registered = registered(&conns).await?;
    let shared: Vec<QualifiedName> = union(&registered)
        .into_iter()
        .filter(|s| registered.iter().filter(|r| r.contains(s)).count() >= 2)
        .collect();
    let states = futures_util::future::try_join_all(
        conns
            .iter()
            .map(|c| read_states(&c.session.client, &c.session.target, &shared, None)),
    )
    .await?;
    let mut out = Vec::new();
    for (k, name) in shared.iter().enumerate() {
        let on: Vec<(usize, &State)> = states
            .iter()
            .enumerate()
            .filter(|(i, _)| registered[*i].contains(name))
            .filter_map(|(i, s)| s[k].as_ref().map(|s| (i, s)))
            .collect();
        let mut involved = BTreeSet::new();
        let mut first: Option<(usize, usize, i128)> = None;
        for (x, (i, a)) in on.iter().enumerate() {
            for (j, b) in &on[x + 1..] {
                let (Some(sa), Some(sb)) = (a.stream(), b.stream()) else {
                    continue;
                };
                if let Some(v) = sa.common(&sb) {
                    involved.insert(*i);
                    involved.insert(*j);
                    first.get_or_insert((*i, *j, v));
                }
            }
        }
        if let Some((i, j, v)) = first {
            let show = |i: usize, s: &State| {
                format!(
                    "node {} (next {}, INCREMENT BY {}{})",
                    conns[i].name,
                    s.next(),
                    s.increment,
                    if s.cycle { ", CYCLE" } else { "" }
                )
            };
            let (a, b) = (states[i][k].as_ref(), states[j][k].as_ref());
            let (Some(a), Some(b)) = (a, b) else {
                continue;
            };
            out.push(Collision {
                sequence: name.human(),
                nodes: involved.iter().map(|&i| conns[i].name.clone()).collect(),
                example: v as i64,
                reason: format!("{} and {} can both hand out {v}", show(i, a), show(j, b)),
                fix: COLLISION_FIX.to_owned(),
            });
        }
    }
    Ok(out)
}

/// A node's session and its name.
struct Node {
    name: String,
    session: Session,
}

async fn connect(nodes: &[(String, Dsn)]) -> Result<Vec<Node>, SyncError> {
    futures_util::future::try_join_all(nodes.iter().map(|(name, dsn)| async move {
        let session = Session::connect(dsn, "sequences").await?;
        if !catalog::schema_exists(&session.client, SCHEMA, &session.target).await? {
            return Err(SyncError::NotInstalled {
                source_db: format!("node {name} ({})", session.target),
            });
        }
        Ok::<_, SyncError>(Node {
            name: name.clone(),
            session,
        })
    }))
    .await
}

/// Refuses two nodes with the same identity: the same database listed twice, or a restored
/// copy still carrying its origin's capture. Partitioning those would give one database two
/// residues, the last one winning.
async fn refuse_same_node(conns: &[Node]) -> Result<(), SyncError> {
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for c in conns {
        let id: String = c
            .session
            .client
            .query_one("SELECT node_id FROM pgferry.installation", &[])
            .await
            .map_err(q(&c.session.target, "reading the node's identity"))?
            .get(0);
        if let Some(first) = seen.insert(id.clone(), &c.name) {
            return Err(SyncError::SameNodeTwice {
                first: first.to_owned(),
                second: c.name.clone(),
                node_id: id,
            });
        }
    }
    Ok(())
}

/// Each node's registered sequences.
async fn registered(conns: &[Node]) -> Result<Vec<BTreeSet<QualifiedName>>, SyncError> {
    let mut out = Vec::new();
    for c in conns {
        let seqs = registry::captured_sequences(&c.session.client, &c.session.target).await?;
        out.push(seqs.into_iter().map(|s| s.name).collect());
    }
    Ok(out)
}

fn union(sets: &[BTreeSet<QualifiedName>]) -> BTreeSet<QualifiedName> {
    sets.iter().flatten().cloned().collect()
}

/// The sequences registered on some nodes but not all.
fn skipped(
    conns: &[Node],
    registered: &[BTreeSet<QualifiedName>],
    everywhere: &[QualifiedName],
) -> Vec<SkippedSequence> {
    union(registered)
        .into_iter()
        .filter(|s| !everywhere.contains(s))
        .map(|s| {
            let (on, off): (Vec<_>, Vec<_>) = conns
                .iter()
                .zip(registered)
                .partition(|(_, r)| r.contains(&s));
            SkippedSequence {
                sequence: s.human(),
                registered_on: on.into_iter().map(|(c, _)| c.name.clone()).collect(),
                missing_on: off.into_iter().map(|(c, _)| c.name.clone()).collect(),
            }
        })
        .collect()
}

/// One sequence on one node, as read.
#[derive(Clone, Debug)]
struct State {
    increment: i64,
    min: i64,
    max: i64,
    cycle: bool,
    last_value: i64,
    is_called: bool,
    /// The largest value in the integer columns taking their values from the sequence (its
    /// owning column, columns whose default names it; partitions left out, their parent covers
    /// them), if any row.
    column_max: Option<i128>,
    /// Whether those columns hold a value at or above [`State::next`] in this node's residue.
    ahead_in_residue: bool,
}

impl State {
    /// The value the next `nextval` returns.
    fn next(&self) -> i128 {
        if self.is_called {
            i128::from(self.last_value) + i128::from(self.increment)
        } else {
            i128::from(self.last_value)
        }
    }

    /// Everything at or below this an ascending sequence may have handed out, or its columns
    /// may hold.
    fn high(&self) -> i128 {
        let handed_out = if self.is_called {
            i128::from(self.last_value)
        } else {
            i128::from(self.last_value) - 1
        };
        handed_out.max(self.column_max.unwrap_or(i128::MIN))
    }

    /// The values it may still hand out; `None` when exhausted.
    fn stream(&self) -> Option<Stream> {
        let (min, max) = (i128::from(self.min), i128::from(self.max));
        if self.cycle {
            return Some(Stream {
                lo: min,
                hi: max,
                modulus: 1,
                residue: 0,
            });
        }
        let next = self.next();
        let modulus = i128::from(self.increment).abs();
        let (lo, hi) = if self.increment > 0 {
            (next, max)
        } else {
            (min, next)
        };
        (lo <= hi).then_some(Stream {
            lo,
            hi,
            modulus,
            residue: next.rem_euclid(modulus),
        })
    }
}

/// Reads `names` on a node: `None` for a sequence that does not exist there. With `residue`
/// (`N`, `i`) also the columns fed by each sequence, their largest value, and whether they
/// hold a value of residue `i` at or above the next value.
async fn read_states(
    client: &impl GenericClient,
    label: &str,
    names: &[QualifiedName],
    residue: Option<(i64, i64)>,
) -> Result<Vec<Option<State>>, SyncError> {
    let mut out: Vec<Option<State>> = vec![None; names.len()];
    if names.is_empty() {
        return Ok(out);
    }
    let quoted: Vec<String> = names.iter().map(ToString::to_string).collect();
    let params = client
        .query_typed(
            "SELECT (u.i - 1)::int4, s.seqincrement, s.seqmin, s.seqmax, s.seqcycle
               FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(n, i)
               JOIN pg_catalog.pg_sequence s ON s.seqrelid = pg_catalog.to_regclass(u.n)",
            &[(&quoted, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(q(label, "reading sequence parameters"))?;
    if params.is_empty() {
        return Ok(out);
    }
    let present: Vec<usize> = params.iter().map(|r| r.get::<_, i32>(0) as usize).collect();
    let positions = client
        .query_typed(&position_sql(present.iter().map(|&k| (k, &names[k]))), &[])
        .await
        .map_err(q(label, "reading sequences"))?;
    let positions: BTreeMap<usize, (i64, bool)> = positions
        .iter()
        .map(|r| (r.get::<_, i32>(0) as usize, (r.get(1), r.get(2))))
        .collect();
    for r in &params {
        let k = r.get::<_, i32>(0) as usize;
        let Some(&(last_value, is_called)) = positions.get(&k) else {
            continue;
        };
        out[k] = Some(State {
            increment: r.get(1),
            min: r.get(2),
            max: r.get(3),
            cycle: r.get(4),
            last_value,
            is_called,
            column_max: None,
            ahead_in_residue: false,
        });
    }
    let Some((n, i)) = residue else {
        return Ok(out);
    };
    let fed = client
        .query_typed(
            "WITH seq AS (
                 SELECT (u.i - 1)::int4 AS k, pg_catalog.to_regclass(u.n) AS oid
                   FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(n, i)),
             col AS (
                 SELECT seq.k, d.refobjid AS rel, d.refobjsubid AS att
                   FROM seq JOIN pg_catalog.pg_depend d
                     ON d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.objid = seq.oid
                    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                    AND d.deptype IN ('a', 'i') AND d.refobjsubid > 0
                 UNION
                 SELECT seq.k, ad.adrelid, ad.adnum
                   FROM seq JOIN pg_catalog.pg_depend d
                     ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = seq.oid
                    AND d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass
                   JOIN pg_catalog.pg_attrdef ad ON ad.oid = d.objid)
             SELECT col.k, n.nspname::text, c.relname::text, a.attname::text
               FROM col
               JOIN pg_catalog.pg_class c ON c.oid = col.rel
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid = col.rel AND a.attnum = col.att
              WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND NOT a.attisdropped
                AND a.atttypid IN ('pg_catalog.int2'::pg_catalog.regtype, 'pg_catalog.int4'::pg_catalog.regtype,
                                   'pg_catalog.int8'::pg_catalog.regtype, 'pg_catalog.numeric'::pg_catalog.regtype)
              ORDER BY 1, 2, 3, 4",
            &[(&quoted, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(q(label, "finding the columns fed by sequences"))?;
    // (k, table, column) of each column fed by sequence k.
    let mut columns: Vec<(usize, QualifiedName, Ident)> = Vec::new();
    for r in &fed {
        let k = r.get::<_, i32>(0) as usize;
        if out[k].is_some() {
            columns.push((
                k,
                QualifiedName::new(r.get::<_, String>(1), r.get::<_, String>(2)),
                Ident::new(r.get::<_, String>(3)),
            ));
        }
    }
    if columns.is_empty() {
        return Ok(out);
    }
    // $1: each sequence's next value (by k + 1), $2: N, $3: this node's residue.
    let next: Vec<i64> = out
        .iter()
        .map(|s| s.as_ref().map_or(i64::MAX, |s| clamp(s.next())))
        .collect();
    let sql = columns
        .iter()
        .map(|(k, t, c)| {
            format!(
                "SELECT {k}::int4, pg_catalog.ceil((SELECT pg_catalog.max({c}) FROM {t})::pg_catalog.numeric)::pg_catalog.text,
                        EXISTS (SELECT FROM {t} WHERE {c} >= $1[{}] AND pg_catalog.mod({c}, $2) IN ($3, $3 - $2))",
                k + 1
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let values = client
        .query_typed(
            &sql,
            &[
                (&next, Type::INT8_ARRAY),
                (&n, Type::INT8),
                (&i, Type::INT8),
            ],
        )
        .await
        .map_err(q(
            label,
            "reading the largest values of the columns fed by sequences",
        ))?;
    for r in &values {
        let Some(state) = out[r.get::<_, i32>(0) as usize].as_mut() else {
            continue;
        };
        // A value too large for i128 is above every MAXVALUE: it refuses the sequence.
        let max = r
            .get::<_, Option<String>>(1)
            .map(|v| v.parse::<i128>().unwrap_or(i128::MAX));
        state.column_max = state.column_max.max(max);
        state.ahead_in_residue |= r.get::<_, bool>(2);
    }
    Ok(out)
}

/// One query reading `(k, last_value, is_called)` of each `(k, sequence)`.
fn position_sql<'a>(seqs: impl Iterator<Item = (usize, &'a QualifiedName)>) -> String {
    seqs.map(|(k, name)| format!("SELECT {k}::int4, last_value, is_called FROM {name}"))
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

fn clamp(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// What to do with one sequence: the restart value per node (`None`: left alone).
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// The smallest restart value: the smallest multiple of `N` above everything seen.
    base: i128,
    restart: Vec<Option<i64>>,
}

/// Plans one sequence found on every node (`states[i]` on node `i`), or says why it cannot be
/// partitioned, per node.
fn plan(n: i64, states: &[&State]) -> Result<Plan, Vec<(usize, RefusalReason)>> {
    let mut refusals = Vec::new();
    for (i, s) in states.iter().enumerate() {
        if s.increment < 0 {
            refusals.push((
                i,
                RefusalReason::Descending {
                    increment: s.increment,
                },
            ));
        } else if s.cycle {
            refusals.push((i, RefusalReason::Cycles));
        }
    }
    if !refusals.is_empty() {
        return Err(refusals);
    }
    let n128 = i128::from(n);
    let mut change: Vec<bool> = states
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let in_place =
                s.increment == n && s.next().rem_euclid(n128) == i as i128 && !s.ahead_in_residue;
            !in_place
        })
        .collect();
    // A sequence left alone must lie above whatever the changed ones may have handed out.
    loop {
        let threshold = states
            .iter()
            .zip(&change)
            .filter(|(_, c)| **c)
            .map(|(s, _)| s.high())
            .max();
        let Some(threshold) = threshold else { break };
        let mut grew = false;
        for (s, c) in states.iter().zip(change.iter_mut()) {
            if !*c && s.next() <= threshold {
                *c = true;
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let high = states.iter().map(|s| s.high()).max().unwrap_or(0);
    let base = (high.div_euclid(n128) + 1) * n128;
    let mut restart = Vec::new();
    for (i, (s, c)) in states.iter().zip(&change).enumerate() {
        if !*c {
            restart.push(None);
            continue;
        }
        let r = base + i as i128;
        if r > i128::from(s.max) {
            refusals.push((
                i,
                RefusalReason::BeyondMaxvalue {
                    restart: r,
                    maxvalue: s.max,
                },
            ));
            restart.push(None);
        } else {
            restart.push(Some(r as i64));
        }
    }
    if refusals.is_empty() {
        Ok(Plan { base, restart })
    } else {
        Err(refusals)
    }
}

fn report(
    nodes: &[String],
    n: i64,
    dry_run: bool,
    plans: &[Planned],
    mut skipped: Vec<SkippedSequence>,
) -> PartitionReport {
    let mut sequences = Vec::new();
    for p in plans {
        for (i, (s, r)) in p.states.iter().zip(&p.plan.restart).enumerate() {
            sequences.push(SequenceOnNode {
                sequence: p.name.human(),
                node: nodes[i].clone(),
                residue: i as i64,
                old_increment: s.increment,
                new_increment: n,
                restart: *r,
                next_value: r.unwrap_or_else(|| clamp(s.next())),
                changed: r.is_some(),
            });
        }
    }
    skipped.sort_by(|a, b| a.sequence.cmp(&b.sequence));
    PartitionReport {
        nodes: nodes.to_vec(),
        increment: n,
        dry_run,
        changed: sequences.iter().filter(|s| s.changed).count() as u64,
        sequences,
        skipped,
    }
}

/// Values `lo ≤ x ≤ hi` with `x ≡ residue (mod modulus)`: what a sequence may still hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stream {
    lo: i128,
    hi: i128,
    modulus: i128,
    residue: i128,
}

impl Stream {
    /// The smallest value both streams contain, if any (Chinese remainder theorem).
    fn common(&self, other: &Stream) -> Option<i128> {
        let (lo, hi) = (self.lo.max(other.lo), self.hi.min(other.hi));
        if lo > hi {
            return None;
        }
        let (m1, m2) = (self.modulus, other.modulus);
        let (g, p, _) = ext_gcd(m1, m2);
        let diff = other.residue - self.residue;
        if diff.rem_euclid(g) != 0 {
            return None;
        }
        // x = r1 + m1·t with m1·t ≡ diff (mod m2): t ≡ (diff/g)·p (mod m2/g), p = (m1/g)⁻¹.
        let m2g = m2 / g;
        let t = ((diff / g).rem_euclid(m2g) * p.rem_euclid(m2g)).rem_euclid(m2g);
        let lcm = m1 / g * m2;
        let x0 = (self.residue + m1 * t).rem_euclid(lcm);
        // The smallest x ≥ lo with x ≡ x0 (mod lcm).
        let x = x0 + (lo - x0).div_euclid(lcm) * lcm;
        let x = if x < lo { x + lcm } else { x };
        (x <= hi).then_some(x)
    }
}

/// `(g, p, q)` with `g = gcd(a, b) = a·p + b·q`, for `a, b > 0`.
fn ext_gcd(a: i128, b: i128) -> (i128, i128, i128) {
    if b == 0 {
        (a, 1, 0)
    } else {
        let (g, p, q) = ext_gcd(b, a.rem_euclid(b));
        (g, q, p - (a / b) * q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(increment: i64, last_value: i64, is_called: bool) -> State {
        State {
            increment,
            min: 1,
            max: i64::MAX,
            cycle: false,
            last_value,
            is_called,
            column_max: None,
            ahead_in_residue: false,
        }
    }

    #[test]
    fn two_fresh_nodes_get_interleaved_values_above_everything() {
        let (a, mut b) = (seq(1, 50, true), seq(1, 10, true));
        b.column_max = Some(1000);
        let p = plan(2, &[&a, &b]).unwrap();
        assert_eq!(p.base, 1002);
        assert_eq!(p.restart, vec![Some(1002), Some(1003)]);
    }

    #[test]
    fn partitioned_sequences_are_left_alone_even_behind_the_other_nodes() {
        // Node 0 next 1004 (even), node 1 next 2001 (odd), far ahead: nothing to change.
        let (a, b) = (seq(2, 1002, true), seq(2, 1999, true));
        let p = plan(2, &[&a, &b]).unwrap();
        assert_eq!(p.restart, vec![None, None]);
    }

    #[test]
    fn a_partitioned_sequence_below_a_changed_one_moves_too() {
        let a = seq(3, 9, true); // next 12 ≡ 0: in place
        let b = seq(1, 40, true); // not partitioned, handed out up to 40
        let c = seq(3, 13, false); // next 13 ≡ 1 but node 2 wants ≡ 2
        let p = plan(3, &[&a, &b, &c]).unwrap();
        assert_eq!(p.base, 42);
        assert_eq!(p.restart, vec![Some(42), Some(43), Some(44)]);
    }

    #[test]
    fn a_row_of_its_own_residue_ahead_of_a_partitioned_sequence_moves_it() {
        let a = seq(2, 8, true); // next 10 ≡ 0
        let mut b = seq(2, 9, true); // next 11 ≡ 1
        b.ahead_in_residue = true;
        b.column_max = Some(21);
        let p = plan(2, &[&a, &b]).unwrap();
        // b's old values reach 21, above a's next value: a moves as well.
        assert_eq!(p.restart, vec![Some(22), Some(23)]);
    }

    #[test]
    fn descending_cycling_and_too_small_sequences_are_refused_per_node() {
        let mut d = seq(-1, 5, true);
        d.min = -100;
        let mut c = seq(1, 5, true);
        c.cycle = true;
        let err = plan(2, &[&d, &c]).unwrap_err();
        assert!(matches!(
            err[..],
            [
                (0, RefusalReason::Descending { increment: -1 }),
                (1, RefusalReason::Cycles)
            ]
        ));
        let mut small = seq(1, 2_147_483_646, true);
        small.max = 2_147_483_647;
        let other = seq(1, 1, true);
        let err = plan(2, &[&other, &small]).unwrap_err();
        assert!(
            matches!(
                err[..],
                [(
                    1,
                    RefusalReason::BeyondMaxvalue {
                        restart: 2_147_483_649,
                        maxvalue: 2_147_483_647
                    }
                )]
            ),
            "{err:?}"
        );
    }

    #[test]
    fn streams_meet_where_the_congruences_agree() {
        let up = |lo, m, r| Stream {
            lo,
            hi: i128::from(i64::MAX),
            modulus: m,
            residue: r,
        };
        assert_eq!(up(51, 1, 0).common(&up(11, 1, 0)), Some(51));
        assert_eq!(up(10, 2, 0).common(&up(11, 2, 1)), None);
        assert_eq!(up(10, 2, 0).common(&up(11, 2, 0)), Some(12));
        assert_eq!(up(0, 4, 1).common(&up(0, 6, 2)), None);
        assert_eq!(up(0, 4, 1).common(&up(0, 6, 3)), Some(9));
        assert_eq!(up(0, 4, 1).common(&up(0, 6, 5)), Some(5));
        assert_eq!(up(100, 4, 1).common(&up(0, 6, 5)), Some(101));
        let big = i128::from(i64::MAX) - 10;
        assert_eq!(
            up(0, big, 3).common(&up(0, big - 1, 3)),
            Some(3),
            "large moduli do not overflow"
        );
        let bounded = Stream {
            lo: 0,
            hi: 50,
            modulus: 1,
            residue: 0,
        };
        assert_eq!(up(51, 1, 0).common(&bounded), None);
    }

    #[test]
    fn descending_and_cycling_sequences_have_streams() {
        let mut d = seq(-2, 100, true);
        d.min = -1000;
        assert_eq!(
            d.stream(),
            Some(Stream {
                lo: -1000,
                hi: 98,
                modulus: 2,
                residue: 0
            })
        );
        let mut done = seq(1, 10, true);
        done.max = 10;
        assert_eq!(done.stream(), None);
    }
}
