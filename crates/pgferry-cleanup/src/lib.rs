//! Stripping replication artifacts from a restored copy (step 4 of a migration).
//!
//! A database restored from a dump or a cloud snapshot of a captured source carries the
//! source's capture: schema pgferry, the triggers on user tables, and the source's node
//! identity. `clean` removes all of it, and with `bucardo` also Bucardo's (schema bucardo and
//! the `bucardo_delta`, `bucardo_kick_*`, `bucardo_note_trunc_*` and `btrunc_*` triggers that
//! call its functions), in one transaction. User tables, data, triggers and functions stay.
//!
//! A copy carries its source's identity, so identity cannot tell the two apart. `clean`
//! therefore looks for signs of life that a freshly restored copy does not have — a pgferry
//! session connected, targets acknowledging progress or ticks written in the last minutes,
//! capture rows being written while it watches — and refuses without `force` when it sees any.

use std::time::Duration;

use pgferry_core::artifact::{self, Removal, BUCARDO_SCHEMA, BUCARDO_TRIGGER_PATTERNS};
use pgferry_core::session::APPLICATION_NAME_PREFIX;
use pgferry_core::{Dsn, ErrorClass, Session};
use serde::Serialize;

/// What to clean.
#[derive(Clone, Debug)]
pub struct CleanOptions {
    /// Also remove Bucardo's artifacts.
    pub bucardo: bool,
    /// Report, change nothing.
    pub dry_run: bool,
    /// Clean even when the database looks like a live source.
    pub force: bool,
    /// How long to wait for a table lock.
    pub lock_timeout: Duration,
    /// How long to watch the capture for new rows.
    pub watch: Duration,
    /// Progress or ticks younger than this count as signs of life.
    pub recent: Duration,
}

impl Default for CleanOptions {
    fn default() -> Self {
        CleanOptions {
            bucardo: false,
            dry_run: false,
            force: false,
            lock_timeout: Duration::from_secs(10),
            watch: Duration::from_secs(2),
            recent: Duration::from_secs(600),
        }
    }
}

/// What clean removed (or would remove).
#[derive(Debug, Serialize)]
pub struct CleanReport {
    pub dry_run: bool,
    pub pgferry: Removal,
    /// The source identity the copy carried (removed with the schema).
    pub pgferry_node_id: Option<String>,
    pub bucardo: Option<Removal>,
    /// Signs that the database is a live source; cleaning went ahead only with `force`.
    pub live_signs: Vec<String>,
}

impl CleanReport {
    /// Whether anything was (or would be) removed.
    pub fn removed_anything(&self) -> bool {
        !self.pgferry.statements.is_empty()
            || self
                .bucardo
                .as_ref()
                .is_some_and(|b| !b.statements.is_empty())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CleanError {
    #[error(transparent)]
    Core(#[from] pgferry_core::Error),

    #[error("refusing to clean {target}: it looks like a live pgferry source, not a restored copy:\n  - {}\n\
             fix: if this really is a restored copy, re-run with --force; to remove capture from a live source, use `pgferry uninstall`; nothing was changed",
            signs.join("\n  - "))]
    LooksLive { target: String, signs: Vec<String> },

    #[error("objects outside schema {schema} depend on it: {}\nfix: drop or change them first (pgferry never drops user objects); nothing was changed",
            objects.join(", "))]
    Dependents {
        schema: String,
        objects: Vec<String>,
    },
}

impl CleanError {
    pub fn class(&self) -> ErrorClass {
        match self {
            CleanError::Core(e) => e.class(),
            _ => ErrorClass::Definite,
        }
    }
}

fn q(target: &str, ctx: &str, e: tokio_postgres::Error) -> pgferry_core::Error {
    pgferry_core::Error::Query {
        context: ctx.to_owned(),
        target: target.to_owned(),
        source: e,
    }
}

