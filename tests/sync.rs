//! End-to-end tests of `pgferry sync --once` against real clusters.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    contents, copy_schema, dump, load_hostile, pgferry, restore, sync_json, sync_run, wait_for,
};
use pgferry_testkit::{client_tool, Cluster, TestDb};

const APP: &str = "
    CREATE TABLE customers (id bigserial PRIMARY KEY, email text UNIQUE NOT NULL, name text);
    CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers ON UPDATE CASCADE ON DELETE CASCADE,
                         total numeric(12,2), at timestamptz DEFAULT now());
    CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
    CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
    INSERT INTO customers (email, name) SELECT 'c' || g || '@x', 'name ' || g FROM generate_series(1, 50) g;
    INSERT INTO orders (customer_id, total) SELECT 1 + g % 50, g FROM generate_series(1, 200) g;
    INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' FROM generate_series(1, 20) g;";

#[test]
fn catch_up_applies_every_kind_of_change_and_a_second_run_applies_nothing() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("sync_src");
    let target = cluster.create_database("sync_dst");
    load_hostile(&source);
    source.psql(APP);
    copy_schema(&source, &target);
    // The target starts from a copy of the source's data taken before capture: the catch-up
    // brings everything since.
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let before = Command::new(client_tool("pg_dump"))
        .args(["--data-only", "--exclude-schema=pgferry"])
        .arg(source.dsn())
        .output()
        .unwrap();
    target.psql(&format!(
        "SET session_replication_role = replica;\n{}",
        String::from_utf8(before.stdout).unwrap()
    ));
    source.psql(
        "INSERT INTO customers (email, name) VALUES ('new@x', 'new');
         UPDATE customers SET name = 'renamed' WHERE id <= 10;
         UPDATE customers SET id = 1000 WHERE id = 11;
         DELETE FROM customers WHERE id = 12;
         UPDATE orders SET total = total * 2 WHERE id % 3 = 0;
         UPDATE events SET region = 'eu' WHERE id = 1;
         TRUNCATE events_us;
         INSERT INTO events VALUES (99, 'us', 'after truncate');
         INSERT INTO \"Sch\"\"ema. *x\".\"Order Lines\" VALUES (1, 1, 'k', '$body$');
         INSERT INTO public.\"dated key\" VALUES ('2026-02-01', '\\x00ff', 'n');
         INSERT INTO public.\"t*\" VALUES (1, '2026-01-02 03:04:05+00', '\\x01');
         INSERT INTO public.\"MixedCase\" (\"Value\") VALUES ('a'), ('b');",
    );
    let report = sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
    assert_eq!(report["rounds"], 1, "{report}");
    // Sequences moved forward: the next customer gets the same id on both sides.
    assert_eq!(
        source.scalar("SELECT nextval('customers_id_seq')"),
        target.scalar("SELECT nextval('customers_id_seq')")
    );
    let again = sync_json(&source, &target);
    assert_eq!(again["rows"], 0, "{again}");
    assert_eq!(
        again["targets"][0]["tables"].as_array().unwrap().len(),
        0,
        "{again}"
    );
}

