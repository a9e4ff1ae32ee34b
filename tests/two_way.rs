//! End-to-end tests of two-way (multi-node) syncs, `pgferry sync --node … --conflict … --once`,
//! and of `pgferry conflicts`, against real clusters.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{contents, pgferry, wait_for, Conn, Daemon, Run};
use pgferry_core::Dsn;
use pgferry_sync::conflict::{Rule, Rules};
use pgferry_sync::two_way::{exchange_in_order, ExchangeReport, Mesh, Node};
use pgferry_testkit::{Cluster, TestDb};

const SCHEMA: &str = "
    CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
    CREATE TABLE \"Other Table\" (a text, b int, note text, PRIMARY KEY (a, b));
    INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
    INSERT INTO \"Other Table\" SELECT 'k' || g, g, 'n' FROM generate_series(1, 20) g;
    CREATE TABLE users (id int PRIMARY KEY, email text UNIQUE, name text);
    INSERT INTO users SELECT g, 'u' || g || '@x', 'n' FROM generate_series(1, 20) g;";

/// Databases with the same schema and rows, capture installed on each.
fn nodes<'c>(cluster: &'c Cluster, prefix: &str, n: usize) -> Vec<TestDb<'c>> {
    nodes_with(cluster, prefix, n, SCHEMA, &[])
}

/// `n` databases loaded with `schema`, capture installed on each (`install` added to
/// `pgferry install --source …`).
fn nodes_with<'c>(
    cluster: &'c Cluster,
    prefix: &str,
    n: usize,
    schema: &str,
    install: &[&str],
) -> Vec<TestDb<'c>> {
    (0..n)
        .map(|i| {
            let db = cluster.create_database(&format!("{prefix}_{i}"));
            db.psql(schema);
            let dsn = db.dsn();
            let mut args = vec!["install", "--source", &dsn];
            args.extend_from_slice(install);
            pgferry(&args).expect(0);
            db
        })
        .collect()
}

const NAMES: [&str; 3] = ["a", "b", "c"];

/// `pgferry sync --node a=… --node b=… … --conflict RULE --once --json`.
fn exchange(dbs: &[TestDb<'_>], rule: &str, extra: &[&str]) -> Run {
    let specs: Vec<String> = dbs
        .iter()
        .zip(NAMES)
        .map(|(db, name)| format!("{name}={}", db.dsn()))
        .collect();
    let mut args = vec!["sync", "--once", "--json", "--conflict", rule];
    for s in &specs {
        args.push("--node");
        args.push(s);
    }
    args.extend_from_slice(extra);
    pgferry(&args)
}

fn exchange_ok(dbs: &[TestDb<'_>], rule: &str) -> serde_json::Value {
    exchange(dbs, rule, &[]).expect(0).json()
}

fn conflicts(db: &TestDb<'_>) -> Vec<serde_json::Value> {
    pgferry(&["conflicts", "--db", &db.dsn(), "--json"])
        .expect(0)
        .json()
        .as_array()
        .unwrap()
        .clone()
}

fn row(db: &TestDb<'_>, id: i32) -> String {
    db.psql(&format!(
        "SELECT coalesce((SELECT v FROM t WHERE id = {id}), '<none>')"
    ))
    .trim()
    .to_owned()
}

#[test]
fn writes_on_both_nodes_meet_and_a_second_exchange_moves_nothing() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_plain", 2);
    dbs[0].psql(
        "UPDATE t SET v = 'a' WHERE id <= 10;
         DELETE FROM t WHERE id = 11;
         INSERT INTO t VALUES (101, 'from a');
         UPDATE t SET id = 1000 WHERE id = 12;
         INSERT INTO \"Other Table\" VALUES ('x y', 1, 'a');",
    );
    dbs[1].psql(
        "UPDATE t SET v = 'b' WHERE id BETWEEN 50 AND 60;
         DELETE FROM t WHERE id = 99;
         INSERT INTO t VALUES (201, 'from b');
         UPDATE \"Other Table\" SET note = 'b' WHERE b <= 5;",
    );
    let report = exchange_ok(&dbs, "latest");
    assert_eq!(report["conflicts"], 0, "{report}");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(row(&dbs[1], 1000), "v12");
    assert_eq!(row(&dbs[0], 201), "from b");
    // Applied rows are not captured again: nothing travels back.
    let again = exchange_ok(&dbs, "latest");
    assert_eq!(again["rows"], 0, "{again}");
    for d in again["directions"].as_array().unwrap() {
        assert_eq!(d["tables"].as_array().unwrap().len(), 0, "{again}");
    }
}

/// The same conflicting changes on two nodes: an update on both, an insert of the same key on
/// both, an update against a delete each way, and a key change against an update each way.
fn conflicting_changes(dbs: &[TestDb<'_>]) {
    dbs[0].psql(
        "UPDATE t SET v = 'a1' WHERE id = 1;
         INSERT INTO t VALUES (500, 'a500');
         UPDATE t SET v = 'a5' WHERE id = 5;
         DELETE FROM t WHERE id = 6;
         UPDATE t SET id = 700 WHERE id = 7;
         UPDATE t SET v = 'a8' WHERE id = 8;
         UPDATE t SET v = 'a-only' WHERE id = 20;",
    );
    dbs[1].psql(
        "UPDATE t SET v = 'b1' WHERE id = 1;
         INSERT INTO t VALUES (500, 'b500');
         DELETE FROM t WHERE id = 5;
         UPDATE t SET v = 'b6' WHERE id = 6;
         UPDATE t SET v = 'b7' WHERE id = 7;
         UPDATE t SET id = 800 WHERE id = 8;
         UPDATE t SET v = 'b-only' WHERE id = 30;",
    );
}

#[test]
fn prefer_a_node_settles_every_kind_of_conflict_its_way() {
    let cluster = Cluster::shared();
    for (winner, expect) in [
        (
            "a",
            [
                (1, "a1"),
                (500, "a500"),
                (5, "a5"),
                (6, "<none>"),
                (7, "<none>"),
                (700, "v7"),
                (8, "a8"),
                (800, "<none>"),
            ],
        ),
        (
            "b",
            [
                (1, "b1"),
                (500, "b500"),
                (5, "<none>"),
                (6, "b6"),
                (7, "b7"),
                (700, "<none>"),
                (8, "<none>"),
                (800, "v8"),
            ],
        ),
    ] {
        let dbs = nodes(cluster, &format!("tw_prefer_{winner}"), 2);
        exchange_ok(&dbs, "abort"); // prepares both nodes
        conflicting_changes(&dbs);
        let report = exchange_ok(&dbs, &format!("prefer:{winner}"));
        assert_eq!(
            contents(&dbs[0]),
            contents(&dbs[1]),
            "prefer:{winner}: {report}"
        );
        for (id, v) in expect {
            assert_eq!(row(&dbs[0], id), v, "prefer:{winner}, id {id}: {report}");
        }
        assert_eq!(row(&dbs[0], 20), "a-only");
        assert_eq!(row(&dbs[0], 30), "b-only");
        // Six groups, each decided once (on b, which applies a's changes first) and recorded.
        assert_eq!(report["conflicts"], 6, "{report}");
        let recorded = conflicts(&dbs[1]);
        assert_eq!(recorded.len(), 6, "{recorded:?}");
        assert!(recorded
            .iter()
            .all(|c| c["winner"] == winner && c["rule"] == format!("prefer:{winner}")));
        let key_change = recorded
            .iter()
            .find(|c| c["keys"].to_string().contains("700"))
            .expect("the key change 7 -> 700 is recorded");
        assert_eq!(
            key_change["keys"].as_array().unwrap().len(),
            2,
            "{key_change}"
        );
        // And it is over: nothing moves next time.
        let again = exchange_ok(&dbs, &format!("prefer:{winner}"));
        assert_eq!(again["rows"], 0, "{again}");
        assert_eq!(again["conflicts"], 0, "{again}");
    }
}

#[test]
fn latest_is_decided_row_by_row() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_latest", 2);
    exchange_ok(&dbs, "latest");
    // Interleaved in time: a, then b, then a again.
    dbs[0].psql("UPDATE t SET v = 'a-early' WHERE id IN (1, 3)");
    dbs[1].psql("UPDATE t SET v = 'b-middle' WHERE id IN (1, 2, 3, 4)");
    dbs[0].psql("UPDATE t SET v = 'a-late' WHERE id IN (2, 4)");
    let report = exchange_ok(&dbs, "latest");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]), "{report}");
    for (id, v) in [
        (1, "b-middle"),
        (2, "a-late"),
        (3, "b-middle"),
        (4, "a-late"),
    ] {
        assert_eq!(row(&dbs[1], id), v, "id {id}: {report}");
    }
    assert_eq!(report["conflicts"], 4, "{report}");
}

