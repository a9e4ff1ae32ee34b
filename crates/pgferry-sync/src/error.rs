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
             fix: load their current rows into the target (e.g. pg_dump --data-only --table …), then re-run with --accept-new-tables; nothing was applied",
            tables.join(", "))]
    TablesAddedLater { target: String, tables: Vec<String> },

    #[error("captured tables on {source_db} stayed locked exclusively (TRUNCATEs or other DDL in progress) for every attempt of the round for about 30 s; nothing was applied\nfix: retry when the long transaction holding them has ended")]
    TablesBusy { source_db: String },

    #[error("the capture on {source_db} changed while syncing (tables added by a new `pgferry install`); nothing was applied, the sync starts over with the new tables")]
    CaptureChanged { source_db: String },

    #[error("table {table} has {pending} keys with pending changes: too many to leave out of a live comparison\nfix: verify when the target has caught up (the daemon running, or after `pgferry sync --once`)")]
    TooBusyToVerify { table: String, pending: u64 },

    #[error("another pgferry is applying to {target} (its progress moved from the snapshot this round started at); this round was rolled back")]
    AnotherApplier { target: String },

    #[error("{target}: pgferry may not set session_replication_role = replica, and without it applying would fire the target's triggers and foreign-key actions on: {}\n\
             fix: apply as a superuser, or on PostgreSQL 15+ GRANT SET ON PARAMETER session_replication_role TO <pgferry's role>; nothing was applied",
            tables.join(", "))]
    NeedsReplicaRole { target: String, tables: Vec<String> },
}

impl SyncError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SyncError::Core(e) => e.class(),
            SyncError::Install(e) => e.class(),
            SyncError::AnotherApplier { .. }
            | SyncError::TablesBusy { .. }
            | SyncError::CaptureChanged { .. } => ErrorClass::Transient,
            _ => ErrorClass::Definite,
        }
    }
}
