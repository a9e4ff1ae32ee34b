//! End-to-end tests of `pgferry copy`: hostile identifiers and partitioned tables copied and
//! verified equal, the copy's snapshot skipping exactly what it holds under concurrent writes,
//! refusals that change nothing (non-empty tables, missing columns), the dry run, jobs sharing
//! a table cut into ranges, an interrupted copy resumed, and tables captured after a target
//! registered copied into a replicating target, also while the daemon runs and writes go on.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{
    catalog_listing, contents, copy_schema, digest, load_hostile, pgferry, sync_json, sync_run,
    verify_run, wait_for, Conn, Daemon, Run,
};
use pgferry_testkit::{Cluster, PgBin, TestDb};

/// `pgferry copy --source SOURCE --target TARGET` followed by `extra`.
fn copy_run(source: &TestDb<'_>, target: &TestDb<'_>, extra: &[&str]) -> Run {
    let (s, t) = (source.dsn(), target.dsn());
    let mut args = vec!["copy", "--source", &s, "--target", &t];
    args.extend_from_slice(extra);
    pgferry(&args)
}

fn install(source: &TestDb<'_>) {
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
}

/// A partitioned table with a hostile name, a sub-partitioned partition and a default one.
const PARTITIONED: &str = r#"
    CREATE TABLE "Events ""p""" (id int NOT NULL, region text NOT NULL, "v a l" text, PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE "Events eu" PARTITION OF "Events ""p""" FOR VALUES IN ('eu') PARTITION BY RANGE (id);
    CREATE TABLE "Events eu low" PARTITION OF "Events eu" FOR VALUES FROM (MINVALUE) TO (500);
    CREATE TABLE "Events eu high" PARTITION OF "Events eu" FOR VALUES FROM (500) TO (MAXVALUE);
    CREATE TABLE "Events other" PARTITION OF "Events ""p""" DEFAULT;
    INSERT INTO "Events ""p""" SELECT g, (ARRAY['eu', 'us', 'Ärger'])[1 + g % 3], 'v' || g FROM generate_series(1, 1500) g;"#;

/// Rows in every table of the hostile fixture.
const HOSTILE_ROWS: &str = r#"
    INSERT INTO "Sch""ema. *x"."Order Lines" SELECT g, g % 3, 'k' || g, '$body$' || g FROM generate_series(1, 300) g;
    INSERT INTO public."user" SELECT md5(g::text)::uuid, 'from ' || g, NULL FROM generate_series(1, 200) g;
    INSERT INTO public."éééééééééééééééééééééééééééééééz" (v) SELECT 'v' || g FROM generate_series(1, 250) g;
    INSERT INTO public."MixedCase" ("Value") SELECT 'x' || g FROM generate_series(1, 120) g;
    INSERT INTO public."t*" SELECT g, '2026-01-01'::timestamptz + g * interval '1 hour', decode(lpad(to_hex(g), 4, '0'), 'hex')
      FROM generate_series(1, 100) g;
    INSERT INTO public."dated key" SELECT '2026-01-01'::date + g, '\x00ff', 'note ' || g FROM generate_series(1, 80) g;"#;

#[test]
fn hostile_and_partitioned_tables_copy_equal_and_the_next_sync_applies_nothing() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_hostile_src");
    let target = cluster.create_database("cp_hostile_dst");
    load_hostile(&source);
    source.psql(PARTITIONED);
    install(&source);
    copy_schema(&source, &target);
    // Captured changes committed before the copy: the copy holds them, the next sync must not
    // need them (they are purged once the copy is acknowledged).
    source.psql(HOSTILE_ROWS);
    source.psql(r#"UPDATE "Events ""p""" SET "v a l" = 'changed' WHERE id % 10 = 0"#);

    let report = copy_run(&source, &target, &["--json"]).expect(0).json();
    let snapshot = report["snapshot"].as_str().expect("a snapshot").to_owned();
    assert_eq!(report["dry_run"], false, "{report}");
    assert_eq!(report["rows"], 2550, "{report}");
    assert!(report["bytes"].as_u64().unwrap() > 0, "{report}");
    assert!(report["seconds"].as_f64().is_some(), "{report}");
    assert_eq!(report["applied_snapshot"], snapshot.as_str(), "{report}");
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 7, "{report}");
    let events = tables
        .iter()
        .find(|t| t["table"] == r#"public."Events ""p""""#)
        .unwrap_or_else(|| panic!("no partitioned table in {report}"));
    // The leaves, each read once: eu low, eu high, other.
    assert_eq!(events["relations"], 3, "{report}");
    assert_eq!(events["rows"], 1500, "{report}");
    for t in tables {
        for key in ["table", "action", "rows", "bytes", "seconds", "snapshot"] {
            assert!(t.get(key).is_some(), "{key} missing in {t}");
        }
        assert_eq!(t["action"], "copy", "{t}");
    }
    assert_eq!(contents(&source), contents(&target));
    let verified = verify_run(&source, &target).expect(0).json();
    assert_eq!(verified["equal"], true, "{verified}");
    // The copy's snapshot is the target's progress, acknowledged to the source.
    assert_eq!(
        target.scalar("SELECT snapshot FROM pgferry.applied"),
        snapshot
    );
    assert_eq!(
        source.scalar("SELECT acked_snapshot::text FROM pgferry.target"),
        snapshot
    );
    // Sequences were set: the next generated keys agree.
    for seq in [
        r#"SELECT nextval(pg_get_serial_sequence('public."MixedCase"', 'ID'))"#,
        r#"SELECT nextval(pg_get_serial_sequence('public."éééééééééééééééééééééééééééééééz"', 'éééééééééééééééééééééééééééééééz'))"#,
    ] {
        assert_eq!(source.scalar(seq), target.scalar(seq), "{seq}");
    }
    // Everything captured before the snapshot is in the copy: nothing to apply, all purged.
    let sync = sync_json(&source, &target);
    assert_eq!(sync["rows"], 0, "{sync}");
    assert_eq!(source.scalar("SELECT count(*) FROM pgferry.delta"), "0");
    // Later changes flow as usual.
    source.psql(r#"UPDATE "Events ""p""" SET region = 'eu' WHERE id = 2; DELETE FROM public."t*" WHERE id < 5"#);
    sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn a_copy_under_concurrent_writes_then_a_sync_converges() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_live_src");
    let target = cluster.create_database("cp_live_dst");
    source.psql(
        "CREATE TABLE account (id int PRIMARY KEY, balance bigint NOT NULL, note text);
         CREATE TABLE transfer (id bigserial PRIMARY KEY, src int, dst int, amount bigint);
         INSERT INTO account SELECT g, 1000, repeat('n', 50) FROM generate_series(1, 40000) g;",
    );
    install(&source);
    copy_schema(&source, &target);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dsn, stop) = (source.dsn(), stop.clone());
        thread::spawn(move || {
            let c = Conn::open(&dsn);
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                n += 1;
                let (a, b) = (1 + (n * 7919) % 40000, 1 + (n * 104729) % 40000);
                c.batch(&format!(
                    "BEGIN;
                     UPDATE account SET balance = balance - 5 WHERE id = {a};
                     UPDATE account SET balance = balance + 5 WHERE id = {b};
                     INSERT INTO transfer (src, dst, amount) VALUES ({a}, {b}, 5);
                     INSERT INTO account VALUES ({}, 0, 'new') ON CONFLICT (id) DO UPDATE SET note = 'again';
                     DELETE FROM account WHERE id = {};
                     COMMIT;",
                    40000 + n,
                    1 + (n * 31) % 40000
                ));
            }
            n
        })
    };
    // Let writes be under way before and during the copy.
    let probe = Conn::open(&source.dsn());
    wait_for(Duration::from_secs(20), "writes before the copy", || {
        probe
            .text("SELECT count(*) FROM transfer")
            .parse::<u64>()
            .unwrap_or(0)
            >= 50
    });
    let report = copy_run(
        &source,
        &target,
        &[
            "--jobs",
            "2",
            "--split-tables-larger-than",
            "256kB",
            "--json",
        ],
    )
    .expect(0)
    .json();
    // A few more writes after the copy, then stop.
    let copied_transfers = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == "public.transfer")
        .map(|t| t["rows"].as_u64().unwrap())
        .unwrap();
    wait_for(Duration::from_secs(20), "writes after the copy", || {
        probe
            .text("SELECT count(*) FROM transfer")
            .parse::<u64>()
            .unwrap_or(0)
            >= copied_transfers + 20
    });
    stop.store(true, Ordering::Relaxed);
    let transactions = writer.join().expect("writer");
    assert!(transactions > 70, "only {transactions} writer transactions");
    let sync = sync_json(&source, &target);
    assert!(sync["rows"].as_u64().unwrap() > 0, "{sync}");
    assert_eq!(digest(&source), digest(&target));
    let verified = verify_run(&source, &target).expect(0).json();
    assert_eq!(verified["equal"], true, "{verified}");
    // The sums agree: no transfer half-applied.
    assert_eq!(
        source.scalar("SELECT sum(balance) FROM account"),
        target.scalar("SELECT sum(balance) FROM account")
    );
}