#[test]
fn abort_leaves_both_nodes_untouched_and_names_the_key() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_abort", 2);
    exchange_ok(&dbs, "abort");
    dbs[0].psql("UPDATE t SET v = 'a' WHERE id = 3; INSERT INTO t VALUES (101, 'a')");
    dbs[1].psql("UPDATE t SET v = 'b' WHERE id = 3; INSERT INTO t VALUES (102, 'b')");
    let before = (contents(&dbs[0]), contents(&dbs[1]));
    let run = exchange(&dbs, "abort", &[]).expect(1);
    assert!(
        run.stderr.contains("table public.t") && run.stderr.contains("(3)"),
        "{}",
        run.stderr
    );
    assert_eq!((contents(&dbs[0]), contents(&dbs[1])), before);
    // A per-table rule settles it.
    exchange(&dbs, "abort", &["--conflict-table", "public.t=prefer:b"]).expect(0);
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(row(&dbs[0], 3), "b");
}

#[test]
fn skip_leaves_each_node_its_row_until_a_later_change() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_skip", 2);
    exchange_ok(&dbs, "skip");
    dbs[0].psql("UPDATE t SET v = 'a' WHERE id = 3; UPDATE t SET v = 'a4' WHERE id = 4");
    dbs[1].psql("UPDATE t SET v = 'b' WHERE id = 3");
    let report = exchange_ok(&dbs, "skip");
    assert_eq!(report["conflicts"], 1, "{report}");
    assert_eq!(row(&dbs[0], 3), "a");
    assert_eq!(row(&dbs[1], 3), "b");
    assert_eq!(row(&dbs[1], 4), "a4");
    assert_eq!(conflicts(&dbs[1])[0]["winner"], "skip");
    // verify lists the key as unsettled, and finds the nodes otherwise equal.
    let v = pgferry(&[
        "verify",
        "--source",
        &dbs[0].dsn(),
        "--target",
        &dbs[1].dsn(),
        "--json",
    ])
    .expect(0)
    .json();
    assert!(v["tables"].to_string().contains("unsettled"), "{v}");
    // Still unsettled next time (nothing ships), until one node changes the row again.
    exchange_ok(&dbs, "skip");
    assert_eq!(row(&dbs[1], 3), "b");
    dbs[1].psql("UPDATE t SET v = 'b again' WHERE id = 3");
    exchange_ok(&dbs, "skip");
    assert_eq!(row(&dbs[0], 3), "b again");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    // Or until `pgferry conflicts resolve` keeps one side: here the remote node's (a).
    dbs[0].psql("UPDATE t SET v = 'a5' WHERE id = 5");
    dbs[1].psql("UPDATE t SET v = 'b5' WHERE id = 5");
    exchange_ok(&dbs, "skip");
    let open = conflicts(&dbs[1]);
    let id = open.last().unwrap()["conflict_id"].to_string();
    let b = dbs[1].dsn();
    // Keeping a needs a's connection.
    pgferry(&[
        "conflicts",
        "resolve",
        "--db",
        &b,
        "--id",
        &id,
        "--keep",
        "a",
    ])
    .expect(1);
    let a = format!("a={}", dbs[0].dsn());
    pgferry(&[
        "conflicts",
        "resolve",
        "--db",
        &b,
        "--id",
        &id,
        "--keep",
        "a",
        "--node",
        &a,
    ])
    .expect(0);
    exchange_ok(&dbs, "skip");
    assert_eq!(row(&dbs[1], 5), "a5");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert!(conflicts(&dbs[1]).last().unwrap()["settled_by"]
        .to_string()
        .contains("kept a"));
}

