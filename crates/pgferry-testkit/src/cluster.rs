//! One throwaway PostgreSQL server: its lifecycle and how tests talk to it.
//!
//! A cluster's data directory is a copy (`cp -a`) of an `initdb` template made once per bin
//! directory and template-settings version (see [`TEMPLATE_VERSION`]) under the cache
//! directory, because copying is several times faster than `initdb` (on tmpfs, ~0.1 s against
//! ~0.7 s). Per-cluster settings are appended to the copy's `postgresql.conf` (later lines win,
//! which is also how a port retry and `extra_conf` override earlier lines) and `pg_hba.conf` is
//! replaced, so the template itself carries nothing cluster-specific.
//!
//! Cluster directories go to `/dev/shm` when it has room (see `cluster_base`), else the system
//! temporary directory; `PGFERRY_TEST_TMPDIR` overrides both.
//!
//! Every wait has a deadline: `pg_ctl -w -t 60` for start and stop, `PGCONNECT_TIMEOUT` for
//! psql. Nothing sleeps and hopes.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use crate::pgbin::{cache_root, client_tool, ensure_dir, PgBin};
use crate::server_user::{give, run, scrub_env, server_command};
use crate::testdb::TestDb;
use crate::watchdog::Watchdog;

/// Version of the `initdb` invocation below; bump it when changing that invocation so that
/// cached templates made the old way are no longer used.
const TEMPLATE_VERSION: u32 = 1;

/// Deadline, in seconds, for `pg_ctl` to see the server started or stopped.
const PG_CTL_TIMEOUT_SECS: &str = "60";

/// Deadline, in seconds, for psql to connect.
const PSQL_CONNECT_TIMEOUT_SECS: &str = "30";

/// How many ports to try when another process takes the chosen one before the server binds it.
const START_ATTEMPTS: usize = 5;

/// Settings appended to every cluster's `postgresql.conf`, before the port and `extra_conf`.
const SETTINGS: &str = "\
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 128MB
logging_collector = off
";

/// The whole `pg_hba.conf`: the superuser is trusted, every other role gives its password
/// (`md5` also accepts SCRAM-stored passwords).
const HBA: &str = "\
host all postgres 127.0.0.1/32 trust
host all all 127.0.0.1/32 md5
";

/// How a cluster is set up beyond the defaults, for [`Cluster::start_setup`].
#[derive(Clone, Debug, Default)]
pub struct ClusterSetup {
    /// Extra `postgresql.conf` lines (they override the defaults).
    pub conf: Vec<String>,
    /// The whole `pg_hba.conf`, instead of the default (the superuser `postgres` trusted from
    /// 127.0.0.1, every other role by password).
    pub hba: Option<String>,
    /// Files written into the data directory before the server starts, by name relative to
    /// it, owned by the server user with mode 0600: certificates and keys for `ssl = on`.
    pub files: Vec<(String, Vec<u8>)>,
}

/// A running (or deliberately stopped) PostgreSQL server in its own temporary directory,
/// listening on 127.0.0.1 only. Dropping it stops the server (`-m immediate`) and deletes the
/// directory; if the process ends without dropping it, its watchdog does the same.
#[derive(Debug)]
pub struct Cluster {
    bin: PgBin,
    /// The temporary directory holding `data/` and `server.log`.
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    watchdog: Option<Watchdog>,
}

impl Cluster {
    /// Creates and starts a cluster: copies the cached `initdb` template of `bin` (making it
    /// first if needed), picks a free port by binding `127.0.0.1:0`, writes the settings and
    /// starts the server with `pg_ctl -w` and a deadline. A start failure includes the tail of
    /// the server log.
    pub fn start(bin: &PgBin) -> io::Result<Cluster> {
        Cluster::start_with(bin, &[])
    }

    /// Like [`Cluster::start`], with extra `postgresql.conf` lines (they override the defaults).
    pub fn start_with(bin: &PgBin, extra_conf: &[&str]) -> io::Result<Cluster> {
        Cluster::start_setup(
            bin,
            &ClusterSetup {
                conf: extra_conf.iter().map(|l| (*l).to_owned()).collect(),
                ..ClusterSetup::default()
            },
        )
    }