#[test]
fn a_non_empty_target_table_is_refused_unless_truncate() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_full_src");
    let target = cluster.create_database("cp_full_dst");
    source.psql(
        "CREATE TABLE parent (id int PRIMARY KEY, v text);
         CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent);
         INSERT INTO parent SELECT g, 'p' || g FROM generate_series(1, 100) g;
         INSERT INTO child SELECT g, g FROM generate_series(1, 100) g;",
    );
    install(&source);
    copy_schema(&source, &target);
    target.psql(
        "INSERT INTO parent VALUES (1, 'stale'), (1000, 'extra'); INSERT INTO child VALUES (7, 1);",
    );
    let before = contents(&target);
    let refused = copy_run(&source, &target, &[]).expect(1);
    assert!(
        refused.stderr.contains("public.child")
            && refused.stderr.contains("public.parent")
            && refused.stderr.contains("--truncate"),
        "{}",
        refused.stderr
    );
    assert_eq!(contents(&target), before, "nothing changed");
    assert_eq!(
        target.scalar("SELECT to_regnamespace('pgferry') IS NULL"),
        "t",
        "not even registered"
    );
    assert_eq!(source.scalar("SELECT count(*) FROM pgferry.target"), "0");
    // Emptied first (parent is referenced: DELETE under the replica role), then copied.
    let report = copy_run(&source, &target, &["--truncate", "--json"])
        .expect(0)
        .json();
    assert_eq!(
        report["tables"][0]["action"], "truncate and copy",
        "{report}"
    );
    assert_eq!(contents(&source), contents(&target));
    // A source that cannot be reached: exit 3, and no password printed.
    let run = pgferry(&[
        "copy",
        "--source",
        "host=127.0.0.1 port=1 dbname=x password=s3cret connect_timeout=2",
        "--target",
        &target.dsn(),
    ]);
    assert_eq!(run.code, 3, "{run:?}");
    assert!(!run.stderr.contains("s3cret"), "{}", run.stderr);
}

