//! Targets: registration on first use, progress, and the source's registry of targets.

use std::time::Duration;

use pgferry_core::artifact::{Dialect, SCHEMA};
use pgferry_core::{catalog, Session};

use crate::SyncError;

/// A target ready for rounds from one source.
#[derive(Debug)]
pub(crate) struct Registered {
    /// The target's own node identity.
    pub node_id: String,
    /// The source snapshot it last applied (None: nothing applied yet).
    pub applied: Option<String>,
    /// Whether the session may set `session_replication_role = replica`.
    pub replica_role: bool,
}

/// Registers `target` for `source_node` on first use (schema pgferry with the target's own
/// identity, and a progress row), refusing an uncleaned copy of the source. Returns where the
/// target stands.
pub(crate) async fn register(
    target: &mut Session,
    source_node: &str,
    source_label: &str,
) -> Result<Registered, SyncError> {
    let label = target.target.clone();
    refuse_uncleaned_copy(target, source_node).await?;
    let dialect = Dialect::new(target.server_version);
    let tx = target.begin_locked(Duration::from_secs(10)).await?;
    if !catalog::schema_exists(&tx, SCHEMA, &label).await? {
        for (what, sql) in pgferry_install::schema_statements(&tx, dialect, &label).await? {
            tx.batch_execute(&sql).await.map_err(|e| {
                SyncError::Core(pgferry_core::Error::Query {
                    context: format!("registering the target: {what}"),
                    target: label.clone(),
                    source: e,
                })
            })?;
        }
        tracing::info!(target = %label, "registered a new target");
    }
    tx.execute(
        "INSERT INTO pgferry.applied (source_node_id, source) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&source_node, &source_label],
    )
    .await
    .map_err(|e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: "registering the target's progress".into(),
            target: label.clone(),
            source: e,
        })
    })?;
    let row = tx
        .query_one(
            "SELECT i.node_id, a.snapshot FROM pgferry.installation i, pgferry.applied a WHERE a.source_node_id = $1",
            &[&source_node],
        )
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: "reading the target's progress".into(),
                target: label.clone(),
                source: e,
            })
        })?;
    let (node_id, applied): (String, Option<String>) = (row.get(0), row.get(1));
    tx.commit().await.map_err(|e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: "committing the target's registration".into(),
            target: label.clone(),
            source: e,
        })
    })?;
    let replica_role = may_set_replica_role(target).await?;
    Ok(Registered {
        node_id,
        applied,
        replica_role,
    })
}

/// Refuses a database that carries the source's own node identity: an uncleaned restored copy
/// of it (a two-way peer has an identity of its own).
pub(crate) async fn refuse_uncleaned_copy(
    target: &Session,
    source_node: &str,
) -> Result<(), SyncError> {
    if !catalog::schema_exists(&target.client, SCHEMA, &target.target).await? {
        return Ok(());
    }
    let node: Option<String> = target
        .client
        .query_opt(
            "SELECT node_id FROM pgferry.installation WHERE pg_catalog.to_regclass('pgferry.installation') IS NOT NULL",
            &[],
        )
        .await
        .map_err(target.on_err("reading the target's identity"))?
        .map(|r| r.get(0));
    if node.as_deref() == Some(source_node) {
        return Err(SyncError::UncleanedCopy {
            target: target.target.clone(),
            node: source_node.to_owned(),
        });
    }
    Ok(())
}

/// Whether the session's role may set `session_replication_role = replica` (a superuser, or
/// on 15+ a role granted SET on the parameter).
pub(crate) async fn may_set_replica_role(session: &Session) -> Result<bool, SyncError> {
    may_set(session, "session_replication_role").await
}

