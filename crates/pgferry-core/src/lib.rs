//! pgferry's foundations, shared by every other crate: connection strings that never leak a
//! password ([`dsn`]), sessions with fixed text forms, over TLS as `sslmode` asks ([`session`]),
//! the one identifier type that reaches SQL ([`ident`]), table patterns ([`pattern`]), catalog
//! introspection ([`catalog`]), the definition of what pgferry installs ([`artifact`]), and error
//! classification ([`error`]).
//!
//! This crate knows nothing about the command line.

pub mod artifact;
pub mod catalog;
pub mod dsn;
pub mod error;
pub mod ident;
pub mod pattern;
pub mod session;
mod tls;

pub use dsn::{Dsn, SslMode};
pub use error::{Error, ErrorClass};
pub use ident::{Ident, QualifiedName};
pub use pattern::TablePattern;
pub use session::Session;