#[test]
fn a_custom_function_can_merge_the_two_rows() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_custom", 2);
    for db in &dbs {
        db.psql(
            "CREATE FUNCTION merge_v(l jsonb, r jsonb, ln text, rn text) RETURNS jsonb
             LANGUAGE sql AS $$
               SELECT jsonb_set(l, '{v}', to_jsonb(least(l->>'v', r->>'v') || '+' || greatest(l->>'v', r->>'v')))
             $$",
        );
    }
    exchange_ok(&dbs, "custom:public.merge_v");
    dbs[0].psql("UPDATE t SET v = 'x' WHERE id = 3");
    dbs[1].psql("UPDATE t SET v = 'y' WHERE id = 3");
    let report = exchange_ok(&dbs, "custom:public.merge_v");
    assert_eq!(row(&dbs[0], 3), "x+y", "{report}");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(conflicts(&dbs[1])[0]["winner"], "merged");
}

#[test]
fn three_nodes_in_a_full_mesh_converge_and_stay_quiet() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_mesh", 3);
    for (i, db) in dbs.iter().enumerate() {
        let base = 1000 * (i + 1);
        db.psql(&format!(
            "INSERT INTO t SELECT g, 'n{i}' FROM generate_series({base}, {base} + 9) g;
             UPDATE t SET v = 'by {i}' WHERE id = {};
             DELETE FROM t WHERE id = {};",
            10 + i,
            50 + i
        ));
    }
    let report = exchange_ok(&dbs, "latest");
    assert_eq!(
        report["directions"].as_array().unwrap().len(),
        6,
        "{report}"
    );
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(contents(&dbs[1]), contents(&dbs[2]));
    let again = exchange_ok(&dbs, "latest");
    assert_eq!(again["rows"], 0, "{again}");
}

/// The mesh of `dbs` (named a, b, c) under `rule`, for the library's exchanges.
fn mesh(dbs: &[TestDb<'_>], rule: &str) -> Mesh {
    Mesh {
        nodes: dbs
            .iter()
            .zip(NAMES)
            .map(|(db, name)| Node {
                name: name.to_owned(),
                dsn: Dsn::parse(&db.dsn()).expect("dsn"),
            })
            .collect(),
        rules: Rules::new(Rule::parse(rule).expect("rule")),
        delta_columns: Vec::new(),
    }
}

/// Rounds of the given directions (`(from, to)`), in this order: one arrival order of the
/// changes at each node.
fn directions(dbs: &[TestDb<'_>], rule: &str, order: &[(usize, usize)]) -> ExchangeReport {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(exchange_in_order(&mesh(dbs, rule), order))
        .expect("exchange")
}

/// Two nodes change the same keys (an update of 3, an update on one and a delete on the other of
/// 4, an insert of 200 on both), the changes reach the third node in `order`, and every node ends
/// with the rows the rule picks — also when the third node receives the losing change last, long
/// after the two decided — then the mesh goes quiet.
fn third_node_case(prefix: &str, rule: &str, order: &[(usize, usize)], expect: &str) {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, prefix, 3);
    // Every node registered with every other (as a running mesh is).
    exchange_ok(&dbs, rule);
    let write = |db: &TestDb<'_>, tag: &str, delete: bool| {
        db.psql(&format!(
            "UPDATE t SET v = '{tag}' WHERE id = 3;
             {}
             INSERT INTO t VALUES (200, '{tag}');",
            if delete {
                "DELETE FROM t WHERE id = 4;".to_owned()
            } else {
                format!("UPDATE t SET v = '{tag}' WHERE id = 4;")
            }
        ));
    };
    // a first, b a moment later (latest: b's changes win).
    write(&dbs[0], "A", false);
    thread::sleep(Duration::from_millis(20));
    write(&dbs[1], "B", true);
    directions(&dbs, rule, order);
    for _ in 0..2 {
        exchange_ok(&dbs, rule);
    }
    let state = |db: &TestDb<'_>| format!("{} {} {}", row(db, 3), row(db, 4), row(db, 200));
    for db in &dbs {
        assert_eq!(state(db), expect, "{rule}, arrivals {order:?}");
    }
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(contents(&dbs[1]), contents(&dbs[2]));
    let quiet = exchange_ok(&dbs, rule);
    assert_eq!(quiet["rows"], 0, "{quiet}");
    // Provenance is let go once every node has everything.
    for db in &dbs {
        let left = db.psql("SELECT count(*) FROM pgferry.row_origin");
        assert_eq!(left.trim(), "0", "{rule}, arrivals {order:?}");
    }
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

#[test]
fn a_third_node_keeps_the_winner_of_latest_whatever_arrives_last() {
    // b decides (its change is later), c gets b's rows, then a's losing ones.
    third_node_case("tw_3l1", "latest", &[(A, B), (B, C), (A, C)], "B <none> B");
    // b decides, a takes b's rows, then c gets them, then a's losing changes (a ships its
    // current rows: b's, which it had applied by then).
    third_node_case(
        "tw_3l2",
        "latest",
        &[(A, B), (B, A), (B, C), (A, C)],
        "B <none> B",
    );
    // c gets a's rows first, then b's: no decision anywhere yet.
    third_node_case("tw_3l3", "latest", &[(A, C), (B, C)], "B <none> B");
}

/// A TRUNCATE on a while b writes the same table: a's TRUNCATE removes the rows a had; b's
/// rows written meanwhile (an update of 7, an insert of 600) survive on every node, whatever
/// order the directions run in.
fn truncate_case(prefix: &str, n: usize, order: &[(usize, usize)]) {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, prefix, n);
    exchange_ok(&dbs, "latest");
    dbs[0].psql("TRUNCATE t; INSERT INTO t VALUES (500, 'a after')");
    dbs[1].psql("UPDATE t SET v = 'b' WHERE id = 7; INSERT INTO t VALUES (600, 'b new')");
    directions(&dbs, "latest", order);
    exchange_ok(&dbs, "latest");
    for db in &dbs {
        let rows = db.psql("SELECT string_agg(id || '=' || v, ' ' ORDER BY id) FROM t");
        assert_eq!(
            rows.trim(),
            "7=b 500=a after 600=b new",
            "arrivals {order:?}"
        );
    }
    for db in &dbs[1..] {
        assert_eq!(contents(&dbs[0]), contents(db), "arrivals {order:?}");
    }
    let quiet = exchange_ok(&dbs, "latest");
    assert_eq!(quiet["rows"], 0, "{quiet}");
}

