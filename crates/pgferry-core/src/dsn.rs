//! Connection strings.
//!
//! A DSN is a libpq URL (`postgresql://user@host:5432/db?sslmode=…`) or a key=value string
//! (`host=… dbname=…`). pgferry parses it itself rather than through tokio-postgres, for two
//! reasons: a DSN must be printable without its password ([`Dsn::redacted`] is the only form that
//! ever reaches a log or an error), and libpq's TLS modes that tokio-postgres does not know
//! (allow, verify-ca, verify-full) must be recognised ([`SslMode`], [`Dsn::tls`]). The libpq
//! environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
//! `PGPASSFILE`/`~/.pgpass`, `PGSSLMODE`, `PGSSLROOTCERT`) fills what the DSN leaves out, as a
//! DBA expects.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;

/// A parsed connection string. `Debug` and `Display` never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Dsn {
    params: Vec<(String, String)>,
}

const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "application_name",
    "connect_timeout",
    "options",
    "sslmode",
    "sslrootcert",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
    "passfile",
];

impl Dsn {
    /// Parses a URL or key=value DSN. The error never contains the password.
    pub fn parse(text: &str) -> Result<Dsn, Error> {
        let text = text.trim();
        let params = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
            parse_url(text)?
        } else {
            parse_kv(text)?
        };
        for (k, _) in &params {
            if !KNOWN.contains(&k.as_str()) {
                return Err(Error::Dsn {
                    reason: format!("unknown parameter {k:?}"),
                });
            }
        }
        // What the DSN says alone must make sense; the environment is read when connecting.
        resolve_tls(get(&params, "sslmode"), get(&params, "sslrootcert"), |_| {
            None
        })?;
        Ok(Dsn { params })
    }

    /// The value of a parameter as given in the DSN (not from the environment).
    pub fn get(&self, key: &str) -> Option<&str> {
        get(&self.params, key)
    }

    /// Sets (or replaces) a parameter.
    pub fn with(mut self, key: &str, value: &str) -> Dsn {
        self.params.retain(|(k, _)| k != key);
        self.params.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The DSN as libpq `key=value` pairs, without its password: what a printed command may
    /// carry (the password then comes from `PGPASSWORD` or `.pgpass`, as libpq reads them).
    pub fn without_password(&self) -> String {
        self.params
            .iter()
            .filter(|(k, _)| k != "password")
            .map(|(k, v)| {
                let plain = !v.is_empty()
                    && !v
                        .chars()
                        .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
                if plain {
                    format!("{k}={v}")
                } else {
                    format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The effective value: the DSN's, else the libpq environment variable's.
    fn effective(&self, key: &str, env: &str) -> Option<String> {
        self.get(key)
            .map(str::to_owned)
            .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
    }

    pub fn host(&self) -> String {
        self.effective("host", "PGHOST")
            .or_else(|| self.get("hostaddr").map(str::to_owned))
            .unwrap_or_else(|| "localhost".to_owned())
    }

    pub fn port(&self) -> String {
        self.effective("port", "PGPORT")
            .unwrap_or_else(|| "5432".to_owned())
    }

    pub fn user(&self) -> String {
        self.effective("user", "PGUSER")
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".to_owned())
    }

    pub fn dbname(&self) -> String {
        self.effective("dbname", "PGDATABASE")
            .unwrap_or_else(|| self.user())
    }

    /// `user@host:port/dbname`: what logs and errors show of a DSN.
    pub fn redacted(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.user(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }

    fn password(&self) -> Option<String> {
        if let Some(p) = self.effective("password", "PGPASSWORD") {
            return Some(p);
        }
        let file = self
            .get("passfile")
            .map(str::to_owned)
            .or_else(|| std::env::var("PGPASSFILE").ok())
            .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.pgpass")))?;
        let text = std::fs::read_to_string(file).ok()?;
        pgpass_lookup(
            &text,
            &self.host(),
            &self.port(),
            &self.dbname(),
            &self.user(),
        )
    }

    /// The effective TLS settings: `sslmode` and `sslrootcert` from the DSN, else from
    /// `PGSSLMODE` and `PGSSLROOTCERT`, with libpq's defaults (see [`TlsSettings`]).
    pub fn tls(&self) -> Result<TlsSettings, Error> {
        resolve_tls(self.get("sslmode"), self.get("sslrootcert"), |var| {
            std::env::var(var).ok().filter(|v| !v.is_empty())
        })
    }

    /// How a libpq client tool (`pg_dump`, `pg_restore`, `psql`) connects as this DSN does: the
    /// `PG*` environment variables that carry its effective host, port, user, database, options
    /// and TLS settings (so that nothing of the DSN appears on the tool's command line), and the
    /// password apart, for the caller to hand over in a passfile of mode 0600. `application_name`
    /// is the DSN's, else `application_name`.
    ///
    /// `sslrootcert=system` is understood by libpq 16 and later only: the tool is given the
    /// system's bundle file instead (`SSL_CERT_FILE`, else the usual locations), still with
    /// `verify-full`.
    pub fn client_env(&self, application_name: &str) -> Result<ClientEnv, Error> {
        let mut vars = vec![
            ("PGHOST", self.host()),
            ("PGPORT", self.port()),
            ("PGUSER", self.user()),
            ("PGDATABASE", self.dbname()),
            (
                "PGAPPNAME",
                self.get("application_name")
                    .unwrap_or(application_name)
                    .to_owned(),
            ),
            (
                "PGCONNECT_TIMEOUT",
                self.effective("connect_timeout", "PGCONNECT_TIMEOUT")
                    .unwrap_or_else(|| "10".to_owned()),
            ),
        ];
        for (key, var) in [
            ("hostaddr", "PGHOSTADDR"),
            ("options", "PGOPTIONS"),
            ("target_session_attrs", "PGTARGETSESSIONATTRS"),
        ] {
            if let Some(v) = self.get(key) {
                vars.push((var, v.to_owned()));
            }
        }
        let tls = self.tls()?;
        vars.push(("PGSSLMODE", tls.mode.as_str().to_owned()));
        match &tls.root_cert {
            RootCert::File(path) => vars.push(("PGSSLROOTCERT", path.display().to_string())),
            RootCert::System => {
                let bundle = std::env::var("SSL_CERT_FILE")
                    .ok()
                    .filter(|f| !f.is_empty())
                    .or_else(|| {
                        SYSTEM_BUNDLES
                            .iter()
                            .find(|f| Path::new(f).is_file())
                            .map(|f| (*f).to_owned())
                    })
                    .ok_or_else(|| Error::Dsn {
                        reason: format!(
                            "sslrootcert=system: no bundle of trusted roots for client tools (looked at SSL_CERT_FILE, {}); install ca-certificates or give sslrootcert=FILE",
                            SYSTEM_BUNDLES.join(", ")
                        ),
                    })?;
                vars.push(("PGSSLROOTCERT", bundle));
            }
            // libpq looks there by itself.
            RootCert::Default(_) | RootCert::None => {}
        }
        Ok(ClientEnv {
            vars,
            password: self.password(),
        })
    }

    /// The tokio-postgres configuration for this DSN, with `application_name` set.
    /// Its `ssl_mode` is left at tokio-postgres's default: [`crate::Session::connect`] sets it
    /// from [`Dsn::tls`].
    pub fn config(&self, application_name: &str) -> Result<tokio_postgres::Config, Error> {
        let mut c = tokio_postgres::Config::new();
        for host in self.host().split(',') {
            c.host(host);
        }
        for port in self.port().split(',') {
            let p: u16 = port.parse().map_err(|_| Error::Dsn {
                reason: format!("port {port:?} is not a number"),
            })?;
            c.port(p);
        }
        if let Some(addr) = self.get("hostaddr") {
            for a in addr.split(',') {
                c.hostaddr(a.parse().map_err(|_| Error::Dsn {
                    reason: format!("hostaddr {a:?} is not an IP address"),
                })?);
            }
        }
        c.user(self.user());
        c.dbname(self.dbname());
        if let Some(p) = self.password() {
            c.password(p);
        }
        c.application_name(self.get("application_name").unwrap_or(application_name));
        if let Some(o) = self.get("options") {
            c.options(o);
        }
        let timeout = self
            .effective("connect_timeout", "PGCONNECT_TIMEOUT")
            .unwrap_or_else(|| "10".to_owned());
        let secs: u64 = timeout.parse().map_err(|_| Error::Dsn {
            reason: format!("connect_timeout {timeout:?} is not a number"),
        })?;
        c.connect_timeout(Duration::from_secs(secs.max(1)));
        if self.get("keepalives") == Some("0") {
            c.keepalives(false);
        }
        if let Some(idle) = self.get("keepalives_idle") {
            let s: u64 = idle.parse().map_err(|_| Error::Dsn {
                reason: format!("keepalives_idle {idle:?} is not a number"),
            })?;
            c.keepalives_idle(Duration::from_secs(s));
        }
        if let Some(attrs) = self.get("target_session_attrs") {
            c.target_session_attrs(match attrs {
                "any" => tokio_postgres::config::TargetSessionAttrs::Any,
                "read-write" => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
                other => {
                    return Err(Error::Dsn {
                        reason: format!("target_session_attrs={other} is not supported"),
                    })
                }
            });
        }
        Ok(c)
    }
}

/// Where Debian, Red Hat and Alpine keep the system's bundle of trusted root certificates.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A DSN as a libpq client tool takes it (see [`Dsn::client_env`]). `Debug` hides the password.
#[derive(Clone)]
pub struct ClientEnv {
    /// `PG*` variables to set in the tool's environment (after removing the inherited ones).
    pub vars: Vec<(&'static str, String)>,
    /// The password, to be written to a passfile (`PGPASSFILE`), never to the command line.
    pub password: Option<String>,
}

impl ClientEnv {
    /// The passfile line that gives the password for any connection (`*:*:*:*:password`, with
    /// `:` and `\` escaped), if there is a password.
    pub fn passfile_line(&self) -> Option<String> {
        self.password.as_ref().map(|p| {
            let escaped = p.replace('\\', "\\\\").replace(':', "\\:");
            format!("*:*:*:*:{escaped}\n")
        })
    }
}

impl fmt::Debug for ClientEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientEnv")
            .field("vars", &self.vars)
            .field("password", &self.password.as_ref().map(|_| "…"))
            .finish()
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({})", self.redacted())
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::str::FromStr for Dsn {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Dsn::parse(s)
    }
}

/// libpq's `sslmode`: whether TLS is used and what of the server's certificate is verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// Plain first; TLS only if the server refuses the plain connection.
    Allow,
    /// TLS if the server offers it, else plain. The certificate is not verified.
    Prefer,
    /// TLS or nothing. The certificate is verified only if a root certificate file exists
    /// (as libpq does: then it is [`SslMode::VerifyCa`]).
    Require,
    /// TLS; the certificate chain must lead to a trusted root. The host name is not checked.
    VerifyCa,
    /// TLS; the chain must lead to a trusted root and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq spellings, in order of strength.
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The libpq spelling (`verify-full`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(text: &str) -> Option<SslMode> {
        SslMode::ALL.into_iter().find(|m| m.as_str() == text)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the certificates trusted to sign the server's certificate come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file named by `sslrootcert` or `PGSSLROOTCERT`: it must exist.
    File(PathBuf),
    /// libpq's default, `~/.postgresql/root.crt`: used if it exists.
    Default(PathBuf),
    /// `sslrootcert=system` (libpq 16): the operating system's trusted roots.
    System,
    /// No file given and no home directory to look in.
    None,
}

/// The effective TLS settings of a DSN (see [`Dsn::tls`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: RootCert,
}

/// libpq's resolution of `sslmode` and `sslrootcert`: the DSN's values, else the environment's
/// (`env` looks a variable up), with the default mode `prefer`, or `verify-full` under
/// `sslrootcert=system`, which refuses anything weaker (libpq 16 does the same).
fn resolve_tls(
    mode: Option<&str>,
    root_cert: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<TlsSettings, Error> {
    let (mode_text, mode_origin) = match mode {
        Some(m) => (Some(m.to_owned()), "sslmode"),
        None => (env("PGSSLMODE"), "PGSSLMODE"),
    };
    let root_text = match root_cert {
        Some(r) => Some(r.to_owned()),
        None => env("PGSSLROOTCERT"),
    };
    let system = root_text.as_deref() == Some("system");
    let mode = match mode_text.as_deref() {
        None if system => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(text) => SslMode::parse(text).ok_or_else(|| Error::Dsn {
            reason: format!(
                "{mode_origin}={text:?} is not an sslmode: use one of disable, allow, prefer, require, verify-ca, verify-full"
            ),
        })?,
    };
    if system && mode != SslMode::VerifyFull {
        return Err(Error::Dsn {
            reason: format!(
                "weak sslmode={mode} may not be used with sslrootcert=system: the system's roots vouch for any name they signed, so use sslmode=verify-full"
            ),
        });
    }
    let root_cert = match root_text {
        Some(_) if system => RootCert::System,
        Some(path) if !path.is_empty() => RootCert::File(PathBuf::from(path)),
        _ => match env("HOME") {
            Some(home) => RootCert::Default(Path::new(&home).join(".postgresql/root.crt")),
            None => RootCert::None,
        },
    };
    Ok(TlsSettings { mode, root_cert })
}

fn get<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn parse_kv(text: &str) -> Result<Vec<(String, String)>, Error> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(Error::Dsn {
                reason: format!("expected key=value after {key:?} (a DSN is a postgresql:// URL or key=value pairs)"),
            });
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(Error::Dsn {
                            reason: format!("unterminated quoted value for {key:?}"),
                        })
                    }
                    Some('\\') => {
                        if let Some(c) = chars.next() {
                            value.push(c)
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or_else(|| Error::Dsn {
                reason: "bad percent-encoding in URL".to_owned(),
            })?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| Error::Dsn {
                reason: "bad percent-encoding in URL".to_owned(),
            })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::Dsn {
        reason: "URL is not UTF-8 after percent-decoding".to_owned(),
    })
}

fn parse_url(text: &str) -> Result<Vec<(String, String)>, Error> {
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or(text);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (rest, None),
    };
    let mut out = Vec::new();
    let hostpart = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.push(("user".to_owned(), percent_decode(user)?));
            }
            if let Some(p) = password {
                out.push(("password".to_owned(), percent_decode(p)?));
            }
            hosts
        }
        None => authority,
    };
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    for hp in hostpart.split(',').filter(|s| !s.is_empty()) {
        let (h, p) = if let Some(stripped) = hp.strip_prefix('[') {
            let (h, tail) = stripped.split_once(']').ok_or_else(|| Error::Dsn {
                reason: "unterminated [ in URL host".to_owned(),
            })?;
            (h.to_owned(), tail.strip_prefix(':').map(str::to_owned))
        } else {
            match hp.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p.to_owned())),
                None => (hp.to_owned(), None),
            }
        };
        hosts.push(percent_decode(&h)?);
        if let Some(p) = p {
            ports.push(p);
        }
    }
    if !hosts.is_empty() {
        out.push(("host".to_owned(), hosts.join(",")));
    }
    if !ports.is_empty() {
        out.push(("port".to_owned(), ports.join(",")));
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.push(("dbname".to_owned(), percent_decode(db)?));
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| Error::Dsn {
                reason: format!("URL parameter {pair:?} has no value"),
            })?;
            out.push((percent_decode(k)?, percent_decode(v)?));
        }
    }
    Ok(out)
}