/// Whether the session's role may set the superuser-only `parameter` (a superuser, or on 15+
/// a role granted SET on it).
pub(crate) async fn may_set(session: &Session, parameter: &str) -> Result<bool, SyncError> {
    let (sql, params): (&str, Vec<&(dyn tokio_postgres::types::ToSql + Sync)>) =
        if session.server_version >= 150000 {
            (
                "SELECT r.rolsuper OR pg_catalog.has_parameter_privilege($1, 'SET')
                   FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
                vec![&parameter],
            )
        } else {
            (
                "SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user",
                vec![],
            )
        };
    Ok(session
        .client
        .query_one(sql, &params)
        .await
        .map_err(session.on_err(format!("checking whether pgferry may set {parameter}")))?
        .get(0))
}

/// What stands in the way of applying to a target without the replica role.
#[derive(Debug, Default)]
pub(crate) struct Blocked {
    /// Tables (quoted names) carrying or referenced by a foreign key, or with user triggers.
    pub tables: Vec<String>,
    /// Tables whose only obstacle is a pgferry capture function that predates the guard
    /// skipping pgferry's own apply (`pgferry install` regenerates it).
    pub unguarded: Vec<String>,
}

/// The condition, over `pg_trigger g` and `pg_proc p` (its function), that a trigger is
/// pgferry's: its name starts with `pgferry_` and it calls a function in schema pgferry.
const PGFERRY_TRIGGER: &str =
    "g.tgname::text LIKE 'pgferry\\_%' AND p.pronamespace = pg_catalog.to_regnamespace('pgferry')";

/// Tables (among `tables`) that cannot be applied without the replica role: carrying or
/// referenced by a foreign key, or with user triggers. With `apply_mark` (the applying
/// transaction sets `pgferry.apply`, as every round's does), pgferry's own triggers whose
/// function has the guard are not in the way: they skip pgferry's apply (the capture) or let
/// it through (the freeze); pgferry triggers without it are reported apart.
pub(crate) async fn needs_replica_role(
    target: &Session,
    tables: &[String],
    apply_mark: bool,
) -> Result<Blocked, SyncError> {
    let sql = format!(
        "SELECT t, EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                            WHERE c.contype = 'f' AND (c.conrelid = pg_catalog.to_regclass(t) OR c.confrelid = pg_catalog.to_regclass(t)))
                   OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid
                               WHERE g.tgrelid = pg_catalog.to_regclass(t) AND NOT g.tgisinternal
                                 AND NOT ($2 AND {PGFERRY_TRIGGER}))
           FROM pg_catalog.unnest($1::text[]) AS t
          WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                         WHERE c.contype = 'f' AND (c.conrelid = pg_catalog.to_regclass(t) OR c.confrelid = pg_catalog.to_regclass(t)))
             OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid
                         WHERE g.tgrelid = pg_catalog.to_regclass(t) AND NOT g.tgisinternal
                           AND NOT ($2 AND {PGFERRY_TRIGGER} AND pg_catalog.strpos(p.prosrc, $3) > 0))"
    );
    let rows = target
        .client
        .query(
            &sql,
            &[&tables, &apply_mark, &pgferry_install::CAPTURE_GUARD_MARK],
        )
        .await
        .map_err(target.on_err("checking the target's foreign keys and triggers"))?;
    let mut blocked = Blocked::default();
    for r in rows {
        if r.get::<_, bool>(1) {
            blocked.tables.push(r.get(0));
        } else {
            blocked.unguarded.push(r.get(0));
        }
    }
    Ok(blocked)
}

/// Whether every pgferry trigger in the database calls a function with the guard that skips
/// pgferry's own apply: then rows applied without the replica role are not captured again.
pub(crate) async fn capture_guarded(session: &Session) -> Result<bool, SyncError> {
    let sql = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g JOIN pg_catalog.pg_proc p ON p.oid = g.tgfoid
                             WHERE NOT g.tgisinternal AND {PGFERRY_TRIGGER}
                               AND pg_catalog.strpos(p.prosrc, $1) = 0)"
    );
    Ok(session
        .client
        .query_one(&sql, &[&pgferry_install::CAPTURE_GUARD_MARK])
        .await
        .map_err(session.on_err("checking the capture functions for the guard"))?
        .get(0))
}