#[test]
fn a_truncate_removes_its_nodes_rows_and_rows_written_meanwhile_elsewhere_survive() {
    truncate_case("tw_trunc1", 2, &[(A, B), (B, A)]);
    truncate_case("tw_trunc2", 2, &[(B, A), (A, B)]);
    // The third node gets b's rows before or after a's TRUNCATE.
    truncate_case("tw_trunc3", 3, &[(B, C), (A, C)]);
    truncate_case("tw_trunc4", 3, &[(A, C), (B, C)]);
}

#[test]
fn a_mesh_of_three_takes_latest_or_abort_only() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_3rules", 3);
    let before: Vec<String> = dbs.iter().map(|db| contents(db)).collect();
    for rule in ["prefer:a", "skip", "custom:public.f"] {
        let r = exchange(&dbs, rule, &[]).expect(1);
        assert!(
            r.stderr.contains("latest or abort") && r.stderr.contains(rule),
            "{rule}: {}",
            r.stderr
        );
        // A per-table override is refused alike.
        let over = format!("t={rule}");
        let r = exchange(&dbs, "latest", &["--conflict-table", &over]).expect(1);
        assert!(r.stderr.contains("latest or abort"), "{}", r.stderr);
    }
    let after: Vec<String> = dbs.iter().map(|db| contents(db)).collect();
    assert_eq!(before, after);
    for db in &dbs {
        let registered = db.psql("SELECT count(*) FROM pgferry.target");
        assert_eq!(registered.trim(), "0", "nothing registered");
    }
    // abort: the round stops on the conflict, on the third node too.
    exchange_ok(&dbs, "abort");
    dbs[0].psql("UPDATE t SET v = 'A' WHERE id = 5");
    dbs[1].psql("UPDATE t SET v = 'B' WHERE id = 5");
    directions(&dbs, "abort", &[(A, C)]);
    let r = exchange(&dbs, "abort", &[]).expect(1);
    assert!(r.stderr.contains("(5)"), "{}", r.stderr);
}

#[test]
fn delta_columns_are_refused_in_a_mesh_of_three() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_3delta",
        3,
        "CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);",
        &["--delta-column", "public.accounts.balance"],
    );
    let r = exchange(&dbs, "latest", &[]).expect(1);
    assert!(
        r.stderr.contains("two-node syncs only") && r.stderr.contains("accounts"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_node_lists_and_rules_are_refused_before_anything_changes() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_bad", 2);
    let a = format!("a={}", dbs[0].dsn());
    let b = format!("b={}", dbs[1].dsn());
    // No rule; an unknown rule; prefer: an unknown node; one node; a bare DSN.
    pgferry(&["sync", "--once", "--node", &a, "--node", &b]).expect(2);
    let r = pgferry(&[
        "sync",
        "--once",
        "--node",
        &a,
        "--node",
        &b,
        "--conflict",
        "newest",
    ])
    .expect(2);
    assert!(r.stderr.contains("prefer:NODE"), "{}", r.stderr);
    let r = pgferry(&[
        "sync",
        "--once",
        "--node",
        &a,
        "--node",
        &b,
        "--conflict",
        "prefer:z",
    ])
    .expect(1);
    assert!(r.stderr.contains("prefer:z"), "{}", r.stderr);
    pgferry(&["sync", "--once", "--node", &a, "--conflict", "latest"]).expect(1);
    pgferry(&[
        "sync",
        "--once",
        "--node",
        &dbs[0].dsn(),
        "--node",
        &b,
        "--conflict",
        "latest",
    ])
    .expect(2);
    // A table captured on one node only.
    dbs[0].psql("CREATE TABLE only_a (id int PRIMARY KEY)");
    dbs[1].psql("CREATE TABLE only_a (id int PRIMARY KEY)");
    pgferry(&[
        "install",
        "--source",
        &dbs[0].dsn(),
        "--table",
        "public.only_a",
    ])
    .expect(0);
    let r = exchange(&dbs, "latest", &[]).expect(1);
    assert!(
        r.stderr.contains("only_a") && r.stderr.contains("node b"),
        "{}",
        r.stderr
    );
    assert!(conflicts(&dbs[0]).is_empty());
    let r = pgferry(&[
        "conflicts",
        "resolve",
        "--db",
        &dbs[0].dsn(),
        "--id",
        "1",
        "--keep",
        "a",
    ])
    .expect(1);
    assert!(r.stderr.contains("no conflict #1"), "{}", r.stderr);
}

/// A writer on node `node` until `stop`: updates of keys both nodes update (1–20), deletes,
/// upserts and re-inserts of keys both nodes delete and insert (21–40), and inserts, deletes
/// and key changes of keys of its own.
fn writer(dsn: String, node: i32, stop: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let conn = Conn::open(&dsn);
        let base = 10_000 * (node + 1);
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let shared = 21 + (i * 7 + node) % 20;
            let mut sql = format!("UPDATE t SET v = 'n{node}-{i}' WHERE id = {};", 1 + i % 20);
            if i % 3 == 0 {
                sql.push_str(&format!("INSERT INTO t VALUES ({}, 'ins');", base + i));
            }
            if i % 4 == 0 {
                sql.push_str(&format!(
                    "DELETE FROM t WHERE id = {shared};
                     INSERT INTO t VALUES ({}, 'up{node}') ON CONFLICT (id) DO UPDATE SET v = excluded.v;",
                    21 + (shared + 3) % 20
                ));
            }
            if i % 5 == 0 {
                sql.push_str(&format!("DELETE FROM t WHERE id = {};", base + i - 3));
            }
            if i % 7 == 0 {
                sql.push_str(&format!(
                    "UPDATE t SET id = id + 5000 WHERE id = {};",
                    base + i - 6
                ));
            }
            if i % 6 == 0 {
                sql.push_str(&format!(
                    "UPDATE \"Other Table\" SET note = 'n{node}-{i}' WHERE b = {};",
                    1 + i % 20
                ));
            }
            // Each statement on its own (an autocommit transaction each); conflicts with the
            // daemon's rounds (a row locked, a key inserted meanwhile) may fail one: ignored.
            for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
                let _ = conn.try_batch(stmt);
            }
            thread::sleep(Duration::from_millis(2));
        }
        i as u64
    })
}

