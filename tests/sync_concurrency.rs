//! End-to-end tests of `pgferry sync --once` under concurrency: TRUNCATEs committing while
//! rounds run, two appliers racing for one target, sessions killed in the middle of a round,
//! readers of the target while rounds commit, and transactions that stay open across rounds.
//!
//! Every wait is bounded by a deadline; sleeps only pace polling loops. Races that matter are
//! forced where they can be (a test session holds the target's progress row or a table lock
//! until the processes under test are where they should be), and left to chance otherwise.
//!
//! Three tests pin bugs these tests found and that were fixed: a round's multi-table LOCK
//! deadlocking with an application's TRUNCATE (rounds now lock NOWAIT and start over), a
//! prefetching round hanging behind a queued TRUNCATE (prefetch was removed), and a duplicate
//! registry row from two concurrent first syncs (the registry is now written under a lock).

mod common;

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{contents, digest, pgferry, wait_for, Conn, Run};
use pgferry_testkit::{Cluster, TestDb};

/// The exit code of a transient failure, which is what losing the race for a target is.
const EXIT_FAILURE: i32 = 5;
/// The exit code of a connection failure.
const EXIT_CONNECTION: i32 = 3;
const ANOTHER_APPLIER: &str = "another pgferry is applying";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn sync_args<'a>(source: &'a str, target: &'a str) -> [&'a str; 7] {
    [
        "sync", "--source", source, "--target", target, "--once", "--json",
    ]
}

/// How a round copies rows: `Plain` (the default) streams them from the round's session;
/// `Prefetch` (`PGFERRY_PREFETCH_MIN_CHANGES=0`, every table) reads them through a second
/// source session at the same exported snapshot while the target deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copying {
    Plain,
    Prefetch,
}

impl Copying {
    /// Alternates the two, so that concurrency tests cover both paths.
    fn alternate(i: usize) -> Copying {
        if i % 2 == 0 {
            Copying::Plain
        } else {
            Copying::Prefetch
        }
    }
}

/// Starts `pgferry sync --once --json` without waiting for it.
fn spawn_sync(source: &TestDb<'_>, target: &TestDb<'_>, copying: Copying) -> Child {
    let (s, t) = (source.dsn(), target.dsn());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.args(sync_args(&s, &t))
        .env_remove("PGPASSWORD")
        .env("PGFERRY_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    match copying {
        Copying::Plain => cmd.env_remove("PGFERRY_PREFETCH_MIN_CHANGES"),
        Copying::Prefetch => cmd.env("PGFERRY_PREFETCH_MIN_CHANGES", "0"),
    };
    cmd.spawn().expect("start pgferry")
}

/// `pgferry sync --once --json`, whatever it returns (bounded: a hang fails the test).
fn try_sync(source: &TestDb<'_>, target: &TestDb<'_>, copying: Copying) -> Run {
    finish(
        spawn_sync(source, target, copying),
        Duration::from_secs(120),
    )
}

/// `pgferry sync --once --json`, which must succeed; its report.
#[track_caller]
fn sync(source: &TestDb<'_>, target: &TestDb<'_>) -> serde_json::Value {
    sync_with(source, target, Copying::Plain)
}

#[track_caller]
fn sync_with(source: &TestDb<'_>, target: &TestDb<'_>, copying: Copying) -> serde_json::Value {
    try_sync(source, target, copying).expect(0).json()
}

/// Waits (at most `limit`) for a process started by [`spawn_sync`]; kills it and panics when it
/// takes longer.
#[track_caller]
fn finish(child: Child, limit: Duration) -> Run {
    match finish_within(child, limit, String::new) {
        Ok(run) => run,
        Err(run) => panic!(
            "pgferry sync did not end within {limit:?}\nstderr:\n{}",
            run.stderr
        ),
    }
}