#[test]
fn a_missing_column_is_refused_naming_the_table_and_column() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_col_src");
    let target = cluster.create_database("cp_col_dst");
    source.psql(
        r#"CREATE TABLE a (id int PRIMARY KEY, v text);
           CREATE TABLE "B b" (id int PRIMARY KEY, v text, "Wide col" int);
           INSERT INTO a VALUES (1, 'x'); INSERT INTO "B b" VALUES (1, 'y', 2);"#,
    );
    install(&source);
    target.psql(
        r#"CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE "B b" (id int PRIMARY KEY, v text);"#,
    );
    let before = catalog_listing(&target);
    let run = copy_run(&source, &target, &[]).expect(1);
    assert!(
        run.stderr
            .contains(r#"column "Wide col" of table public."B b" is missing"#),
        "{}",
        run.stderr
    );
    assert_eq!(catalog_listing(&target), before, "nothing changed");
    assert_eq!(target.scalar("SELECT count(*) FROM a"), "0");
    target.psql(r#"ALTER TABLE "B b" ADD COLUMN "Wide col" bigint"#);
    let typed = copy_run(&source, &target, &[]).expect(1);
    assert!(
        typed.stderr.contains("integer on the source but bigint"),
        "{}",
        typed.stderr
    );
    // A pattern that matches no captured table: refused.
    let none = copy_run(&source, &target, &["--table", "nothing.here"]).expect(1);
    assert!(none.stderr.contains("nothing.here"), "{}", none.stderr);
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_dry_src");
    let target = cluster.create_database("cp_dry_dst");
    source.psql(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         CREATE TABLE small (id int PRIMARY KEY);
         INSERT INTO big SELECT g, repeat('v', 100) FROM generate_series(1, 20000) g;
         INSERT INTO small VALUES (1); ANALYZE;",
    );
    install(&source);
    copy_schema(&source, &target);
    target.psql("INSERT INTO small VALUES (5)");
    let (src_before, dst_before) = (catalog_listing(&source), catalog_listing(&target));
    let registry = source.scalar("SELECT count(*) FROM pgferry.target");
    let plan = copy_run(
        &source,
        &target,
        &[
            "--dry-run",
            "--truncate",
            "--jobs",
            "3",
            "--split-tables-larger-than",
            "512kB",
        ],
    )
    .expect(0);
    assert!(
        plan.stdout.contains("public.big  copy: ~20000 rows"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("public.small  truncate and copy"),
        "{}",
        plan.stdout
    );
    assert!(
        plan.stdout.contains("nothing was changed"),
        "{}",
        plan.stdout
    );
    let json = copy_run(&source, &target, &["--dry-run", "--truncate", "--json"])
        .expect(0)
        .json();
    assert_eq!(json["dry_run"], true, "{json}");
    assert!(json["snapshot"].is_null(), "{json}");
    assert_eq!(catalog_listing(&source), src_before);
    assert_eq!(catalog_listing(&target), dst_before);
    assert_eq!(
        source.scalar("SELECT count(*) FROM pgferry.target"),
        registry
    );
    assert_eq!(
        target.scalar("SELECT string_agg(id::text, ',') FROM small"),
        "5"
    );
    assert_eq!(target.scalar("SELECT count(*) FROM big"), "0");
    // Without --truncate the dry run is refused like the copy.
    copy_run(&source, &target, &["--dry-run"]).expect(1);
}

#[test]
fn four_jobs_share_a_table_cut_into_ranges() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_jobs_src");
    let target = cluster.create_database("cp_jobs_dst");
    source.psql(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text, at timestamptz);
         INSERT INTO big SELECT g, md5(g::text) || repeat('x', 60), '2026-01-01'::timestamptz + g * interval '1 s'
           FROM generate_series(1, 60000) g;
         DELETE FROM big WHERE id % 7 = 0;",
    );
    install(&source);
    copy_schema(&source, &target);
    let report = copy_run(
        &source,
        &target,
        &["--jobs", "4", "--split-tables-larger-than", "1MB", "--json"],
    )
    .expect(0)
    .json();
    let big = &report["tables"][0];
    let pieces = big["pieces"].as_u64().unwrap();
    assert!(pieces >= 4, "{report}");
    assert_eq!(big["rows"], 60000 - 60000 / 7, "{report}");
    assert_eq!(report["jobs"], 4, "{report}");
    assert_eq!(digest(&source), digest(&target));
    verify_run(&source, &target).expect(0);
}