/// Both nodes written for `seconds` while the daemon replicates with `rule` (killed with -9
/// and restarted every `kill_every`, if given); then the nodes must meet while it runs, and
/// again after it stops and a final exchange runs.
fn daemon_under_writers(prefix: &str, rule: &str, seconds: u64, kill_every: Option<Duration>) {
    mesh_under_writers(prefix, rule, 2, seconds, kill_every)
}

/// [`daemon_under_writers`] with `n` nodes, every one written.
fn mesh_under_writers(
    prefix: &str,
    rule: &str,
    n: usize,
    seconds: u64,
    kill_every: Option<Duration>,
) {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, prefix, n);
    for db in &dbs {
        // For custom:public.larger: the larger row image wins, whichever node decides.
        db.psql(
            "CREATE FUNCTION larger(l jsonb, r jsonb, ln text, rn text) RETURNS jsonb
             LANGUAGE sql AS $$ SELECT CASE WHEN l::text >= r::text THEN l ELSE r END $$",
        );
    }
    exchange_ok(&dbs, rule);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let specs: Vec<String> = dbs
        .iter()
        .zip(NAMES)
        .map(|(db, name)| format!("{name}={}", db.dsn()))
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for spec in &specs {
        args.extend(["--node", spec.as_str()]);
    }
    args.extend(["--conflict", rule, "--poll-interval", "20ms"]);
    let mut daemon = Daemon::start(&args, &dir, "daemon");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = dbs
        .iter()
        .enumerate()
        .map(|(n, db)| writer(db.dsn(), n as i32, stop.clone()))
        .collect();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut kills = 0;
    while Instant::now() < until {
        match kill_every {
            Some(every) => {
                thread::sleep(every);
                daemon.kill9();
                kills += 1;
                daemon = Daemon::start(&args, &dir, "daemon");
            }
            None => thread::sleep(Duration::from_millis(100)),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(writes > 100, "the writers barely ran ({writes} iterations)");
    // Equal, or (skip) equal but for the keys a skip left unsettled, which verify lists.
    let verify = |other: &TestDb<'_>| {
        pgferry(&[
            "verify",
            "--source",
            &dbs[0].dsn(),
            "--target",
            &other.dsn(),
        ])
    };
    let met = || {
        dbs[1..].iter().all(|other| {
            if rule == "skip" {
                verify(other).code == 0
            } else {
                contents(&dbs[0]) == contents(other)
            }
        })
    };
    wait_for(Duration::from_secs(60), "the nodes to meet", met);
    assert!(daemon.is_running(), "{}", daemon.log());
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "{}", daemon.log());
    let last = exchange_ok(&dbs, rule);
    assert_eq!(
        last["rows"], 0,
        "after the daemon, nothing left to move: {last}"
    );
    assert!(met());
    for other in &dbs[1..] {
        verify(other).expect(0);
    }
    let decided: usize = dbs.iter().map(|db| conflicts(db).len()).sum();
    eprintln!("{rule}: {writes} writer iterations, {kills} kills, {decided} conflicts decided");
}

#[test]
fn the_daemon_settles_concurrent_writers_with_latest() {
    daemon_under_writers("tw_d_latest", "latest", 3, None);
}

#[test]
fn the_daemon_settles_concurrent_writers_with_prefer() {
    daemon_under_writers("tw_d_prefer", "prefer:b", 3, None);
}

#[test]
fn the_daemon_settles_concurrent_writers_with_skip() {
    daemon_under_writers("tw_d_skip", "skip", 3, None);
}

#[test]
fn the_daemon_settles_concurrent_writers_with_a_custom_function() {
    daemon_under_writers("tw_d_custom", "custom:public.larger", 3, None);
}

#[test]
fn three_nodes_under_writers_end_equal_with_latest() {
    mesh_under_writers("tw_m_latest", "latest", 3, 3, None);
}

#[test]
fn kill_9_of_the_daemon_in_a_mesh_of_three_loses_nothing() {
    mesh_under_writers(
        "tw_m_kill",
        "latest",
        3,
        4,
        Some(Duration::from_millis(700)),
    );
}

#[test]
fn kill_9_of_the_daemon_during_two_way_traffic_loses_nothing() {
    daemon_under_writers("tw_d_kill", "latest", 4, Some(Duration::from_millis(700)));
}

