//! Sequences: carried forward to the targets, never backward.
//!
//! Sequences are not transactional, so they are not part of a round's snapshot: after a
//! catch-up each registered sequence is set on the target to the source's position when that
//! is ahead. A target sequence that is already further (used on the target) is left alone.

use pgferry_core::Session;

use crate::registry::CapturedSequence;

use crate::SyncError;

/// Moves each sequence forward on `target` to where it is on `source`; returns how many moved.
pub(crate) async fn advance(
    source: &Session,
    target: &Session,
    sequences: &[&CapturedSequence],
) -> Result<u64, SyncError> {
    let mut moved = 0;
    for seq in sequences.iter().map(|s| &s.name) {
        let read = format!("SELECT last_value, is_called FROM {seq}");
        let (value, called): (i64, bool) = match source.client.query_one(&read, &[]).await {
            Ok(r) => (r.get(0), r.get(1)),
            Err(e) => {
                return Err(SyncError::Core(
                    source.err(format!("reading sequence {}", seq.human()), e),
                ))
            }
        };
        let theirs = match target.client.query_opt(&read, &[]).await {
            Ok(r) => r.map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1))),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
                tracing::warn!(sequence = %seq.human(), target = %target.target, "sequence missing on the target: not carried");
                continue;
            }
            Err(e) => {
                return Err(SyncError::Core(
                    target.err(format!("reading sequence {}", seq.human()), e),
                ))
            }
        };
        // Position as "the next value handed out would be greater than": value, or value - 1.
        let pos = |v: i64, c: bool| if c { v } else { v.saturating_sub(1) };
        if let Some((tv, tc)) = theirs {
            if pos(tv, tc) >= pos(value, called) {
                continue;
            }
        }
        target
            .client
            .execute(
                "SELECT pg_catalog.setval($1::text::regclass, $2, $3)",
                &[&seq.to_string(), &value, &called],
            )
            .await
            .map_err(|e| {
                SyncError::Core(target.err(format!("setting sequence {}", seq.human()), e))
            })?;
        moved += 1;
    }
    Ok(moved)
}