/// Starts `pgferry copy` in the background.
fn spawn_copy(source: &TestDb<'_>, target: &TestDb<'_>, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["copy", "--source", &source.dsn(), "--target", &target.dsn()])
        .args(extra)
        .env("PGFERRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgferry copy")
}

#[test]
fn an_interrupted_copy_is_refused_by_rounds_and_a_rerun_converges() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_kill_src");
    let target = cluster.create_database("cp_kill_dst");
    source.psql(
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         CREATE TABLE small (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat('b', 80) FROM generate_series(1, 30000) g;
         INSERT INTO small SELECT g, 's' FROM generate_series(1, 50) g;",
    );
    install(&source);
    copy_schema(&source, &target);
    // A trigger that fires even under the replica role stalls the copy on one row of big.
    target.psql(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS
           $$BEGIN IF NEW.id = 29000 THEN PERFORM pg_sleep(120); END IF; RETURN NULL; END$$;
         CREATE TRIGGER stall AFTER INSERT ON big FOR EACH ROW EXECUTE FUNCTION stall();
         ALTER TABLE big ENABLE ALWAYS TRIGGER stall;",
    );
    let mut child = spawn_copy(
        &source,
        &target,
        &["--jobs", "2", "--split-tables-larger-than", "256kB"],
    );
    let poll = Conn::open(&target.dsn());
    wait_for(Duration::from_secs(60), "the copy to stall on big", || {
        poll.text("SELECT to_regclass('pgferry.applied_table') IS NOT NULL") == "t"
            && poll.text(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep')
                  * (SELECT count(*) FROM pgferry.applied_table) > 0
                AND EXISTS (SELECT 1 FROM big)",
            ) == "t"
    });
    child.kill().expect("kill pgferry");
    let _ = child.wait();
    // Its sessions die with it (the one asleep in the trigger is ended here) — only this
    // test's: other tests' pgferry sessions share the cluster.
    poll.batch(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE application_name LIKE 'pgferry%' AND pid <> pg_backend_pid()
            AND datname IN ('{}', '{}')",
        source.name(),
        target.name()
    ));
    target.psql("DROP TRIGGER stall ON big");
    let partial: u64 = target.scalar("SELECT count(*) FROM big").parse().unwrap();
    assert!(partial > 0 && partial < 30000, "{partial}");
    assert_eq!(target.scalar("SELECT count(*) FROM small"), "50");
    // The source's registry does not list the copied tables: rounds refuse to run over them.
    source.psql("UPDATE small SET v = 'later' WHERE id <= 10; DELETE FROM big WHERE id <= 100");
    let sync = sync_run(&source, &target, &[]).expect(1);
    assert!(
        sync.stderr.contains("public.big") && sync.stderr.contains("pgferry copy"),
        "{}",
        sync.stderr
    );
    // A rerun keeps small (recorded as copied), and refuses big's partial rows.
    let rerun = copy_run(&source, &target, &[]).expect(1);
    assert!(
        rerun.stderr.contains("public.big") && !rerun.stderr.contains("public.small"),
        "{}",
        rerun.stderr
    );
    let report = copy_run(&source, &target, &["--truncate", "--json"])
        .expect(0)
        .json();
    let action = |name: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == name)
            .map(|t| t["action"].as_str().unwrap().to_owned())
            .unwrap()
    };
    assert_eq!(action("public.small"), "resumed", "{report}");
    assert_eq!(action("public.big"), "truncate and copy", "{report}");
    // small was copied before the changes to it: the target's progress is small's (older)
    // snapshot, and the next sync brings it forward.
    sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
    verify_run(&source, &target).expect(0);
}