#[test]
fn check_validates_a_two_way_configuration() {
    let cluster = Cluster::shared();
    let dbs = nodes(cluster, "tw_check", 2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgferry.toml");
    std::fs::write(
        &file,
        format!(
            "[nodes.a]\ndsn = {:?}\n[nodes.b]\ndsn = {:?}\n[syncs.mesh]\nnodes = [\"a\", \"b\"]\nconflict = \"latest\"\n",
            dbs[0].dsn(),
            dbs[1].dsn()
        ),
    )
    .unwrap();
    let config = file.display().to_string();
    let ok = pgferry(&["check", "--config", &config, "--json"])
        .expect(0)
        .json();
    assert_eq!(ok["ok"], true, "{ok}");
    dbs[1].psql("CREATE TABLE only_b (id int PRIMARY KEY)");
    pgferry(&[
        "install",
        "--source",
        &dbs[1].dsn(),
        "--table",
        "public.only_b",
    ])
    .expect(0);
    let bad = pgferry(&["check", "--config", &config, "--json"])
        .expect(1)
        .json();
    assert!(bad["problems"].to_string().contains("only_b"), "{bad}");
}

fn emails(db: &TestDb<'_>) -> String {
    db.psql("SELECT string_agg(id || '=' || email, ' ' ORDER BY id) FROM users WHERE id > 20 OR email LIKE 'same%'")
        .trim()
        .to_owned()
}

#[test]
fn a_unique_clash_beyond_the_key_is_settled_by_the_rule() {
    let cluster = Cluster::shared();
    for (rule, expect) in [
        ("prefer:a", "3=same2@x 21=same@x"),
        ("prefer:b", "4=same2@x 22=same@x"),
    ] {
        let dbs = nodes(cluster, &format!("tw_clash_{}", &rule[7..]), 2);
        exchange_ok(&dbs, rule);
        // Two keys inserted with one email; two rows updated to one email.
        dbs[0].psql("INSERT INTO users VALUES (21, 'same@x', 'a'); UPDATE users SET email = 'same2@x' WHERE id = 3");
        dbs[1].psql("INSERT INTO users VALUES (22, 'same@x', 'b'); UPDATE users SET email = 'same2@x' WHERE id = 4");
        let report = exchange_ok(&dbs, rule);
        assert_eq!(contents(&dbs[0]), contents(&dbs[1]), "{rule}: {report}");
        assert_eq!(emails(&dbs[0]), expect, "{rule}: {report}");
        let recorded = conflicts(&dbs[1]);
        assert_eq!(recorded.len(), 2, "{recorded:?}");
        assert!(
            recorded
                .iter()
                .all(|c| c["kind"] == "unique:users_email_key"),
            "{recorded:?}"
        );
        // The losing row is kept in the record.
        assert!(
            recorded
                .iter()
                .any(|c| c.to_string().contains("\"name\":\"b\"")
                    && c.to_string().contains("\"name\":\"a\"")),
            "{recorded:?}"
        );
        let again = exchange_ok(&dbs, rule);
        assert_eq!(again["rows"], 0, "{again}");
    }
}

#[test]
fn clashes_in_expression_and_partial_unique_indexes_are_settled_too() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_clash_expr",
        2,
        "CREATE TABLE handles (id int PRIMARY KEY, handle text NOT NULL, nick text, active bool NOT NULL);
         CREATE UNIQUE INDEX handles_lower ON handles (lower(handle));
         CREATE UNIQUE INDEX handles_active_nick ON handles (nick) WHERE active;
         INSERT INTO handles VALUES (1, 'one', 'n1', true), (2, 'two', 'n2', true);",
        &[],
    );
    exchange_ok(&dbs, "prefer:a");
    // Equal under lower(); one nick on two active rows; one nick on two inactive rows (the
    // partial index does not cover them: no clash).
    dbs[0].psql(
        "INSERT INTO handles VALUES (10, 'Alice', 'x', true), (12, 'z1', 'dup', false);
         UPDATE handles SET nick = 'shared' WHERE id = 1",
    );
    dbs[1].psql(
        "INSERT INTO handles VALUES (11, 'ALICE', 'y', true), (13, 'z2', 'dup', false);
         UPDATE handles SET nick = 'shared' WHERE id = 2",
    );
    let report = exchange_ok(&dbs, "prefer:a");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]), "{report}");
    let ids = dbs[1]
        .psql("SELECT string_agg(id || ':' || coalesce(nick, '-'), ' ' ORDER BY id) FROM handles");
    assert_eq!(ids.trim(), "1:shared 10:x 12:dup 13:dup", "{report}");
    let kinds: BTreeSet<String> = conflicts(&dbs[1])
        .iter()
        .map(|c| c["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "unique:handles_active_nick".to_owned(),
            "unique:handles_lower".to_owned()
        ])
    );
    let again = exchange_ok(&dbs, "prefer:a");
    assert_eq!(again["rows"], 0, "{again}");
}

#[test]
fn sequence_partition_gives_each_node_its_own_values() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_seq",
        2,
        "CREATE TABLE s (id serial PRIMARY KEY, v text); INSERT INTO s (v) SELECT 'x' FROM generate_series(1, 5)",
        &[],
    );
    // Both nodes would hand out 6 next: pgferry check says so.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pgferry.toml");
    std::fs::write(
        &file,
        format!(
            "[nodes.a]\ndsn = {:?}\n[nodes.b]\ndsn = {:?}\n[syncs.mesh]\nnodes = [\"a\", \"b\"]\nconflict = \"latest\"\n",
            dbs[0].dsn(),
            dbs[1].dsn()
        ),
    )
    .unwrap();
    let check = pgferry(&["check", "--config", &file.display().to_string(), "--json"])
        .expect(1)
        .json();
    assert!(
        check["problems"]
            .to_string()
            .contains("--sequence-partition"),
        "{check}"
    );
    exchange(&dbs, "latest", &["--sequence-partition"]).expect(0);
    for db in &dbs {
        db.psql("INSERT INTO s (v) SELECT 'y' FROM generate_series(1, 10)");
    }
    let report = exchange_ok(&dbs, "latest");
    assert_eq!(report["conflicts"], 0, "{report}");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(dbs[0].psql("SELECT count(*) FROM s").trim(), "25");
    pgferry(&["check", "--config", &file.display().to_string()]).expect(0);
}

