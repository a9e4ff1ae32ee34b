//! End-to-end tests of `pgferry run` (the daemon) and `pgferry check`: continuous replication
//! under write load, kill -9 at random moments, source and target restarts, a target down for
//! a while, standby takeover, SIGTERM during a large round, purge, metrics and health.
//!
//! Correctness is judged as everywhere else: once the writers stop, the target must equal the
//! source (row counts and digests of every table), which a lost or doubled change would break.
//! Every wait has a deadline; sleeps only pace the kills and the polling.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{digest, pgferry, wait_for, Conn, Daemon};
use pgferry_testkit::{Cluster, PgBin, TestDb};

const SCHEMA: &str = "
    CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL, note text);
    CREATE TABLE movement (id bigserial PRIMARY KEY, account_id int NOT NULL, amount int NOT NULL,
                           at timestamptz NOT NULL DEFAULT now());
    INSERT INTO account SELECT g, 0, 'a' || g FROM generate_series(1, 50) g;";

/// A source database `PREFIX_src` on `source` and a target `PREFIX_dst` on `target`, both with
/// the schema, the source captured.
fn setup_pair<'a>(
    source: &'a Cluster,
    target: &'a Cluster,
    prefix: &str,
) -> (TestDb<'a>, TestDb<'a>) {
    let (source, target) = (
        source.create_database(&format!("{prefix}_src")),
        target.create_database(&format!("{prefix}_dst")),
    );
    setup(&source, &target);
    (source, target)
}

/// Creates the schema on both, installs capture on the source.
fn setup(source: &TestDb<'_>, target: &TestDb<'_>) {
    source.psql(SCHEMA);
    target.psql(SCHEMA);
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.*"]).expect(0);
}

// ---------------------------------------------------------------------------------------------
// The daemon as a child process
// ---------------------------------------------------------------------------------------------

fn run_args<'a>(source: &'a str, target: &'a str) -> Vec<&'a str> {
    vec![
        "--source",
        source,
        "--target",
        target,
        "--poll-interval",
        "20ms",
    ]
}

fn tempdir() -> Arc<tempfile::TempDir> {
    Arc::new(tempfile::tempdir().expect("tempdir"))
}