/// Waits (at most `limit`) for a process started by [`spawn_sync`]. When it takes longer,
/// `diagnose` runs while it still hangs, then the process is killed, and `Err` carries what it
/// printed, plus the diagnosis in `stdout`.
fn finish_within(
    mut child: Child,
    limit: Duration,
    diagnose: impl FnOnce() -> String,
) -> Result<Run, Run> {
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for pgferry") {
            return Ok(Run {
                code: status.code().unwrap_or(-1),
                stdout: stdout.join().unwrap_or_default(),
                stderr: stderr.join().unwrap_or_default(),
            });
        }
        if Instant::now() > deadline {
            let diagnosis = diagnose();
            let _ = child.kill();
            let _ = child.wait();
            return Err(Run {
                code: -1,
                stdout: diagnosis,
                stderr: stderr.join().unwrap_or_default(),
            });
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The target's progress row: the source snapshot it holds and its round count.
fn progress(target: &TestDb<'_>) -> String {
    target.scalar("SELECT snapshot || ' / ' || rounds FROM pgferry.applied")
}

/// What the source's registry records as acknowledged by its (single) target.
fn acked(source: &TestDb<'_>) -> String {
    source.scalar("SELECT coalesce(acked_snapshot::text, '-') FROM pgferry.target")
}

/// Runs `sql` on both databases (the same schema, and the same rows before capture).
fn on_both(source: &TestDb<'_>, target: &TestDb<'_>, sql: &str) {
    source.psql(sql);
    target.psql(sql);
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after `limit`.
#[track_caller]
fn is_sqlstate(e: &tokio_postgres::Error, codes: &[&str]) -> bool {
    e.code().is_some_and(|c| codes.contains(&c.code()))
}

// ---------------------------------------------------------------------------------------------
// 1. TRUNCATE committed while rounds run
// ---------------------------------------------------------------------------------------------

/// Tables `t` and `child` described by `meta` in the same transactions that change them, so
/// every state the source commits satisfies: count(t) = n, sum(t.v) = total, count(child) = m.
/// Created on both, captured on the source. Returns the TRUNCATE of both tables in the order
/// rounds lock them (table_id order): the other order can deadlock with a round (see
/// `an_application_truncating_tables_in_another_order_than_a_round_locks_them_is_not_aborted`).
fn truncating_setup(source: &TestDb<'_>, target: &TestDb<'_>) -> String {
    on_both(
        source,
        target,
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE child (id int PRIMARY KEY, t_id int NOT NULL REFERENCES t ON DELETE CASCADE);
         CREATE TABLE meta (id int PRIMARY KEY, n bigint NOT NULL, total bigint NOT NULL, m bigint NOT NULL);
         INSERT INTO meta VALUES (1, 0, 0, 0);",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.scalar(
        "SELECT 'TRUNCATE ' || string_agg(format('%I', table_name), ', ' ORDER BY table_id)
           FROM pgferry.captured_table WHERE table_name IN ('t', 'child')",
    )
}

/// Whether the target of [`truncating_setup`] holds a state the source committed (the first
/// column); the others are for the message.
const TRUNCATING_INVARIANT: &str = "SELECT (SELECT count(*) FROM t) = n AND (SELECT coalesce(sum(v), 0) FROM t) = total
        AND (SELECT count(*) FROM child) = m
        AND NOT EXISTS (SELECT 1 FROM child c WHERE NOT EXISTS (SELECT 1 FROM t WHERE t.id = c.t_id)),
        n, (SELECT count(*) FROM t), total, (SELECT coalesce(sum(v), 0) FROM t), m, (SELECT count(*) FROM child)
   FROM meta";

/// [`TRUNCATING_INVARIANT`] on `check`: `None` when it holds, else what is wrong.
fn truncating_broken(check: &Conn) -> Option<String> {
    let row = check.row(TRUNCATING_INVARIANT);
    (row[0].as_deref() != Some("t")).then(|| {
        format!(
            "meta (n, total, m) = {:?}, {:?}, {:?} but t has {:?} rows summing to {:?} and child {:?} rows",
            row[1], row[3], row[5], row[2], row[4], row[6]
        )
    })
}

/// For 3 s, an application on `dsn` inserts, updates, deletes and truncates the tables of
/// [`truncating_setup`] (`truncate`), keeping `meta` in step. Returns its operations, its
/// TRUNCATEs and its errors.
fn truncating_writer(dsn: String, truncate: String) -> thread::JoinHandle<(u64, u64, Vec<String>)> {
    thread::spawn(move || {
        let c = Conn::open(&dsn);
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut next: i64 = 1;
        let mut ops = 0u64;
        let mut truncates = 0u64;
        let mut errors = Vec::new();
        // `k` new rows of t (ids next..next+k), each with one child row, and meta updated.
        let mut insert = |k: i64| {
            let (a, b) = (next, next + k - 1);
            next += k;
            format!(
                "INSERT INTO t SELECT g, g % 100 FROM generate_series({a}, {b}) g;
                 INSERT INTO child SELECT g, g FROM generate_series({a}, {b}) g;
                 UPDATE meta SET n = n + {k}, m = m + {k},
                                 total = total + (SELECT sum(g % 100) FROM generate_series({a}, {b}) g);"
            )
        };
        let reset = format!("{truncate}; UPDATE meta SET n = 0, total = 0, m = 0;");
        while Instant::now() < deadline {
            let sql = match ops % 12 {
                // TRUNCATE alone, the inserts that follow in later transactions.
                0 => {
                    truncates += 1;
                    format!("BEGIN; {reset} COMMIT;")
                }
                // TRUNCATE and inserts in one transaction.
                4 => {
                    truncates += 1;
                    format!("BEGIN; {reset} {} COMMIT;", insert(30))
                }
                // Inserts, TRUNCATE, inserts in one transaction.
                8 => {
                    truncates += 1;
                    format!("BEGIN; {} {reset} {} COMMIT;", insert(10), insert(20))
                }
                // Updates and deletes of existing rows.
                3 | 7 => format!(
                    "BEGIN;
                     WITH u AS (UPDATE t SET v = v + 1 WHERE id % 3 = {0} RETURNING 1)
                     UPDATE meta SET total = total + (SELECT count(*) FROM u);
                     COMMIT;",
                    ops % 3
                ),
                10 => format!(
                    "BEGIN;
                     WITH c AS (DELETE FROM child WHERE t_id % 5 = {0} RETURNING 1),
                          d AS (DELETE FROM t WHERE id % 5 = {0} RETURNING v)
                     UPDATE meta SET n = n - (SELECT count(*) FROM d), m = m - (SELECT count(*) FROM c),
                                     total = total - (SELECT coalesce(sum(v), 0) FROM d);
                     COMMIT;",
                    ops % 5
                ),
                _ => format!("BEGIN; {} COMMIT;", insert(25)),
            };
            if let Err(e) = c.try_batch(&sql) {
                let _ = c.try_batch("ROLLBACK");
                errors.push(format!("{sql}\nfailed: {e:?}"));
            }
            ops += 1;
            thread::sleep(Duration::from_millis(2));
        }
        (ops, truncates, errors)
    })
}

#[test]
fn truncates_committed_while_rounds_run_never_leave_the_target_in_a_state_the_source_was_not_in() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("ctrunc_src");
    let target = cluster.create_database("ctrunc_dst");
    let truncate = truncating_setup(&source, &target);
    let writer = truncating_writer(source.dsn(), truncate);
    // Whatever a round applied, the target must be in a state the source committed.
    let check = Conn::open(&target.dsn());
    let mut runs = Vec::new();
    let mut truncated_rounds = 0;
    let mut broken = Vec::new();
    while !writer.is_finished() {
        // Plain copying only: with prefetch, a TRUNCATE hangs the round (see
        // `a_truncate_queued_behind_a_prefetching_round_does_not_hang_it`).
        let run = try_sync(&source, &target, Copying::Plain);
        if run.code == 0 {
            let report = run.json();
            if report["targets"][0]["tables"]
                .as_array()
                .is_some_and(|ts| ts.iter().any(|t| t["truncated"] == true))
            {
                truncated_rounds += 1;
            }
            if let Some(wrong) = truncating_broken(&check) {
                broken.push(format!("after sync {}: {wrong}", runs.len()));
            }
        }
        runs.push(run);
    }
    let (ops, truncates, writer_errors) = writer.join().expect("writer");
    eprintln!(
        "{} syncs while the writer made {ops} changes ({truncates} with a TRUNCATE); {truncated_rounds} rounds replayed one",
        runs.len()
    );

    assert!(
        writer_errors.is_empty(),
        "{} of the application's {ops} transactions failed while syncs ran:\n{}",
        writer_errors.len(),
        writer_errors.join("\n")
    );
    let failed: Vec<String> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.code != 0)
        .map(|(i, r)| format!("sync {i}: exit {}\n{}", r.code, r.stderr))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} syncs failed while TRUNCATEs committed:\n{}",
        failed.len(),
        runs.len(),
        failed.join("\n")
    );
    assert!(
        broken.is_empty(),
        "the target showed states the source never committed:\n{}",
        broken.join("\n")
    );
    assert!(
        runs.len() >= 3,
        "only {} syncs ran during the writes",
        runs.len()
    );
    assert!(truncates >= 10, "the writer only made {ops} changes");
    assert!(truncated_rounds >= 1, "no round replayed a TRUNCATE");

    sync(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

/// The daemon locks the tables of its previous round before it takes the next round's
/// snapshot, and checks only the others for a TRUNCATE after it (round.rs): under the same
/// truncating application, every state a reader of the target sees is one the source committed.
#[test]
fn truncates_committed_while_the_daemon_runs_never_leave_the_target_in_a_state_the_source_was_not_in(
) {
    let cluster = Cluster::shared();
    let source = cluster.create_database("ctruncd_src");
    let target = cluster.create_database("ctruncd_dst");
    let truncate = truncating_setup(&source, &target);
    let mut daemon = common::Daemon::following(&source.dsn(), &target.dsn());
    daemon.wait_log("target connected", Duration::from_secs(30));
    let writer = truncating_writer(source.dsn(), truncate);
    let check = Conn::open(&target.dsn());
    let mut reads = 0u64;
    let mut broken = Vec::new();
    while !writer.is_finished() {
        if let Some(wrong) = truncating_broken(&check) {
            broken.push(wrong);
        }
        reads += 1;
        thread::sleep(Duration::from_millis(3));
    }
    let (ops, truncates, writer_errors) = writer.join().expect("writer");
    eprintln!("{reads} reads of the target while the writer made {ops} changes ({truncates} with a TRUNCATE)");
    assert!(
        writer_errors.is_empty(),
        "{} of the application's {ops} transactions failed while the daemon ran:
{}",
        writer_errors.len(),
        writer_errors.join("\n")
    );
    assert!(
        broken.is_empty(),
        "the target showed states the source never committed:\n{}",
        broken.join("\n")
    );
    assert!(truncates >= 10, "the writer only made {ops} changes");
    let src = digest(&source);
    wait_for(Duration::from_secs(30), "the target to catch up", || {
        digest(&target) == src
    });
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "log:\n{}", daemon.log());
    assert_eq!(contents(&source), contents(&target));
}