#[test]
fn a_transaction_that_commits_after_later_ones_is_not_lost() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("straddle_src");
    let target = cluster.create_database("straddle_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(&source.dsn(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("BEGIN; INSERT INTO t VALUES (1, 'early writer, late commit')")
            .await
            .unwrap();
        source.psql("INSERT INTO t VALUES (2, 'later writer, early commit')");
        sync_json(&source, &target);
        assert_eq!(
            target.scalar("SELECT string_agg(id::text, ',') FROM t"),
            "2"
        );
        client.batch_execute("COMMIT").await.unwrap();
    });
    let report = sync_json(&source, &target);
    assert_eq!(report["rows"], 1, "{report}");
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn a_restored_copy_converges_after_clean() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("restore_src");
    let target = cluster.create_database("restore_dst");
    source.psql(APP);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(
        "UPDATE customers SET name = 'before dump' WHERE id < 5; DELETE FROM orders WHERE id < 20;",
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    dump(&source, file.path());
    source.psql("UPDATE customers SET name = 'after dump' WHERE id < 3; INSERT INTO orders (customer_id, total) VALUES (1, 1);");
    restore(file.path(), &target);

    // Not cleaned yet: refused, nothing applied.
    let refused = sync_run(&source, &target, &[]).expect(1);
    assert!(
        refused.stderr.contains("pgferry clean"),
        "{}",
        refused.stderr
    );

    // The refused run's session ends after its process does; until then clean would rightly
    // count it as a sign of a live source.
    wait_for(
        Duration::from_secs(10),
        "the refused run's session to end",
        || {
            target.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                AND application_name LIKE 'pgferry%' AND pid <> pg_backend_pid()",
            ) == "0"
        },
    );
    pgferry(&["clean", "--db", &target.dsn(), "--watch", "0"]).expect(0);
    sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn swapped_unique_values_apply_without_a_violation() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("swap_src");
    let target = cluster.create_database("swap_dst");
    source.psql(
        "CREATE TABLE users (id int PRIMARY KEY, handle text NOT NULL UNIQUE);
                 INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c');",
    );
    copy_schema(&source, &target);
    target.psql("INSERT INTO users VALUES (1, 'a'), (2, 'b'), (3, 'c')");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(
        "BEGIN; UPDATE users SET handle = 'tmp' WHERE id = 1; UPDATE users SET handle = 'a' WHERE id = 2;
                UPDATE users SET handle = 'b' WHERE id = 1; COMMIT;
         BEGIN; UPDATE users SET handle = 'tmp' WHERE id = 2; UPDATE users SET handle = 'a' WHERE id = 3;
                UPDATE users SET handle = 'c' WHERE id = 2; COMMIT;",
    );
    sync_json(&source, &target);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn bad_targets_are_refused_with_the_table_and_column_named() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("bad_src");
    let target = cluster.create_database("bad_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v text, w int)");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO t VALUES (1, 'x', 1)");
    let missing = sync_run(&source, &target, &[]).expect(1);
    assert!(
        missing.stderr.contains("table public.t is missing"),
        "{}",
        missing.stderr
    );
    target.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let column = sync_run(&source, &target, &[]).expect(1);
    assert!(
        column.stderr.contains("column w of table public.t"),
        "{}",
        column.stderr
    );
    target.psql("ALTER TABLE t ADD COLUMN w bigint");
    let typed = sync_run(&source, &target, &[]).expect(1);
    assert!(
        typed.stderr.contains("integer on the source but bigint"),
        "{}",
        typed.stderr
    );
    assert_eq!(target.scalar("SELECT count(*) FROM t"), "0");
    let no_capture = cluster.create_database("bad_nocapture");
    let run = sync_run(&no_capture, &target, &[]).expect(1);
    assert!(run.stderr.contains("pgferry install"), "{}", run.stderr);
}

#[test]
fn applied_changes_are_purged_only_below_every_registered_target() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("purge_src");
    let a = cluster.create_database("purge_a");
    let b = cluster.create_database("purge_b");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v int)");
    copy_schema(&source, &a);
    copy_schema(&source, &b);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    // Reserve b before anything is purged; a registers on its first sync.
    pgferry(&[
        "target",
        "add",
        "--source",
        &source.dsn(),
        "--target",
        &b.dsn(),
    ])
    .expect(0);
    source.psql("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g");
    let first = sync_json(&source, &a);
    assert_eq!(first["purged"], 0, "b has acknowledged nothing: {first}");
    assert_eq!(source.scalar("SELECT count(*) FROM pgferry.delta"), "100");
    // Two targets in one run: each applies, then everything both have is purged. (A purge can
    // lag one round: a transaction in flight when a round takes its snapshot — pgferry's own
    // ticker, say — holds that snapshot's xmin back. `settle` re-runs until it has caught up.)
    settle(&source, &[&a, &b], 0);
    assert_eq!(contents(&source), contents(&b));
    source.psql("UPDATE t SET v = v + 1 WHERE id <= 10");
    settle(&source, &[&a], 10);
    assert_eq!(
        source.scalar("SELECT count(*) FROM pgferry.delta"),
        "10",
        "b still needs them"
    );
    settle(&source, &[&b], 0);
    assert_eq!(contents(&source), contents(&a));
    assert_eq!(contents(&source), contents(&b));

    // A target that was never reserved cannot register once changes were purged.
    let late = cluster.create_database("purge_late");
    copy_schema(&source, &late);
    let run = sync_run(&source, &late, &[]).expect(1);
    assert!(
        run.stderr.contains("already purged") && run.stderr.contains("target add"),
        "{}",
        run.stderr
    );

    // Dropping a target releases what it held back.
    source.psql("UPDATE t SET v = 0 WHERE id = 1");
    settle(&source, &[&a], 1);
    let name = b.psql("SELECT node_id FROM pgferry.installation");
    pgferry(&["target", "drop", "--source", &source.dsn(), name.trim()]).expect(0);
    settle(&source, &[&a], 0);
    // The dropped target missed a purged change: it is refused loudly, never silently skipped.
    let behind = sync_run(&source, &b, &[]).expect(1);
    assert!(
        behind
            .stderr
            .contains("behind what the source already purged"),
        "{}",
        behind.stderr
    );
    assert_ne!(contents(&source), contents(&b));
}

