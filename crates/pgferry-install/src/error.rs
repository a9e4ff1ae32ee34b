//! Install errors: each names the tables and the fix.

use pgferry_core::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Core(#[from] pgferry_core::Error),

    #[error("{} table(s) have no usable replication key, so their changes cannot be captured: {}\n\
             fix: add a primary key (or a unique index over NOT NULL columns) to each, or leave them out with --exclude PATTERN; nothing was installed",
            tables.len(), tables.join(", "))]
    NoKey { tables: Vec<String> },

    #[error("{} table(s) have a key pgferry cannot use: {}\n\
             fix: give the table a primary key over other columns, or leave it out with --exclude PATTERN; nothing was installed",
            problems.len(), problems.join("; "))]
    UnsupportedKey { problems: Vec<String> },

    #[error("{} delta column(s) cannot be used: {}\n\
             fix: name numeric (smallint, integer, bigint or numeric) columns outside the replication key of tables pgferry captures as a whole, as SCHEMA.TABLE.COLUMN; nothing was installed",
            problems.len(), problems.join("; "))]
    DeltaColumns { problems: Vec<String> },

    #[error("pattern {pattern} matches no table{hint}; nothing was installed")]
    NoMatch { pattern: String, hint: String },

    #[error("missing privilege: {what}\nfix: {fix}; nothing was installed")]
    Privilege { what: String, fix: String },

    #[error("schema pgferry is at version {found}, newer than this pgferry understands ({known}); use a newer pgferry")]
    NewerSchema { found: i32, known: i32 },

    #[error("objects outside schema pgferry depend on it: {}\nfix: drop or change them first (pgferry never drops user objects); nothing was removed", objects.join(", "))]
    Dependents { objects: Vec<String> },

    #[error("{table} carries a pgferry capture trigger but is not registered under that name (registered tables that no longer exist: {}); was it renamed?\n\
             fix: rename it back, or run `pgferry uninstall` then `pgferry install` (targets then need a fresh copy of it); nothing was installed",
            if stale.is_empty() { "none".to_owned() } else { stale.join(", ") })]
    Unregistered { table: String, stale: Vec<String> },

    #[error("schema pgferry exists but was not made by pgferry (no pgferry.installation); rename or drop it first")]
    ForeignSchema,
}

impl InstallError {
    pub fn class(&self) -> ErrorClass {
        match self {
            InstallError::Core(e) => e.class(),
            InstallError::Privilege { .. } => ErrorClass::Privilege,
            _ => ErrorClass::Definite,
        }
    }
}
