//! Sessions: connecting with a known application name and fixed text forms.
//!
//! Every pgferry session sets the same `TimeZone`, `DateStyle`, `IntervalStyle`,
//! `extra_float_digits`, `bytea_output` and client encoding, so that values passed through as
//! text (COPY between two servers, keys recorded as text) mean the same thing on both ends
//! whatever the server's or role's defaults are.

use std::time::Duration;

use tokio_postgres::{Client, NoTls, Transaction};

use crate::dsn::Dsn;
use crate::error::Error;

/// The `application_name` prefix of every pgferry session; `clean` uses it to recognise a
/// database that a running pgferry is connected to.
pub const APPLICATION_NAME_PREFIX: &str = "pgferry";

/// Session settings that make text forms identical on every server.
pub const FIXED_TEXT_FORMS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; \
     SET IntervalStyle = 'postgres'; SET extra_float_digits = 3; SET bytea_output = 'hex'; \
     SET client_encoding = 'UTF8'; SET standard_conforming_strings = on";

/// A connected session with what pgferry needs to know about its server.
#[derive(Debug)]
pub struct Session {
    pub client: Client,
    /// `server_version_num`, e.g. 150004.
    pub server_version: u32,
    /// The DSN without password, for messages.
    pub target: String,
}

impl Session {
    /// Connects, checks the server version and fixes the session's text forms.
    /// `role` names what the session is for (`install`, `sync`…), shown in `pg_stat_activity`.
    pub async fn connect(dsn: &Dsn, role: &str) -> Result<Session, Error> {
        let target = dsn.redacted();
        let app = format!("{APPLICATION_NAME_PREFIX} {role}");
        let config = dsn.config(&app)?;
        let (client, connection) =
            config
                .connect(NoTls)
                .await
                .map_err(|source| Error::Connect {
                    target: target.clone(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
        });
        let mut s = Session {
            client,
            server_version: 0,
            target,
        };
        s.batch(FIXED_TEXT_FORMS, "setting session text forms")
            .await?;
        let v: String = s
            .client
            .query_one("SELECT current_setting('server_version_num')", &[])
            .await
            .map_err(|e| s.err("reading the server version", e))?
            .get(0);
        s.server_version = v.parse().unwrap_or(0);
        if s.server_version < 100000 {
            return Err(Error::UnsupportedServer {
                target: s.target.clone(),
                version: v,
            });
        }
        Ok(s)
    }

    /// Wraps a driver error with what was being done and where.
    pub fn err(&self, context: impl Into<String>, source: tokio_postgres::Error) -> Error {
        Error::Query {
            context: context.into(),
            target: self.target.clone(),
            source,
        }
    }

    /// The same as [`Session::err`], as a closure for `map_err`.
    pub fn on_err(
        &self,
        context: impl Into<String>,
    ) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let (context, target) = (context.into(), self.target.clone());
        move |source| Error::Query {
            context,
            target,
            source,
        }
    }

    /// Runs SQL text (several statements allowed, no parameters).
    pub async fn batch(&self, sql: &str, context: &str) -> Result<(), Error> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| self.err(context, e))
    }

    /// The server's major version (10, 11, … 18).
    pub fn major(&self) -> u32 {
        self.server_version / 10000
    }

    /// Begins a transaction with `lock_timeout` set and pgferry's install lock taken (see
    /// [`crate::artifact::INSTALL_LOCK_KEY`]): install, uninstall and clean all change the
    /// database this way, so they never interleave and each is all-or-nothing.
    pub async fn begin_locked(&mut self, lock_timeout: Duration) -> Result<Transaction<'_>, Error> {
        let target = self.target.clone();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|source| Error::Query {
                context: "starting a transaction".into(),
                target: target.clone(),
                source,
            })?;
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = '{}ms'; SELECT pg_catalog.pg_advisory_xact_lock({})",
            lock_timeout.as_millis().max(1),
            crate::artifact::INSTALL_LOCK_KEY
        ))
        .await
        .map_err(|source| Error::Query {
            context: "taking pgferry's install lock".into(),
            target,
            source,
        })?;
        Ok(tx)
    }
}
