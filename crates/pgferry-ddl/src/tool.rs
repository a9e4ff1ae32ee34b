//! `pg_dump` and `pg_restore`: which ones to use, and running them.
//!
//! pg_dump reads only servers of its own major version or older, so the pair used must be at
//! least the source's major. Of the suitable ones the newest that is not newer than the target
//! is chosen (its output is meant to load into the target's version), else the oldest suitable
//! one. pg_restore always comes from pg_dump's own directory: only it reads that pg_dump's
//! archives for sure.
//!
//! A tool is given the connection through `PG*` environment variables and the password through
//! a passfile of mode 0600 ([`pgferry_core::Dsn::client_env`]): nothing secret is on a command
//! line, where any user of the machine could read it. Every inherited `PG*` variable is
//! removed first, so the tool connects exactly where pgferry did.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use pgferry_core::dsn::ClientEnv;
use serde::Serialize;

use crate::DdlError;

/// Where distributions install the client tools of each major version: (directory, prefix of
/// its entries), each entry holding `bin/pg_dump`. Debian and Ubuntu:
/// `/usr/lib/postgresql/<major>/bin`; the PGDG packages of Red Hat: `/usr/pgsql-<major>/bin`.
const VERSIONED_DIRS: &[(&str, &str)] = &[("/usr/lib/postgresql", ""), ("/usr", "pgsql-")];

/// A pg_dump and the pg_restore beside it.
#[derive(Clone, Debug, Serialize)]
pub struct Tools {
    pub pg_dump: PathBuf,
    #[serde(skip)]
    pub pg_restore: PathBuf,
    /// As `pg_dump --version` says, e.g. `15.18`.
    pub version: String,
    #[serde(skip)]
    pub major: u32,
}

/// The version and major in `pg_dump --version` output, e.g. `pg_dump (PostgreSQL) 15.18
/// (Debian 15.18-0+deb12u1)` or `pg_dump (PostgreSQL) 18beta1`. Majors before 10 (`9.6.24`)
/// count as 9.
fn parse_version(text: &str) -> Option<(String, u32)> {
    let word = text
        .split_whitespace()
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))?;
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    Some((word.to_owned(), digits.parse().ok()?))
}

/// A command for `tool` without the inherited `PG*` variables.
fn command(tool: &Path) -> Command {
    let mut cmd = Command::new(tool);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PG") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs `path --version`.
fn version_of(path: &Path) -> Result<(String, u32), String> {
    let out = command(path)
        .arg("--version")
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!("`--version` exited with {}", out.status));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| format!("no version in its `--version` output {text:?}"))
}

/// Checks a pg_dump and its pg_restore, and reads their version.
fn tools_at(pg_dump: &Path) -> Result<Tools, DdlError> {
    let bad = |reason: String| DdlError::BadTool {
        path: pg_dump.display().to_string(),
        reason,
    };
    let (version, major) = version_of(pg_dump).map_err(bad)?;
    let pg_restore = pg_dump.with_file_name("pg_restore");
    let (_, restore_major) = version_of(&pg_restore).map_err(|e| {
        bad(format!(
            "its pg_restore ({}) does not run: {e}",
            pg_restore.display()
        ))
    })?;
    if restore_major != major {
        return Err(bad(format!(
            "it is version {major} but {} is version {restore_major}",
            pg_restore.display()
        )));
    }
    Ok(Tools {
        pg_dump: pg_dump.to_owned(),
        pg_restore,
        version,
        major,
    })
}

/// Every pg_dump installed in the usual places, then the one on `PATH`.
fn installed() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for (parent, prefix) in VERSIONED_DIRS {
        if let Ok(dirs) = std::fs::read_dir(parent) {
            found.extend(
                dirs.flatten()
                    .filter(|d| d.file_name().to_string_lossy().starts_with(prefix))
                    .map(|d| d.path().join("bin/pg_dump")),
            );
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        found.extend(std::env::split_paths(&path).map(|d| d.join("pg_dump")));
    }
    // The same binary twice (a symlink on PATH) counts once, where it was first seen.
    let mut seen = std::collections::HashSet::new();
    found.retain(|p| p.is_file() && seen.insert(std::fs::canonicalize(p).unwrap_or(p.clone())));
    found
}