/// A round must never hold one table's lock while it waits for another's: an application that
/// truncates the same tables in another order (`TRUNCATE c, a`, or a `TRUNCATE … CASCADE`
/// reaching them in another order) would close a cycle, and PostgreSQL would abort one of the
/// two transactions — possibly the application's. Rounds lock `NOWAIT` and start over later.
#[test]
fn an_application_truncating_tables_in_another_order_than_a_round_locks_them_is_not_aborted() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cdead_src");
    let target = cluster.create_database("cdead_dst");
    on_both(
        &source,
        &target,
        "CREATE TABLE a_first (id int PRIMARY KEY);
         CREATE TABLE b_gate (id int PRIMARY KEY);
         CREATE TABLE c_last (id int PRIMARY KEY);",
    );
    // One at a time, so that the table ids (the rounds' lock order) are a_first < b_gate < c_last.
    for table in ["public.a_first", "public.b_gate", "public.c_last"] {
        pgferry(&["install", "--source", &source.dsn(), "--table", table]).expect(0);
    }
    sync(&source, &target);
    source.psql("INSERT INTO a_first VALUES (1); INSERT INTO b_gate VALUES (1); INSERT INTO c_last VALUES (1);");

    // Some session holds b_gate (ALTER TABLE, VACUUM FULL, a queued TRUNCATE…): rounds cannot
    // lock it and start over, again and again, holding nothing while they wait.
    let holder = Conn::open(&source.dsn());
    holder.batch("BEGIN; LOCK TABLE b_gate IN ACCESS EXCLUSIVE MODE");
    let round = spawn_sync(&source, &target, Copying::Plain);
    let poll = Conn::open(&source.dsn());
    wait_for(
        Duration::from_secs(20),
        "the sync to start its rounds",
        || {
            poll.text(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name = 'pgferry sync'",
            source.name()
        )) != "0"
        },
    );
    // The application truncates c_last and a_first, in that order, meanwhile: it may wait a
    // moment for a round's lock, never forever and never into a deadlock.
    let app = Conn::open(&source.dsn()).try_batch("BEGIN; TRUNCATE c_last, a_first; COMMIT");
    assert!(
        app.is_ok(),
        "the application's TRUNCATE failed because a round was running: {:?}",
        app.unwrap_err()
    );
    // b_gate is free: the next attempt of the round goes through.
    holder.batch("ROLLBACK");
    let run = finish(round, Duration::from_secs(60));
    assert_eq!(run.code, 0, "{}", run.stderr);
    sync(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

/// With prefetch, a round reads a large table's rows through a second source session (`sync
/// reader`) that imports the round's snapshot but not its locks: it asks for its own ACCESS
/// SHARE lock when its COPY starts. A TRUNCATE that queued in between, behind the round's own
/// lock, is granted first, so the reader waits for the TRUNCATE, the TRUNCATE for the round's
/// transaction, and the round for its reader. PostgreSQL cannot see the cycle (it passes through
/// the pgferry process), so nothing breaks it; meanwhile every other session that touches the
/// table queues behind the TRUNCATE.
#[test]
fn a_truncate_queued_behind_a_prefetching_round_does_not_hang_it() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cpfhang_src");
    let target = cluster.create_database("cpfhang_dst");
    on_both(
        &source,
        &target,
        "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL)",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    sync(&source, &target);
    source.psql("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g");

    // The test holds the target's progress row, so that the round stops after it locked t and
    // shared its snapshot with its reader.
    let gate = Conn::open(&target.dsn());
    gate.batch("BEGIN; SELECT 1 FROM pgferry.applied FOR UPDATE");
    let round = spawn_sync(&source, &target, Copying::Prefetch);
    let watch = Conn::open(&target.dsn());
    wait_for(
        Duration::from_secs(20),
        "the round to wait for the progress row",
        || {
            watch.text(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'
                    AND query ILIKE '%pgferry.applied%FOR UPDATE%'",
                target.name()
            )) == "1"
        },
    );
    // The round locks t on the source while its target waits (the two start side by side):
    // the TRUNCATE must come after that lock, or it wins and the round starts over.
    let poll = Conn::open(&source.dsn());
    wait_for(
        Duration::from_secs(20),
        "the round to lock t on the source",
        || {
            poll.text(
                "SELECT count(*) FROM pg_locks l
                  WHERE l.relation = 't'::regclass AND l.mode = 'AccessShareLock' AND l.granted
                    AND l.pid <> pg_backend_pid()",
            ) != "0"
        },
    );
    // The application truncates t: it queues behind the round's ACCESS SHARE lock.
    let app = {
        let dsn = source.dsn();
        thread::spawn(move || {
            let c = Conn::open(&dsn);
            let started = Instant::now();
            let result = c.try_batch("TRUNCATE t").map_err(|e| format!("{e:?}"));
            (result, started.elapsed())
        })
    };
    let locks = format!(
        "SELECT coalesce(string_agg(coalesce(nullif(application_name, ''), 'application') || ' waits for '
                                    || wait_event || ': ' || left(query, 60), E'\\n' ORDER BY pid), '')
           FROM pg_stat_activity WHERE datname = '{}' AND wait_event_type = 'Lock'",
        source.name()
    );
    wait_for(
        Duration::from_secs(20),
        "the TRUNCATE to queue behind the round",
        || poll.text(&locks).contains("TRUNCATE t"),
    );
    gate.batch("ROLLBACK");
    let outcome = finish_within(round, Duration::from_secs(10), || poll.text(&locks));
    // Killing a hung sync releases the TRUNCATE.
    let (app_result, app_waited) = app.join().expect("application thread");
    match outcome {
        Ok(run) => assert_eq!(run.code, 0, "{}", run.stderr),
        Err(hung) => panic!(
            "the sync hung (killed after 10 s; the application's TRUNCATE waited {app_waited:?}); lock waits on the source:\n{}",
            hung.stdout
        ),
    }
    assert!(app_result.is_ok(), "{app_result:?}");
    sync(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

// ---------------------------------------------------------------------------------------------
// 2. Two appliers on one target
// ---------------------------------------------------------------------------------------------

/// Checks the outcomes of two syncs that ran at the same time; returns how many applied.
#[track_caller]
fn judge_pair(runs: [&Run; 2]) -> usize {
    for r in runs {
        assert!(
            r.code == 0 || (r.code == EXIT_FAILURE && r.stderr.contains(ANOTHER_APPLIER)),
            "a sync racing another failed otherwise: exit {}\nstderr:\n{}",
            r.code,
            r.stderr
        );
        if r.code != 0 {
            assert!(r.stderr.contains("rolled back"), "{}", r.stderr);
        }
    }
    let applied = runs.iter().filter(|r| r.code == 0).count();
    assert!(
        applied >= 1,
        "both syncs lost the race: one of them must have applied"
    );
    applied
}

#[test]
fn two_appliers_on_one_target_apply_once_and_the_loser_says_so() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("ctwo_src");
    let target = cluster.create_database("ctwo_dst");
    on_both(
        &source,
        &target,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    sync(&source, &target);
    source.psql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 200000) g");

    // A forced race: the test holds the target's progress row while both syncs start, so that
    // both are inside a round (snapshot taken, target transaction open) when it lets go.
    let rounds_before: i64 = target
        .scalar("SELECT rounds FROM pgferry.applied")
        .parse()
        .unwrap();
    let gate = Conn::open(&target.dsn());
    gate.batch("BEGIN; SELECT 1 FROM pgferry.applied FOR UPDATE");
    let a = spawn_sync(&source, &target, Copying::Plain);
    let b = spawn_sync(&source, &target, Copying::Prefetch);
    let watch = Conn::open(&target.dsn());
    let waiting = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE 'pgferry%'
            AND wait_event_type = 'Lock' AND query ILIKE '%pgferry.applied%FOR UPDATE%'",
        target.name()
    );
    wait_for(
        Duration::from_secs(30),
        "both syncs to wait for the progress row",
        || watch.text(&waiting) == "2",
    );
    gate.batch("ROLLBACK");
    let (ra, rb) = (
        finish(a, Duration::from_secs(60)),
        finish(b, Duration::from_secs(60)),
    );
    assert_eq!(
        judge_pair([&ra, &rb]),
        1,
        "both applied the same round:\n{}\n{}",
        ra.stdout,
        rb.stdout
    );
    let loser = if ra.code == 0 { &rb } else { &ra };
    assert_eq!(loser.code, EXIT_FAILURE, "{}", loser.stderr);
    eprintln!("forced race, the loser said: {}", loser.stderr.trim());
    assert_eq!(digest(&source), digest(&target));
    let rounds_after: i64 = target
        .scalar("SELECT rounds FROM pgferry.applied")
        .parse()
        .unwrap();
    assert_eq!(
        rounds_after,
        rounds_before + 1,
        "exactly one round committed"
    );
    assert_eq!(
        acked(&source),
        target.scalar("SELECT snapshot FROM pgferry.applied"),
        "the source's registry records what the target holds"
    );
    let again = sync(&source, &target);
    assert_eq!(again["rows"], 0, "{again}");

    // Free races, with different kinds of change: whoever wins, the target ends equal.
    let changes = [
        "UPDATE t SET v = upper(v) WHERE id % 2 = 0",
        "DELETE FROM t WHERE id % 3 = 0; INSERT INTO t SELECT g, 'new' FROM generate_series(200001, 260000) g",
        "UPDATE t SET id = -id WHERE id % 5 = 0",
    ];
    let mut lost = 0;
    for (i, change) in changes.into_iter().enumerate() {
        source.psql(change);
        let (a, b) = (
            spawn_sync(&source, &target, Copying::alternate(i)),
            spawn_sync(&source, &target, Copying::alternate(i + 1)),
        );
        let (ra, rb) = (
            finish(a, Duration::from_secs(60)),
            finish(b, Duration::from_secs(60)),
        );
        lost += 2 - judge_pair([&ra, &rb]);
        assert_eq!(digest(&source), digest(&target), "after {change}");
    }
    eprintln!(
        "free races: {lost} of {} syncs lost to the other",
        2 * changes.len()
    );
    sync(&source, &target);
    assert_eq!(digest(&source), digest(&target));
}

