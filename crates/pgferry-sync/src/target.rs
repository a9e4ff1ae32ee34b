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

fn err(s: &Session, ctx: &str) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let (ctx, target) = (ctx.to_owned(), s.target.clone());
    move |e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: ctx,
            target,
            source: e,
        })
    }
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
    if catalog::schema_exists(&target.client, SCHEMA, &label).await? {
        let node: Option<String> = target
            .client
            .query_opt(
                "SELECT node_id FROM pgferry.installation WHERE pg_catalog.to_regclass('pgferry.installation') IS NOT NULL",
                &[],
            )
            .await
            .map_err(err(target, "reading the target's identity"))?
            .map(|r| r.get(0));
        if node.as_deref() == Some(source_node) {
            return Err(SyncError::UncleanedCopy {
                target: label,
                node: source_node.to_owned(),
            });
        }
    }
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
    let replica_sql = if target.server_version >= 150000 {
        "SELECT r.rolsuper OR pg_catalog.has_parameter_privilege('session_replication_role', 'SET')
           FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
    } else {
        "SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user"
    };
    let replica_role: bool = target
        .client
        .query_one(replica_sql, &[])
        .await
        .map_err(err(target, "checking the replica role"))?
        .get(0);
    Ok(Registered {
        node_id,
        applied,
        replica_role,
    })
}

/// Tables (among `tables`) that cannot be applied without the replica role: carrying or
/// referenced by a foreign key, or with user triggers.
pub(crate) async fn needs_replica_role(
    target: &Session,
    tables: &[String],
) -> Result<Vec<String>, SyncError> {
    let rows = target
        .client
        .query(
            "SELECT t FROM pg_catalog.unnest($1::text[]) AS t
              WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c
                             WHERE c.contype = 'f' AND (c.conrelid = pg_catalog.to_regclass(t) OR c.confrelid = pg_catalog.to_regclass(t)))
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                             WHERE g.tgrelid = pg_catalog.to_regclass(t) AND NOT g.tgisinternal)",
            &[&tables],
        )
        .await
        .map_err(err(target, "checking the target's foreign keys and triggers"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Records on the source what the target acknowledged (after the target committed; the
/// target's own progress row stays the truth).
pub(crate) async fn acknowledge(
    source: &Session,
    name: &str,
    node_id: &str,
    snapshot: &str,
) -> Result<(), SyncError> {
    let dialect = Dialect::new(source.server_version);
    source
        .client
        .execute(
            &format!(
                "INSERT INTO pgferry.target (name, node_id, acked_snapshot, acked_at)
                 VALUES ($1, $2, $3::text::{snap}, pg_catalog.now())
                 ON CONFLICT (name) DO UPDATE SET node_id = excluded.node_id,
                     acked_snapshot = excluded.acked_snapshot, acked_at = excluded.acked_at",
                snap = dialect.snapshot_type()
            ),
            &[&name, &node_id, &snapshot],
        )
        .await
        .map_err(err(source, "recording the target's progress on the source"))?;
    Ok(())
}