/// Chooses among `candidates` those at least `source_major`: the newest not newer than
/// `target_major`, else the oldest; of equal versions, the first listed.
fn choose(candidates: Vec<Tools>, source_major: u32, target_major: u32) -> Option<Tools> {
    let (within, beyond): (Vec<Tools>, Vec<Tools>) = candidates
        .into_iter()
        .filter(|t| t.major >= source_major)
        .partition(|t| t.major <= target_major);
    // max_by_key keeps the last of equals: reversed, that is the first listed.
    within
        .into_iter()
        .rev()
        .max_by_key(|t| t.major)
        .or_else(|| beyond.into_iter().min_by_key(|t| t.major))
}

/// The pg_dump to use for a source of `source_major` and a target of `target_major`: `explicit`
/// if given (it must be new enough), else the best installed one (see the module docs).
pub fn find(
    explicit: Option<&Path>,
    source_major: u32,
    target_major: u32,
) -> Result<Tools, DdlError> {
    if let Some(path) = explicit {
        let tools = tools_at(path)?;
        if tools.major < source_major {
            return Err(DdlError::NoSuitablePgDump {
                needed: source_major,
                found: format!("{} is {}", path.display(), tools.version),
            });
        }
        return Ok(tools);
    }
    let mut usable = Vec::new();
    let mut seen = Vec::new();
    for path in installed() {
        match tools_at(&path) {
            Ok(t) => {
                seen.push(format!("{} ({})", t.version, path.display()));
                usable.push(t);
            }
            Err(e) => tracing::debug!(path = %path.display(), error = %e, "pg_dump not usable"),
        }
    }
    choose(usable, source_major, target_major).ok_or_else(|| DdlError::NoSuitablePgDump {
        needed: source_major,
        found: if seen.is_empty() {
            "no pg_dump found (looked in /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin and PATH)"
                .to_owned()
        } else {
            format!("found only {}", seen.join(", "))
        },
    })
}

/// Writes the passfile for `env`'s password (mode 0600, as libpq requires) into `dir`.
pub fn passfile(dir: &Path, env: &ClientEnv) -> Result<Option<PathBuf>, DdlError> {
    let Some(line) = env.passfile_line() else {
        return Ok(None);
    };
    let path = dir.join("passfile");
    let io = |source| DdlError::Io {
        context: format!("writing the passfile {}", path.display()),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    f.write_all(line.as_bytes()).map_err(io)?;
    Ok(Some(path))
}

/// Runs `tool` with `args` (no connection settings among them), connected as `env` says when
/// given, and returns its standard output. The tool's own messages are in the error.
pub async fn run(
    tool: &Path,
    args: Vec<String>,
    env: Option<(&ClientEnv, Option<&Path>)>,
) -> Result<Vec<u8>, DdlError> {
    let mut cmd = command(tool);
    cmd.args(&args);
    if let Some((env, passfile)) = env {
        cmd.envs(env.vars.iter().map(|(k, v)| (*k, v)));
        if let Some(p) = passfile {
            cmd.env("PGPASSFILE", p);
        }
    }
    let name = tool
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| tool.display().to_string());
    let shown = name.clone();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| DdlError::Io {
            context: format!("running {shown}"),
            source: std::io::Error::other(e),
        })?
        .map_err(|source| DdlError::Io {
            context: format!("running {}", tool.display()),
            source,
        })?;
    if !out.status.success() {
        return Err(DdlError::ToolFailed {
            tool: name,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim_end().to_owned(),
        });
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(major: u32) -> Tools {
        Tools {
            pg_dump: PathBuf::from(format!("/{major}/pg_dump")),
            pg_restore: PathBuf::new(),
            version: format!("{major}.1"),
            major,
        }
    }

    #[test]
    fn versions_from_version_output() {
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(("15.18".to_owned(), 15))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 18beta1"),
            Some(("18beta1".to_owned(), 18))
        );
        assert_eq!(
            parse_version("pg_dump (PostgreSQL) 9.6.24"),
            Some(("9.6.24".to_owned(), 9))
        );
        assert_eq!(parse_version("nothing"), None);
    }

    #[test]
    fn the_newest_not_newer_than_the_target_else_the_oldest_suitable() {
        let all = || vec![t(12), t(15), t(17)];
        assert_eq!(choose(all(), 12, 16).unwrap().major, 15);
        assert_eq!(choose(all(), 12, 17).unwrap().major, 17);
        assert_eq!(choose(all(), 16, 15).unwrap().major, 17);
        assert_eq!(choose(all(), 10, 10).unwrap().major, 12);
        assert!(choose(all(), 18, 18).is_none());
        assert!(choose(Vec::new(), 10, 18).is_none());
    }
}
