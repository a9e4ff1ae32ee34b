//! Exit codes and error reports.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (also: nothing to do) |
//! | 1 | refused or different: bad input that pgferry recognised (no key, pattern matches nothing, a live source given to `clean`, …); nothing was changed |
//! | 2 | usage: unknown command or flag, bad flag value |
//! | 3 | connection or authentication failed |
//! | 4 | a privilege is missing |
//! | 5 | any other failure (a database error, an I/O error) |
//! | 6 | `cutover` failed and the source could not be made writable again: run `pgferry unfreeze` |

use pgferry_core::error::find_db_error;
use pgferry_core::ErrorClass;

/// The exit codes, for `--help`.
pub const EXIT_CODES_HELP: &str =
    "Exit codes: 0 ok; 1 refused or different (nothing changed); 2 usage; \
3 connection or authentication; 4 missing privilege; 5 other failure; \
6 cutover failed and left the source frozen (run `pgferry unfreeze`).";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    Ok = 0,
    Refused = 1,
    Usage = 2,
    Connection = 3,
    Privilege = 4,
    Failure = 5,
    /// A cutover failed and could not unfreeze the source.
    Frozen = 6,
}

impl From<Code> for std::process::ExitCode {
    fn from(c: Code) -> Self {
        std::process::ExitCode::from(c as u8)
    }
}

/// An error with the class that decides the exit code.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub class: ErrorClass,
    /// Recognised bad input (exit 1) rather than a failure while working (exit 5).
    pub refused: bool,
    /// Bad command-line input or configuration (exit 2).
    pub usage: bool,
}

impl Failure {
    pub fn new(error: impl Into<anyhow::Error>, class: ErrorClass) -> Failure {
        Failure {
            error: error.into(),
            class,
            refused: class == ErrorClass::Definite,
            usage: false,
        }
    }

    /// Bad command-line input or configuration: exit 2.
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            error: anyhow::Error::msg(message.into()),
            class: ErrorClass::Definite,
            refused: false,
            usage: true,
        }
    }
}

/// Prints an error (the chain, then SQLSTATE, DETAIL, HINT, and the table or constraint) and
/// returns its exit code. Never prints row values or passwords: DSNs reach errors redacted.
pub fn report(f: &Failure) -> Code {
    let mut msg = format!("error: {}", f.error);
    let mut source = f.error.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = s.source();
    }
    if let Some(db) = find_db_error(f.error.as_ref()).and_then(|e| e.as_db_error()) {
        msg.push_str(&format!("\n  sqlstate: {}", db.code().code()));
        if let Some(d) = db.detail() {
            msg.push_str(&format!("\n  detail: {d}"));
        }
        if let Some(h) = db.hint() {
            msg.push_str(&format!("\n  hint: {h}"));
        }
        match (db.schema(), db.table()) {
            (Some(s), Some(t)) => msg.push_str(&format!(
                "\n  table: {}",
                pgferry_core::QualifiedName::new(s, t)
            )),
            (None, Some(t)) => msg.push_str(&format!("\n  table: {t}")),
            _ => {}
        }
        if let Some(c) = db.constraint() {
            msg.push_str(&format!("\n  constraint: {c}"));
        }
    }
    eprintln!("{msg}");
    match f.class {
        _ if f.usage => Code::Usage,
        ErrorClass::Connection | ErrorClass::Authentication => Code::Connection,
        ErrorClass::Privilege => Code::Privilege,
        ErrorClass::Definite if f.refused => Code::Refused,
        _ => Code::Failure,
    }
}
