//! Errors of `pgferry schema`: each names the tables, the tool or the version needed, and the fix.

use pgferry_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum DdlError {
    #[error(transparent)]
    Core(#[from] pgferry_core::Error),

    #[error("{source_db} has no pgferry capture installed, so it has no captured tables\nfix: run `pgferry install --source …` on it first (step 1 of a migration)")]
    NotInstalled { source_db: String },

    #[error("pattern {pattern} matches no captured table on {source_db}; nothing was created")]
    PatternMatchesNothing { pattern: String, source_db: String },

    #[error("{source_db} has no captured table left to create (registered tables no longer exist: {}); nothing was created", missing.join(", "))]
    NothingToCreate {
        source_db: String,
        missing: Vec<String>,
    },

    #[error("already on {target}: {}; pgferry schema creates tables and sequences, it never replaces them, so nothing was created\n\
             fix: drop them on the target if they are leftovers, or leave their tables out with --table", existing.join(", "))]
    AlreadyExists {
        target: String,
        existing: Vec<String>,
    },

    #[error("the source runs PostgreSQL {needed}, and pg_dump must be at least as new as the server it dumps: {found}; nothing was created\n\
             fix: install the client tools of PostgreSQL {needed} or newer (Debian/Ubuntu: postgresql-client-{needed} from apt.postgresql.org; they land in /usr/lib/postgresql/{needed}/bin), or name a pg_dump with --pg-dump PATH (or PGFERRY_PG_DUMP)")]
    NoSuitablePgDump { needed: u32, found: String },

    #[error("{path} cannot be used: {reason}\nfix: give --pg-dump (or PGFERRY_PG_DUMP) the path of a pg_dump with its pg_restore beside it")]
    BadTool { path: String, reason: String },

    #[error("{tool} failed ({status}):\n{stderr}")]
    ToolFailed {
        tool: String,
        status: String,
        stderr: String,
    },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("unexpected output from {tool}: {reason}")]
    UnexpectedOutput { tool: String, reason: String },

    #[error("creating the schema on {target} failed, so nothing was created (it runs as one transaction)\nfix: the statement in error is in the script `pgferry schema --dry-run` prints; with --privileges, roles missing on the target come from the source with `pg_dumpall --roles-only`")]
    Create {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl DdlError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DdlError::Core(e) => e.class(),
            DdlError::Create { source, .. } => ErrorClass::of(source),
            _ => ErrorClass::Definite,
        }
    }

    /// Whether pgferry recognised a situation it refuses (exit 1: bad input, a table in the way,
    /// no suitable pg_dump) rather than failing while it worked (a tool that failed, I/O).
    pub fn is_refusal(&self) -> bool {
        match self {
            DdlError::ToolFailed { .. }
            | DdlError::Io { .. }
            | DdlError::UnexpectedOutput { .. } => false,
            _ => self.class() == ErrorClass::Definite,
        }
    }
}
