//! Errors a DBA can act on, and the one place where PostgreSQL errors are classified.

use tokio_postgres::error::SqlState;

/// Errors of `pgferry-core`. Messages never contain a password or row values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid connection string: {reason}")]
    Dsn { reason: String },

    #[error("cannot connect to {target}")]
    Connect {
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },

    /// TLS could not be set up, or the server or its certificate did not pass the `sslmode`.
    /// `reason` says which and names the fix; `source` is the driver's error, if it got that far.
    #[error("cannot connect to {target}: {reason}")]
    Tls {
        target: String,
        reason: String,
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    #[error("{context} (on {target})")]
    Query {
        context: String,
        target: String,
        #[source]
        source: tokio_postgres::Error,
    },

    #[error("invalid table pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },

    #[error(
        "PostgreSQL {version} on {target} is not supported: pgferry needs PostgreSQL 10 or newer"
    )]
    UnsupportedServer { target: String, version: String },
}

/// What kind of failure an error is, which decides retrying and the CLI's exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Server unreachable, connection lost, server shutting down.
    Connection,
    /// Wrong password, unknown role, no pg_hba entry.
    Authentication,
    /// A privilege is missing (SQLSTATE 42501).
    Privilege,
    /// Worth retrying as is: serialization failure, deadlock, lock timeout, shutdown.
    Transient,
    /// Anything else: retrying will not help.
    Definite,
}

impl ErrorClass {
    /// Classifies a driver error by its SQLSTATE (or the lack of one).
    pub fn of(e: &tokio_postgres::Error) -> ErrorClass {
        match e.code() {
            Some(code) => Self::of_sqlstate(code),
            None if e.is_closed() => ErrorClass::Connection,
            // Errors without SQLSTATE are I/O, TLS, protocol or timeouts: the connection.
            None => ErrorClass::Connection,
        }
    }

    /// Classifies a SQLSTATE.
    pub fn of_sqlstate(code: &SqlState) -> ErrorClass {
        let c = code.code();
        if c.starts_with("28") {
            ErrorClass::Authentication
        } else if c == "42501" {
            ErrorClass::Privilege
        } else if c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03" {
            ErrorClass::Connection
        } else if c == "40001" || c == "40P01" || c == "55P03" || c == "57014" {
            ErrorClass::Transient
        } else if c == "3D000" {
            // database does not exist: the DSN is wrong, as with a bad host.
            ErrorClass::Connection
        } else {
            ErrorClass::Definite
        }
    }
}

impl Error {
    /// The class of this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Dsn { .. } | Error::Pattern { .. } | Error::UnsupportedServer { .. } => {
                ErrorClass::Definite
            }
            Error::Connect { source, .. } => match ErrorClass::of(source) {
                ErrorClass::Authentication => ErrorClass::Authentication,
                ErrorClass::Privilege => ErrorClass::Privilege,
                _ => ErrorClass::Connection,
            },
            Error::Tls { .. } => ErrorClass::Connection,
            Error::Query { source, .. } => ErrorClass::of(source),
        }
    }
}

/// Finds the first `tokio_postgres::Error` in an error's source chain.
pub fn find_db_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a tokio_postgres::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(pg) = err.downcast_ref::<tokio_postgres::Error>() {
            return Some(pg);
        }
        cur = err.source();
    }
    None
}

/// An error and its causes on one line (each cause once: messages that already quote their
/// cause are not repeated), for logs and one-line reports. A server error shows its SQLSTATE
/// and message, never its DETAIL (which may quote row values).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = match c.downcast_ref::<tokio_postgres::error::DbError>() {
            Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
            None => c.to_string(),
        };
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text.replace('\n', " ")
}