/// Two syncs that register the same new target at the same time: the second looks the target up
/// on the source by node id (not there yet), the first then inserts its registry row, and the
/// second, finding the name taken, takes it for another node's and inserts a second row,
/// `name (node_id)`, for the same node. From then on `status` lists the target twice, each sync
/// finds and acknowledges one of the two rows, and purge follows the other, older
/// acknowledgement: capture rows the target has applied are kept. The race is not forced: the
/// test tries fresh sources and targets until it shows (in about one attempt in seven on 2
/// cores), and passes if it never does.
#[test]
fn two_syncs_registering_one_new_target_create_one_registry_entry() {
    let cluster = Cluster::shared();
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)";
    for attempt in 0..40 {
        let source = cluster.create_database("creg_src");
        source.psql(ddl);
        pgferry(&["install", "--source", &source.dsn()]).expect(0);
        source.psql("INSERT INTO t VALUES (1, 'a')");
        let target = cluster.create_database("creg_dst");
        target.psql(ddl);
        let (a, b) = (
            spawn_sync(&source, &target, Copying::Plain),
            spawn_sync(&source, &target, Copying::Plain),
        );
        let (ra, rb) = (
            finish(a, Duration::from_secs(60)),
            finish(b, Duration::from_secs(60)),
        );
        judge_pair([&ra, &rb]);
        let entries = source.scalar("SELECT count(*) FROM pgferry.target");
        if entries != "1" {
            let listing = source.psql(
                "SELECT name || ': node ' || coalesce(node_id, '-') || ', acknowledged ' || coalesce(acked_snapshot::text, '-')
                   FROM pgferry.target ORDER BY name",
            );
            let status = pgferry(&["status", "--source", &source.dsn()])
                .expect(0)
                .stdout;
            source.psql("UPDATE t SET v = 'b'");
            sync(&source, &target);
            let kept = source.scalar("SELECT count(*) FROM pgferry.delta");
            panic!(
                "attempt {attempt}: two syncs registering one target left {entries} registry rows for it:\n{listing}\n\
                 status:\n{status}\n\
                 after one more change and sync, {kept} capture row(s) the target has applied are still kept (expected 0)"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A connection killed mid-round, then a rerun
// ---------------------------------------------------------------------------------------------

#[test]
fn a_session_killed_mid_round_leaves_the_target_untouched_and_a_rerun_finishes() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("ckill_src");
    let target = cluster.create_database("ckill_dst");
    on_both(
        &source,
        &target,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL)",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO t VALUES (0, 'first')");
    sync(&source, &target);
    const ROWS: i64 = 400_000;
    source.psql(&format!(
        "INSERT INTO t SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, {ROWS}) g;
         UPDATE t SET v = 'changed' WHERE id = 0;"
    ));
    let before = digest(&target);
    let held = progress(&target);
    let acked_before = acked(&source);
    let capture_rows = source.scalar("SELECT count(*) FROM pgferry.delta");

    let poll = Conn::open(&source.dsn());
    // Mid-round: the target session holds the progress row (it has an xid) and is deleting or
    // copying rows.
    let mid_round = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE 'pgferry%'
            AND backend_xid IS NOT NULL AND state = 'active' AND query ~* '^\\s*(COPY|DELETE)'",
        target.name()
    );
    let source_copying = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE 'pgferry%'
            AND state = 'active' AND query ~* '^\\s*COPY'",
        source.name()
    );
    for (victims, copying) in [
        (vec![target.name()], Copying::Plain),
        (vec![source.name()], Copying::Plain),
        (vec![source.name(), target.name()], Copying::Plain),
        (vec![target.name()], Copying::Prefetch),
        (vec![source.name()], Copying::Prefetch),
    ] {
        let mut child = spawn_sync(&source, &target, copying);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = poll.text(&mid_round) != "0"
                && (victims.contains(&target.name()) || poll.text(&source_copying) != "0");
            if ready {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                let run = finish(child, Duration::from_secs(1));
                panic!("the sync ended ({status}) before it could be killed mid-round:\n{run:?}");
            }
            assert!(Instant::now() < deadline, "the round never got going");
            thread::sleep(Duration::from_millis(2));
        }
        let killed = poll.text(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE application_name LIKE 'pgferry%' AND datname IN ('{}')",
            victims.join("', '")
        ));
        let run = finish(child, Duration::from_secs(60));
        eprintln!(
            "killed {killed} pgferry session(s) on {victims:?} ({copying:?}): exit {}\n{}",
            run.code,
            run.stderr.trim()
        );
        assert!(
            run.code == EXIT_CONNECTION || run.code == EXIT_FAILURE,
            "a sync whose session was killed must fail (exit 3 or 5): {run:?}"
        );
        assert_eq!(held, progress(&target), "a killed round moved the progress");
        assert_eq!(before, digest(&target), "a killed round left a trace");
        assert_eq!(
            acked_before,
            acked(&source),
            "a killed round was acknowledged"
        );
        assert_eq!(
            capture_rows,
            source.scalar("SELECT count(*) FROM pgferry.delta"),
            "capture rows were purged although the round failed"
        );
        // The dead process's sessions are gone, and hold nothing the next run would wait for.
        wait_for(
            Duration::from_secs(10),
            "the killed sync's sessions to go away",
            || {
                poll.text(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgferry%'
                      AND datname IN ('{}', '{}')",
                    source.name(),
                    target.name()
                )) == "0"
            },
        );
    }
    let report = sync(&source, &target);
    assert_eq!(report["rows"], ROWS + 1, "{report}");
    assert_eq!(digest(&source), digest(&target));
}