/// The default registry name of a target: `dbname@host:port` from its DSN (no user, no
/// password). A reservation made with `pgferry target add` uses the same name, so the first
/// sync adopts it; after that the registry row is found by the target's node identity.
pub fn default_name(dsn: &pgferry_core::Dsn) -> String {
    format!("{}@{}:{}", dsn.dbname(), dsn.host(), dsn.port())
}

/// A target's row in the source's registry.
#[derive(Debug)]
pub(crate) struct Entry {
    pub name: String,
    /// Captured tables the target had when it registered.
    pub table_ids: Vec<i32>,
}

/// A target's row in the source's registry, as stored.
#[derive(Debug)]
pub(crate) struct Found {
    pub name: String,
    /// Captured tables listed as received (None: only reserved so far).
    pub table_ids: Option<Vec<i32>>,
    pub acked: Option<String>,
}

/// The registry row of the target with identity `node_id` or, not registered yet, the
/// reservation under `name`.
pub(crate) async fn find_entry(
    source: &Session,
    node_id: Option<&str>,
    name: &str,
) -> Result<Option<Found>, SyncError> {
    let row = source
        .client
        .query_opt(
            "SELECT name, table_ids, acked_snapshot::text FROM pgferry.target WHERE node_id = $1
             UNION ALL
             SELECT name, table_ids, acked_snapshot::text FROM pgferry.target WHERE node_id IS NULL AND name = $2
             LIMIT 1",
            &[&node_id, &name],
        )
        .await
        .map_err(source.on_err("reading the source's registry of targets"))?;
    Ok(row.map(|r| Found {
        name: r.get(0),
        table_ids: r.get(1),
        acked: r.get(2),
    }))
}

/// What the caller is about to do with a target; it decides which captured tables the target's
/// registry entry lists as received.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Intent<'a> {
    /// Rounds: the tables the target had stay listed (every captured table, for a target
    /// registering now: its copy was taken after capture started), or, accepting new tables,
    /// every captured table is.
    Rounds { accept_new_tables: bool },
    /// `pgferry copy` of these tables follows, at a snapshot taken after this entry commits.
    /// They are withheld (not listed) until the copy has them all, so rounds refuse to run
    /// over a half-copied table; a target registering now lists nothing else either. The
    /// purge check of a target that applied nothing is waived when they are every captured
    /// table: what the copy does not hold is committed after its snapshot, and kept.
    Copy { tables: &'a [i32] },
}

/// Finds or creates the source's registry row for a target. A target that has applied nothing
/// yet is refused when capture rows were already purged and it was not reserved before.
pub(crate) async fn registry_entry(
    source: &Session,
    node_id: &str,
    name: &str,
    applied: Option<&str>,
    accept_new_tables: bool,
) -> Result<Entry, SyncError> {
    registry_entry_for(
        source,
        node_id,
        name,
        applied,
        Intent::Rounds { accept_new_tables },
    )
    .await
}

/// [`registry_entry`] for what the caller is about to do (see [`Intent`]).
pub(crate) async fn registry_entry_for(
    source: &Session,
    node_id: &str,
    name: &str,
    applied: Option<&str>,
    intent: Intent<'_>,
) -> Result<Entry, SyncError> {
    // Two first syncs of one new target must not both create its registry row.
    source
        .client
        .execute(
            "SELECT pg_catalog.pg_advisory_lock($1)",
            &[&pgferry_core::artifact::REGISTRY_LOCK_KEY],
        )
        .await
        .map_err(source.on_err("locking the source's registry of targets"))?;
    let entry = registry_entry_locked(source, node_id, name, applied, intent).await;
    source
        .client
        .execute(
            "SELECT pg_catalog.pg_advisory_unlock($1)",
            &[&pgferry_core::artifact::REGISTRY_LOCK_KEY],
        )
        .await
        .map_err(source.on_err("unlocking the source's registry of targets"))?;
    entry
}

