//! The process that cleans up a cluster after its test process is gone.
//!
//! The watchdog is `sh` blocked reading a pipe whose write end only the test process holds
//! (Rust creates pipes close-on-exec, so no other child inherits it). When the test process
//! ends — normally, by panic with `panic = "abort"`, by a signal, even by SIGKILL — the kernel
//! closes the write end, the read returns end-of-file, and the watchdog stops the cluster with
//! `pg_ctl stop -m immediate` and deletes its directory. It runs in its own process group, so a
//! Ctrl-C aimed at the test run does not kill it before it has cleaned up. Nothing is polled.
//!
//! A [`Cluster`](crate::Cluster) that is dropped normally does the cleanup itself and then kills
//! its watchdog. The two never run at once: the watchdog acts only after the test process is
//! gone, and if that happens halfway through a drop, the watchdog finishes the job.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::server_user::{is_root, scrub_env, SERVER_USER};

/// A running watchdog; [`Watchdog::disarm`] ends it without cleaning up.
#[derive(Debug)]
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// Arms a watchdog that, once this process is gone, stops the server of `data` with `pg_ctl`
    /// and removes `dir` recursively.
    pub(crate) fn arm(pg_ctl: &Path, data: &Path, dir: &Path) -> io::Result<Watchdog> {
        let run_as = if is_root() {
            format!("runuser -u {SERVER_USER} -- ")
        } else {
            String::new()
        };
        // Paths arrive as positional parameters, never spliced into the script.
        let script = format!(
            "read -r _ || :\n\
             if [ -f \"$2/postmaster.pid\" ]; then {run_as}\"$1\" -D \"$2\" -m immediate -w -t 60 stop; fi\n\
             rm -rf \"$3\"\n"
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("pgferry-watchdog")
            .arg(pg_ctl)
            .arg(data)
            .arg(dir)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        scrub_env(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start the watchdog: {e}")))?;
        Ok(Watchdog { child })
    }

    /// Kills the watchdog without letting it clean up, and reaps it.
    pub(crate) fn disarm(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