// ---------------------------------------------------------------------------------------------
// 4. Cross-table invariants never broken on the target
// ---------------------------------------------------------------------------------------------

const ACCOUNTS: i64 = 50;
const OPENING_BALANCE: i64 = 1000;

/// One transfer between two accounts, with its log row; rows are locked in id order so that
/// concurrent writers never deadlock.
fn transfer_sql(from: i64, to: i64, amount: i64) -> String {
    let (first, second) = if from < to { (from, to) } else { (to, from) };
    let change = |id: i64| {
        if id == from {
            format!(
                "UPDATE accounts SET balance = balance - {amount}, sent = sent + 1 WHERE id = {id};"
            )
        } else {
            format!("UPDATE accounts SET balance = balance + {amount} WHERE id = {id};")
        }
    };
    format!(
        "BEGIN; {} INSERT INTO transfers (from_id, to_id, amount) VALUES ({from}, {to}, {amount}); {} COMMIT;",
        change(first),
        change(second)
    )
}

/// Undoes the oldest transfer: its log row is deleted and both balances restored.
const REVERSAL: &str = "WITH d AS (DELETE FROM transfers WHERE id = (SELECT min(id) FROM transfers) RETURNING from_id, to_id, amount)
    UPDATE accounts a SET balance = a.balance + CASE WHEN a.id = d.from_id THEN d.amount ELSE -d.amount END,
                          sent = a.sent - CASE WHEN a.id = d.from_id THEN 1 ELSE 0 END
      FROM d WHERE a.id IN (d.from_id, d.to_id)";