#[test]
fn tables_captured_later_are_copied_into_a_replicating_target() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_later_src");
    let target = cluster.create_database("cp_later_dst");
    source.psql(
        "CREATE TABLE a (id int PRIMARY KEY, v int);
         CREATE TABLE b (id int PRIMARY KEY, v int);
         INSERT INTO b SELECT g, g FROM generate_series(1, 500) g;",
    );
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.a"]).expect(0);
    source.psql("INSERT INTO a SELECT g, g FROM generate_series(1, 100) g");
    sync_json(&source, &target);
    let progress = target.scalar("SELECT snapshot FROM pgferry.applied");
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.b"]).expect(0);
    source.psql("UPDATE a SET v = -v WHERE id <= 10; UPDATE b SET v = -v WHERE id <= 10;");
    sync_run(&source, &target, &[]).expect(1);
    let report = copy_run(&source, &target, &["--table", "public.b", "--json"])
        .expect(0)
        .json();
    assert_eq!(report["already_replicating"], true, "{report}");
    assert_eq!(report["tables"].as_array().unwrap().len(), 1, "{report}");
    // Its progress is untouched: a's pending changes still come with the next round.
    assert_eq!(
        target.scalar("SELECT snapshot FROM pgferry.applied"),
        progress
    );
    assert_eq!(report["applied_snapshot"], progress.as_str(), "{report}");
    source.psql("UPDATE b SET v = 0 WHERE id = 500");
    sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
    verify_run(&source, &target).expect(0);
}

