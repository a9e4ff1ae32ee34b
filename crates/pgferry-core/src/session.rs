//! Sessions: connecting with a known application name and fixed text forms.
//!
//! Every pgferry session sets the same `TimeZone`, `DateStyle`, `IntervalStyle`,
//! `extra_float_digits`, `bytea_output` and client encoding, so that values passed through as
//! text (COPY between two servers, keys recorded as text) mean the same thing on both ends
//! whatever the server's or role's defaults are.
//!
//! Every session is opened with a rustls connector configured from the DSN's effective
//! `sslmode` and `sslrootcert` (see the `tls` module): a TLS or certificate failure becomes
//! [`Error::Tls`], which says which check failed and how to fix it.

use std::time::Duration;

use tokio_postgres::config::{Host, SslMode as TlsMode};
use tokio_postgres::{Client, Config, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::dsn::{Dsn, SslMode};
use crate::error::Error;
use crate::tls;

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
    /// Connects (over TLS as the DSN's `sslmode` asks, see [`crate::SslMode`]), checks the
    /// server version and fixes the session's text forms. `role` names what the session is for
    /// (`install`, `sync`…), shown in `pg_stat_activity`.
    pub async fn connect(dsn: &Dsn, role: &str) -> Result<Session, Error> {
        let target = dsn.redacted();
        let app = format!("{APPLICATION_NAME_PREFIX} {role}");
        let mut config = dsn.config(&app)?;
        let tls = dsn.tls()?;
        let connector = tls::connector(&tls).map_err(|reason| Error::Tls {
            target: target.clone(),
            reason,
            source: None,
        })?;
        // libpq ignores sslmode on Unix sockets (the server never offers TLS there).
        let tcp = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
        config.ssl_mode(match tls.mode {
            _ if !tcp => TlsMode::Disable,
            SslMode::Disable | SslMode::Allow => TlsMode::Disable,
            SslMode::Prefer => TlsMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => TlsMode::Require,
        });
        let mut opened = open(&config, connector.clone()).await;
        if tls.mode == SslMode::Allow && tcp {
            // allow: plain first, then TLS if the server refused the plain connection.
            if let Err(e) = &opened {
                if e.as_db_error().is_some() {
                    config.ssl_mode(TlsMode::Require);
                    opened = open(&config, connector).await;
                }
            }
        }
        let client =
            opened.map_err(
                |source| match tls::explain_failure(&source, &tls, &dsn.host()) {
                    Some(reason) => Error::Tls {
                        target: target.clone(),
                        reason,
                        source: Some(source),
                    },
                    None => Error::Connect {
                        target: target.clone(),
                        source,
                    },
                },
            )?;
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

    /// Whether this session's connection is encrypted, as the server sees it (`pg_stat_ssl`).
    pub async fn is_encrypted(&self) -> Result<bool, Error> {
        let row = self
            .client
            .query_one(
                "SELECT ssl FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| self.err("reading pg_stat_ssl", e))?;
        Ok(row.get(0))
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

/// Opens a connection and drives it on its own task.
async fn open(config: &Config, tls: MakeRustlsConnect) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "connection closed");
        }
    });
    Ok(client)
}