#[test]
fn a_reader_of_the_target_never_sees_a_state_the_source_was_not_in() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cinv_src");
    let target = cluster.create_database("cinv_dst");
    on_both(
        &source,
        &target,
        &format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL, sent int NOT NULL DEFAULT 0);
             CREATE TABLE transfers (id bigserial PRIMARY KEY, from_id int NOT NULL REFERENCES accounts,
                                     to_id int NOT NULL REFERENCES accounts, amount bigint NOT NULL);
             INSERT INTO accounts SELECT g, {OPENING_BALANCE}, 0 FROM generate_series(1, {ACCOUNTS}) g;"
        ),
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);

    let stop = Arc::new(AtomicBool::new(false));
    // Two writers, so that transactions commit in a different order than they start.
    let writers: Vec<_> = (0..2i64)
        .map(|w| {
            let (dsn, stop) = (source.dsn(), stop.clone());
            thread::spawn(move || {
                let c = Conn::open(&dsn);
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut i = 0i64;
                let mut done = 0;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let from = 1 + (i * 7 + w * 13) % ACCOUNTS;
                    let to = 1 + (from + 1 + (i + w) % (ACCOUNTS - 1)) % ACCOUNTS;
                    let to = if to == from { 1 + to % ACCOUNTS } else { to };
                    let sql = if i % 10 == 9 {
                        REVERSAL.to_owned()
                    } else {
                        transfer_sql(from, to, 1 + i % 97)
                    };
                    match c.try_batch(&sql) {
                        Ok(()) => done += 1,
                        // Two reversals may lock the same two accounts in opposite orders.
                        Err(e) if is_sqlstate(&e, &["40P01"]) => {
                            let _ = c.try_batch("ROLLBACK");
                        }
                        Err(e) => panic!("{sql}\nfailed: {e:?}"),
                    }
                    i += 1;
                }
                done
            })
        })
        .collect();

    let reader = {
        let (dsn, stop) = (target.dsn(), stop.clone());
        thread::spawn(move || {
            let c = Conn::open(&dsn);
            // One statement: one snapshot of both tables.
            let sample = format!(
                "SELECT (SELECT count(*) FROM accounts),
                        (SELECT coalesce(sum(balance), 0) FROM accounts),
                        (SELECT count(*) FROM transfers),
                        (SELECT coalesce(sum(sent), 0) FROM accounts),
                        (SELECT count(*) FROM accounts a
                           LEFT JOIN (SELECT from_id AS id, sum(amount) AS s, count(*) AS c FROM transfers GROUP BY 1) o USING (id)
                           LEFT JOIN (SELECT to_id AS id, sum(amount) AS s FROM transfers GROUP BY 1) i USING (id)
                          WHERE a.balance <> {OPENING_BALANCE} - coalesce(o.s, 0) + coalesce(i.s, 0)
                             OR a.sent <> coalesce(o.c, 0))"
            );
            let expected_total = (ACCOUNTS * OPENING_BALANCE).to_string();
            let mut samples = 0u64;
            let mut states = std::collections::BTreeSet::new();
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let row: Vec<String> = c
                    .row(&sample)
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect();
                let ok = row[0] == ACCOUNTS.to_string()
                    && row[1] == expected_total
                    && row[2] == row[3]
                    && row[4] == "0";
                if !ok && bad.len() < 10 {
                    bad.push(format!(
                        "accounts {}, total balance {}, transfers {}, sum(sent) {}, accounts off their log {}",
                        row[0], row[1], row[2], row[3], row[4]
                    ));
                }
                states.insert(row[2].clone());
                samples += 1;
            }
            (samples, states.len(), bad)
        })
    };

    let mut syncs = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        sync_with(&source, &target, Copying::alternate(syncs));
        syncs += 1;
    }
    let done: i64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    stop.store(true, Ordering::Relaxed);
    let (samples, states, bad) = reader.join().expect("reader");
    eprintln!("{done} transfers, {syncs} syncs; the reader took {samples} samples and saw {states} states");
    assert!(
        bad.is_empty(),
        "the target showed states the source was never in:\n{}",
        bad.join("\n")
    );
    assert!(done > 20, "only {done} transfers");
    assert!(samples >= 20, "only {samples} samples");
    assert!(
        states >= 2,
        "the reader saw only {states} state(s) in {samples} samples over {syncs} syncs"
    );
    sync(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

// ---------------------------------------------------------------------------------------------
// 5. Transactions open across several rounds
// ---------------------------------------------------------------------------------------------

#[test]
fn transactions_open_across_rounds_arrive_with_the_round_after_their_commit() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("copen_src");
    let target = cluster.create_database("copen_dst");
    on_both(
        &source,
        &target,
        "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
         CREATE TABLE u (id int PRIMARY KEY, v text NOT NULL);",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO t VALUES (1, 'committed early'), (2, 'committed early')");
    sync(&source, &target);

    // After every sync the target equals what the source has committed: the open
    // transactions' rows are neither applied early nor skipped later.
    let rounds = std::cell::Cell::new(0);
    let step = |label: &str| {
        rounds.set(rounds.get() + 1);
        let report = sync_with(&source, &target, Copying::alternate(rounds.get()));
        assert_eq!(contents(&source), contents(&target), "after {label}");
        report
    };

    // A starts first and writes at once (its xid is the oldest running one for a while).
    let a = Conn::open(&source.dsn());
    a.batch("BEGIN; INSERT INTO t VALUES (100, 'A first')");
    source.psql("INSERT INTO t VALUES (3, 'short 1')");
    // B starts later.
    let b = Conn::open(&source.dsn());
    b.batch("BEGIN; INSERT INTO u VALUES (200, 'B first')");
    step("round 1: A and B open");

    source
        .psql("INSERT INTO t VALUES (4, 'short 2'); UPDATE t SET v = 'short update' WHERE id = 2;");
    // A keeps writing: a row committed long ago, a subtransaction, a rolled-back one.
    a.batch(
        "UPDATE t SET v = 'A changed it' WHERE id = 1;
         SAVEPOINT s1; INSERT INTO u VALUES (101, 'A in a savepoint'); RELEASE SAVEPOINT s1;
         SAVEPOINT s2; INSERT INTO u VALUES (102, 'A rolled back'); ROLLBACK TO SAVEPOINT s2;",
    );
    step("round 2: A and B open");

    b.batch("INSERT INTO t VALUES (201, 'B second'); DELETE FROM t WHERE id = 3;");
    source.psql("INSERT INTO u VALUES (5, 'short 3')");
    // C starts after several rounds, reads first and writes late.
    let c = Conn::open(&source.dsn());
    c.batch("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM t");
    step("round 3: A, B and C open");

    // B (started after A) commits first.
    b.batch("COMMIT");
    source.psql("INSERT INTO t VALUES (6, 'short 4')");
    let report = step("round 4: B committed");
    assert_eq!(
        target.scalar("SELECT string_agg(id::text, ',' ORDER BY id) FROM t WHERE id >= 100"),
        "201"
    );
    // B's two rows and short 4's (B's delete copies nothing).
    assert_eq!(report["rows"], 3, "{report}");

    c.batch("INSERT INTO u VALUES (300, 'C late write')");
    step("round 5: A and C open");

    // A, the oldest, commits last but one.
    a.batch("COMMIT");
    let report = step("round 6: A committed");
    // A's rows: 100, u 101, and its update of 1 (102 was rolled back).
    assert_eq!(report["rows"], 3, "{report}");
    assert_eq!(
        target.scalar("SELECT v FROM t WHERE id = 1"),
        "A changed it"
    );
    assert_eq!(target.scalar("SELECT count(*) FROM u WHERE id = 102"), "0");

    c.batch("COMMIT");
    let report = step("round 7: C committed");
    assert_eq!(report["rows"], 1, "{report}");
    let report = step("round 8: nothing new");
    assert_eq!(report["rows"], 0, "{report}");
}