#[test]
fn a_delta_column_changed_on_both_nodes_keeps_both_changes() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_delta",
        2,
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric(12,2), hits bigint);
                 INSERT INTO accounts SELECT g, 'o' || g, 100, 0 FROM generate_series(1, 10) g;",
        &["--delta-column",
                "public.accounts.balance",
                "--delta-column",
                "public.accounts.hits"],
    );
    exchange(
        &dbs,
        "prefer:a",
        &[
            "--delta-column",
            "accounts.balance",
            "--delta-column",
            "public.accounts.hits",
        ],
    )
    .expect(0);
    // A sync requiring a delta column a node does not declare is refused.
    let r = exchange(&dbs, "prefer:a", &["--delta-column", "accounts.id"]).expect(1);
    assert!(r.stderr.contains("public.accounts.id"), "{}", r.stderr);
    // Two withdrawals on a, one on b, of the same account; the owner changed on b.
    dbs[0].psql("UPDATE accounts SET balance = balance - 10, hits = hits + 1 WHERE id = 1");
    dbs[0].psql("UPDATE accounts SET balance = balance - 5, hits = hits + 1 WHERE id = 1");
    dbs[1].psql(
        "UPDATE accounts SET balance = balance - 30, hits = hits + 1, owner = 'b' WHERE id = 1",
    );
    // Only one node changed account 2: no conflict, plain state.
    dbs[1].psql("UPDATE accounts SET balance = balance + 7 WHERE id = 2");
    let report = exchange_ok(&dbs, "prefer:a");
    assert_eq!(report["conflicts"], 1, "{report}");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]), "{report}");
    let one =
        dbs[0].psql("SELECT owner || ' ' || balance || ' ' || hits FROM accounts WHERE id = 1");
    // prefer:a keeps a's owner; both sides' withdrawals count: 100 - 15 - 30.
    assert_eq!(one.trim(), "o1 55.00 3", "{report}");
    assert_eq!(
        dbs[1]
            .psql("SELECT balance FROM accounts WHERE id = 2")
            .trim(),
        "107.00"
    );
    let again = exchange_ok(&dbs, "prefer:a");
    assert_eq!(again["rows"], 0, "{again}");
    // The same with latest, b's change being the later one.
    dbs[0].psql("UPDATE accounts SET balance = balance - 1 WHERE id = 3");
    dbs[1].psql("UPDATE accounts SET balance = balance - 2, owner = 'late b' WHERE id = 3");
    exchange_ok(&dbs, "latest");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    let three = dbs[1].psql("SELECT owner || ' ' || balance FROM accounts WHERE id = 3");
    assert_eq!(three.trim(), "late b 97.00");
}

/// Increments `counters` rows on node `node` until `stop` (or `limit` times), 1 ms apart;
/// returns how many increments changed a row (an UPDATE that found no row does not count).
fn counter_writer(
    dsn: String,
    node: usize,
    stop: Arc<AtomicBool>,
    limit: Option<u64>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let conn = Conn::open(&dsn);
        let mut done = 0;
        let mut i: u64 = 0;
        while !stop.load(Ordering::Relaxed) && limit.is_none_or(|l| i < l) {
            i += 1;
            let sql = format!(
                "UPDATE counters SET hits = hits + 1, note = 'n{node}-{i}' WHERE id = {}",
                1 + (i * 3 + node as u64) % 5
            );
            done += conn
                .rt
                .block_on(conn.client.execute(&sql, &[]))
                .unwrap_or(0);
            thread::sleep(Duration::from_millis(1));
        }
        done
    })
}

