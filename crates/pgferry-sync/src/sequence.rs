//! Sequences: carried forward to the targets, never backward.
//!
//! Sequences are not transactional, so they are not part of a round's snapshot: after a
//! catch-up each registered sequence is set on the target to the source's position when that
//! is ahead. A target sequence that is already further (used on the target) is left alone.

use std::collections::BTreeSet;

use pgferry_core::Session;
use tokio_postgres::types::Type;

use crate::registry::CapturedSequence;
use crate::SyncError;

/// Moves each sequence forward on `target` to where it is on `source`; returns how many moved.
/// One query per side reads every sequence, and one statement sets those that moved (each sent
/// unprepared, one round trip). A sequence
/// missing on the target is skipped, with a warning the first time it is found missing:
/// `missing` holds the sequences already reported for this target (the daemon keeps it for as
/// long as it runs, so a missing sequence is reported once, not on every round).
pub(crate) async fn advance(
    source: &Session,
    target: &Session,
    sequences: &[&CapturedSequence],
    missing: &mut BTreeSet<String>,
) -> Result<u64, SyncError> {
    if sequences.is_empty() {
        return Ok(0);
    }
    let read = |names: &[String]| {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("SELECT {i}, last_value, is_called FROM {n}"))
            .collect::<Vec<_>>()
            .join(" UNION ALL ")
    };
    let all: Vec<String> = sequences.iter().map(|s| s.name.to_string()).collect();
    let (ours, theirs_exist) = tokio::try_join!(
        async {
            source
                .client
                .query_typed(&read(&all), &[])
                .await
                .map_err(|e| SyncError::Core(source.err("reading sequences", e)))
        },
        async {
            target
                .client
                .query_typed(
                    "SELECT pg_catalog.to_regclass(n) IS NOT NULL
                       FROM pg_catalog.unnest($1::text[]) WITH ORDINALITY AS u(n, i) ORDER BY i",
                    &[(&all, Type::TEXT_ARRAY)],
                )
                .await
                .map_err(|e| SyncError::Core(target.err("looking for sequences", e)))
        }
    )?;
    let mut present = Vec::new();
    for ((n, row), s) in all.iter().zip(&theirs_exist).zip(sequences) {
        if row.get::<_, bool>(0) {
            if missing.remove(n) {
                tracing::info!(sequence = %s.name.human(), target = %target.target, "sequence found on the target: carried again");
            }
            present.push(n.clone());
        } else if missing.insert(n.clone()) {
            tracing::warn!(sequence = %s.name.human(), target = %target.target, "sequence missing on the target: not carried (reported once)");
        }
    }
    if present.is_empty() {
        return Ok(0);
    }
    let theirs = target
        .client
        .query_typed(&read(&present), &[])
        .await
        .map_err(|e| SyncError::Core(target.err("reading sequences", e)))?;
    let ours: std::collections::HashMap<&str, (i64, bool)> = ours
        .iter()
        .map(|r| {
            (
                all[r.get::<_, i32>(0) as usize].as_str(),
                (r.get(1), r.get(2)),
            )
        })
        .collect();
    // Position as "the next value handed out would be greater than": value, or value - 1.
    let pos = |v: i64, c: bool| if c { v } else { v.saturating_sub(1) };
    let mut names = Vec::new();
    let mut values = Vec::new();
    let mut called = Vec::new();
    for t in &theirs {
        let name = &present[t.get::<_, i32>(0) as usize];
        let (tv, tc): (i64, bool) = (t.get(1), t.get(2));
        let Some(&(v, c)) = ours.get(name.as_str()) else {
            continue;
        };
        if pos(tv, tc) < pos(v, c) {
            names.push(name.clone());
            values.push(v);
            called.push(c);
        }
    }
    if !names.is_empty() {
        target
            .client
            .execute_typed(
                "SELECT pg_catalog.setval(n::regclass, v, c)
                   FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest($2::int8[]),
                                   pg_catalog.unnest($3::bool[])) AS u(n, v, c)",
                &[
                    (&names, Type::TEXT_ARRAY),
                    (&values, Type::INT8_ARRAY),
                    (&called, Type::BOOL_ARRAY),
                ],
            )
            .await
            .map_err(|e| SyncError::Core(target.err("setting sequences", e)))?;
    }
    Ok(names.len() as u64)
}
