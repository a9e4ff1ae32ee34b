//! End-to-end tests of `pgferry verify`: equal tables, differences narrowed to their keys, a
//! live source whose pending changes are left out, composite and text keys. (Across major
//! versions, with floats, verify runs at the end of the version tests in sync_types.rs.)

mod common;

use common::{pgferry, sync_json, verify_run};
use pgferry_testkit::{Cluster, TestDb};

const SCHEMA: &str = r#"
    CREATE TABLE item (id int PRIMARY KEY, name text, price numeric(10,2), ratio float8, tags text[]);
    CREATE TABLE "Odd ""Keys""" (region text, n int, v jsonb, PRIMARY KEY (region, n));
    INSERT INTO item SELECT g, 'item ' || g, g * 1.5, 1.0 / g, ARRAY['a', g::text] FROM generate_series(1, 5000) g;
    INSERT INTO "Odd ""Keys""" SELECT r, g, jsonb_build_object('g', g)
      FROM unnest(ARRAY['eu', 'us', 'Ärger', 'z z']) r, generate_series(1, 300) g;"#;

fn pair(prefix: &str) -> (TestDb<'static>, TestDb<'static>) {
    let cluster = Cluster::shared();
    let source = cluster.create_database(&format!("{prefix}_src"));
    let target = cluster.create_database(&format!("{prefix}_dst"));
    source.psql(SCHEMA);
    target.psql(SCHEMA);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    (source, target)
}

#[test]
fn equal_databases_verify_equal() {
    let (source, target) = pair("vf_eq");
    source.psql(
        "UPDATE item SET price = price + 1 WHERE id % 7 = 0; DELETE FROM item WHERE id > 4990",
    );
    sync_json(&source, &target);
    let report = verify_run(&source, &target).expect(0).json();
    assert_eq!(report["equal"], true, "{report}");
    assert_eq!(report["tables"][0]["source_rows"], 1200, "{report}");
    assert_eq!(report["tables"][1]["source_rows"], 4990, "{report}");
}

#[test]
fn differences_are_narrowed_to_their_keys() {
    let (source, target) = pair("vf_diff");
    target.psql(
        r#"UPDATE item SET name = 'changed' WHERE id = 1234;
           DELETE FROM item WHERE id = 4321;
           INSERT INTO item VALUES (9999, 'extra', 1, 1, NULL);
           UPDATE item SET ratio = ratio * (1 + 1e-15) WHERE id = 77;
           UPDATE "Odd ""Keys""" SET v = '{"g": 0}' WHERE region = 'Ärger' AND n = 12;"#,
    );
    let run = verify_run(&source, &target).expect(1);
    let report = run.json();
    assert_eq!(report["equal"], false);
    let text = report.to_string();
    for needle in [
        r#"{"key":"1234","kind":"different"}"#,
        r#"{"key":"4321","kind":"missing on target"}"#,
        r#"{"key":"9999","kind":"extra on target"}"#,
        r#"{"key":"77","kind":"different"}"#,
        r#""kind":"different""#,
        "Ärger",
    ] {
        assert!(text.contains(needle), "{needle} not in {report}");
    }
    // The text report names the table and the keys.
    let human = pgferry(&[
        "verify",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--table",
        "public.item",
    ])
    .expect(1);
    assert!(
        human.stdout.contains("DIFFERENT  public.item"),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("missing on target: key 4321"),
        "{}",
        human.stdout
    );
}

#[test]
fn pending_changes_on_a_live_source_are_left_out_and_counted() {
    let (source, target) = pair("vf_live");
    sync_json(&source, &target);
    source.psql("UPDATE item SET name = 'later' WHERE id <= 10; DELETE FROM item WHERE id = 11");
    let report = verify_run(&source, &target).expect(0).json();
    let item = &report["tables"][1];
    assert_eq!(item["table"], "public.item", "{report}");
    assert_eq!(item["skipped_pending"], 11, "{report}");
    assert_eq!(item["equal"], true, "{report}");
    // A difference outside the pending keys is still found.
    target.psql("UPDATE item SET name = 'drift' WHERE id = 500");
    verify_run(&source, &target).expect(1);
}

#[test]
fn errors_never_exit_1() {
    let cluster = Cluster::shared();
    let plain = cluster.create_database("vf_plain");
    let other = cluster.create_database("vf_other");
    // Not a captured source: an error (5), not "different" (1).
    let run = verify_run(&plain, &other);
    assert!(run.code >= 2, "{run:?}");
    let run = pgferry(&[
        "verify",
        "--source",
        "host=127.0.0.1 port=1 dbname=x connect_timeout=2",
        "--target",
        &other.dsn(),
    ]);
    assert_eq!(run.code, 3, "{run:?}");
}