#[test]
fn a_delta_column_incremented_concurrently_on_both_nodes_ends_with_the_exact_total() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_dcount",
        2,
        "CREATE TABLE counters (id int PRIMARY KEY, hits bigint NOT NULL, note text);
                 INSERT INTO counters SELECT g, 0, '' FROM generate_series(1, 5) g;",
        &["--delta-column", "counters.hits"],
    );
    exchange_ok(&dbs, "latest");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let (a, b) = (format!("a={}", dbs[0].dsn()), format!("b={}", dbs[1].dsn()));
    let mut daemon = Daemon::start(
        &[
            "--node",
            &a,
            "--node",
            &b,
            "--conflict",
            "latest",
            "--poll-interval",
            "10ms",
        ],
        &dir,
        "daemon",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = dbs
        .iter()
        .enumerate()
        .map(|(n, db)| counter_writer(db.dsn(), n, stop.clone(), Some(400)))
        .collect();
    let total: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let sum = |db: &TestDb<'_>| db.psql("SELECT sum(hits) FROM counters").trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(sum(&dbs[0]) == total.to_string() && contents(&dbs[0]) == contents(&dbs[1])) {
        if Instant::now() > deadline {
            panic!(
                "total {total}: a {} b {}\n{}\n{}\nlog:\n{}\nconflicts b: {:?}",
                sum(&dbs[0]),
                sum(&dbs[1]),
                contents(&dbs[0]),
                contents(&dbs[1]),
                daemon
                    .log()
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n"),
                conflicts(&dbs[1]).iter().rev().take(3).collect::<Vec<_>>()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (code, _) = daemon.term(Duration::from_secs(10));
    assert_eq!(code, 0, "{}", daemon.log());
    exchange_ok(&dbs, "latest");
    assert_eq!(sum(&dbs[1]), total.to_string());
    assert!(conflicts(&dbs[0]).len() + conflicts(&dbs[1]).len() > 0);
}

#[test]
fn a_delta_column_under_writers_and_repeated_exchanges_counts_every_increment() {
    let cluster = Cluster::shared();
    let dbs = nodes_with(
        cluster,
        "tw_dexp",
        2,
        "CREATE TABLE counters (id int PRIMARY KEY, hits bigint NOT NULL, note text);
                 INSERT INTO counters SELECT g, 0, '' FROM generate_series(1, 5) g;",
        &["--delta-column", "counters.hits"],
    );
    exchange_ok(&dbs, "latest");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = dbs
        .iter()
        .enumerate()
        .map(|(n, db)| counter_writer(db.dsn(), n, stop.clone(), None))
        .collect();
    for _ in 0..30 {
        exchange_ok(&dbs, "latest");
    }
    stop.store(true, Ordering::Relaxed);
    let total: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    exchange_ok(&dbs, "latest");
    exchange_ok(&dbs, "latest");
    let sum = |db: &TestDb<'_>| db.psql("SELECT sum(hits) FROM counters").trim().to_owned();
    assert_eq!(
        (sum(&dbs[0]), sum(&dbs[1])),
        (total.to_string(), total.to_string())
    );
}

/// A role that may not set `session_replication_role`: two-way works through the capture
/// guard (rows pgferry applies are skipped by the capture), an install made before the guard is
/// refused with the fix, and re-running `pgferry install` applies it.
#[test]
fn two_way_without_the_replica_role_relies_on_the_capture_guard() {
    let cluster = Cluster::shared();
    let (user, pw) = ("tw_guard_ferry", "pw-guard");
    cluster
        .create_database("tw_guard_roles")
        .psql(&format!("CREATE ROLE {user} LOGIN PASSWORD '{pw}'"));
    let dbs: Vec<TestDb<'_>> = (0..2)
        .map(|i| {
            let db = cluster.create_database(&format!("tw_guard_{i}"));
            db.psql(&format!(
                "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {user}', current_database()); END $$;
                 GRANT CREATE ON SCHEMA public TO {user};"
            ));
            db.try_psql_as(
                user,
                pw,
                "CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
                 CREATE TABLE \"Other Table\" (a text, b int, note text, PRIMARY KEY (a, b));
                 INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g;
                 INSERT INTO \"Other Table\" SELECT 'k' || g, g, 'n' FROM generate_series(1, 20) g;",
            )
            .unwrap();
            assert!(
                db.try_psql_as(user, pw, "SET session_replication_role = replica")
                    .is_err(),
                "the role must not be allowed the replica role"
            );
            pgferry(&["install", "--source", &db.dsn_as(user, pw)]).expect(0);
            db
        })
        .collect();
    let exchange_as = |extra: &[&str]| {
        let a = format!("a={}", dbs[0].dsn_as(user, pw));
        let b = format!("b={}", dbs[1].dsn_as(user, pw));
        let mut args = vec![
            "sync",
            "--once",
            "--json",
            "--conflict",
            "latest",
            "--node",
            &a,
            "--node",
            &b,
        ];
        args.extend_from_slice(extra);
        pgferry(&args)
    };

    // Node b's capture of t as an install made before the guard had it: refused, with the fix.
    dbs[1].psql(
        "DO $$ DECLARE f text := (SELECT 'pgferry.' || quote_ident(capture_function)
                                   FROM pgferry.captured_table WHERE table_name = 't');
           BEGIN
             EXECUTE format('CREATE OR REPLACE FUNCTION %s() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS %L',
                            f, replace((SELECT prosrc FROM pg_proc WHERE oid = (f || '()')::regprocedure),
                                       'pgferry.apply', 'pgferry.before_the_guard'));
           END $$;",
    );
    let refused = exchange_as(&[]).expect(1);
    assert!(
        refused.stderr.contains("node b") && refused.stderr.contains("pgferry install --source"),
        "{}",
        refused.stderr
    );
    let fixed = pgferry(&["install", "--source", &dbs[1].dsn_as(user, pw), "--json"]).expect(0);
    let guarded = fixed.json()["guarded"].clone();
    assert_eq!(guarded.as_array().unwrap().len(), 1, "{guarded}");
    assert_eq!(guarded[0]["name"], "t", "{guarded}");
    // Idempotent: a second run changes nothing.
    let again = pgferry(&["install", "--source", &dbs[1].dsn_as(user, pw), "--json"]).expect(0);
    assert_eq!(again.json()["guarded"], serde_json::json!([]));

    // Writes on both nodes (by the application, which the guard does not skip).
    dbs[0].psql(
        "UPDATE t SET v = 'a' WHERE id <= 10;
         DELETE FROM t WHERE id = 11;
         INSERT INTO t VALUES (101, 'from a');
         UPDATE t SET id = 1000 WHERE id = 12;
         INSERT INTO \"Other Table\" VALUES ('x y', 1, 'a');",
    );
    dbs[1].psql(
        "UPDATE t SET v = 'b' WHERE id BETWEEN 50 AND 60;
         DELETE FROM t WHERE id = 99;
         INSERT INTO t VALUES (201, 'from b');
         UPDATE t SET v = 'both-b' WHERE id = 5;
         UPDATE \"Other Table\" SET note = 'b' WHERE b <= 5;",
    );
    dbs[0].psql("UPDATE t SET v = 'both-a' WHERE id = 5");
    let report = exchange_as(&[]).expect(0).json();
    assert!(report["rows"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(contents(&dbs[0]), contents(&dbs[1]));
    assert_eq!(row(&dbs[0], 201), "from b");
    // No loop: the applied rows were not captured again, so nothing travels back.
    let quiet = exchange_as(&[]).expect(0).json();
    assert_eq!(quiet["rows"], 0, "{quiet}");
    for d in quiet["directions"].as_array().unwrap() {
        assert_eq!(d["tables"].as_array().unwrap().len(), 0, "{quiet}");
    }

    // Without the replica role a user trigger would fire on apply: refused, naming the table.
    dbs[1].psql(
        "CREATE FUNCTION note_it() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER note_it BEFORE UPDATE ON \"Other Table\" FOR EACH ROW EXECUTE FUNCTION note_it();",
    );
    dbs[0].psql("UPDATE t SET v = 'later' WHERE id = 1");
    let blocked = exchange_as(&[]).expect(1);
    assert!(blocked.stderr.contains("Other Table"), "{}", blocked.stderr);
}
