//! Catch-up across major versions: sources on PostgreSQL 10 and 12 (npm binaries) to targets on
//! 15 (the system's) and 18. Text COPY between sessions with fixed text forms carries every value
//! exactly; the comparison reads floats through float8send so that the servers' different
//! float text output cannot hide or invent a difference.

mod common;

use common::pgferry;
use pgferry_testkit::{Cluster, PgBin, TestDb};

fn ddl(major: u32) -> String {
    let partitioned = if major >= 11 {
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');"
    } else {
        "CREATE TABLE m (id int, region text, v text) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m (PRIMARY KEY (id, region)) FOR VALUES IN ('us');"
    };
    format!(
        "CREATE TABLE a (id serial PRIMARY KEY, f float8, j jsonb, n numeric, ts timestamptz, b bytea,
                         d date NOT NULL, t text, UNIQUE (d, id));
         {partitioned}"
    )
}

const DATA: &str = "
    INSERT INTO a (f, j, n, ts, b, d, t)
    SELECT g / 3.0, jsonb_build_object('g', g, 's', 'é\"'), g / 7.0, '2026-01-01 00:00:00+00'::timestamptz + g * interval '1 minute',
           '\\x00ff', '2026-01-01'::date + g, 'row ' || g FROM generate_series(1, 500) g;
    INSERT INTO m SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g FROM generate_series(1, 100) g;";

const CHANGES: &str = "
    UPDATE a SET f = f * 1.1, j = j || '{\"u\": true}' WHERE id % 3 = 0;
    DELETE FROM a WHERE id % 10 = 0;
    INSERT INTO a (f, d, t) VALUES (0.1::float8 + 0.2, '2030-01-01', E'tab\\there'), ('NaN', '2030-01-02', NULL);
    UPDATE a SET id = id + 5000 WHERE id = 7;
    UPDATE m SET v = 'changed' WHERE id < 20;
    TRUNCATE m_us;
    INSERT INTO m VALUES (1001, 'us', 'after truncate');";

/// Rows in a form that is the same on every server version.
fn neutral(db: &TestDb<'_>) -> String {
    db.psql(
        "SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET DateStyle = 'ISO';
         SELECT concat_ws('|', id, encode(float8send(f), 'hex'), j::text, n::text, ts::text, encode(b, 'hex'), d::text, t)
           FROM a ORDER BY id;
         SELECT concat_ws('|', id, region, v) FROM m ORDER BY id, region;",
    )
}

fn catch_up(source_major: &str, target: Option<&str>) {
    let sbin =
        PgBin::npm(source_major).unwrap_or_else(|e| panic!("PostgreSQL {source_major}: {e}"));
    let source = Cluster::shared_for(&sbin).create_database("xv_src");
    let tcluster = match target {
        Some(v) => {
            Cluster::shared_for(&PgBin::npm(v).unwrap_or_else(|e| panic!("PostgreSQL {v}: {e}")))
        }
        None => Cluster::shared(),
    };
    let target = tcluster.create_database("xv_dst");
    // Same DDL and data on both sides (pg_dump 15 cannot dump an 18 server).
    source.psql(&ddl(sbin.major()));
    source.psql(DATA);
    target.psql(&ddl(sbin.major()));
    target.psql(DATA);
    assert_eq!(neutral(&source), neutral(&target));
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(CHANGES);
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--once",
    ])
    .expect(0);
    assert_eq!(neutral(&source), neutral(&target));
    source.psql("UPDATE a SET n = -1 WHERE id < 50; INSERT INTO m VALUES (2000, 'eu', 'late');");
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--once",
    ])
    .expect(0);
    assert_eq!(neutral(&source), neutral(&target));
    assert_eq!(
        source.scalar("SELECT last_value FROM a_id_seq"),
        target.scalar("SELECT last_value FROM a_id_seq")
    );
}

#[test]
fn postgresql_10_to_15() {
    catch_up("10", None);
}

#[test]
fn postgresql_12_to_15() {
    catch_up("12", None);
}

#[test]
fn postgresql_12_to_18() {
    catch_up("12", Some("18"));
}
