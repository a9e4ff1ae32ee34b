//! Two-way syncs on the command line: `pgferry sync --node … --conflict … --once` and
//! `pgferry conflicts`.

use pgferry_core::ErrorClass;
use pgferry_sync::conflict::{Rule, Rules, Since};
use pgferry_sync::two_way::{Mesh, Node};
use pgferry_sync::SyncError;

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;
use crate::sync::SyncArgs;

fn fail(e: SyncError) -> Failure {
    let class = e.class();
    Failure::new(e, class)
}

/// The flags of a two-way sync, shared by `pgferry sync` and `pgferry run`.
#[derive(Debug, clap::Args)]
pub struct TwoWayArgs {
    /// A node of a two-way (multi-node) sync, as NAME=DSN; give two or more. Every node's
    /// changes are applied to every other (capture installed on each, the same tables), with
    /// conflicts decided by --conflict. Instead of --source/--target.
    #[arg(long = "node", value_name = "NAME=DSN", conflicts_with_all = ["source", "targets"])]
    pub nodes: Vec<String>,
    /// Two-way: how a key changed on two nodes since they last exchanged is decided:
    /// prefer:NODE, latest, abort, skip or custom:FUNCTION; three or more nodes: latest or
    /// abort (docs/conflicts.md).
    #[arg(long, value_name = "RULE", requires = "nodes")]
    pub conflict: Option<String>,
    /// Two-way: a rule for some tables, TABLE=RULE (TABLE: schema.table, * and ? allowed).
    /// Repeatable; the first match wins, other tables follow --conflict.
    #[arg(long = "conflict-table", value_name = "TABLE=RULE", requires = "nodes")]
    pub conflict_tables: Vec<String>,
    /// Two-way: before replicating, give every node its own interleaved sequence values (the
    /// same INCREMENT BY N on every node, node i starting at a value ≡ i mod N, above every
    /// value handed out); sequences already partitioned are left alone
    /// (docs/sequences-two-way.md).
    #[arg(long, requires = "nodes")]
    pub sequence_partition: bool,
    /// Two-way: a delta column every node must declare (`pgferry install --delta-column`),
    /// SCHEMA.TABLE.COLUMN; repeatable. The sync refuses nodes that do not.
    #[arg(long = "delta-column", value_name = "SCHEMA.TABLE.COLUMN", value_parser = pgferry_install::DeltaColumn::parse, requires = "nodes")]
    pub delta_columns: Vec<pgferry_install::DeltaColumn>,
}

impl TwoWayArgs {
    /// The sync these flags describe (exit 2 on a malformed node or rule).
    pub fn mesh(&self) -> Result<Mesh, Failure> {
        Ok(Mesh {
            nodes: nodes(&self.nodes)?,
            rules: rules(self.conflict.as_deref(), &self.conflict_tables)?,
            delta_columns: self.delta_columns.clone(),
        })
    }
}

/// `--node NAME=DSN` values.
pub fn nodes(list: &[String]) -> Result<Vec<Node>, Failure> {
    list.iter()
        .map(|n| {
            let (name, dsn) = n.split_once('=').ok_or_else(|| {
                Failure::usage("--node wants NAME=DSN (a name for the node, then its connection string)")
            })?;
            let name = name.trim();
            // `host=… dbname=…` given without a name splits at its first `=`.
            const KEYWORDS: [&str; 8] = [
                "host", "hostaddr", "port", "dbname", "user", "password", "sslmode", "postgres",
            ];
            if KEYWORDS.contains(&name) || name.contains("://") || name.contains(char::is_whitespace)
            {
                return Err(Failure::usage(format!(
                    "--node wants NAME=DSN: {name:?} is not a node name (give one first, e.g. --node old=host=…)"
                )));
            }
            Ok(Node {
                name: name.to_owned(),
                dsn: parse_dsn(dsn)?,
            })
        })
        .collect()
}

/// `--conflict` and `--conflict-table` values.
pub fn rules(conflict: Option<&str>, tables: &[String]) -> Result<Rules, Failure> {
    let default = conflict.ok_or_else(|| {
        Failure::usage(
            "a two-way sync needs --conflict RULE (prefer:NODE, latest, abort, skip or custom:FUNCTION)",
        )
    })?;
    let mut rules = Rules::new(Rule::parse(default).map_err(Failure::usage)?);
    for t in tables {
        rules
            .tables
            .push(Rules::parse_override(t).map_err(Failure::usage)?);
    }
    Ok(rules)
}

/// With `partition`, partitions the nodes' sequences (reported on stderr, or stdout's JSON
/// is left alone); without, warns about sequences that could hand out the same values.
pub async fn sequences(nodes: &[Node], partition: bool, quiet: bool) -> Result<(), Failure> {
    let pairs: Vec<(String, pgferry_core::Dsn)> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.dsn.clone()))
        .collect();
    if partition {
        let report = pgferry_sync::sequence_partition::partition(&pairs, false)
            .await
            .map_err(fail)?;
        tracing::info!(
            sequences = report.sequences.len() / nodes.len().max(1),
            changed = report.changed,
            increment = report.increment,
            "sequences partitioned"
        );
        if !quiet {
            eprintln!(
                "sequences: {} partitioned with INCREMENT BY {} ({} changed)",
                report.sequences.len() / nodes.len().max(1),
                report.increment,
                report.changed
            );
        }
        return Ok(());
    }
    for c in pgferry_sync::sequence_partition::collisions(&pairs)
        .await
        .map_err(fail)?
    {
        tracing::warn!("{}", c.to_string().replace('\n', "; "));
    }
    Ok(())
}

