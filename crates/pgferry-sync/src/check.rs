//! Checking, without changing anything, that a target can take a source's rounds.

use pgferry_core::artifact::SCHEMA;
use pgferry_core::{catalog, Dsn, Session, TablePattern};

use crate::{schema, source_info, target, SyncError};

/// Every problem that would stop `source`'s rounds on `target` (or stop them from starting):
/// capture missing on the source, either side unreachable, the target an uncleaned copy of
/// the source, a table or column missing or of another type, triggers and foreign keys that
/// need the replica role. Empty when the target is ready. Changes nothing on either side.
pub async fn check_target(source: &Dsn, target: &Dsn, tables: &[TablePattern]) -> Vec<SyncError> {
    match check(source, target, tables).await {
        Ok(problems) => problems,
        Err(e) => vec![e],
    }
}

async fn check(
    source: &Dsn,
    target: &Dsn,
    tables: &[TablePattern],
) -> Result<Vec<SyncError>, SyncError> {
    let mut src = Session::connect(source, "check").await?;
    let info = source_info(&src, tables).await?;
    let mut dst = Session::connect(target, "check").await?;
    let mut problems = Vec::new();
    if catalog::schema_exists(&dst.client, SCHEMA, &dst.target).await? {
        let node: Option<String> = dst
            .client
            .query_opt(
                "SELECT node_id FROM pgferry.installation WHERE pg_catalog.to_regclass('pgferry.installation') IS NOT NULL",
                &[],
            )
            .await
            .map_err(dst.on_err("reading the target's identity"))?
            .map(|r| r.get(0));
        if node.as_deref() == Some(info.node_id.as_str()) {
            problems.push(SyncError::UncleanedCopy {
                target: dst.target.clone(),
                node: info.node_id.clone(),
            });
            return Ok(problems);
        }
    }
    let versions = (src.server_version, dst.server_version);
    let labels = (src.target.clone(), dst.target.clone());
    let mut stx = src
        .client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: "starting a read-only transaction".into(),
                target: labels.0.clone(),
                source: e,
            })
        })?;
    let mut ttx = dst
        .client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: "starting a read-only transaction".into(),
                target: labels.1.clone(),
                source: e,
            })
        })?;
    for t in info.tables.values() {
        // An error aborts the transactions: check each table in a savepoint.
        let (ssp, tsp) = (stx.savepoint("t").await, ttx.savepoint("t").await);
        let (Ok(ssp), Ok(tsp)) = (ssp, tsp) else {
            break;
        };
        if let Err(e) =
            schema::columns_to_copy(&ssp, &tsp, t, versions, (&labels.0, &labels.1)).await
        {
            problems.push(e);
        }
        let _ = ssp.rollback().await;
        let _ = tsp.rollback().await;
    }
    drop((stx, ttx));
    let replica_role = target::may_set_replica_role(&dst).await?;
    if !replica_role {
        let names: Vec<String> = info.tables.values().map(|t| t.name.to_string()).collect();
        let blocked = target::needs_replica_role(&dst, &names).await?;
        if !blocked.is_empty() {
            problems.push(SyncError::NeedsReplicaRole {
                target: dst.target.clone(),
                tables: blocked,
            });
        }
    }
    Ok(problems)
}