async fn registry_entry_locked(
    source: &Session,
    node_id: &str,
    name: &str,
    applied: Option<&str>,
    intent: Intent<'_>,
) -> Result<Entry, SyncError> {
    let c = &source.client;
    let row = find_entry(source, Some(node_id), name).await?;
    let all_ids: Vec<i32> = c
        .query(
            "SELECT table_id FROM pgferry.captured_table ORDER BY 1",
            &[],
        )
        .await
        .map_err(source.on_err("reading captured tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (entry_name, ids) = match row {
        Some(found) => {
            let acked = found.acked;
            if went_back(applied, acked.as_deref()) {
                // The target holds an older state than it acknowledged: rows between the two
                // may have been purged. Go on only if nothing at or above its xmin was.
                let xid_type = Dialect::new(source.server_version).xid_type();
                let xmin = applied.and_then(snapshot_xmin).unwrap_or(0);
                let purged: bool = c
                    .query_one(
                        &format!("SELECT coalesce(purged_below > '{xmin}'::{xid_type}, false) FROM pgferry.installation"),
                        &[],
                    )
                    .await
                    .map_err(source.on_err("reading the purge horizon"))?
                    .get(0);
                if purged {
                    return Err(SyncError::WentBack {
                        target: name.to_owned(),
                    });
                }
            }
            (found.name, found.table_ids)
        }
        None => {
            // Not registered (never, or dropped since): capture rows may have been purged
            // without regard for this target.
            let xid_type = Dialect::new(source.server_version).xid_type();
            let xmin: Option<u64> = applied.and_then(|p| p.split(':').next()?.parse().ok());
            let sql = match xmin {
                None => "SELECT purged_below IS NOT NULL FROM pgferry.installation".to_owned(),
                Some(x) => format!(
                    "SELECT coalesce(purged_below > '{x}'::{xid_type}, false) FROM pgferry.installation"
                ),
            };
            let purged: bool = c
                .query_one(&sql, &[])
                .await
                .map_err(source.on_err("reading the purge horizon"))?
                .get(0);
            let whole_copy = match intent {
                Intent::Copy { tables } => all_ids.iter().all(|id| tables.contains(id)),
                Intent::Rounds { .. } => false,
            };
            if purged && applied.is_none() && !whole_copy {
                return Err(SyncError::PurgedBeforeRegistration {
                    target: name.to_owned(),
                });
            }
            if purged {
                return Err(SyncError::BehindPurge {
                    target: name.to_owned(),
                });
            }
            // A different node may already use the name (a dropped and recreated database):
            // keep both apart.
            let taken: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pgferry.target WHERE name = $1)",
                    &[&name],
                )
                .await
                .map_err(source.on_err("reading the source's registry of targets"))?
                .get(0);
            let entry_name = if taken {
                format!("{name} ({node_id})")
            } else {
                name.to_owned()
            };
            (entry_name, None)
        }
    };
    let table_ids = match intent {
        Intent::Rounds {
            accept_new_tables: false,
        } => ids.unwrap_or_else(|| all_ids.clone()),
        Intent::Rounds {
            accept_new_tables: true,
        } => all_ids.clone(),
        // A reservation (no tables yet) or a new registration lists nothing the copy does not
        // bring: whatever else the target holds was not received through pgferry.
        Intent::Copy { tables } => ids
            .unwrap_or_default()
            .into_iter()
            .filter(|id| !tables.contains(id))
            .collect(),
    };
    c.execute(
        "INSERT INTO pgferry.target (name, node_id, table_ids) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET node_id = excluded.node_id, table_ids = excluded.table_ids",
        &[&entry_name, &node_id, &table_ids],
    )
    .await
    .map_err(source.on_err("registering the target on the source"))?;
    Ok(Entry {
        name: entry_name,
        table_ids,
    })
}

