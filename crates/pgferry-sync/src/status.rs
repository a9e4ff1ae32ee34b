//! `status`: where each target stands, read from the source's registry (or from a target's own
//! progress rows).

use pgferry_core::artifact::{Dialect, SCHEMA};
use pgferry_core::ident::literal;
use pgferry_core::{catalog, Dsn, QualifiedName, Session};
use serde::Serialize;

use crate::SyncError;

/// Pending changes of one table for one target.
#[derive(Clone, Debug, Serialize)]
pub struct TablePending {
    pub table: String,
    pub pending: u64,
}

/// One target as the source's registry sees it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetStatus {
    pub name: String,
    pub node_id: Option<String>,
    /// Reserved but never synced.
    pub reserved_only: bool,
    pub acked_snapshot: Option<String>,
    /// Seconds since the target last acknowledged progress.
    pub acked_seconds_ago: Option<f64>,
    /// Capture rows the target has not applied yet, all tables.
    pub pending: u64,
    /// Seconds since the oldest pending change committed (from ticks; None when unknown).
    pub oldest_pending_seconds: Option<f64>,
    pub tables: Vec<TablePending>,
}

/// The source's view of its targets.
#[derive(Clone, Debug, Serialize)]
pub struct SourceStatus {
    pub source: String,
    pub node_id: String,
    pub captured_tables: u64,
    /// Capture rows kept on the source (pending for at least one target, or not yet purged).
    pub capture_rows: u64,
    pub targets: Vec<TargetStatus>,
    /// The source's latest cutover: `frozen` (writes refused: a cutover is running or was
    /// interrupted), `done` (cut over, frozen for good) or `unfrozen`.
    pub cutover: Option<crate::freeze::CutoverRecord>,
}

/// A target's own progress rows.
#[derive(Clone, Debug, Serialize)]
pub struct AppliedStatus {
    pub source_node_id: String,
    pub source: String,
    pub snapshot: Option<String>,
    pub rounds: i64,
    pub applied_seconds_ago: Option<f64>,
}

/// Reads the status of every target registered on `source`.
pub async fn source_status(source: &Dsn) -> Result<SourceStatus, SyncError> {
    let s = Session::connect(source, "status").await?;
    if !catalog::schema_exists(&s.client, SCHEMA, &s.target).await? {
        return Err(SyncError::NotInstalled {
            source_db: s.target.clone(),
        });
    }
    let dialect = Dialect::new(s.server_version);
    let head = s
        .client
        .query_one(
            "SELECT (SELECT node_id FROM pgferry.installation),
                    (SELECT count(*) FROM pgferry.captured_table),
                    (SELECT count(*) FROM pgferry.delta)",
            &[],
        )
        .await
        .map_err(s.on_err("reading the source's capture"))?;
    let mut status = SourceStatus {
        source: s.target.clone(),
        node_id: head.get(0),
        captured_tables: head.get::<_, i64>(1) as u64,
        capture_rows: head.get::<_, i64>(2) as u64,
        targets: Vec::new(),
        cutover: crate::freeze::latest_cutover(&s).await?,
    };
    let rows = s
        .client
        .query(
            "SELECT name, node_id, acked_snapshot::text,
                    extract(epoch FROM pg_catalog.now() - acked_at)::float8
               FROM pgferry.target ORDER BY name",
            &[],
        )
        .await
        .map_err(s.on_err("reading the source's registry of targets"))?;
    for r in rows {
        let acked: Option<String> = r.get(2);
        let pending = match &acked {
            None => "true".to_owned(),
            Some(p) => format!(
                "NOT {}(d.xid, {}::{})",
                dialect.visible_in_snapshot(),
                literal(p),
                dialect.snapshot_type()
            ),
        };
        let per_table = s
            .client
            .query(
                &format!(
                    "SELECT t.schema_name, t.table_name, count(*), min(d.xid)::text
                       FROM pgferry.delta d JOIN pgferry.captured_table t USING (table_id)
                      WHERE {pending} GROUP BY 1, 2 ORDER BY 1, 2"
                ),
                &[],
            )
            .await
            .map_err(s.on_err("counting pending changes"))?;
        let mut tables = Vec::new();
        let mut oldest: Option<String> = None;
        let mut oldest_n: Option<u64> = None;
        for t in &per_table {
            let n = t.get::<_, i64>(2) as u64;
            tables.push(TablePending {
                table: QualifiedName::new(t.get::<_, String>(0), t.get::<_, String>(1)).human(),
                pending: n,
            });
            let xid: String = t.get(3);
            let x: u64 = xid.parse().unwrap_or(u64::MAX);
            if oldest_n.is_none_or(|o| x < o) {
                oldest_n = Some(x);
                oldest = Some(xid);
            }
        }
        let oldest_pending_seconds = match oldest {
            None => None,
            Some(xid) => committed_seconds_ago(&s, dialect, &xid).await?,
        };
        status.targets.push(TargetStatus {
            name: r.get(0),
            node_id: r.get(1),
            reserved_only: acked.is_none(),
            acked_snapshot: acked,
            acked_seconds_ago: r.get(3),
            pending: tables.iter().map(|t| t.pending).sum(),
            oldest_pending_seconds,
            tables,
        });
    }
    Ok(status)
}

/// Reads a target's own progress rows (one per source it applies from).
pub async fn target_status(target: &Dsn) -> Result<Vec<AppliedStatus>, SyncError> {
    let s = Session::connect(target, "status").await?;
    if !catalog::schema_exists(&s.client, SCHEMA, &s.target).await? {
        return Ok(Vec::new());
    }
    let rows = s
        .client
        .query(
            "SELECT source_node_id, source, snapshot, rounds,
                    extract(epoch FROM pg_catalog.now() - applied_at)::float8
               FROM pgferry.applied ORDER BY 1",
            &[],
        )
        .await
        .map_err(s.on_err("reading the target's progress"))?;
    Ok(rows
        .iter()
        .map(|r| AppliedStatus {
            source_node_id: r.get(0),
            source: r.get(1),
            snapshot: r.get(2),
            rounds: r.get(3),
            applied_seconds_ago: r.get(4),
        })
        .collect())
}

/// Seconds since transaction `xid` committed, from pgferry's ticks on the source: the age of the
/// first tick whose snapshot sees it. None when no tick has seen it yet.
pub(crate) async fn committed_seconds_ago(
    s: &Session,
    dialect: Dialect,
    xid: &str,
) -> Result<Option<f64>, SyncError> {
    Ok(s.client
        .query_one(
            &format!(
                "SELECT extract(epoch FROM pg_catalog.now() - min(tick_time))::float8 FROM pgferry.tick
                  WHERE {}({}::{}, snapshot)",
                dialect.visible_in_snapshot(),
                literal(xid),
                dialect.xid_type()
            ),
            &[],
        )
        .await
        .map_err(s.on_err("reading ticks"))?
        .get(0))
}
