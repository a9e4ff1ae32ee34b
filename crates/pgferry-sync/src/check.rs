//! Checking, without changing anything, that a target can take a source's rounds.

use pgferry_core::{Dsn, Session, TablePattern};

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
    if let Err(e) = target::refuse_uncleaned_copy(&dst, &info.node_id).await {
        problems.push(e);
        return Ok(problems);
    }
    let versions = (src.server_version, dst.server_version);
    let labels = (src.target.clone(), dst.target.clone());
    let mut stx = read_only(&mut src).await?;
    let mut ttx = read_only(&mut dst).await?;
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
        let blocked = target::needs_replica_role(&dst, &names, true).await?;
        if !blocked.tables.is_empty() {
            problems.push(SyncError::NeedsReplicaRole {
                target: dst.target.clone(),
                tables: blocked.tables,
            });
        }
        if !blocked.unguarded.is_empty() {
            problems.push(SyncError::UnguardedCapture {
                target: dst.target.clone(),
                tables: blocked.unguarded,
            });
        }
    }
    Ok(problems)
}

async fn read_only(session: &mut Session) -> Result<tokio_postgres::Transaction<'_>, SyncError> {
    let label = session.target.clone();
    session
        .client
        .build_transaction()
        .read_only(true)
        .start()
        .await
        .map_err(|e| {
            SyncError::Core(pgferry_core::Error::Query {
                context: "starting a read-only transaction".into(),
                target: label,
                source: e,
            })
        })
}