/// Lists `tables` as received in a target's registry entry (after `pgferry copy` brought them),
/// under the registry lock, so that a concurrent registration cannot write back an older list.
pub(crate) async fn accept_tables(
    source: &Session,
    name: &str,
    tables: &[i32],
) -> Result<(), SyncError> {
    let c = &source.client;
    c.execute(
        "SELECT pg_catalog.pg_advisory_lock($1)",
        &[&pgferry_core::artifact::REGISTRY_LOCK_KEY],
    )
    .await
    .map_err(source.on_err("locking the source's registry of targets"))?;
    let updated = c
        .execute(
            "UPDATE pgferry.target SET table_ids = ARRAY(
                 SELECT DISTINCT u.id FROM pg_catalog.unnest(coalesce(table_ids, '{}') || $2::int4[]) AS u(id) ORDER BY 1)
              WHERE name = $1",
            &[&name, &tables],
        )
        .await
        .map_err(source.on_err("recording the copied tables on the source"));
    c.execute(
        "SELECT pg_catalog.pg_advisory_unlock($1)",
        &[&pgferry_core::artifact::REGISTRY_LOCK_KEY],
    )
    .await
    .map_err(source.on_err("unlocking the source's registry of targets"))?;
    updated?;
    Ok(())
}

fn snapshot_xmin(snapshot: &str) -> Option<u64> {
    snapshot.split(':').next()?.parse().ok()
}

fn snapshot_xmax(snapshot: &str) -> Option<u64> {
    snapshot.split(':').nth(1)?.parse().ok()
}

/// Whether a target's own progress (`applied`) is older than what it acknowledged to the
/// source (`acked`): it lost rounds it had committed (restored from an older backup, or a
/// crash that lost commits).
fn went_back(applied: Option<&str>, acked: Option<&str>) -> bool {
    match (applied, acked) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(p), Some(a)) => match (snapshot_xmax(p), snapshot_xmax(a)) {
            (Some(p), Some(a)) => a > p,
            _ => false,
        },
    }
}

/// Reserves a target on the source before its copy exists (before the dump is taken), so that
/// nothing it will need is purged. Returns false when it was reserved already.
pub async fn reserve(source: &pgferry_core::Dsn, name: &str) -> Result<bool, SyncError> {
    let s = Session::connect(source, "target").await?;
    if !catalog::schema_exists(&s.client, SCHEMA, &s.target).await? {
        return Err(SyncError::NotInstalled {
            source_db: s.target.clone(),
        });
    }
    let n = s
        .client
        .execute(
            "INSERT INTO pgferry.target (name) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&name],
        )
        .await
        .map_err(s.on_err("reserving the target"))?;
    Ok(n == 1)
}

/// Removes a target from the source's registry, releasing the capture rows it held back.
/// Returns false when there was no such target.
pub async fn drop_target(source: &pgferry_core::Dsn, name: &str) -> Result<bool, SyncError> {
    let s = Session::connect(source, "target").await?;
    let n = s
        .client
        .execute(
            "DELETE FROM pgferry.target WHERE name = $1 OR node_id = $1",
            &[&name],
        )
        .await
        .map_err(s.on_err("dropping the target"))?;
    Ok(n > 0)
}

/// Records on the source what the target acknowledged (after the target committed; the
/// target's own progress row stays the truth).
pub(crate) async fn acknowledge(
    source: &Session,
    name: &str,
    snapshot: &str,
) -> Result<(), SyncError> {
    let dialect = Dialect::new(source.server_version);
    source
        .client
        .execute(
            &format!(
                "UPDATE pgferry.target SET acked_snapshot = $2::text::{snap}, acked_at = pg_catalog.now() WHERE name = $1",
                snap = dialect.snapshot_type()
            ),
            &[&name, &snapshot],
        )
        .await
        .map_err(source.on_err("recording the target's progress on the source"))?;
    Ok(())
}
