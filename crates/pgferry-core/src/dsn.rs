//! Connection strings.
//!
//! A DSN is a libpq URL (`postgresql://user@host:5432/db?sslmode=…`) or a key=value string
//! (`host=… dbname=…`). pgferry parses it itself rather than through tokio-postgres, for two
//! reasons: a DSN must be printable without its password ([`Dsn::redacted`] is the only form that
//! ever reaches a log or an error), and TLS modes that tokio-postgres does not know must be
//! recognised. The libpq environment (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`,
//! `PGPASSFILE`/`~/.pgpass`) fills what the DSN leaves out, as a DBA expects.

use std::fmt;
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
        let mut params = if text.starts_with("postgresql://") || text.starts_with("postgres://") {
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
        if let Some(mode) = get(&params, "sslmode") {
            if !matches!(mode, "disable" | "allow" | "prefer") {
                return Err(Error::Dsn {
                    reason: format!(
                        "sslmode={mode} is not supported yet by this pgferry build (TLS arrives with the daemon); use sslmode=disable or prefer"
                    ),
                });
            }
        }
        params.retain(|(k, _)| k != "sslmode" && k != "sslrootcert");
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

    /// The tokio-postgres configuration for this DSN, with `application_name` set.
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
        let e = Dsn::parse("postgresql://u:hunter2@h/db?sslmode=verify-full").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
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