pub async fn sync(a: &SyncArgs) -> Result<Code, Failure> {
    let mesh = a.two_way.mesh()?;
    pgferry_sync::two_way::validate(&mesh.nodes, &mesh.rules).map_err(fail)?;
    sequences(&mesh.nodes, a.two_way.sequence_partition, a.json).await?;
    let report = pgferry_sync::two_way::exchange_once(&mesh)
        .await
        .map_err(fail)?;
    if a.json {
        output::json(&report);
        return Ok(Code::Ok);
    }
    for d in &report.directions {
        println!(
            "{} -> {}: {} rows in {:.2} s, at snapshot {} of {}",
            d.from, d.to, d.rows, d.seconds, d.snapshot, d.from
        );
        for t in &d.tables {
            println!(
                "  {}  {} changes, {} rows copied{}",
                t.table,
                t.changes,
                t.rows,
                if t.conflicts.is_empty() {
                    String::new()
                } else {
                    format!(", {} conflict(s)", t.conflicts.len())
                }
            );
        }
        for c in &d.conflicts {
            println!(
                "  conflict {} key {}: rule {}, winner {}",
                c.table,
                pgferry_sync::conflict::show_keys(&c.keys),
                c.rule,
                c.winner
            );
        }
    }
    println!(
        "{} nodes, {} rows, {} conflicts in {:.2} s; {} applied capture rows purged",
        report.nodes.len(),
        report.rows,
        report.conflicts,
        report.seconds,
        report.purged
    );
    Ok(Code::Ok)
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConflictsArgs {
    #[command(subcommand)]
    pub action: Option<ConflictsAction>,
    /// The node whose decisions to list (each node records the conflicts it decided while
    /// applying its peers' changes).
    #[arg(long, value_name = "DSN", required = true)]
    pub db: Option<String>,
    /// Only conflicts decided since then: a time (`2026-11-27 10:00+00`) or a duration back
    /// from now (`10m`, `2h`, `90s`).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Print JSON on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConflictsAction {
    /// Settle a recorded conflict (typically one a skip rule left open): the rows of its keys
    /// on the node named by --keep ship to the other node at the next exchange.
    Resolve {
        /// The node holding the record (where `pgferry conflicts --db` lists it).
        #[arg(long, value_name = "DSN")]
        db: String,
        /// The conflict's number (`#N` in the list, conflict_id in JSON).
        #[arg(long)]
        id: i64,
        /// The node whose rows win: the record's local node (the --db node) or its remote one.
        #[arg(long, value_name = "NODE")]
        keep: String,
        /// The remote node's connection, NAME=DSN, when --keep names it.
        #[arg(long = "node", value_name = "NAME=DSN")]
        node: Option<String>,
        /// Print JSON on stdout instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub async fn conflicts(a: ConflictsArgs) -> Result<Code, Failure> {
    if let Some(ConflictsAction::Resolve {
        db,
        id,
        keep,
        node,
        json,
    }) = a.action
    {
        let db = parse_dsn(&db)?;
        let remote = match node {
            Some(n) => {
                let mut list = nodes(&[n])?;
                let n = list.remove(0);
                if n.name != keep {
                    return Err(Failure::usage(format!(
                        "--node names {}, but --keep is {keep}",
                        n.name
                    )));
                }
                Some(n.dsn)
            }
            None => None,
        };
        let done = pgferry_sync::conflict::resolve(&db, id, &keep, remote.as_ref())
            .await
            .map_err(fail)?;
        if json {
            output::json(&done);
        } else if done.already_settled {
            println!("conflict #{id} was already settled; nothing done");
        } else {
            println!(
                "conflict #{id} ({} keys {}): {keep}'s rows ship to the other node at the next exchange",
                done.table,
                pgferry_sync::conflict::show_keys(&done.keys)
            );
        }
        return Ok(Code::Ok);
    }
    let dsn = parse_dsn(a.db.as_deref().unwrap_or_default())?;
    let since = match a.since.as_deref() {
        None => Since::All,
        Some(t) => match ago(t) {
            Some(d) => Since::Ago(d),
            None => Since::Time(t.to_owned()),
        },
    };
    let list = pgferry_sync::conflict::list(&dsn, &since)
        .await
        .map_err(|e| match &e {
            SyncError::Core(pgferry_core::Error::Query { .. }) if a.since.is_some() => Failure::new(
                anyhow::Error::new(e).context(
                    "--since takes a time PostgreSQL reads as timestamptz, or a duration like 10m",
                ),
                ErrorClass::Definite,
            ),
            _ => fail(e),
        })?;
    if a.json {
        output::json(&list);
        return Ok(Code::Ok);
    }
    if list.is_empty() {
        println!("no conflicts recorded on {}", dsn.redacted());
    }
    for c in &list {
        println!(
            "#{} {} {} keys {}: {} ({}) vs {} ({}), rule {}, winner {}",
            c.conflict_id,
            c.decided_at,
            c.table,
            c.keys,
            c.local_node,
            c.local_ops,
            c.remote_node,
            c.remote_ops,
            c.rule,
            c.winner
        );
    }
    Ok(Code::Ok)
}

/// `10m`, `2h`, `90s`, `1d` as a duration; None for anything else (a time).
fn ago(text: &str) -> Option<std::time::Duration> {
    let t = text.trim();
    let (n, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" | "min" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(secs))
}
