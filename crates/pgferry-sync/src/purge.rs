//! Purge: capture rows every registered target has applied are deleted.
//!
//! A capture row is purged when its transaction is visible in the acknowledged snapshot of
//! every registered target: each of them has it. (Visibility, not just `xid < xmin`: any
//! transaction in flight anywhere on the source's cluster holds a snapshot's `xmin` back, and
//! purge must not wait for unrelated long transactions.) A target that is reserved but has
//! acknowledged nothing holds purge back entirely, and with no target registered nothing is
//! purged (capture starts before any target exists). The horizon below which rows may be gone
//! is recorded, so that a target registered later, whose copy may predate purged changes, is
//! refused. Purge is a plain DELETE: it takes the same lock as the capture triggers' inserts, so
//! it never blocks writers.

use pgferry_core::artifact::Dialect;
use pgferry_core::Session;

use crate::SyncError;

/// Purges what every target has; returns the number of capture rows deleted.
pub(crate) async fn purge(source: &Session) -> Result<u64, SyncError> {
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
    let sql = format!(
        "WITH horizon AS (
             SELECT CASE WHEN count(*) > 0 AND bool_and(acked_snapshot IS NOT NULL)
                         THEN min({xmin}(acked_snapshot)) END AS lo,
                    CASE WHEN count(*) > 0 AND bool_and(acked_snapshot IS NOT NULL)
                         THEN min({xmax}(acked_snapshot)) END AS h
               FROM pgferry.target),
         gone AS (
             DELETE FROM pgferry.delta d USING horizon
              WHERE d.xid < horizon.lo
                 OR (d.xid < horizon.h
                     AND NOT EXISTS (SELECT 1 FROM pgferry.target t WHERE NOT {visible}(d.xid, t.acked_snapshot)))
             RETURNING 1),
         mark AS (
             UPDATE pgferry.installation SET purged_below = horizon.h FROM horizon
              WHERE horizon.h IS NOT NULL AND (purged_below IS NULL OR purged_below < horizon.h))
         SELECT count(*) FROM gone"
    );
    let n: i64 = source
        .client
        .query_one(&sql, &[])
        .await
        .map_err(|e| SyncError::Core(source.err("purging applied capture rows", e)))?
        .get(0);
    source
        .client
        .execute(
            "DELETE FROM pgferry.tick WHERE tick_time < pg_catalog.now() - interval '1 day'",
            &[],
        )
        .await
        .map_err(|e| SyncError::Core(source.err("purging old ticks", e)))?;
    Ok(n as u64)
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