    /// Like [`Cluster::start`], set up as `setup` says: extra `postgresql.conf` lines, another
    /// `pg_hba.conf`, files in the data directory (a TLS certificate and key, say).
    pub fn start_setup(bin: &PgBin, setup: &ClusterSetup) -> io::Result<Cluster> {
        let dir = tempfile::Builder::new()
            .prefix("pgferry-")
            .tempdir_in(cluster_base())?
            .keep();
        // From here on, dropping `cluster` (also on an error below) cleans up.
        let mut cluster = Cluster {
            bin: bin.clone(),
            data: dir.join("data"),
            log: dir.join("server.log"),
            dir,
            port: 0,
            watchdog: None,
        };
        cluster.watchdog = Some(Watchdog::arm(
            &bin.tool("pg_ctl"),
            &cluster.data,
            &cluster.dir,
        )?);
        give(&cluster.dir)?;
        cluster.make_data_dir()?;
        cluster.configure(setup)?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    /// The cluster of this process (of this test binary under `cargo test`), started on first
    /// use from [`PgBin::system`]. It is never dropped: its watchdog stops and deletes it when
    /// the process exits. Give each test its own database with [`Cluster::create_database`].
    ///
    /// # Panics
    /// If the cluster cannot be started.
    pub fn shared() -> &'static Cluster {
        Cluster::shared_for(&PgBin::system())
    }

