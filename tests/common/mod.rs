//! Shared helpers for the end-to-end tests: run the `pgferry` binary, load fixtures, and
//! describe a database's catalog for before/after comparisons.
#![allow(dead_code)]

use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pgferry_testkit::{client_tool, TestDb};

/// What a `pgferry` run printed and returned.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Panics with the whole output unless the exit code is `code`.
    #[track_caller]
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}, got {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", self.stdout))
    }
}

/// Runs the pgferry binary with `args`.
pub fn pgferry(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(args)
        .env_remove("PGPASSWORD")
        .env("PGFERRY_LOG", "warn")
        .output()
        .expect("run pgferry");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A file of `tests/fixtures` (`bucardo-source.sql` is a copy of `../shared/fixtures`'s: a
/// plain pg_dump of a database instrumented by Bucardo 5.6.0).
/// `pgferry sync --source SOURCE --target TARGET --once` followed by `extra`.
pub fn sync_run(source: &TestDb<'_>, target: &TestDb<'_>, extra: &[&str]) -> Run {
    let (s, t) = (source.dsn(), target.dsn());
    let mut args = vec!["sync", "--source", &s, "--target", &t, "--once"];
    args.extend_from_slice(extra);
    pgferry(&args)
}

/// `pgferry verify --source SOURCE --target TARGET --json`.
pub fn verify_run(source: &TestDb<'_>, target: &TestDb<'_>) -> Run {
    pgferry(&[
        "verify",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--json",
    ])
}

/// `pgferry sync … --once --json`, which must exit 0; its report.
pub fn sync_json(source: &TestDb<'_>, target: &TestDb<'_>) -> serde_json::Value {
    sync_run(source, target, &["--json"]).expect(0).json()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

pub fn load_hostile(db: &TestDb<'_>) {
    let sql = std::fs::read_to_string(fixture("hostile.sql")).expect("hostile fixture");
    db.psql(&sql);
}

/// A table `m (id, region, v)` partitioned by list of region into `m_eu` and `m_us`, keyed on
/// `(id, region)`: on the parent from PostgreSQL 11, on each partition on 10 (which has no keys
/// on partitioned tables).
pub fn partitioned_m(major: u32) -> &'static str {
    if major >= 11 {
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');"
    } else {
        "CREATE TABLE m (id int, region text, v text) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('us');"
    }
}

/// Every schema, relation, function, trigger, type, sequence and default outside the system
/// schemas, one line each, sorted: equal before install and after uninstall.
pub fn catalog_listing(db: &TestDb<'_>) -> String {
    db.psql(
        "SELECT 'schema ' || nspname FROM pg_namespace WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'
         UNION ALL
         SELECT 'rel ' || n.nspname || '.' || c.relname || ' ' || c.relkind::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
         UNION ALL
         SELECT 'func ' || n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ') ' || md5(p.prosrc)
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
         UNION ALL
         SELECT 'trigger ' || t.tgrelid::regclass::text || ' ' || t.tgname || ' ' || t.tgfoid::regproc::text
           FROM pg_trigger t WHERE NOT t.tgisinternal
         UNION ALL
         SELECT 'type ' || n.nspname || '.' || t.typname
           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
          WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
         UNION ALL
         SELECT 'default ' || d.adrelid::regclass::text || ' ' || pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d
         UNION ALL
         SELECT 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '-')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname !~ '^pg_' AND n.nspname <> 'information_schema'
         ORDER BY 1",
    )
}

/// Rows of `pgferry.delta` as `table op key old_key`, in capture order.
pub fn deltas(db: &TestDb<'_>) -> Vec<String> {
    db.psql(
        "SELECT t.schema_name || '.' || t.table_name || ' ' || d.op::text || ' ' || coalesce(d.key::text, '-') || ' ' || coalesce(d.old_key::text, '-')
           FROM pgferry.delta d JOIN pgferry.captured_table t USING (table_id)
          ORDER BY d.xid, d.ctid",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Every user table outside the system schemas and pgferry's, partitions left out.
pub fn user_tables(db: &TestDb<'_>) -> Vec<String> {
    db.psql(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
            AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgferry') ORDER BY 1",
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Every user table's rows, as sorted text (for small tables: a mismatch shows the rows).
pub fn contents(db: &TestDb<'_>) -> String {
    user_tables(db)
        .iter()
        .map(|t| {
            let rows = db.psql(&format!(
                "SELECT coalesce(string_agg(r::text, E'\\n' ORDER BY r::text COLLATE \"C\"), '') FROM {t} AS r"
            ));
            format!("== {t}\n{rows}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Copies the schema (no data) of `from` to `to`, without pgferry's schema and triggers.
pub fn copy_schema(from: &TestDb<'_>, to: &TestDb<'_>) {
    let dump = Command::new(client_tool("pg_dump"))
        .args([
            "--schema-only",
            "--no-owner",
            "--no-privileges",
            "--exclude-schema=pgferry",
        ])
        .arg(from.dsn())
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let sql = String::from_utf8(dump.stdout).unwrap();
    // Leave pgferry's triggers behind: the target must not capture.
    let sql: String = sql
        .lines()
        .filter(|l| !l.contains("EXECUTE FUNCTION pgferry."))
        .collect::<Vec<_>>()
        .join("\n");
    to.psql(&sql);
}

/// `pg_dump -Fc` of `db` into `file`.
pub fn dump(db: &TestDb<'_>, file: &Path) {
    let out = Command::new(client_tool("pg_dump"))
        .args(["-Fc", "-f"])
        .arg(file)
        .arg(db.dsn())
        .output()
        .expect("run pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pg_restore --no-owner --no-privileges` of `file` into `db`.
pub fn restore(file: &Path, db: &TestDb<'_>) {
    let out = Command::new(client_tool("pg_restore"))
        .args(["--no-owner", "--no-privileges", "--exit-on-error", "-d"])
        .arg(db.dsn())
        .arg(file)
        .output()
        .expect("run pg_restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain client session for the test's own SQL (writers, readers, pollers, open
/// transactions), with a single-threaded runtime of its own so that it can live in a thread.
pub struct Conn {
    pub client: tokio_postgres::Client,
    pub rt: tokio::runtime::Runtime,
}

impl Conn {
    pub fn open(dsn: &str) -> Conn {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = rt.block_on(async {
            let (client, conn) = tokio_postgres::connect(dsn, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            client
        });
        Conn { client, rt }
    }

    pub fn try_batch(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.rt.block_on(self.client.batch_execute(sql))
    }

    #[track_caller]
    pub fn batch(&self, sql: &str) {
        if let Err(e) = self.try_batch(sql) {
            panic!("{sql}\nfailed: {e:?}");
        }
    }

    /// The columns of the first row of `sql`'s last result, as text.
    #[track_caller]
    pub fn row(&self, sql: &str) -> Vec<Option<String>> {
        let msgs = match self.rt.block_on(self.client.simple_query(sql)) {
            Ok(m) => m,
            Err(e) => panic!("{sql}\nfailed: {e:?}"),
        };
        msgs.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).map(str::to_owned))
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// The first column of the first row of `sql` (empty for NULL or no row).
    #[track_caller]
    pub fn text(&self, sql: &str) -> String {
        self.row(sql)
            .into_iter()
            .next()
            .flatten()
            .unwrap_or_default()
    }
}

/// Every user table's row count and an md5 of its sorted rows (for large tables).
pub fn digest(db: &TestDb<'_>) -> String {
    user_tables(db)
        .iter()
        .map(|t| {
            db.scalar(&format!(
                "SELECT '{t} ' || count(*) || ' ' || md5(coalesce(string_agg(r::text, E'\\n' ORDER BY r::text COLLATE \"C\"), ''))
                   FROM {t} AS r"
            ))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Polls `cond` until it holds; panics after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(2));
    }
}

/// `pgferry run` as a child process, its log in a file; killed (-9) when dropped.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    _dir: Arc<tempfile::TempDir>,
}

impl Daemon {
    /// Starts `pgferry run ARGS`, its log in a file.
    pub fn start(args: &[&str], dir: &Arc<tempfile::TempDir>, name: &str) -> Daemon {
        let log = dir.path().join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pgferry"))
            .arg("run")
            .args(args)
            .env_remove("PGPASSWORD")
            .env("PGFERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("start pgferry run");
        Daemon {
            child,
            log,
            _dir: dir.clone(),
        }
    }

    /// `pgferry run --source SOURCE --target TARGET --poll-interval 20ms`, its log in a
    /// directory of its own.
    pub fn following(source: &str, target: &str) -> Daemon {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        Daemon::start(
            &[
                "--source",
                source,
                "--target",
                target,
                "--poll-interval",
                "20ms",
            ],
            &dir,
            "daemon",
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {needle:?} in the daemon's log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; the exit code and how long the daemon took to exit.
    pub fn term(&mut self, limit: Duration) -> (i32, Duration) {
        let started = Instant::now();
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code().unwrap_or(-1), started.elapsed());
            }
            if started.elapsed() > limit {
                self.kill9();
                panic!(
                    "the daemon did not exit within {limit:?} of SIGTERM; log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