/// Waits until the target holds what the source holds.
fn wait_equal(source: &TestDb<'_>, target: &TestDb<'_>, limit: Duration, daemon: &Daemon) {
    let deadline = Instant::now() + limit;
    loop {
        let (s, t) = (digest(source), digest(target));
        if s == t {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the target did not converge in {limit:?}\nsource:\n{s}\ntarget:\n{t}\ndaemon log:\n{}",
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Write load: transactions that move money between accounts, with a movement row each, and
// delete old movements; they reconnect when their server goes away.
// ---------------------------------------------------------------------------------------------

struct Writers {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Writers {
    fn start(dsn: &str, count: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let threads = (0..count)
            .map(|w| {
                let (dsn, stop, committed) = (dsn.to_owned(), stop.clone(), committed.clone());
                thread::spawn(move || write_loop(&dsn, w as u64, &stop, &committed))
            })
            .collect();
        Writers {
            stop,
            committed,
            threads,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops the writers; returns how many transactions they committed.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("writer thread");
        }
        self.committed.load(Ordering::Relaxed)
    }
}

fn write_loop(dsn: &str, seed: u64, stop: &AtomicBool, committed: &AtomicU64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    rt.block_on(async {
        while !stop.load(Ordering::Relaxed) {
            let Ok((client, conn)) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let (from, to, amount) = (1 + next() % 50, 1 + next() % 50, 1 + next() % 100);
                let sql = format!(
                    "BEGIN;
                     UPDATE account SET balance = balance - {amount} WHERE id = {from};
                     UPDATE account SET balance = balance + {amount} WHERE id = {to};
                     INSERT INTO movement (account_id, amount) VALUES ({from}, -{amount}), ({to}, {amount});
                     {}
                     COMMIT;",
                    if next() % 10 == 0 {
                        "DELETE FROM movement WHERE id IN (SELECT id FROM movement ORDER BY id LIMIT 3);"
                    } else {
                        ""
                    }
                );
                match client.batch_execute(&sql).await {
                    Ok(()) => {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if client.is_closed() || e.is_closed() => break,
                    Err(_) => {
                        let _ = client.batch_execute("ROLLBACK").await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// HTTP, without a client library
// ---------------------------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `GET path`: status code and body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn the_daemon_replicates_continuously_serves_metrics_and_stops_on_sigterm() {
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "dmn");
    let (s, t) = (source.dsn(), target.dsn());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = run_args(&s, &t);
    args.extend(["--metrics", &addr]);
    let dir = tempdir();
    let mut daemon = Daemon::start(&args, &dir, "main");
    daemon.wait_log("target connected", Duration::from_secs(30));

    // Single changes arrive on their own, without anything else happening.
    source.psql("UPDATE account SET note = 'first' WHERE id = 7");
    wait_for(Duration::from_secs(10), "a single update", || {
        target.scalar("SELECT note FROM account WHERE id = 7") == "first"
    });
    let writers = Writers::start(&s, 2);
    wait_for(Duration::from_secs(30), "some write load", || {
        writers.committed() > 200
    });
    writers.stop();
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    // The movement sequence was carried forward with the rows.
    let (sv, tv) = (
        source.scalar("SELECT last_value FROM movement_id_seq"),
        target.scalar("SELECT last_value FROM movement_id_seq"),
    );
    wait_for(Duration::from_secs(10), "the sequence", || {
        target.scalar("SELECT last_value FROM movement_id_seq") == sv
    });
    let _ = tv;

    let (code, body) = http_get(port, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200);
    for name in [
        "pgferry_rounds_total",
        "pgferry_rows_applied_total",
        "pgferry_changes_applied_total",
        "pgferry_round_duration_seconds",
        "pgferry_lag_seconds",
        "pgferry_pending_changes",
        "pgferry_capture_rows",
        "pgferry_active",
        "pgferry_target_up",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    assert!(body.contains("table=\"public.movement\""), "{body}");
    let (code, health) = http_get(port, "/healthz").expect("/healthz answers");
    assert_eq!(code, 200, "{health}");
    let health: serde_json::Value = serde_json::from_str(&health).expect("JSON health");
    assert_eq!(health["healthy"], true);
    assert_eq!(health["syncs"][0]["role"], "active");

    // Capture rows everyone has are purged.
    wait_for(Duration::from_secs(10), "purge", || {
        source.scalar("SELECT count(*) FROM pgferry.delta") == "0"
    });
    // The gauge of kept capture rows follows (a statistics estimate would lag behind).
    wait_for(Duration::from_secs(5), "pgferry_capture_rows at 0", || {
        http_get(port, "/metrics").is_some_and(|(_, body)| {
            body.lines()
                .any(|l| l.starts_with("pgferry_capture_rows{") && l.ends_with(" 0"))
        })
    });
    let (code, took) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
    assert!(took < Duration::from_secs(10));
}

#[test]
fn rounds_paced_under_load_lose_nothing() {
    // A transaction of 150 changes makes a round of at least 150 changes, after which the next
    // round waits (docs/daemon.md, pacing); a write load then runs through paced rounds. The
    // target must still converge, and the pauses show in the metrics.
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "dmn_pace");
    let (s, t) = (source.dsn(), target.dsn());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = run_args(&s, &t);
    args.extend(["--metrics", &addr, "--max-round-pause", "50ms"]);
    let dir = tempdir();
    let mut daemon = Daemon::start(&args, &dir, "paced");
    daemon.wait_log("target connected", Duration::from_secs(30));

    source.psql(
        "BEGIN;
         UPDATE account SET note = 'all at once ' || id;
         INSERT INTO movement (account_id, amount) SELECT 1 + g % 50, g FROM generate_series(1, 100) g;
         COMMIT;",
    );
    let paused = || {
        http_get(port, "/metrics").and_then(|(_, body)| {
            body.lines()
                .find(|l| l.starts_with("pgferry_round_pause_seconds_count{"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        })
    };
    wait_for(Duration::from_secs(30), "a paced round", || {
        paused().is_some_and(|p| p > 0.0)
    });
    let writers = Writers::start(&s, 4);
    wait_for(Duration::from_secs(30), "some write load", || {
        writers.committed() > 300
    });
    writers.stop();
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
}

#[test]
fn a_table_of_the_last_round_held_exclusively_does_not_hold_back_the_others() {
    // Each round locks the tables of the last round that applied changes before its snapshot
    // (round.rs). One of them held by an ALTER, a VACUUM FULL or a queued TRUNCATE, with no
    // changes of its own, must not stop the rounds of the others: the round starts over
    // without expectations.
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "dmn_held");
    let mut daemon = Daemon::following(&source.dsn(), &target.dsn());
    daemon.wait_log("target connected", Duration::from_secs(30));
    source.psql(
        "BEGIN;
         UPDATE account SET balance = balance - 5 WHERE id = 1;
         INSERT INTO movement (account_id, amount) VALUES (1, -5);
         COMMIT;",
    );
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    let holder = Conn::open(&source.dsn());
    holder.batch("BEGIN; LOCK TABLE movement IN ACCESS EXCLUSIVE MODE");
    source.psql("UPDATE account SET note = 'while movement is held' WHERE id = 2");
    let check = Conn::open(&target.dsn());
    wait_for(
        Duration::from_secs(5),
        "account's change on the target",
        || check.text("SELECT note FROM account WHERE id = 2") == "while movement is held",
    );
    holder.batch("ROLLBACK");
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
}

#[test]
fn columns_added_while_the_daemon_runs_are_replicated_once_the_target_has_them() {
    // The documented order (docs/daemon.md, Not yet): the target first, then the source. Every
    // round reads both sides' columns, so a column added on both is copied from the next round
    // on, with no restart; one added on the source alone is refused until the target has it.
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "dmn_ddl");
    let mut daemon = Daemon::following(&source.dsn(), &target.dsn());
    daemon.wait_log("target connected", Duration::from_secs(30));
    source.psql("UPDATE account SET balance = 1 WHERE id = 1");
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    target.psql("ALTER TABLE account ADD COLUMN extra int");
    source.psql(
        "ALTER TABLE account ADD COLUMN extra int; UPDATE account SET extra = id WHERE id <= 3",
    );
    wait_equal(&source, &target, Duration::from_secs(30), &daemon);
    // The other order: the round refuses the source's new column (the error names it) and the
    // daemon retries until the target has it.
    source.psql(
        "ALTER TABLE account ADD COLUMN later text; UPDATE account SET later = 'x' WHERE id = 4",
    );
    daemon.wait_log(
        "column later of table public.account",
        Duration::from_secs(30),
    );
    target.psql("ALTER TABLE account ADD COLUMN later text");
    wait_equal(&source, &target, Duration::from_secs(60), &daemon);
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
}

/// A tiny deterministic generator for the kill schedule (the seed is printed on failure).
fn schedule(seed: u64, n: usize) -> Vec<Duration> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(80 + x % 700)
        })
        .collect()
}

#[test]
fn kill_9_at_random_moments_under_write_load_loses_and_doubles_nothing() {
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "k9");
    // A backlog, so that some kills land inside large rounds.
    source.psql(
        "INSERT INTO movement (account_id, amount) SELECT 1 + g % 50, g % 100 FROM generate_series(1, 50000) g",
    );
    let (s, t) = (source.dsn(), target.dsn());
    let writers = Writers::start(&s, 2);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    let dir = tempdir();
    for (i, pause) in schedule(seed, 10).into_iter().enumerate() {
        let mut daemon = Daemon::start(&run_args(&s, &t), &dir, &format!("kill{i}"));
        thread::sleep(pause);
        daemon.kill9();
    }
    let committed = writers.stop();
    assert!(committed > 0);
    let daemon = Daemon::start(&run_args(&s, &t), &dir, "final");
    let deadline = Instant::now() + Duration::from_secs(60);
    while digest(&source) != digest(&target) {
        assert!(
            Instant::now() < deadline,
            "seed {seed}: not equal after the kills\nsource:\n{}\ntarget:\n{}\nlog:\n{}",
            digest(&source),
            digest(&target),
            daemon.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Money is conserved on the target as on the source: no transfer half-applied or doubled.
    assert_eq!(target.scalar("SELECT sum(balance) FROM account"), "0");
}

#[test]
fn restarts_of_either_cluster_and_a_target_down_for_a_while_are_ridden_out() {
    let bin = PgBin::system();
    let (src_cluster, dst_cluster) = (
        Cluster::start(&bin).expect("source cluster"),
        Cluster::start(&bin).expect("target cluster"),
    );
    let (source, target) = setup_pair(&src_cluster, &dst_cluster, "rs");
    let (s, t) = (source.dsn(), target.dsn());
    let writers = Writers::start(&s, 2);
    let dir = tempdir();
    let daemon = Daemon::start(&run_args(&s, &t), &dir, "main");
    daemon.wait_log("target connected", Duration::from_secs(30));
    let progress = |w: &Writers, n: u64| {
        let base = w.committed();
        wait_for(Duration::from_secs(30), "writes", || {
            w.committed() > base + n
        });
    };
    progress(&writers, 100);
    dst_cluster.restart();
    progress(&writers, 100);
    src_cluster.restart();
    progress(&writers, 100);
    dst_cluster.stop();
    progress(&writers, 300);
    dst_cluster.start_again();
    progress(&writers, 100);
    writers.stop();
    wait_equal(&source, &target, Duration::from_secs(60), &daemon);
    assert_eq!(target.scalar("SELECT sum(balance) FROM account"), "0");
    // One line per change of state, not one per retry.
    let log = daemon.log();
    let down = log.matches("unavailable: retrying").count();
    assert!(
        (1..=12).contains(&down),
        "{down} 'unavailable' lines:\n{log}"
    );
    assert!(log.contains("available again"), "{log}");
}

#[test]
fn a_standby_takes_over_when_the_active_daemon_is_killed() {
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "sb");
    let (s, t) = (source.dsn(), target.dsn());
    let dir = tempdir();
    let mut active = Daemon::start(&run_args(&s, &t), &dir, "active");
    active.wait_log("target connected", Duration::from_secs(30));
    let standby = Daemon::start(&run_args(&s, &t), &dir, "standby");
    standby.wait_log("standing by", Duration::from_secs(30));
    let writers = Writers::start(&s, 1);
    wait_for(Duration::from_secs(30), "writes", || {
        writers.committed() > 50
    });
    active.kill9();
    let killed = Instant::now();
    standby.wait_log("active: replicating", Duration::from_secs(15));
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "took over after {:?}",
        killed.elapsed()
    );
    wait_for(Duration::from_secs(30), "more writes", || {
        writers.committed() > 150
    });
    writers.stop();
    wait_equal(&source, &target, Duration::from_secs(30), &standby);
}

#[test]
fn sigterm_during_a_large_round_exits_cleanly_and_the_next_start_resumes() {
    let cluster = Cluster::shared();
    let (source, target) = setup_pair(cluster, cluster, "st");
    source.psql(
        "INSERT INTO movement (account_id, amount) SELECT 1 + g % 50, g % 100 FROM generate_series(1, 300000) g",
    );
    let (s, t) = (source.dsn(), target.dsn());
    let dir = tempdir();
    let mut daemon = Daemon::start(&run_args(&s, &t), &dir, "first");
    daemon.wait_log("target connected", Duration::from_secs(30));
    // The round is in flight once the target's session is copying.
    wait_for(Duration::from_secs(30), "the large round", || {
        target.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgferry%' AND query ILIKE '%COPY%' AND state = 'active'",
        ) != "0"
    });
    let (code, took) = daemon.term(Duration::from_secs(12));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The target holds the source's state at some snapshot: all of the backlog or none of it.
    let n = target.scalar("SELECT count(*) FROM movement");
    assert!(n == "0" || n == "300000", "a round half-applied: {n} rows");
    let daemon = Daemon::start(&run_args(&s, &t), &dir, "second");
    wait_equal(&source, &target, Duration::from_secs(60), &daemon);
}

#[test]
fn purge_keeps_capture_bounded_and_a_target_down_holds_back_only_what_it_needs() {
    let cluster = Cluster::shared();
    let (source, up, down) = (
        cluster.create_database("pg_src"),
        cluster.create_database("pg_up"),
        cluster.create_database("pg_down"),
    );
    setup(&source, &up);
    down.psql(SCHEMA);
    let (s, u, d) = (source.dsn(), up.dsn(), down.dsn());
    let dir = tempdir();
    let daemon = Daemon::start(
        &["--source", &s, "--target", &u, "--target", &d],
        &dir,
        "main",
    );
    wait_for(Duration::from_secs(30), "both targets", || {
        daemon.log().matches("target connected").count() >= 2
    });
    // Steady load, both targets up: capture rows are purged as they are applied.
    let writers = Writers::start(&s, 2);
    wait_for(Duration::from_secs(30), "writes", || {
        writers.committed() > 300
    });
    let written = writers.stop();
    wait_equal(&source, &up, Duration::from_secs(30), &daemon);
    wait_equal(&source, &down, Duration::from_secs(30), &daemon);
    wait_for(Duration::from_secs(10), "purge under load", || {
        source.scalar("SELECT count(*) FROM pgferry.delta") == "0"
    });
    // One target goes away: its backlog is kept, the other keeps up.
    cluster.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {0} ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{0}';",
            down.name()
        ),
    );
    source.psql("UPDATE account SET note = 'while down'");
    wait_equal(&source, &up, Duration::from_secs(30), &daemon);
    thread::sleep(Duration::from_secs(2));
    let kept: u64 = source
        .scalar("SELECT count(*) FROM pgferry.delta")
        .parse()
        .expect("count");
    assert!(
        kept >= 50,
        "the down target's backlog was purged: {kept} rows kept"
    );
    let status = pgferry(&["status", "--source", &s, "--json"])
        .expect(0)
        .json();
    assert!(status.to_string().contains("pending"), "{status}");
    // It comes back and catches up; then everything is purged.
    cluster.psql(
        "postgres",
        &format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", down.name()),
    );
    wait_equal(&source, &down, Duration::from_secs(60), &daemon);
    wait_for(Duration::from_secs(10), "purge after the catch-up", || {
        source.scalar("SELECT count(*) FROM pgferry.delta") == "0"
    });
    assert!(written > 0);
    // Purged rows are dead rows in the capture table, which every round scans: the daemon
    // vacuums it once enough were purged, instead of waiting for autovacuum.
    source.psql(
        "INSERT INTO movement (account_id, amount) SELECT 1, g FROM generate_series(1, 6000) g",
    );
    wait_equal(&source, &up, Duration::from_secs(30), &daemon);
    wait_equal(&source, &down, Duration::from_secs(30), &daemon);
    wait_for(
        Duration::from_secs(15),
        "the capture table vacuumed",
        || {
            source.scalar(
            "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'pgferry.delta'::regclass",
        ) != "0"
        },
    );
}

#[test]
fn check_reports_every_problem_at_once_and_never_a_password() {
    let cluster = Cluster::shared();
    let (source, good, bad) = (
        cluster.create_database("ck_src"),
        cluster.create_database("ck_good"),
        cluster.create_database("ck_bad"),
    );
    setup(&source, &good);
    bad.psql("CREATE TABLE account (id int PRIMARY KEY, balance text)");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("pgferry.toml");
    let write = |text: &str| std::fs::write(&config, text).expect("write config");
    write(&format!(
        r#"
        [nodes.src]
        dsn = "{}"
        [nodes.good]
        dsn = "{}"
        [nodes.bad]
        dsn = "{}"
        password_env = "CK_BAD_PASSWORD"
        [nodes.nowhere]
        dsn = "host=127.0.0.1 port=1 dbname=x connect_timeout=2"
        [syncs.main]
        source = "src"
        targets = ["good", "bad", "nowhere"]
        "#,
        source.dsn(),
        good.dsn(),
        bad.dsn()
    ));
    let path = config.to_str().expect("path");
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["check", "--config", path])
        .env("CK_BAD_PASSWORD", "hunter2-secret")
        .env("PGFERRY_LOG", "warn")
        .output()
        .expect("run check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("target") && text.contains("ready"), "{text}");
    assert!(
        text.contains("public.movement") && text.contains("missing"),
        "{text}"
    );
    assert!(text.contains("balance"), "{text}");
    assert!(text.contains("node nowhere"), "{text}");
    assert!(
        !text.contains("hunter2-secret"),
        "a password was printed:\n{text}"
    );

    // A bad file: every problem, exit 2.
    write(
        r#"
        [nodes.a]
        dsn = "host=a sslmode=sometimes"
        [syncs.x]
        source = "a"
        targets = ["b"]
        poll_interval = "now"
        "#,
    );
    let run = pgferry(&["check", "--config", path]).expect(2);
    for needle in ["sslmode", "\"b\" is not a node", "poll_interval"] {
        assert!(run.stdout.contains(needle), "{needle}: {}", run.stdout);
    }
    // The daemon refuses the same file, with the same problems.
    let run = pgferry(&["run", "--config", path]).expect(2);
    assert!(run.stderr.contains("poll_interval"), "{}", run.stderr);
}