/// Signs that `session`'s database is a live source rather than a restored copy.
async fn live_signs(
    session: &Session,
    opts: &CleanOptions,
) -> Result<Vec<String>, pgferry_core::Error> {
    let c = &session.client;
    let t = session.target.as_str();
    let mut signs = Vec::new();
    let like = format!("{APPLICATION_NAME_PREFIX}%");
    for r in c
        .query(
            "SELECT pid, application_name, coalesce(host(client_addr), 'local')
               FROM pg_catalog.pg_stat_activity
              WHERE datname = pg_catalog.current_database() AND pid <> pg_catalog.pg_backend_pid()
                AND application_name LIKE $1 ORDER BY pid",
            &[&like],
        )
        .await
        .map_err(|e| q(t, "reading pg_stat_activity", e))?
    {
        let (pid, app, from): (i32, String, String) = (r.get(0), r.get(1), r.get(2));
        signs.push(format!(
            "a pgferry session is connected (pid {pid}, {app:?}, from {from})"
        ));
    }
    let has = |rel: &'static str| async move {
        c.query_one("SELECT pg_catalog.to_regclass($1) IS NOT NULL", &[&rel])
            .await
            .map(|r| r.get::<_, bool>(0))
            .map_err(|e| q(t, "reading the pgferry schema", e))
    };
    let recent = opts.recent.as_secs_f64();
    if has("pgferry.target").await? {
        for r in c
            .query(
                "SELECT name, extract(epoch FROM pg_catalog.now() - acked_at)::float8
                   FROM pgferry.target WHERE acked_at > pg_catalog.now() - $1 * interval '1 second' ORDER BY name",
                &[&recent],
            )
            .await
            .map_err(|e| q(t, "reading pgferry.target", e))?
        {
            let (name, age): (String, f64) = (r.get(0), r.get(1));
            signs.push(format!("target {name:?} acknowledged progress {age:.0} s ago"));
        }
    }
    if has("pgferry.tick").await? {
        if let Some(r) = c
            .query_opt(
                "SELECT extract(epoch FROM pg_catalog.now() - max(tick_time))::float8 FROM pgferry.tick
                 HAVING max(tick_time) > pg_catalog.now() - $1 * interval '1 second'",
                &[&recent],
            )
            .await
            .map_err(|e| q(t, "reading pgferry.tick", e))?
        {
            let age: f64 = r.get(0);
            signs.push(format!("a pgferry tick was written {age:.0} s ago (a pgferry engine is running against it)"));
        }
    }
    if has("pgferry.delta").await? {
        let sample = || async {
            c.batch_execute("SELECT pg_catalog.pg_stat_clear_snapshot()")
                .await
                .map_err(|e| q(t, "reading statistics", e))?;
            c.query_one(
                "SELECT pg_catalog.pg_stat_get_tuples_inserted('pgferry.delta'::pg_catalog.regclass)",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .map_err(|e| q(t, "reading statistics", e))
        };
        let before = sample().await?;
        tokio::time::sleep(opts.watch).await;
        let after = sample().await?;
        if after > before {
            signs.push(format!(
                "{} capture row(s) were written while clean watched for {:.0} s (applications are writing captured tables)",
                after - before,
                opts.watch.as_secs_f64()
            ));
        }
    }
    Ok(signs)
}

/// Cleans a restored copy. See the module docs.
pub async fn clean(dsn: &Dsn, opts: &CleanOptions) -> Result<CleanReport, CleanError> {
    let mut session = Session::connect(dsn, "clean").await?;
    let target = session.target.clone();
    let signs = live_signs(&session, opts).await?;
    if !signs.is_empty() && !opts.force {
        return Err(CleanError::LooksLive { target, signs });
    }
    let tx = session.begin_locked(opts.lock_timeout).await?;

    let pgferry = artifact::pgferry_removal(&tx, &target).await?;
    if !pgferry.dependents.is_empty() {
        return Err(CleanError::Dependents {
            schema: artifact::SCHEMA.into(),
            objects: pgferry.dependents,
        });
    }
    let node = if pgferry.schema_found {
        tx.query_opt(
            "SELECT node_id FROM pgferry.installation WHERE pg_catalog.to_regclass('pgferry.installation') IS NOT NULL",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<_, String>(0))
    } else {
        None
    };
    let bucardo = if opts.bucardo {
        let b = artifact::removal(&tx, BUCARDO_SCHEMA, BUCARDO_TRIGGER_PATTERNS, &target).await?;
        if !b.dependents.is_empty() {
            return Err(CleanError::Dependents {
                schema: BUCARDO_SCHEMA.into(),
                objects: b.dependents,
            });
        }
        Some(b)
    } else {
        None
    };
    let report = CleanReport {
        dry_run: opts.dry_run,
        pgferry,
        pgferry_node_id: node,
        bucardo,
        live_signs: signs,
    };
    if opts.dry_run || !report.removed_anything() {
        tx.rollback()
            .await
            .map_err(|e| q(&target, "ending the clean transaction", e))?;
        return Ok(report);
    }
    let all = report
        .pgferry
        .statements
        .iter()
        .chain(report.bucardo.iter().flat_map(|b| b.statements.iter()));
    for s in all {
        tx.batch_execute(s).await.map_err(|e| q(&target, s, e))?;
    }
    tx.commit()
        .await
        .map_err(|e| q(&target, "committing the clean", e))?;
    Ok(report)
}
