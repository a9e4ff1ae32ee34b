//! Purge: capture rows every registered target has applied are deleted.
//!
//! A capture row is purged when its transaction is visible in the acknowledged snapshot of
//! every registered target: each of them has it. (Visibility, not just `xid < xmin`: any
//! transaction in flight anywhere on the source's cluster holds a snapshot's `xmin` back, and
//! purge must not wait for unrelated long transactions.) A target that is reserved but has
//! acknowledged nothing holds purge back entirely, and with no target registered nothing is
//! purged (capture starts before any target exists). The horizon below which rows may be gone
//! is recorded, so that a target registered later, whose copy may predate purged changes, is
//! refused. Purge is a plain DELETE, which takes the same lock as the capture triggers' inserts,
//! so it never blocks writers; when every row may go (a drained, quiet source) it is a TRUNCATE
//! under a lock taken without waiting (see [`purge_all`]).

use pgferry_core::artifact::Dialect;
use pgferry_core::Session;

use crate::SyncError;

/// Purges what every target has; returns the number of capture rows deleted. `truncate`
/// allows the TRUNCATE fast path (a catch-up's final purge); the daemon, purging every second
/// while writers run, never tries it: its check scans the whole capture table.
pub(crate) async fn purge(source: &Session, truncate: bool) -> Result<u64, SyncError> {
    let dialect = Dialect::new(source.server_version);
    let (xmin, xmax) = if dialect.major >= 13 {
        ("pg_catalog.pg_snapshot_xmin", "pg_catalog.pg_snapshot_xmax")
    } else {
        (
            "pg_catalog.txid_snapshot_xmin",
            "pg_catalog.txid_snapshot_xmax",
        )
    };
    let visible = dialect.visible_in_snapshot();
    // Below every snapshot's xmin a row is visible in all of them (the cheap test, true for
    // nearly every row); between that and the smallest xmax, each snapshot is asked.
    let horizon = format!(
        "horizon AS (
             SELECT CASE WHEN count(*) > 0 AND bool_and(acked_snapshot IS NOT NULL)
                         THEN min({xmin}(acked_snapshot)) END AS lo,
                    CASE WHEN count(*) > 0 AND bool_and(acked_snapshot IS NOT NULL)
                         THEN min({xmax}(acked_snapshot)) END AS h
               FROM pgferry.target)"
    );
    let purgeable = format!(
        "(d.xid < horizon.lo
          OR (d.xid < horizon.h
              AND NOT EXISTS (SELECT 1 FROM pgferry.target t WHERE NOT {visible}(d.xid, t.acked_snapshot))))"
    );
    let mark = "UPDATE pgferry.installation SET purged_below = horizon.h FROM horizon
                 WHERE horizon.h IS NOT NULL AND (purged_below IS NULL OR purged_below < horizon.h)";
    // Nothing may go while a registered target has acknowledged nothing (or none is
    // registered): skip the scans.
    let open: bool = source
        .client
        .query_one(
            &format!("WITH {horizon} SELECT h IS NOT NULL FROM horizon"),
            &[],
        )
        .await
        .map_err(|e| SyncError::Core(source.err("reading the purge horizon", e)))?
        .get(0);
    if !open {
        purge_ticks(source).await?;
        return Ok(0);
    }
    if truncate {
        if let Some(n) = purge_all(source, &horizon, &purgeable, mark).await? {
            return Ok(n);
        }
    }
    let sql = format!(
        "WITH {horizon},
         gone AS (DELETE FROM pgferry.delta d USING horizon WHERE {purgeable} RETURNING 1),
         mark AS ({mark})
         SELECT count(*) FROM gone"
    );
    let n: i64 = source
        .client
        .query_one(&sql, &[])
        .await
        .map_err(|e| SyncError::Core(source.err("purging applied capture rows", e)))?
        .get(0);
    purge_ticks(source).await?;
    Ok(n as u64)
}