#[test]
fn a_target_restored_to_an_older_state_than_it_acknowledged_is_refused() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("back_src");
    let target = cluster.create_database("back_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v int)");
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO t SELECT g, g FROM generate_series(1, 10) g");
    sync_json(&source, &target);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("older.dump");
    dump(&target, &file);
    source.psql("UPDATE t SET v = -v");
    sync_json(&source, &target);
    // The older copy carries the target's identity and a progress older than its ack, and the
    // changes in between were purged: applying would silently miss them.
    let older = cluster.create_database("back_old");
    restore(&file, &older);
    let run = sync_run(&source, &older, &[]).expect(1);
    assert!(
        run.stderr.contains("older state than it acknowledged"),
        "{}",
        run.stderr
    );
    assert_eq!(
        older.scalar("SELECT sum(v) FROM t"),
        "55",
        "nothing applied"
    );
}

#[test]
fn a_table_captured_after_the_target_registered_is_refused_until_accepted() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("later_src");
    let target = cluster.create_database("later_dst");
    source.psql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY); INSERT INTO b VALUES (1);");
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.a"]).expect(0);
    source.psql("INSERT INTO a VALUES (1)");
    sync_json(&source, &target);
    pgferry(&["install", "--source", &source.dsn(), "--table", "public.b"]).expect(0);
    source.psql("INSERT INTO b VALUES (2)");
    let run = sync_run(&source, &target, &[]).expect(1);
    assert!(
        run.stderr.contains("public.b") && run.stderr.contains("--accept-new-tables"),
        "{}",
        run.stderr
    );
    target.psql("INSERT INTO b VALUES (1)");
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--once",
        "--accept-new-tables",
    ])
    .expect(0);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn status_shows_pending_changes_per_target_and_table() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("status_src");
    let target = cluster.create_database("status_dst");
    source.psql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE \"B b\" (id int PRIMARY KEY);");
    copy_schema(&source, &target);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let empty = pgferry(&["status", "--source", &source.dsn()]).expect(0);
    assert!(
        empty.stdout.contains("no target registered"),
        "{}",
        empty.stdout
    );
    pgferry(&[
        "target",
        "add",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
    ])
    .expect(0);
    source.psql("INSERT INTO a SELECT generate_series(1, 5); INSERT INTO \"B b\" VALUES (1);");
    let st = pgferry(&["status", "--source", &source.dsn(), "--json"])
        .expect(0)
        .json();
    let t = &st["targets"][0];
    assert_eq!(t["reserved_only"], true, "{st}");
    assert_eq!(t["pending"], 6, "{st}");
    assert_eq!(t["tables"][0]["table"], "public.\"B b\"", "{st}");
    sync_json(&source, &target);
    source.psql("INSERT INTO a VALUES (6)");
    let st = pgferry(&["status", "--source", &source.dsn(), "--json"])
        .expect(0)
        .json();
    let t = &st["targets"][0];
    assert_eq!(t["pending"], 1, "{st}");
    // Ages come from ticks, which a running pgferry writes; no tick has seen this change yet.
    assert!(t["oldest_pending_seconds"].is_null(), "{st}");
    let text = pgferry(&["status", "--source", &source.dsn()]).expect(0);
    assert!(
        text.stdout.contains("public.a  1 pending"),
        "{}",
        text.stdout
    );
    let mine = pgferry(&["status", "--target", &target.dsn(), "--json"])
        .expect(0)
        .json();
    assert_eq!(mine[0]["rounds"], 1, "{mine}");
}