/// Finds a password in `.pgpass` text (`host:port:db:user:password`, `*` matches anything).
fn pgpass_lookup(text: &str, host: &str, port: &str, db: &str, user: &str) -> Option<String> {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n)
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let m = |f: &str, v: &str| f == "*" || f == v;
        if m(&fields[0], host) && m(&fields[1], port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_password_reads_back_as_the_same_dsn_less_its_password() {
        for text in [
            "postgresql://ann:s3cret@db.example:6432/my%20db?sslmode=verify-full",
            "host=/tmp dbname=shop user=x password=y",
            r"host=h dbname='a\'b c\\d' application_name=''",
        ] {
            let dsn = Dsn::parse(text).unwrap();
            let shown = dsn.without_password();
            assert!(
                !shown.contains("s3cret") && !shown.contains("password"),
                "{shown}"
            );
            let back = Dsn::parse(&shown).unwrap();
            let mut expected = dsn.params.clone();
            expected.retain(|(k, _)| k != "password");
            assert_eq!(back.params, expected, "{shown}");
        }
    }

    #[test]
    fn url_and_kv_agree() {
        let a = Dsn::parse("postgresql://bob:s%40cret@127.0.0.1:5433/my%20db?application_name=x")
            .unwrap();
        let b = Dsn::parse(
            "host=127.0.0.1 port=5433 user=bob password='s@cret' dbname='my db' application_name=x",
        )
        .unwrap();
        assert_eq!(a.redacted(), "bob@127.0.0.1:5433/my db");
        assert_eq!(a.redacted(), b.redacted());
        assert_eq!(a.get("password"), Some("s@cret"));
        assert!(!format!("{a:?} {a}").contains("cret"));
    }

    #[test]
    fn errors_never_show_the_password() {
        let e = Dsn::parse("host=x password=hunter2 bogus=1").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Dsn::parse("postgresql://u:hunter2@h/db?sslmode=verify-everything").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e = Dsn::parse("password=hunter2 sslmode=require sslrootcert=system").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    /// An environment holding only `vars`.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn settings(dsn: &str, vars: &[(&str, &str)]) -> Result<TlsSettings, Error> {
        let d = Dsn::parse(dsn)?;
        resolve_tls(d.get("sslmode"), d.get("sslrootcert"), env(vars))
    }

    #[test]
    fn every_sslmode_in_url_and_kv_form() {
        for mode in SslMode::ALL {
            let m = mode.as_str();
            let url = settings(&format!("postgresql://u@h/db?sslmode={m}"), &[]).unwrap();
            let kv = settings(&format!("host=h sslmode={m}"), &[]).unwrap();
            assert_eq!(url.mode, mode);
            assert_eq!(kv, url);
            assert_eq!(url.root_cert, RootCert::None);
        }
        let e = Dsn::parse("host=h sslmode=verify_full")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"verify_full\" is not an sslmode"), "{e}");
        assert!(e.contains("verify-ca, verify-full"), "{e}");
        let e = Dsn::parse("postgresql://h/db?sslmode=")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not an sslmode"), "{e}");
    }

    #[test]
    fn sslrootcert_in_url_and_kv_form() {
        let url = settings(
            "postgresql://u@h/db?sslmode=verify-ca&sslrootcert=%2Fetc%2Fca%20dir%2Froot.pem",
            &[],
        )
        .unwrap();
        let kv = settings(
            "host=h sslmode=verify-ca sslrootcert='/etc/ca dir/root.pem'",
            &[],
        )
        .unwrap();
        assert_eq!(url, kv);
        assert_eq!(url.mode, SslMode::VerifyCa);
        assert_eq!(url.root_cert, RootCert::File("/etc/ca dir/root.pem".into()));
        // The parameters stay in the DSN (tls() reads them when connecting).
        let d = Dsn::parse("host=h sslmode=verify-full sslrootcert=/r.pem").unwrap();
        assert_eq!(d.get("sslmode"), Some("verify-full"));
        assert_eq!(d.get("sslrootcert"), Some("/r.pem"));
    }

    #[test]
    fn default_is_prefer_with_the_home_root_file() {
        let s = settings("host=h", &[("HOME", "/home/dba")]).unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert_eq!(
            s.root_cert,
            RootCert::Default("/home/dba/.postgresql/root.crt".into())
        );
        assert_eq!(settings("host=h", &[]).unwrap().root_cert, RootCert::None);
        // An empty sslrootcert is no sslrootcert, as in libpq.
        let s = settings("host=h sslrootcert=''", &[("HOME", "/h")]).unwrap();
        assert_eq!(
            s.root_cert,
            RootCert::Default("/h/.postgresql/root.crt".into())
        );
    }

    #[test]
    fn environment_fills_what_the_dsn_leaves_out() {
        let vars = [
            ("PGSSLMODE", "verify-full"),
            ("PGSSLROOTCERT", "/env/root.pem"),
        ];
        let s = settings("host=h", &vars).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, RootCert::File("/env/root.pem".into()));
        // The DSN wins over the environment.
        let s = settings("host=h sslmode=require sslrootcert=/dsn.pem", &vars).unwrap();
        assert_eq!(s.mode, SslMode::Require);
        assert_eq!(s.root_cert, RootCert::File("/dsn.pem".into()));
        let s = settings("postgresql://h/db?sslmode=disable", &vars).unwrap();
        assert_eq!(s.mode, SslMode::Disable);
        // A bad PGSSLMODE is named as such.
        let e = settings("host=h", &[("PGSSLMODE", "on")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PGSSLMODE=\"on\" is not an sslmode"), "{e}");
    }

    #[test]
    fn sslrootcert_system_means_verify_full() {
        let s = settings("host=h sslrootcert=system", &[]).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, RootCert::System);
        let s = settings("host=h", &[("PGSSLROOTCERT", "system")]).unwrap();
        assert_eq!(
            (s.mode, s.root_cert),
            (SslMode::VerifyFull, RootCert::System)
        );
        for weak in ["disable", "allow", "prefer", "require", "verify-ca"] {
            let e = Dsn::parse(&format!("host=h sslmode={weak} sslrootcert=system"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!(
                    "weak sslmode={weak} may not be used with sslrootcert=system"
                )),
                "{e}"
            );
            assert!(e.contains("verify-full"), "{e}");
            let e = settings(
                "host=h",
                &[("PGSSLMODE", weak), ("PGSSLROOTCERT", "system")],
            )
            .unwrap_err();
            assert!(matches!(e, Error::Dsn { .. }), "{e}");
        }
    }

    #[test]
    fn client_tools_get_the_dsn_as_environment_and_the_password_apart() {
        let d = Dsn::parse(
            "host=db.example port=6432 user=bob dbname='my db' password='p:w\\\\x' sslmode=verify-ca sslrootcert=/r.pem options='-c a=b'",
        )
        .unwrap();
        let env = d.client_env("pgferry schema").unwrap();
        let get = |k: &str| {
            env.vars
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("PGHOST"), Some("db.example"));
        assert_eq!(get("PGPORT"), Some("6432"));
        assert_eq!(get("PGDATABASE"), Some("my db"));
        assert_eq!(get("PGSSLMODE"), Some("verify-ca"));
        assert_eq!(get("PGSSLROOTCERT"), Some("/r.pem"));
        assert_eq!(get("PGOPTIONS"), Some("-c a=b"));
        assert_eq!(get("PGAPPNAME"), Some("pgferry schema"));
        assert!(env.vars.iter().all(|(_, v)| !v.contains("p:w")));
        assert!(!format!("{env:?}").contains("p:w"));
        // The passfile line gives back the password as libpq reads it.
        let line = env.passfile_line().unwrap();
        assert_eq!(
            pgpass_lookup(&line, "h", "1", "d", "u").as_deref(),
            Some("p:w\\x")
        );
    }

    #[test]
    fn pgpass() {
        let t = "# c\nh:5432:*:bob:pw\\:1\n*:*:*:*:any\n";
        assert_eq!(
            pgpass_lookup(t, "h", "5432", "d", "bob").as_deref(),
            Some("pw:1")
        );
        assert_eq!(
            pgpass_lookup(t, "z", "1", "d", "al").as_deref(),
            Some("any")
        );
    }
}