    /// The shared cluster of `bin` (one per bin directory, for version tests), with the same
    /// lifetime rules as [`Cluster::shared`].
    ///
    /// # Panics
    /// If the cluster cannot be started.
    pub fn shared_for(bin: &PgBin) -> &'static Cluster {
        type Cells = HashMap<PathBuf, &'static OnceLock<Cluster>>;
        static SHARED: Mutex<Option<Cells>> = Mutex::new(None);
        let cell: &'static OnceLock<Cluster> = {
            let mut shared = SHARED.lock().unwrap_or_else(PoisonError::into_inner);
            let cells = shared.get_or_insert_with(HashMap::new);
            // Leaked once per bin directory: shared clusters live until the process exits.
            cells
                .entry(bin.dir().to_owned())
                .or_insert_with(|| Box::leak(Box::new(OnceLock::new())))
        };
        // Started outside the map's lock, so clusters of different binaries start in parallel.
        cell.get_or_init(|| {
            Cluster::start(bin).unwrap_or_else(|e| {
                panic!(
                    "cannot start the shared PostgreSQL {} cluster from {}: {e}",
                    bin.major(),
                    bin.dir().display()
                )
            })
        })
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The binaries this cluster runs.
    pub fn bin(&self) -> &PgBin {
        &self.bin
    }

    /// The data directory (owned by the `postgres` OS user when running as root).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The server log (`pg_ctl -l`), for debugging a failing test.
    pub fn server_log(&self) -> &Path {
        &self.log
    }

    /// A key=value DSN for the superuser `postgres` (trusted, no password) and database `db`:
    /// `host=127.0.0.1 port=N user=postgres dbname=DB` (values quoted when they need it).
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={}",
            self.port,
            conninfo_value(db)
        )
    }

    /// A key=value DSN for role `user` with `password` and database `db`.
    pub fn dsn_as(&self, db: &str, user: &str, password: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            self.port,
            conninfo_value(user),
            conninfo_value(password),
            conninfo_value(db)
        )
    }

    /// Creates a fresh database named after `prefix` (lowercased, other than `[a-z0-9_]`
    /// replaced by `_`) plus a per-process counter and the process id, at most 63 bytes, so the
    /// name is unique and needs no quoting. Uses `CREATE DATABASE … TEMPLATE template0`.
    ///
    /// # Panics
    /// If the database cannot be created.
    pub fn create_database(&self, prefix: &str) -> TestDb<'_> {
        let name = database_name(prefix);
        self.psql(
            "postgres",
            &format!("CREATE DATABASE {name} TEMPLATE template0"),
        );
        TestDb::new(self, name)
    }

    /// Runs `sql` through psql (the system 15 client, `psql -X -q -v ON_ERROR_STOP=1 -At`) as
    /// the superuser in database `db` and returns its stdout.
    ///
    /// # Panics
    /// If psql fails; the message carries its stderr.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql in {db:?} failed: {e}\nSQL: {}", shorten(sql)))
    }

    /// Like [`Cluster::psql`], but a failure returns psql's stderr (for tests expecting errors).
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        psql(&self.dsn(db), Input::Sql(sql))
    }

    /// Runs the SQL file `file` (`psql -f`) as the superuser in database `db`; returns stdout.
    ///
    /// # Panics
    /// If psql fails; the message carries its stderr.
    pub fn psql_file(&self, db: &str, file: &Path) -> String {
        psql(&self.dsn(db), Input::File(file))
            .unwrap_or_else(|e| panic!("psql -f {} in {db:?} failed: {e}", file.display()))
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`) and starts it again on the same port.
    ///
    /// # Panics
    /// If either step fails (the message carries the server log's tail).
    pub fn restart(&self) {
        if let Err(e) = self.pg_ctl_stop("fast") {
            panic!("cannot stop the cluster on port {}: {e}", self.port);
        }
        self.start_again();
    }

    /// Stops the server like a crash (`pg_ctl stop -m immediate`), keeping its directory;
    /// [`Cluster::start_again`] brings it back through crash recovery. Because of
    /// `synchronous_commit=off`, transactions committed just before may be lost, as in a real
    /// crash with that setting; use [`Cluster::restart`] to keep everything.
    ///
    /// # Panics
    /// If `pg_ctl` fails.
    pub fn stop(&self) {
        if let Err(e) = self.pg_ctl_stop("immediate") {
            panic!("cannot stop the cluster on port {}: {e}", self.port);
        }
    }

    /// Starts a stopped server again on the same port.
    ///
    /// # Panics
    /// If it does not start (the message carries the server log's tail).
    pub fn start_again(&self) {
        let from = log_len(&self.log);
        if let Err(e) = self.pg_ctl_start() {
            panic!(
                "cannot start the cluster on port {} again: {e}{}",
                self.port,
                self.log_since(from)
            );
        }
    }

    /// Fills `data` with a copy of the template, or runs `initdb` when there is no template.
    fn make_data_dir(&self) -> io::Result<()> {
        let copied = template(&self.bin).and_then(|template| {
            run(Command::new("cp").arg("-a").arg(template).arg(&self.data)).map(drop)
        });
        if let Err(e) = copied {
            eprintln!(
                "pgferry-testkit: no initdb template for {} ({e}); running initdb for this cluster",
                self.bin.dir().display()
            );
            if self.data.exists() {
                fs::remove_dir_all(&self.data)?;
            }
            initdb(&self.bin, &self.data)?;
        }
        Ok(())
    }

    /// Appends the settings and `setup.conf` to `postgresql.conf`, replaces `pg_hba.conf` and
    /// writes `setup.files`. The two configuration files exist already and keep their owner;
    /// the new files are handed to the server user with mode 0600 (as a TLS key must be).
    fn configure(&self, setup: &ClusterSetup) -> io::Result<()> {
        let mut conf = format!("\n# pgferry-testkit\n{SETTINGS}");
        for line in &setup.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&self.data.join("postgresql.conf"), &conf)?;
        fs::write(
            self.data.join("pg_hba.conf"),
            setup.hba.as_deref().unwrap_or(HBA),
        )?;
        for (name, contents) in &setup.files {
            let path = self.data.join(name);
            let written = fs::write(&path, contents)
                .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o600)));
            if let Err(e) = written {
                return Err(io::Error::new(
                    e.kind(),
                    format!("write {}: {e}", path.display()),
                ));
            }
            give(&path)?;
        }
        Ok(())
    }

    /// Starts the server on a fresh free port, retrying with another one when the server could
    /// not bind it (another process took it between our probe and the server's bind).
    fn start_on_free_port(&mut self) -> io::Result<()> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = free_port()?;
            append(
                &self.data.join("postgresql.conf"),
                &format!("port = {}\n", self.port),
            )?;
            let from = log_len(&self.log);
            let Err(e) = self.pg_ctl_start() else {
                return Ok(());
            };
            let log = self.log_since(from);
            let port_taken = log.contains("could not bind") || log.contains("in use");
            if !port_taken || attempt == START_ATTEMPTS {
                return Err(io::Error::new(e.kind(), format!("{e}{log}")));
            }
        }
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        run(server_command(&self.bin.tool("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "-s", "start"]))
        .map(drop)
    }

    fn pg_ctl_stop(&self, mode: &str) -> io::Result<()> {
        run(server_command(&self.bin.tool("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "-s", "stop"]))
        .map(drop)
    }

    /// The server log from byte `from` on (at most its last 40 lines), formatted for an error.
    fn log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = fs::File::open(&self.log) {
            if file.seek(SeekFrom::Start(from)).is_ok() {
                let mut bytes = Vec::new();
                let _ = file.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("\nserver log {}:\n{tail}", self.log.display())
    }
}

impl Drop for Cluster {
    /// Stops the server (`-m immediate`) and deletes the cluster's directory, then ends the
    /// watchdog (in that order, so a process killed halfway still gets cleaned up).
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            if let Err(e) = self.pg_ctl_stop("immediate") {
                eprintln!(
                    "pgferry-testkit: stopping the cluster on port {}: {e}",
                    self.port
                );
            }
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                eprintln!("pgferry-testkit: deleting {}: {e}", self.dir.display());
            }
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.disarm();
        }
    }
}

/// The data directory of the cached `initdb` template for `bin`, made on first use (see the
/// crate docs for how concurrent processes share it).
fn template(bin: &PgBin) -> io::Result<PathBuf> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let templates = cache_root().join("templates");
    ensure_dir(&templates)?;
    let entry = templates.join(format!(
        "v{TEMPLATE_VERSION}-pg{}-{:016x}",
        bin.major(),
        fnv1a(bin.dir().as_os_str().as_encoded_bytes())
    ));
    let data = entry.join("data");
    if data.join("PG_VERSION").is_file() {
        return Ok(data);
    }
    let work = tempfile::Builder::new()
        .prefix(".initdb-")
        .tempdir_in(&templates)?;
    give(work.path())?;
    initdb(bin, &work.path().join("data"))?;
    match fs::rename(work.path(), &entry) {
        Ok(()) => {
            let _ = work.keep();
        }
        // Another process published its template first; ours is deleted with `work`.
        Err(_) if data.join("PG_VERSION").is_file() => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("publish the initdb template as {}: {e}", entry.display()),
            ))
        }
    }
    Ok(data)
}

fn initdb(bin: &PgBin, data: &Path) -> io::Result<()> {
    run(server_command(&bin.tool("initdb"))
        .arg("-D")
        .arg(data)
        .args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]))
    .map(drop)
}

/// Where cluster directories go: `PGFERRY_TEST_TMPDIR` if set; else `/dev/shm` when it has at
/// least [`MIN_SHM_FREE_KIB`] free, because creating a cluster's ~1000 small files and
/// `CREATE DATABASE` are several times faster on tmpfs than on a disk file system; else the
/// system temporary directory. The size check keeps containers with a 64 MB `/dev/shm` on disk.
fn cluster_base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGFERRY_TEST_TMPDIR") {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if free_kib(shm).is_some_and(|kib| kib >= MIN_SHM_FREE_KIB) {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        }
    })
    .clone()
}

/// Free space `/dev/shm` must have to hold clusters (2 GiB).
const MIN_SHM_FREE_KIB: u64 = 2 * 1024 * 1024;

/// Free space of the file system holding `dir`, from POSIX `df -Pk` (no libc needed).
fn free_kib(dir: &Path) -> Option<u64> {
    if !dir.is_dir() {
        return None;
    }
    let mut cmd = Command::new("df");
    cmd.arg("-Pk").arg(dir);
    let out = run(&mut cmd).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn append(path: &Path, text: &str) -> io::Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| io::Error::new(e.kind(), format!("append to {}: {e}", path.display())))
}

fn log_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A unique, quote-free database name for `prefix` (see [`Cluster::create_database`]).
fn database_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let suffix = format!(
        "_{}_{}",
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    );
    let mut name: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        name.insert_str(0, "db_");
    }
    // ASCII only, so bytes are characters.
    name.truncate(63 - suffix.len());
    name + &suffix
}

/// A libpq key=value value, quoted when it is empty or holds spaces, quotes or backslashes.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// FNV-1a, a hash that is stable across Rust versions (cache keys outlive builds).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn shorten(sql: &str) -> String {
    const MAX: usize = 2000;
    match sql.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &sql[..at]),
        None => sql.to_owned(),
    }
}

/// What psql runs.
pub(crate) enum Input<'a> {
    /// SQL text on stdin.
    Sql(&'a str),
    /// A file, with `-f`.
    File(&'a Path),
}

/// Runs the system psql against `dsn`; stdout on success, stderr (and status) on failure.
pub(crate) fn psql(dsn: &str, input: Input<'_>) -> Result<String, String> {
    let mut cmd = Command::new(client_tool("psql"));
    scrub_env(&mut cmd);
    cmd.env("PGCONNECT_TIMEOUT", PSQL_CONNECT_TIMEOUT_SECS)
        .args(["-X", "-q", "-w", "-v", "ON_ERROR_STOP=1", "-At", "-d"])
        .arg(dsn)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match input {
        Input::Sql(_) => cmd.stdin(Stdio::piped()),
        Input::File(file) => cmd.arg("-f").arg(file).stdin(Stdio::null()),
    };
    let mut child = cmd.spawn().map_err(|e| format!("cannot run psql: {e}"))?;
    // Feed stdin from another thread so a large output cannot deadlock against a large input.
    let feeder = match (input, child.stdin.take()) {
        (Input::Sql(sql), Some(mut stdin)) => {
            let sql = sql.to_owned();
            Some(std::thread::spawn(move || {
                let _ = stdin.write_all(sql.as_bytes());
            }))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for psql: {e}"))?;
    if let Some(feeder) = feeder {
        let _ = feeder.join();
    }
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{} ({})",
            String::from_utf8_lossy(&out.stderr).trim_end(),
            out.status
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names_are_plain_unique_and_short() {
        let a = database_name("Sync Test \"x\"");
        let b = database_name("Sync Test \"x\"");
        assert_ne!(a, b);
        assert!(a.starts_with("sync_test__x__"), "{a}");
        assert!(database_name("9lives").starts_with("db_9lives_"));
        let long = database_name(&"é".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn conninfo_values_are_quoted_when_needed() {
        assert_eq!(conninfo_value("plain"), "plain");
        assert_eq!(conninfo_value(""), "''");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value(r"it's\"), r"'it\'s\\'");
    }
}