#[test]
fn without_the_replica_role_only_tables_without_foreign_keys_or_triggers_are_applied() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("role_src");
    let target = cluster.create_database("role_dst");
    let ddl = "CREATE TABLE parent (id int PRIMARY KEY);
               CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent ON DELETE CASCADE);
               CREATE TABLE plain (id int PRIMARY KEY, v text);";
    source.psql(ddl);
    target.psql(&format!(
        "CREATE ROLE applier LOGIN PASSWORD 'pw-applier';
         GRANT CREATE, TEMPORARY ON DATABASE {} TO applier; GRANT CREATE ON SCHEMA public TO applier;
         SET ROLE applier; {ddl} RESET ROLE;",
        target.name()
    ));
    pgferry(&[
        "install",
        "--source",
        &source.dsn(),
        "--table",
        "public.plain",
    ])
    .expect(0);
    source.psql("INSERT INTO plain VALUES (1, 'a')");
    let as_applier = target.dsn_as("applier", "pw-applier");
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &as_applier,
        "--once",
    ])
    .expect(0);
    assert_eq!(target.scalar("SELECT v FROM plain"), "a");

    // Tables with foreign keys need the replica role: refused, naming them and the fix.
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1, 1);");
    let run = pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &as_applier,
        "--once",
        "--accept-new-tables",
    ])
    .expect(1);
    assert!(
        run.stderr.contains("public.child") && run.stderr.contains("public.parent"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("GRANT SET ON PARAMETER session_replication_role"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("pw-applier"));
    assert_eq!(target.scalar("SELECT count(*) FROM parent"), "0");

    // PostgreSQL 15+: granting SET on the parameter is enough.
    target.psql("GRANT SET ON PARAMETER session_replication_role TO applier");
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &as_applier,
        "--once",
        "--accept-new-tables",
    ])
    .expect(0);
    assert_eq!(contents(&source), contents(&target));
}

/// Syncs `targets` until the source keeps `expected` capture rows (at most a few rounds: purge
/// may lag one round behind a transaction in flight at a round's snapshot). Returns how many
/// passes it took.
fn settle(source: &TestDb<'_>, targets: &[&TestDb<'_>], expected: u64) -> u32 {
    for pass in 1..=5 {
        let mut args = vec!["sync".to_owned(), "--source".to_owned(), source.dsn()];
        for t in targets {
            args.push("--target".into());
            args.push(t.dsn());
        }
        args.push("--once".into());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        pgferry(&args).expect(0);
        if source.scalar("SELECT count(*) FROM pgferry.delta") == expected.to_string() {
            return pass;
        }
    }
    panic!(
        "the source still keeps {} capture rows, expected {expected}",
        source.scalar("SELECT count(*) FROM pgferry.delta")
    );
}