/// The fast path when every capture row may go (a catch-up that drained a quiet source, a
/// cutover): TRUNCATE instead of DELETE, which leaves no dead rows behind. It never waits for
/// a lock: the exclusive lock is taken with NOWAIT, so it fails at once while a writer's
/// capture row or a round's read is in flight (and then the plain DELETE runs), and a writer
/// arriving meanwhile waits only for the check of an all-purgeable table and the TRUNCATE.
/// Returns `None` when the fast path does not apply.
async fn purge_all(
    source: &Session,
    horizon: &str,
    purgeable: &str,
    mark: &str,
) -> Result<Option<u64>, SyncError> {
    let count = format!(
        "WITH {horizon} SELECT count(*), count(*) FILTER (WHERE {purgeable} IS NOT TRUE)
           FROM pgferry.delta d, horizon"
    );
    let all_purgeable = |row: &tokio_postgres::Row| {
        let (n, kept): (i64, i64) = (row.get(0), row.get(1));
        (n >= TRUNCATE_ABOVE && kept == 0).then_some(n as u64)
    };
    let row = source
        .client
        .query_one(&count, &[])
        .await
        .map_err(|e| SyncError::Core(source.err("counting purgeable capture rows", e)))?;
    if all_purgeable(&row).is_none() {
        return Ok(None);
    }
    // Same checks again under the lock: rows written since are not purgeable.
    let attempt = "BEGIN; LOCK TABLE pgferry.delta IN ACCESS EXCLUSIVE MODE NOWAIT";
    if let Err(e) = source.client.batch_execute(attempt).await {
        let _ = source.client.batch_execute("ROLLBACK").await;
        tracing::debug!(error = %e, "capture rows purged by DELETE: the table is in use");
        return Ok(None);
    }
    let finish = async {
        let row = source.client.query_one(&count, &[]).await?;
        let Some(n) = all_purgeable(&row) else {
            return Ok(None);
        };
        source
            .client
            .batch_execute(&format!(
                "TRUNCATE pgferry.delta; WITH {horizon} {mark}; COMMIT"
            ))
            .await?;
        Ok::<_, tokio_postgres::Error>(Some(n))
    };
    match finish.await {
        Ok(Some(n)) => {
            purge_ticks(source).await?;
            Ok(Some(n))
        }
        Ok(None) => {
            let _ = source.client.batch_execute("ROLLBACK").await;
            Ok(None)
        }
        Err(e) => {
            let _ = source.client.batch_execute("ROLLBACK").await;
            if e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
                tracing::debug!("capture rows purged by DELETE: no TRUNCATE privilege");
                return Ok(None);
            }
            Err(SyncError::Core(
                source.err("purging applied capture rows", e),
            ))
        }
    }
}

/// Below this many capture rows a DELETE is as cheap as a TRUNCATE (which creates a new file
/// and needs an exclusive lock).
const TRUNCATE_ABOVE: i64 = 10_000;

/// Vacuums the capture table, so that the space of purged rows is reused: every round scans the
/// whole file (it has no index), so a file bloated by purge's dead rows makes every round
/// slower — and past a few MiB the planner switches those scans to parallel plans. Autovacuum
/// comes at most once a minute per database, far too rarely for a table purged every second.
/// The table has no index, so a VACUUM of it is a single pass over a small file; `SKIP_LOCKED`
/// never waits for an autovacuum already at work on it.
///
/// It does not cut the file's empty tail (`TRUNCATE false`) while the file is small: cutting
/// takes an ACCESS EXCLUSIVE lock, held while the truncation's WAL record is flushed, and every
/// captured write waits for it (measured: single-row commits delayed by hundreds of ms when the
/// disk was busy). Above [`SHRINK_ABOVE`] bytes — after a backlog — it does cut, once a backlog
/// has drained, so that rounds stop scanning a mostly empty file. Needs PostgreSQL 12 (before,
/// autovacuum is left to it); a role that does not own the table gets a warning from the
/// server and nothing is done.
pub(crate) async fn vacuum(source: &Session) -> Result<(), SyncError> {
    if source.server_version < 120000 {
        return Ok(());
    }
    let size: i64 = source
        .client
        .query_typed_one("SELECT pg_catalog.pg_relation_size('pgferry.delta')", &[])
        .await
        .map_err(|e| SyncError::Core(source.err("reading the capture table's size", e)))?
        .get(0);
    let sql = if size > SHRINK_ABOVE {
        "VACUUM (SKIP_LOCKED) pgferry.delta"
    } else {
        "VACUUM (SKIP_LOCKED, TRUNCATE false) pgferry.delta"
    };
    source
        .client
        .batch_execute(sql)
        .await
        .map_err(|e| SyncError::Core(source.err("vacuuming the capture table", e)))
}

/// Above this size the capture table's VACUUM also cuts its empty tail.
const SHRINK_ABOVE: i64 = 8 << 20;

async fn purge_ticks(source: &Session) -> Result<(), SyncError> {
    source
        .client
        .execute(
            "DELETE FROM pgferry.tick WHERE tick_time < pg_catalog.now() - interval '1 day'",
            &[],
        )
        .await
        .map_err(|e| SyncError::Core(source.err("purging old ticks", e)))?;
    Ok(())
}

/// Records a tick: the source's current snapshot and time, for lag in seconds.
pub(crate) async fn tick(source: &Session) -> Result<(), SyncError> {
    let dialect = Dialect::new(source.server_version);
    source
        .client
        .execute(
            &format!(
                "INSERT INTO pgferry.tick (snapshot) VALUES ({})",
                dialect.current_snapshot()
            ),
            &[],
        )
        .await
        .map_err(|e| SyncError::Core(source.err("recording a tick", e)))?;
    Ok(())
}

/// Writes a tick every second, in its own session and short transactions, until the returned
/// guard is dropped: lag and the age of pending changes are read from ticks.
pub(crate) async fn ticker(source: &pgferry_core::Dsn) -> Result<Ticker, SyncError> {
    let session = Session::connect(source, "ticker").await?;
    tick(&session).await?;
    let handle = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.tick().await;
        loop {
            every.tick().await;
            if let Err(e) = tick(&session).await {
                tracing::warn!(error = %e, "could not record a tick");
                return;
            }
        }
    });
    Ok(Ticker(handle))
}

/// Stops the ticker when dropped.
#[derive(Debug)]
pub(crate) struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}
