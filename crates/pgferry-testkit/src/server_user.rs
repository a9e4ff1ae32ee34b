//! Running PostgreSQL's server tools as the right OS user.
//!
//! The server binaries (`initdb`, `pg_ctl`, `postgres`) refuse to run as root. When this
//! process is root, every server tool runs as the OS user `postgres` through
//! `runuser -u postgres --`, from `/` (a root-only working directory would make them complain),
//! and every directory they write into is first handed to that user with [`give`]. Otherwise
//! everything runs as the current user and ownership is left alone.
//!
//! Every command spawned here runs without the caller's `PG*` environment variables, so a
//! developer's `PGHOST`/`PGPORT`/`PGPASSWORD` can never point a tool at the wrong server.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The OS user that owns and runs clusters when this process is root.
pub(crate) const SERVER_USER: &str = "postgres";

/// Whether this process runs with effective uid 0 (`/proc/self` belongs to the euid).
pub(crate) fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    })
}

/// A command for a server tool: `runuser -u postgres -- program` when root, else `program`.
pub(crate) fn server_command(program: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", SERVER_USER, "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    };
    cmd.current_dir("/");
    scrub_env(&mut cmd);
    cmd
}

/// Removes the `PG*` variables of the caller's environment from `cmd`.
pub(crate) fn scrub_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
}

/// Hands `path` (not recursively) to the server user when root; does nothing otherwise.
pub(crate) fn give(path: &Path) -> io::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let (uid, gid) = server_ids()?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("chown {} to {SERVER_USER}: {e}", path.display()),
        )
    })
}

/// Uid and gid of the server user, looked up once with `id`.
fn server_ids() -> io::Result<(u32, u32)> {
    static IDS: OnceLock<Result<(u32, u32), String>> = OnceLock::new();
    IDS.get_or_init(|| {
        let id = |flag: &str| -> Result<u32, String> {
            let out = run(Command::new("id").args([flag, SERVER_USER])).map_err(|e| {
                format!("the OS user {SERVER_USER} is needed to run PostgreSQL as root: {e}")
            })?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("id {flag} {SERVER_USER}: {e}"))
        };
        Ok((id("-u")?, id("-g")?))
    })
    .clone()
    .map_err(io::Error::other)
}

/// Runs `cmd` to completion with stdin closed and output captured; a non-zero exit becomes an
/// error naming the command and carrying its stderr and stdout.
pub(crate) fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end(),
            indent_stdout(&out.stdout),
        )))
    }
}

fn indent_stdout(stdout: &[u8]) -> String {
    let text = String::from_utf8_lossy(stdout);
    let text = text.trim_end();
    if text.is_empty() {
        String::new()
    } else {
        format!("\nstdout:\n{text}")
    }
}