#[test]
fn a_split_round_commits_table_by_table_and_resumes_after_a_failure() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("split_src");
    let target = cluster.create_database("split_dst");
    source.psql(
        "CREATE TABLE a (id int PRIMARY KEY, v int); CREATE TABLE b (id int PRIMARY KEY, v int, w int);
         CREATE TABLE c (id int PRIMARY KEY, v int);",
    );
    copy_schema(&source, &target);
    // A check the source's rows break: b fails while its rows are copied (schema problems are
    // found before any table is applied, so they cannot stand in for a failure half-way).
    target.psql("ALTER TABLE b ADD CONSTRAINT b_small CHECK (v < 50)");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(
        "INSERT INTO a SELECT g, g FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, g, g FROM generate_series(1, 100) g;
         INSERT INTO c SELECT g, g FROM generate_series(1, 100) g;",
    );
    let split = |code: i32| {
        pgferry(&[
            "sync",
            "--source",
            &source.dsn(),
            "--target",
            &target.dsn(),
            "--once",
            "--split-rounds-above",
            "10",
            "--json",
        ])
        .expect(code)
    };
    // Table a commits on its own; b fails (a check constraint): a stays applied, with its own
    // progress, while the round's progress stays where it was.
    let failed = split(1);
    assert!(failed.stderr.contains("b_small"), "{}", failed.stderr);
    assert_eq!(target.scalar("SELECT count(*) FROM a"), "100");
    assert_eq!(target.scalar("SELECT count(*) FROM c"), "0");
    assert_eq!(
        target.scalar("SELECT count(*) FROM pgferry.applied_table"),
        "1"
    );
    assert_eq!(
        target.scalar("SELECT snapshot IS NULL FROM pgferry.applied"),
        "t"
    );
    // More changes meanwhile, then the fix: the rerun resumes and converges.
    source.psql("UPDATE a SET v = 0 WHERE id <= 5; DELETE FROM c WHERE id > 50;");
    target.psql("ALTER TABLE b DROP CONSTRAINT b_small");
    let report = split(0).json();
    assert_eq!(report["targets"][0]["split"], true, "{report}");
    assert_eq!(contents(&source), contents(&target));
    assert_eq!(
        target.scalar("SELECT count(*) FROM pgferry.applied_table"),
        "0"
    );
    // Small rounds are not split.
    source.psql("UPDATE a SET v = 1 WHERE id = 1");
    assert_eq!(split(0).json()["targets"][0]["split"], false);
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn a_small_round_on_a_large_table_probes_its_key_instead_of_scanning_the_table() {
    // A round's cost follows its changes, not the size of its tables (round.rs,
    // ROUND_SETTINGS): 1,000 changed keys of a 100,000-row table are read on the source and
    // deleted on the target through the key's index. At the planner's default page costs both
    // were a hash join over a sequential scan of the whole table.
    let cluster = Cluster::shared();
    let (source, target) = registered_pair(
        cluster,
        "sync_large",
        "CREATE TABLE big_log (id bigint PRIMARY KEY, v text);
         INSERT INTO big_log SELECT g, 'row ' || g FROM generate_series(1, 100000) g;
         ANALYZE big_log;",
    );
    source.psql("UPDATE big_log SET v = 'changed' WHERE id % 100 = 0");
    let stats = |db: &TestDb<'_>| {
        db.scalar(
            "SELECT seq_scan || ' ' || n_tup_del FROM pg_stat_user_tables WHERE relname = 'big_log'",
        )
    };
    let (src_before, dst_before) = (stats(&source), stats(&target));
    let report = sync_json(&source, &target);
    assert_eq!(
        report["targets"][0]["tables"][0]["changes"], 1000,
        "{report}"
    );
    // Statistics reach the views when each pgferry session ends: wait for the target's 1,000
    // deletes to show, then compare sequential scans.
    let deleted = |s: &str| s.split(' ').nth(1).unwrap().parse::<i64>().unwrap();
    wait_for(Duration::from_secs(10), "the round's statistics", || {
        deleted(&stats(&target)) >= deleted(&dst_before) + 1000
    });
    let scans = |s: &str| s.split(' ').next().unwrap().to_owned();
    assert_eq!(
        scans(&stats(&target)),
        scans(&dst_before),
        "the target scanned big_log"
    );
    assert_eq!(
        scans(&stats(&source)),
        scans(&src_before),
        "the source scanned big_log"
    );
    assert_eq!(contents(&source), contents(&target));
}

#[test]
fn a_round_of_a_few_thousand_changes_applies_its_large_and_small_tables() {
    // A round of at most 5,000 changes reads their keys with its snapshot; a table of it with
    // more than 1,000 still streams its keys through a temporary table (round.rs, FEW_CHANGES).
    let cluster = Cluster::shared();
    let (source, target) = registered_pair(
        cluster,
        "sync_few",
        "CREATE TABLE many (id int PRIMARY KEY, v text);
         CREATE TABLE few (id int PRIMARY KEY, v text);
         INSERT INTO many SELECT g, 'v' || g FROM generate_series(1, 3000) g;
         INSERT INTO few SELECT g, 'v' || g FROM generate_series(1, 20) g;",
    );
    source.psql(
        "UPDATE many SET v = 'changed' WHERE id <= 1500;
         DELETE FROM many WHERE id > 2900;
         INSERT INTO many SELECT g, 'new' FROM generate_series(5001, 5400) g;
         UPDATE many SET id = 9000 WHERE id = 1;
         UPDATE few SET v = 'changed' WHERE id <= 10;
         DELETE FROM few WHERE id = 20;",
    );
    let report = sync_json(&source, &target);
    let tables = &report["targets"][0]["tables"];
    assert_eq!(tables[0]["table"], "public.few", "{report}");
    assert_eq!(tables[1]["table"], "public.many", "{report}");
    assert!(tables[1]["changes"].as_u64().unwrap() > 1_000, "{report}");
    assert_eq!(report["rounds"], 1, "{report}");
    assert_eq!(contents(&source), contents(&target));
}

/// A source (`NAME_src`, captured) and a target (`NAME_dst`, registered by a first sync), each
/// loaded with `sql`: equal, nothing pending.
fn registered_pair<'c>(cluster: &'c Cluster, name: &str, sql: &str) -> (TestDb<'c>, TestDb<'c>) {
    let source = cluster.create_database(&format!("{name}_src"));
    let target = cluster.create_database(&format!("{name}_dst"));
    source.psql(sql);
    target.psql(sql);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    sync_run(&source, &target, &[]).expect(0);
    (source, target)
}
