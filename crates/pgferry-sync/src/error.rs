//! Sync errors: each names the table, the column or the node, and the fix.

use pgferry_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Core(#[from] pgferry_core::Error),

    #[error(transparent)]
    Install(#[from] pgferry_install::InstallError),

    #[error("{source_db} has no pgferry capture installed\nfix: run `pgferry install --source …` on it first (step 1 of a migration)")]
    NotInstalled { source_db: String },

    #[error("conflict in table {table}, key {keys}: changed on node {local} and on node {remote} since they last exchanged changes, and the rule is abort; this round was rolled back, nothing was applied\n\
             fix: make the rows equal by hand (or change the row again on the node that should win, after the other's change), or sync with another --conflict rule")]
    ConflictAborted {
        table: String,
        keys: String,
        local: String,
        remote: String,
    },

    #[error("conflict function {function} (table {table}): {reason}; this round was rolled back\nfix: return the local or the remote image (the first two arguments), a merged row of the table as jsonb, or NULL (the row deleted)")]
    CustomConflict {
        function: String,
        table: String,
        reason: String,
    },

    #[error("table {table} is not captured on node {node}: a two-way sync captures the same tables, with the same key, on every node; nothing was applied\nfix: run `pgferry install --source <{node}> --table {table}` on it")]
    NotCapturedOnPeer { table: String, node: String },

    #[error("table {table} declares delta columns on node {node}, and the sync has {nodes} nodes: delta columns merge the changes of two nodes and are supported in two-node syncs only; nothing was applied\nfix: sync this table between two nodes, or re-install its capture without --delta-column")]
    DeltaColumnsInMesh {
        table: String,
        node: String,
        nodes: usize,
    },

    #[error("table {table} has key ({this_key}) on node {this} but ({other_key}) on node {other}: two-way syncs need the same key columns and types on every node; nothing was applied")]
    KeyMismatch {
        table: String,
        this: String,
        this_key: String,
        other: String,
        other_key: String,
    },

    #[error("two-way sync: {reason}")]
    TwoWayConfig { reason: String },

    #[error("node {node}: pgferry's role may not set session_replication_role = replica, and the node's capture functions predate the guard that skips pgferry's own apply: rows pgferry applies would be captured again and travel back and forth; nothing was applied\n\
             fix: re-run `pgferry install --source <{node}>` (it regenerates the capture functions with the guard, in one transaction), or connect as a superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role TO <pgferry's role>")]
    TwoWayNeedsReplicaRole { node: String },

    #[error("{target} is an uncleaned copy of the source: it carries the source's own capture (node {node})\nfix: run `pgferry clean --db …` on it first; nothing was applied")]
    UncleanedCopy { target: String, node: String },

    #[error("table {table} is missing on {target}\nfix: create the schema on the target first (e.g. pg_dump --schema-only); nothing was applied")]
    MissingTable { table: String, target: String },

    #[error("column {column} of table {table} is missing on {target}\nfix: add it to the target (the target's tables must have every column of the source's); nothing was applied")]
    MissingColumn {
        table: String,
        column: String,
        target: String,
    },

    #[error("column {column} of table {table} is {source_type} on the source but {target_type} on {target}\nfix: give it the same type on the target; nothing was applied")]
    TypeMismatch {
        table: String,
        column: String,
        source_type: String,
        target_type: String,
        target: String,
    },

    #[error("target {target} cannot be registered: capture rows were already purged on the source, so changes made before now may be missing from its copy\n\
             fix: reserve targets before taking the dump (`pgferry target add --source … --target …`), then take a new dump or snapshot; nothing was applied")]
    PurgedBeforeRegistration { target: String },

    #[error("target {target} is behind what the source already purged: it was not registered (dropped with `pgferry target drop`?) while capture rows it still needed were deleted, so it would miss changes\n\
             fix: give it a fresh copy (dump and restore, then `pgferry clean`), registering it before the dump with `pgferry target add`; nothing was applied")]
    BehindPurge { target: String },

    #[error("target {target} holds an older state than it acknowledged to the source (restored from an older backup or snapshot, or its server lost commits in a crash), and capture rows it would need again were already purged\n\
             fix: give it a fresh copy (dump and restore, then `pgferry clean`), reserving it before the dump with `pgferry target add`; nothing was applied")]
    WentBack { target: String },

    #[error("table(s) {} were added to the capture after target {target} registered: their existing rows never reached it\n\
             fix: copy them with `pgferry copy --source … --target … --table …` (which records them as received), or load their current rows by other means (e.g. pg_dump --data-only --table …) and re-run with --accept-new-tables; nothing was applied",
            tables.join(", "))]
    TablesAddedLater { target: String, tables: Vec<String> },

    #[error("captured tables on {source_db} stayed locked exclusively (TRUNCATEs or other DDL in progress) for every attempt of the round for about 30 s; nothing was applied\nfix: retry when the long transaction holding them has ended")]
    TablesBusy { source_db: String },

    #[error("the capture on {source_db} changed while syncing (tables added by a new `pgferry install`); nothing was applied, the sync starts over with the new tables")]
    CaptureChanged { source_db: String },

    #[error("table {table} has {pending} keys with pending changes: too many to leave out of a live comparison\nfix: verify when the target has caught up (the daemon running, or after `pgferry sync --once`)")]
    TooBusyToVerify { table: String, pending: u64 },

    #[error("{source_db} was cut over at {at}: it is the old system, frozen, and no longer replicates\nfix: nothing to do if the migration is over; `pgferry unfreeze --source …` makes it writable (and replicable) again")]
    CutOver { source_db: String, at: String },

    #[error("could not freeze writes on {source_db} within {seconds} s: {} hold locks on captured tables (a transaction that wrote to them and has not ended); nothing was changed\n\
             fix: let them finish, or end them (SELECT pg_catalog.pg_terminate_backend(pid)), or stop the application's writers, then retry; or give --lock-timeout more seconds",
            if blockers.is_empty() { "other sessions".to_owned() } else { blockers.join(", ") })]
    FreezeTimedOut {
        source_db: String,
        seconds: f64,
        blockers: Vec<String>,
    },

    #[error("target {target} is {lag:.1} s behind (more than --max-lag {max:.1} s): the final round inside the freeze would be long; nothing was changed\nfix: catch it up first (`pgferry run`, or `pgferry sync --once`), or raise --max-lag")]
    LagTooHigh { target: String, lag: f64, max: f64 },

    #[error("the check inside the freeze found differences: {}\nthe source was unfrozen; run `pgferry verify --source … --target …` to see the differing keys", tables.join(", "))]
    CutoverMismatch { tables: Vec<String> },

    #[error("fault injected at {step} (PGFERRY_FAILPOINT)")]
    Injected { step: &'static str },

    #[error("target {target} has never caught up with this source: cutover drains targets that are already following it; nothing was changed\nfix: catch it up first (`pgferry sync --once`, or the daemon), then cut over")]
    NeverSynced { target: String },

    #[error("another cutover of {source_db} is running; nothing was changed")]
    CutoverRunning { source_db: String },

    #[error("cutover --reverse: capture cannot be installed on {target}, so its writes could not flow back to the old database; nothing was changed\nfix: `pgferry install --source … --dry-run` on it shows the same refusal: fix that, or cut over without --reverse")]
    ReverseCapture {
        target: String,
        #[source]
        cause: pgferry_install::InstallError,
    },

    #[error("cutover --reverse: {reason}; nothing was changed")]
    ReverseRefused { reason: String },

    #[error("target {target} is frozen by a cutover of its own ({state} since {at}) and {source_db} is not the database it follows back: a cutover hands the writes over to its targets, and this one refuses them; nothing was changed\n\
             fix: the way back goes only to a database cut over with --reverse, from the database it follows; otherwise `pgferry unfreeze --source …` on it first (and give it a fresh copy if it no longer holds the source's state)")]
    TargetFrozen {
        target: String,
        source_db: String,
        state: String,
        at: String,
    },

    #[error("a pgferry daemon replicates from {source_db} ({holder}) and cutover may not end its session to take the sync over; nothing was changed\nfix: stop the daemon, or run cutover as a role that may signal it (a superuser, or a member of pg_signal_backend for a non-superuser daemon)")]
    DaemonRunning { source_db: String, holder: String },

    #[error("another pgferry is applying to {target} (its progress moved from the snapshot this round started at); this round was rolled back")]
    AnotherApplier { target: String },

    #[error("{target}: pgferry may not set session_replication_role = replica, and without it applying would fire the target's triggers and foreign-key actions on: {}\n\
             fix: apply as a superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role TO <pgferry's role>; nothing was applied",
            tables.join(", "))]
    NeedsReplicaRole { target: String, tables: Vec<String> },

    #[error("{target}: pgferry may not set session_replication_role = replica, and the capture functions of {} there predate the guard that skips pgferry's own apply: applied rows would be captured again as the target's own changes\n\
             fix: re-run `pgferry install --source <{target}>` (it regenerates them with the guard, in one transaction), or apply as a superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role TO <pgferry's role>; nothing was applied",
            tables.join(", "))]
    UnguardedCapture { target: String, tables: Vec<String> },

    #[error("no captured table of {source_db} matches {}\nfix: `pgferry status --source …` counts the captured tables; patterns are `schema.table` with * and ?; nothing was copied",
            patterns.join(", "))]
    NoTableMatches {
        source_db: String,
        patterns: Vec<String>,
    },

    #[error("table(s) {} on {target} are not empty (rows loaded otherwise, or left by a copy interrupted in the middle of the table)\n\
             fix: re-run with --truncate to empty them before copying, or leave them out with --table; nothing was copied",
            tables.join(", "))]
    TargetNotEmpty { target: String, tables: Vec<String> },

    #[error("{database}: pgferry's role lacks the {privilege} privilege on {}\nfix: GRANT {privilege} ON those tables TO the role pgferry connects as; nothing was copied",
            tables.join(", "))]
    MissingPrivilege {
        database: String,
        privilege: &'static str,
        tables: Vec<String>,
    },

    #[error("the copy into {target} stopped after it had started writing; the tables it finished are recorded as copied and kept, the others are not listed as received, so no round runs over them\n\
             fix: run the same `pgferry copy` again: it keeps the finished tables (add --truncate if it names tables left half-copied)")]
    CopyInterrupted {
        target: String,
        #[source]
        cause: Box<SyncError>,
    },

    #[error(
        "sequences cannot be partitioned between the nodes; nothing was changed on any node\n{}",
        crate::sequence_partition::describe(refusals)
    )]
    SequencePartitionRefused {
        refusals: Vec<crate::sequence_partition::Refusal>,
    },

    #[error("nodes {first} and {second} are the same database, or one is a restored copy still carrying the other's capture (node {node_id}); nothing was changed\n\
             fix: list each node once; clean a restored copy (`pgferry clean --db …`) and install its own capture (`pgferry install`)")]
    SameNodeTwice {
        first: String,
        second: String,
        node_id: String,
    },

    #[error("sequence partitioning needs two nodes or more and an increment no smaller than their number: got {nodes} node(s) and INCREMENT BY {increment}; nothing was changed\n\
             fix: list every node of the two-way sync, always in the same order (an increment larger than the node count leaves room for nodes added later)")]
    PartitionIncrement { nodes: usize, increment: i64 },
}

impl SyncError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SyncError::Core(e) => e.class(),
            SyncError::CopyInterrupted { cause, .. } => cause.class(),
            SyncError::ReverseCapture { cause, .. } => cause.class(),
            SyncError::MissingPrivilege { .. } => ErrorClass::Privilege,
            SyncError::Install(e) => e.class(),
            SyncError::AnotherApplier { .. }
            | SyncError::TablesBusy { .. }
            | SyncError::CaptureChanged { .. } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}

/// Turns a failed query on `label`'s database into a [`SyncError`] naming what was being done:
/// `.map_err(q(label, "reading the target's progress"))`.
pub(crate) fn q(
    label: &str,
    what: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SyncError {
    let (label, what) = (label.to_owned(), what.into());
    move |e| {
        SyncError::Core(pgferry_core::Error::Query {
            context: what,
            target: label,
            source: e,
        })
    }
}