#[test]
fn a_postgresql_10_source_copies_partition_by_partition_without_ranges() {
    let bin = PgBin::npm("10").unwrap_or_else(|e| panic!("PostgreSQL 10 from npm: {e}"));
    let old = Cluster::shared_for(&bin);
    let source = old.create_database("cp_v10_src");
    let target = Cluster::shared().create_database("cp_v10_dst");
    // On 10 a partitioned table has no key: each partition is captured as its own table.
    let ddl =
        "CREATE TABLE m (id int NOT NULL, region text NOT NULL, v text) PARTITION BY LIST (region);
               CREATE TABLE m_eu PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('eu');
               CREATE TABLE m_us PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('us');
               CREATE TABLE big (id int PRIMARY KEY, v text, f float8);";
    load_hostile(&source);
    load_hostile(&target);
    source.psql(ddl);
    target.psql(ddl);
    source.psql(HOSTILE_ROWS);
    source.psql(
        "INSERT INTO m SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' FROM generate_series(1, 400) g;
         INSERT INTO big SELECT g, repeat('x', 100), 1.0 / g FROM generate_series(1, 20000) g;",
    );
    install(&source);
    let report = copy_run(
        &source,
        &target,
        &[
            "--jobs",
            "2",
            "--split-tables-larger-than",
            "64kB",
            "--json",
        ],
    )
    .expect(0)
    .json();
    let tables = report["tables"].as_array().unwrap();
    let piece_count = |name: &str| {
        tables
            .iter()
            .find(|t| t["table"] == name)
            .map(|t| t["pieces"].as_u64().unwrap())
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    // No TID Range Scan before 14: a large table stays one piece; partitions are their own.
    assert_eq!(piece_count("public.big"), 1, "{report}");
    assert_eq!(piece_count("public.m_eu"), 1, "{report}");
    assert!(!tables.iter().any(|t| t["table"] == "public.m"), "{report}");
    assert_eq!(report["rows"], 21450, "{report}");
    source.psql("UPDATE m SET v = 'later' WHERE id < 10; DELETE FROM big WHERE id > 19990;");
    sync_json(&source, &target);
    verify_run(&source, &target).expect(0);
    // Floats crossed versions bit for bit (their text differs between 10 and 15).
    let bits = "SELECT md5(string_agg(float8send(f)::text, ',' ORDER BY id)) FROM big";
    assert_eq!(source.scalar(bits), target.scalar(bits));
}

#[test]
fn a_role_without_the_privileges_is_refused_with_exit_4() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_priv_src");
    let target = cluster.create_database("cp_priv_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    install(&source);
    copy_schema(&source, &target);
    target.psql(&format!(
        "CREATE ROLE reader LOGIN PASSWORD 'pw-reader';
         GRANT CREATE, TEMPORARY ON DATABASE {} TO reader; GRANT SELECT ON t TO reader;",
        target.name()
    ));
    let run = pgferry(&[
        "copy",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn_as("reader", "pw-reader"),
    ]);
    assert_eq!(run.code, 4, "{run:?}");
    assert!(
        run.stderr.contains("INSERT privilege on public.t"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("pw-reader"), "{}", run.stderr);
    // Granted INSERT, a role without the replica role copies tables without foreign keys.
    target.psql("GRANT INSERT ON t TO reader");
    pgferry(&[
        "copy",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn_as("reader", "pw-reader"),
    ])
    .expect(0);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn a_running_daemon_picks_up_a_table_copied_while_writes_go_on() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("cp_daemon_src");
    let target = cluster.create_database("cp_daemon_dst");
    source.psql(
        "CREATE TABLE a (id int PRIMARY KEY, v int);
         CREATE TABLE b (id int PRIMARY KEY, v int);
         INSERT INTO a SELECT g, g FROM generate_series(1, 2000) g;
         INSERT INTO b SELECT g, g FROM generate_series(1, 20000) g;",
    );
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.a"]).expect(0);
    copy_run(&source, &target, &[]).expect(0);
    let daemon = Daemon::following(&source.dsn(), &target.dsn());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dsn, stop) = (source.dsn(), stop.clone());
        thread::spawn(move || {
            let c = Conn::open(&dsn);
            let mut n = 0u64;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                n += 1;
                c.batch(&format!(
                    "UPDATE a SET v = v + 1 WHERE id = {}; UPDATE b SET v = v + 1 WHERE id = {};",
                    1 + n % 2000,
                    1 + n % 20000
                ));
            }
        })
    };
    let wait_equal = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(40);
        while digest(&source) != digest(&target) {
            assert!(
                Instant::now() < deadline,
                "the target did not converge ({what}); daemon log:\n{}",
                daemon.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    // b is captured while the daemon runs: it refuses the target until b is received.
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.b"]).expect(0);
    let probe = Conn::open(&target.dsn());
    wait_for(Duration::from_secs(20), "the daemon to refuse", || {
        daemon.log().contains("public.b")
    });
    let report = copy_run(&source, &target, &["--table", "public.b", "--json"])
        .expect(0)
        .json();
    assert_eq!(report["already_replicating"], true, "{report}");
    // The daemon takes the copied table over: its rounds bring b (and a) forward.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    wait_equal("after the copy");
    assert_eq!(probe.text("SELECT count(*) FROM b"), "20000");
    drop(daemon);
    verify_run(&source, &target).expect(0);
}
