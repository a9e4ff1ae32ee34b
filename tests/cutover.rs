//! End-to-end tests of `pgferry cutover` and `pgferry unfreeze`: a cutover under write load
//! (the writers' commits all reach the target, their next write is refused, whatever role or
//! `session_replication_role`), failure injected at each step inside the freeze (the source is
//! writable again and nothing is lost), a lock held by a writer, a target killed inside the
//! freeze, a daemon taken over, dry run and refusals; the way back (`cutover --reverse`, writes
//! on the new database replicated to the frozen old one, a cutover back losing none), its
//! refusals and its undo.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{
    digest, dump, pgferry, restore, sync_json, sync_run, verify_run, wait_for, Conn, Daemon,
};
use pgferry_testkit::{Cluster, PgBin, TestDb};

const SCHEMA: &str = "
    CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL);
    CREATE TABLE movement (id bigserial PRIMARY KEY, account_id int NOT NULL REFERENCES account,
                           amount int NOT NULL);
    CREATE TABLE event (id bigint GENERATED ALWAYS AS IDENTITY, day date NOT NULL, what text,
                        PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
    CREATE TABLE event_2026 PARTITION OF event FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
    CREATE TABLE event_2027 PARTITION OF event FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');
    INSERT INTO account SELECT g, 0 FROM generate_series(1, 50) g;";

/// The migration up to the cutover: schema and data on the source, capture, a dump restored
/// on the target and cleaned, a first catch-up.
fn migrated(source: &TestDb<'_>, target: &TestDb<'_>) {
    source.psql(SCHEMA);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("source.dump");
    dump(source, &file);
    restore(&file, target);
    pgferry(&["clean", "--db", &target.dsn()]).expect(0);
    sync_json(source, target);
}

/// One writer: transfers between accounts with a movement and an event each; counts commits
/// and writes refused as read-only (SQLSTATE 25006, the freeze).
struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Writer {
    fn start(dsn: &str) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (d, s, c, r) = (
            dsn.to_owned(),
            stop.clone(),
            committed.clone(),
            refused.clone(),
        );
        let thread = thread::spawn(move || {
            let conn = Conn::open(&d);
            let mut n: u64 = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let (from, to) = (1 + n % 50, 1 + (n * 7) % 50);
                let day = if n % 2 == 0 {
                    "2026-06-01"
                } else {
                    "2027-06-01"
                };
                let sql = format!(
                    "BEGIN;
                     UPDATE account SET balance = balance - 3 WHERE id = {from};
                     UPDATE account SET balance = balance + 3 WHERE id = {to};
                     INSERT INTO movement (account_id, amount) VALUES ({from}, -3), ({to}, 3);
                     INSERT INTO event (day, what) VALUES ('{day}', 'transfer {n}');
                     {}
                     COMMIT;",
                    if n % 10 == 0 {
                        "DELETE FROM movement WHERE id IN (SELECT id FROM movement ORDER BY id LIMIT 2);"
                    } else {
                        ""
                    }
                );
                match conn.try_batch(&sql) {
                    Ok(()) => {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if e.code()
                            == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
                        {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                        let _ = conn.try_batch("ROLLBACK");
                        thread::sleep(Duration::from_millis(5));
                    }
                }
                thread::sleep(Duration::from_millis(1));
            }
        });
        Writer {
            stop,
            committed,
            refused,
            thread: Some(thread),
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits for `n` more commits.
    fn progress(&self, n: u64) {
        let base = self.committed();
        wait_for(Duration::from_secs(30), "the writer's commits", || {
            self.committed() >= base + n
        });
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("writer");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cutover(source: &TestDb<'_>, target: &TestDb<'_>, extra: &[&str]) -> common::Run {
    let (s, t) = (source.dsn(), target.dsn());
    let mut args = vec!["cutover", "--source", &s, "--target", &t, "--json"];
    args.extend_from_slice(extra);
    pgferry(&args)
}

/// `pgferry cutover … --json` followed by `extra`, with `PGFERRY_FAILPOINT` set.
fn cutover_failing_at(
    source: &TestDb<'_>,
    target: &TestDb<'_>,
    failpoint: &str,
    extra: &[&str],
) -> common::Run {
    let out = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args([
            "cutover",
            "--source",
            &source.dsn(),
            "--target",
            &target.dsn(),
            "--json",
        ])
        .args(extra)
        .env("PGFERRY_LOG", "warn")
        .env("PGFERRY_FAILPOINT", failpoint)
        .output()
        .expect("run pgferry");
    common::Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn freeze_triggers(db: &TestDb<'_>) -> String {
    db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgferry\\_freeze%'")
}

fn has_pgferry(db: &TestDb<'_>) -> bool {
    db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'") == "1"
}

#[test]
fn a_cutover_under_write_load_freezes_drains_and_hands_over() {
    let cluster = Cluster::shared();
    let (source, target) = (
        cluster.create_database("co_src"),
        cluster.create_database("co_dst"),
    );
    migrated(&source, &target);
    let writer = Writer::start(&source.dsn());
    writer.progress(50);

    let run = cutover(&source, &target, &[]).expect(0);
    let report = run.json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["source_state"], "cut over", "{report}");
    let outage = report["outage_seconds"].as_f64().expect("outage");
    assert!(outage > 0.0, "{report}");
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().unwrap_or(""))
        .collect();
    for s in [
        "check",
        "lag",
        "daemons",
        "catch-up",
        "freeze",
        "final round",
        "sequences",
        "done",
        "release",
    ] {
        assert!(steps.contains(&s), "step {s} missing: {report}");
    }
    let checked = report["targets"][0]["checked"].as_array().expect("checked");
    assert!(!checked.is_empty(), "{report}");
    assert!(checked.iter().all(|t| t["equal"] == true), "{report}");

    // The writer's next write was refused as read-only, and every commit it made is on the
    // target: no transfer lost, none half-applied.
    wait_for(Duration::from_secs(10), "a refused write", || {
        writer.refused() > 0
    });
    writer.stop();
    assert_eq!(digest(&source), digest(&target));
    assert_eq!(target.scalar("SELECT sum(balance) FROM account"), "0");
    assert!(!has_pgferry(&target), "the target keeps pgferry's schema");
    assert_eq!(verify_run(&source, &target).expect(0).json()["equal"], true);

    // Sequences were carried: the new application inserts without key clashes.
    target.psql(
        "INSERT INTO movement (account_id, amount) VALUES (1, 0);
         INSERT INTO event (day, what) VALUES ('2026-01-02', 'new app');",
    );

    // The source refuses every write, whatever the route.
    for sql in [
        "INSERT INTO account VALUES (1000, 0)",
        "SET session_replication_role = replica; UPDATE account SET balance = 0 WHERE id = 1",
        "TRUNCATE movement",
        "TRUNCATE event",
        "INSERT INTO event (day, what) VALUES ('2026-03-01', 'late')",
        "DELETE FROM event_2027",
        "COPY account FROM PROGRAM 'echo 2000,0' WITH (FORMAT csv)",
    ] {
        let err = source.try_psql(sql).expect_err(sql);
        assert!(err.contains("frozen"), "{sql}: {err}");
    }
    // Status says so; replication from it is over; a second cutover says so.
    let status = pgferry(&["status", "--source", &source.dsn()]).expect(0);
    assert!(status.stdout.contains("CUT OVER at"), "{}", status.stdout);
    let again = pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--once",
    ])
    .expect(1);
    assert!(again.stderr.contains("cut over"), "{}", again.stderr);
    let again = cutover(&source, &target, &[]).expect(1);
    assert!(again.stderr.contains("cut over"), "{}", again.stderr);

    // unfreeze makes the old system writable again (a dry run first changes nothing).
    let dry = pgferry(&["unfreeze", "--source", &source.dsn(), "--dry-run"]).expect(0);
    assert!(
        dry.stdout.contains("DROP TRIGGER \"pgferry_freeze\""),
        "{}",
        dry.stdout
    );
    assert_ne!(freeze_triggers(&source), "0");
    pgferry(&["unfreeze", "--source", &source.dsn()]).expect(0);
    assert_eq!(freeze_triggers(&source), "0");
    source.psql("INSERT INTO account VALUES (1000, 0)");
}

#[test]
fn failures_inside_the_freeze_leave_the_source_writable_and_lose_nothing() {
    let cluster = Cluster::shared();
    let (source, target) = (
        cluster.create_database("cf_src"),
        cluster.create_database("cf_dst"),
    );
    migrated(&source, &target);
    let writer = Writer::start(&source.dsn());
    writer.progress(20);

    for step in ["final round", "sequences", "check", "done"] {
        let run = cutover_failing_at(&source, &target, step, &[]).expect(1);
        let report = run.json();
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(report["failed_step"], step, "{report}");
        assert_eq!(report["source_state"], "writable", "{report}");
        assert!(report["outage_seconds"].as_f64().is_some(), "{report}");
        assert_eq!(freeze_triggers(&source), "0", "{step}");
        assert_eq!(
            source.scalar("SELECT state FROM pgferry.cutover ORDER BY cutover_id DESC LIMIT 1"),
            "unfrozen"
        );
        let status = pgferry(&["status", "--source", &source.dsn(), "--json"])
            .expect(0)
            .json();
        assert_eq!(status["cutover"]["state"], "unfrozen", "{status}");
        // The writer goes on.
        writer.progress(20);
    }

    // A difference inside the freeze (a row only the target has) fails the check.
    target.psql("INSERT INTO account VALUES (5000, 0)");
    let report = cutover(&source, &target, &[]).expect(1).json();
    assert_eq!(report["failed_step"], "check", "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains("public.account"),
        "{report}"
    );
    assert_eq!(freeze_triggers(&source), "0");
    writer.progress(20);
    target.psql("DELETE FROM account WHERE id = 5000");

    // A transaction that wrote and stays open holds the freeze back: refused after
    // --lock-timeout, naming the session, nothing changed.
    let holder = Conn::open(&source.dsn());
    holder.batch(
        "BEGIN; UPDATE movement SET amount = amount WHERE id = (SELECT min(id) FROM movement)",
    );
    let run = cutover(&source, &target, &["--lock-timeout", "1"]).expect(1);
    assert!(run.stderr.contains("pid"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was changed"), "{}", run.stderr);
    assert_eq!(freeze_triggers(&source), "0");
    holder.batch("ROLLBACK");
    writer.progress(20);

    // Nothing was lost along the way: the last cutover hands everything over.
    let report = cutover(&source, &target, &[]).expect(0).json();
    assert_eq!(report["ok"], true, "{report}");
    writer.stop();
    assert_eq!(digest(&source), digest(&target));
    assert_eq!(target.scalar("SELECT sum(balance) FROM account"), "0");
}

#[test]
fn a_target_killed_inside_the_freeze_unfreezes_the_source() {
    let bin = PgBin::system();
    let (src_cluster, dst_cluster) = (
        Cluster::start(&bin).expect("source cluster"),
        Cluster::start(&bin).expect("target cluster"),
    );
    let (source, target) = (
        src_cluster.create_database("ck_src"),
        dst_cluster.create_database("ck_dst"),
    );
    migrated(&source, &target);
    let writer = Writer::start(&source.dsn());
    writer.progress(20);

    let child = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args([
            "cutover",
            "--source",
            &source.dsn(),
            "--target",
            &target.dsn(),
            "--json",
        ])
        .env("PGFERRY_LOG", "warn")
        .env("PGFERRY_FAILPOINT", "final round:pause=3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cutover");
    let probe = Conn::open(&source.dsn());
    wait_for(Duration::from_secs(30), "the freeze", || {
        probe.text("SELECT count(*) FROM pg_trigger WHERE tgname = 'pgferry_freeze'") != "0"
    });
    dst_cluster.stop();
    let out = child.wait_with_output().expect("cutover");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["failed_step"], "final round", "{report}");
    assert_eq!(report["source_state"], "writable", "{report}");
    writer.progress(20);

    dst_cluster.start_again();
    writer.stop();
    sync_json(&source, &target);
    assert_eq!(digest(&source), digest(&target));
    assert_eq!(verify_run(&source, &target).expect(0).json()["equal"], true);
}

#[test]
fn a_running_daemon_is_taken_over_and_stays_away_afterwards() {
    let cluster = Cluster::shared();
    let (source, target) = (
        cluster.create_database("cd_src"),
        cluster.create_database("cd_dst"),
    );
    migrated(&source, &target);
    let writer = Writer::start(&source.dsn());
    let mut daemon = Daemon::following(&source.dsn(), &target.dsn());
    daemon.wait_log("target connected", Duration::from_secs(30));
    writer.progress(50);

    let report = cutover(&source, &target, &[]).expect(0).json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["daemons_taken_over"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    writer.stop();
    assert_eq!(digest(&source), digest(&target));
    // The daemon gets its lock back once cutover exits, and refuses to replicate from a source
    // that was cut over: it does not put pgferry back on the target.
    daemon.wait_log("was cut over", Duration::from_secs(30));
    thread::sleep(Duration::from_secs(1));
    assert!(!has_pgferry(&target), "{}", daemon.log());
    assert!(daemon.is_running(), "the daemon died");
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "{}", daemon.log());
}

#[test]
fn dry_run_and_refusals_change_nothing() {
    let cluster = Cluster::shared();
    let (source, target, fresh) = (
        cluster.create_database("cr_src"),
        cluster.create_database("cr_dst"),
        cluster.create_database("cr_new"),
    );
    migrated(&source, &target);
    fresh.psql(SCHEMA);
    source.psql("UPDATE account SET balance = balance + 1 WHERE id = 1; UPDATE account SET balance = balance - 1 WHERE id = 2");

    let report = cutover(&source, &target, &["--dry-run"]).expect(0).json();
    assert_eq!(report["dry_run"], true, "{report}");
    assert_eq!(report["targets"][0]["pending"], 2, "{report}");
    assert_eq!(freeze_triggers(&source), "0");
    assert_eq!(
        source.scalar("SELECT to_regclass('pgferry.cutover') IS NULL"),
        "t"
    );
    // A long transaction that wrote is named in the dry run's warnings.
    let holder = Conn::open(&source.dsn());
    holder.batch("BEGIN; UPDATE account SET balance = balance WHERE id = 3");
    thread::sleep(Duration::from_millis(300));
    let report = cutover(&source, &target, &["--dry-run", "--lock-timeout", "0.2"])
        .expect(0)
        .json();
    assert!(
        report["warnings"]
            .to_string()
            .contains("holds a write lock"),
        "{report}"
    );
    holder.batch("ROLLBACK");

    // Too far behind.
    thread::sleep(Duration::from_millis(300));
    let run = cutover(&source, &target, &["--max-lag", "0.1"]).expect(1);
    assert!(run.stderr.contains("behind"), "{}", run.stderr);
    // Never caught up: not registered behind the user's back.
    let run = cutover(&source, &fresh, &[]).expect(1);
    assert!(run.stderr.contains("never caught up"), "{}", run.stderr);
    assert!(!has_pgferry(&fresh));
    assert_eq!(freeze_triggers(&source), "0");
    source.psql("INSERT INTO account VALUES (777, 0)");
}

/// The step names of a cutover report, in order.
fn steps(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["step"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// The SQLSTATE of a write through `conn`, or None when it went through.
fn write_refused(conn: &Conn, sql: &str) -> Option<String> {
    conn.try_batch(sql)
        .err()
        .map(|e| e.code().map(|c| c.code().to_owned()).unwrap_or_default())
}

#[test]
fn cutover_reverse_replicates_the_new_database_back_and_a_cutover_back_loses_nothing() {
    let cluster = Cluster::shared();
    let (old, new) = (
        cluster.create_database("cw_old"),
        cluster.create_database("cw_new"),
    );
    migrated(&old, &new);
    let writer = Writer::start(&old.dsn());
    writer.progress(30);

    // Forth, with a way back: NEW captures, with OLD registered as its target, before the
    // cutover is done (the applications are released).
    let report = cutover(&old, &new, &["--reverse"]).expect(0).json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["source_state"], "cut over", "{report}");
    let names = steps(&report);
    let at = |s: &str| names.iter().position(|n| n == s).expect(s);
    assert!(
        at("check") < at("reverse") && at("reverse") < at("done"),
        "{report}"
    );
    assert_eq!(
        report["steps"][at("reverse")]["in_outage"],
        true,
        "{report}"
    );
    let back = &report["reverse"];
    assert_eq!(
        back["replicate"],
        format!(
            "pgferry run --source '{}' --target '{}'",
            new.dsn(),
            old.dsn()
        ),
        "{report}"
    );
    assert_eq!(
        back["way_back"],
        format!(
            "pgferry cutover --source '{}' --target '{}'",
            new.dsn(),
            old.dsn()
        ),
        "{report}"
    );
    wait_for(Duration::from_secs(10), "a refused write", || {
        writer.refused() > 0
    });
    writer.stop();
    assert_eq!(digest(&old), digest(&new));
    assert_eq!(
        new.scalar("SELECT string_agg(schema_name || '.' || table_name, ',' ORDER BY 1, 2) FROM pgferry.captured_table"),
        old.scalar("SELECT string_agg(schema_name || '.' || table_name, ',' ORDER BY 1, 2) FROM pgferry.captured_table")
    );
    let status = pgferry(&["status", "--source", &old.dsn(), "--json"])
        .expect(0)
        .json();
    assert_eq!(status["cutover"]["state"], "done", "{status}");
    assert_eq!(
        status["cutover"]["followed_by"],
        new.scalar("SELECT node_id FROM pgferry.installation"),
        "{status}"
    );

    // The application moves to NEW; its writes reach OLD through an ordinary one-way sync:
    // first `sync --once`, then the daemon the report names.
    let writer = Writer::start(&new.dsn());
    writer.progress(30);
    // A row no one changes after it reaches OLD: writes to it there are refused for sure, where
    // a row a round is replacing might be gone under an application's UPDATE (no row, no error).
    new.psql("INSERT INTO account VALUES (999, 0)");
    let once = sync_json(&new, &old);
    assert!(once["rows"].as_u64().unwrap_or(0) > 0, "{once}");
    // A TRUNCATE on NEW goes back too (through OLD's BEFORE TRUNCATE freeze triggers).
    new.psql("TRUNCATE event");
    let mut daemon = Daemon::following(&new.dsn(), &old.dsn());
    daemon.wait_log("target connected", Duration::from_secs(30));
    writer.progress(30);

    // Meanwhile OLD refuses every application write (SQLSTATE 25006), also one that claims to
    // be pgferry's apply from a role that may not use schema pgferry, and is not replicable.
    old.psql(
        "CREATE ROLE cw_app LOGIN PASSWORD 'app';
         GRANT ALL ON ALL TABLES IN SCHEMA public TO cw_app;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO cw_app;",
    );
    let app = Conn::open(&old.dsn_as("cw_app", "app"));
    for sql in [
        "INSERT INTO account VALUES (1000, 0)",
        "UPDATE account SET balance = balance + 1 WHERE id = 999",
        "BEGIN; SET LOCAL pgferry.apply = 'on'; DELETE FROM account WHERE id = 999; COMMIT",
        "TRUNCATE movement CASCADE",
    ] {
        assert_eq!(write_refused(&app, sql).as_deref(), Some("25006"), "{sql}");
        let _ = app.try_batch("ROLLBACK");
    }
    let err = old
        .try_psql("INSERT INTO account VALUES (1000, 0)")
        .expect_err("a write to OLD");
    assert!(err.contains("frozen"), "{err}");
    let refused = sync_run(&old, &new, &[]).expect(1);
    assert!(refused.stderr.contains("cut over"), "{}", refused.stderr);

    // Back: the cutover in the other direction, under the writer, the daemon taken over.
    let report = cutover(&new, &old, &[]).expect(0).json();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["daemons_taken_over"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    let names = steps(&report);
    assert!(names.iter().any(|s| s == "return"), "{report}");
    assert_eq!(
        report["returned"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    wait_for(Duration::from_secs(10), "a refused write on NEW", || {
        writer.refused() > 0
    });
    let made_on_new = writer.committed();
    writer.stop();
    assert!(made_on_new >= 60);
    // Every write made on NEW is on OLD: the same rows, and no transfer lost or half-applied.
    assert_eq!(digest(&old), digest(&new));
    assert_eq!(old.scalar("SELECT sum(balance) FROM account"), "0");

    // OLD is writable again (sequences carried back: no key clash), NEW frozen for good.
    old.psql(
        "INSERT INTO account VALUES (1000, 0);
         INSERT INTO movement (account_id, amount) VALUES (1, 0);
         INSERT INTO event (day, what) VALUES ('2026-01-02', 'back on the old system');",
    );
    assert_eq!(freeze_triggers(&old), "0");
    assert_ne!(freeze_triggers(&new), "0");
    let err = new
        .try_psql("INSERT INTO account VALUES (2000, 0)")
        .expect_err("a write to NEW");
    assert!(err.contains("frozen"), "{err}");
    let refused = sync_run(&new, &old, &[]).expect(1);
    assert!(refused.stderr.contains("cut over"), "{}", refused.stderr);

    // OLD's capture goes on, and replays nothing stale: it forgot the targets of its first
    // life, so one coming back with old progress is refused (it needs a fresh copy) instead of
    // missing the rows OLD took back uncaptured.
    let status = pgferry(&["status", "--source", &old.dsn(), "--json"])
        .expect(0)
        .json();
    assert_eq!(status["cutover"]["state"], "unfrozen", "{status}");
    assert_eq!(
        status["targets"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    assert_eq!(status["capture_rows"], 3, "{status}");
    let stale = sync_run(&old, &new, &[]).expect(1);
    assert!(
        stale.stderr.contains("cannot be registered"),
        "{}",
        stale.stderr
    );

    daemon.wait_log("was cut over", Duration::from_secs(30));
    assert!(daemon.is_running(), "the daemon died");
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "{}", daemon.log());
}

#[test]
fn reverse_refusals_and_failures_change_nothing() {
    let cluster = Cluster::shared();
    let (old, new, other) = (
        cluster.create_database("cv_old"),
        cluster.create_database("cv_new"),
        cluster.create_database("cv_other"),
    );
    migrated(&old, &new);
    let captured = |db: &TestDb<'_>| db.scalar("SELECT count(*) FROM pgferry.captured_table");
    let capture_triggers = |db: &TestDb<'_>| {
        db.scalar(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              WHERE NOT t.tgisinternal AND p.pronamespace = 'pgferry'::regnamespace",
        )
    };
    let untouched = |old: &TestDb<'_>, new: &TestDb<'_>| {
        assert_eq!(freeze_triggers(old), "0");
        assert_eq!(captured(new), "0");
        assert_eq!(capture_triggers(new), "0");
        assert_eq!(new.scalar("SELECT count(*) FROM pgferry.target"), "0");
        assert_eq!(old.scalar("SELECT count(*) FROM pgferry.applied"), "0");
        old.psql("UPDATE account SET balance = balance WHERE id = 1");
    };

    // Capture cannot be installed on NEW (a table without a key there): refused before the
    // freeze, naming the table.
    new.psql("ALTER TABLE account DROP CONSTRAINT account_pkey CASCADE");
    let run = cutover(&old, &new, &["--reverse"]).expect(1);
    assert!(run.stderr.contains("--reverse"), "{}", run.stderr);
    assert!(run.stderr.contains("account"), "{}", run.stderr);
    assert!(run.stderr.contains("nothing was changed"), "{}", run.stderr);
    assert_eq!(
        old.scalar("SELECT to_regclass('pgferry.cutover') IS NULL"),
        "t"
    );
    untouched(&old, &new);
    new.psql("ALTER TABLE account ADD PRIMARY KEY (id)");

    // One new database only.
    let run = pgferry(&[
        "cutover",
        "--source",
        &old.dsn(),
        "--target",
        &new.dsn(),
        "--target",
        &other.dsn(),
        "--reverse",
    ])
    .expect(1);
    assert!(run.stderr.contains("one --target"), "{}", run.stderr);

    // A failure inside the outage after the reverse step: OLD writable again, and what the
    // step installed and registered is gone.
    let run = cutover_failing_at(&old, &new, "done", &["--reverse"]).expect(1);
    let report = run.json();
    assert_eq!(report["failed_step"], "done", "{report}");
    assert_eq!(report["source_state"], "writable", "{report}");
    untouched(&old, &new);

    // A database cut over without --reverse is no way back, even when it follows the new one
    // (pgferry's rounds get through a freeze).
    let report = cutover(&old, &new, &[]).expect(0).json();
    assert_eq!(report["ok"], true, "{report}");
    pgferry(&["install", "--source", &new.dsn()]).expect(0);
    new.psql("UPDATE account SET balance = balance + 5 WHERE id = 1; UPDATE account SET balance = balance - 5 WHERE id = 2");
    sync_json(&new, &old);
    assert_eq!(digest(&old), digest(&new));
    let run = cutover(&new, &old, &[]).expect(1);
    assert!(
        run.stderr.contains("frozen by a cutover of its own"),
        "{}",
        run.stderr
    );
    assert_eq!(freeze_triggers(&new), "0");
    assert_ne!(freeze_triggers(&old), "0");
}
