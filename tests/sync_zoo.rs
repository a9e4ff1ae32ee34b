//! The type zoo: every column type a target must get back exactly, including NULLs, special
//! float values, multi-megabyte values, generated and identity columns.

mod common;

use common::pgferry;
use pgferry_testkit::{Cluster, TestDb};

const DDL: &str = "
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN positive AS int CHECK (VALUE > 0);
    CREATE TYPE pair AS (a int, b text);
    CREATE TABLE zoo (
        id bigint PRIMARY KEY,
        i2 int2, i4 int4, i8 int8,
        num numeric, num_p numeric(30, 10),
        f4 float4, f8 float8,
        t text, vc varchar(20), ch char(5),
        by bytea, bo bool,
        d date, tm time, tmz timetz, ts timestamp, tsz timestamptz, iv interval,
        u uuid, js json, jb jsonb,
        ai int[], at text[], a2 int[][],
        m mood, p positive, pr pair,
        r4 int4range, rt tstzrange,
        ip inet, cn cidr, mac macaddr,
        bits bit(8), vbits varbit,
        x xml,
        ident bigint GENERATED ALWAYS AS IDENTITY,
        gen text GENERATED ALWAYS AS (t || '!') STORED
    );";

const ROWS: &str = "
    INSERT INTO zoo (id, i2, i4, i8, num, num_p, f4, f8, t, vc, ch, by, bo, d, tm, tmz, ts, tsz, iv, u, js, jb,
                     ai, at, a2, m, p, pr, r4, rt, ip, cn, mac, bits, vbits, x) VALUES
      (1, -32768, 2147483647, -9223372036854775808, 'NaN', 12345678901234567890.0123456789,
       'Infinity', 0.1::float8 + 0.2, E'quote '' backslash \\\\ tab \\t newline \\n unicode é 😀', 'varchar', 'ch',
       '\\x00ff00', true, '2026-02-28', '23:59:59.999999', '12:00:00+05:30', '2026-01-01 00:00:00.000001',
       '2026-06-30 12:34:56.789+02', '1 year 2 mons -3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
       '{\"a\": [1, 2, {\"b\": null}], \"u\": \"\\u00e9\"}', '{\"nested\": {\"deep\": [true, false]}, \"n\": 1.50}',
       '{1,2,3}', '{\"a\",NULL,\"with \\\"quote\\\"\",\"comma,\"}', '{{1,2},{3,4}}', 'happy', 42, '(1,\"x y\")',
       '[1,10)', '[2026-01-01 00:00+00,2026-02-01 00:00+00)', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
       B'10101010', B'101', '<a href=\"x\">text &amp; more</a>'),
      (2, 0, 0, 0, '-0.0000000001', 0, '-Infinity', '-0', '', '', '', '\\x', false, 'infinity', '00:00', '00:00+00',
       '-infinity', 'infinity', '0', '00000000-0000-0000-0000-000000000000', '[]', '{}', '{}', '{}', '{}',
       'sad', 1, '(,)', 'empty', '(,)', '::1', '::/0', 'ff:ff:ff:ff:ff:ff', B'00000000', B'', '<r/>'),
      (3, NULL, NULL, NULL, NULL, NULL, 'NaN', 'NaN', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
      (4, 1, 1, 1, 1, 1, 1.5, 1e-310, repeat('large ', 1000000), 'big', 'big',
       decode(repeat('00ff', 2 * 1024 * 1024), 'hex'), true, '0044-03-15 BC', '12:00', '12:00-03',
       '1999-12-31 23:59:59', '1999-12-31 23:59:59-08', '100 years', gen_random_uuid(), '1', '\"s\"',
       NULL, NULL, NULL, 'ok', 7, '(2,)', '[,5]', '(,2026-01-01 00:00+00]', '2001:db8::1', '2001:db8::/32',
       '00:00:00:00:00:00', B'11111111', B'1', '<big/>');";

/// Every row, read in one neutral session, floats also by their binary form.
fn rows(db: &TestDb<'_>) -> String {
    db.psql(
        "SET DateStyle = 'ISO'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';
         SET extra_float_digits = 3; SET bytea_output = 'hex';
         SELECT z::text, encode(float4send(f4), 'hex'), encode(float8send(f8), 'hex'), md5(t), md5(by)
           FROM zoo z ORDER BY id",
    )
}

#[test]
fn every_type_round_trips_exactly() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("zoo_src");
    let target = cluster.create_database("zoo_dst");
    source.psql(DDL);
    target.psql(DDL);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(ROWS);
    source.psql("UPDATE zoo SET f8 = f8 * 2, jb = jb || '{\"updated\": true}', t = t || '+' WHERE id IN (1, 4);");
    source.psql("DELETE FROM zoo WHERE id = 2; INSERT INTO zoo (id, m) VALUES (5, 'ok');");
    pgferry(&[
        "sync",
        "--source",
        &source.dsn(),
        "--target",
        &target.dsn(),
        "--once",
    ])
    .expect(0);
    let expected = rows(&source);
    assert_eq!(target.scalar("SELECT count(*) FROM zoo"), "4");
    assert!(
        expected.contains("happy") && expected.contains("large large"),
        "{expected}"
    );
    assert_eq!(expected, rows(&target));
    // Identity values are kept, generated columns computed by the target.
    assert_eq!(
        source.psql("SELECT id, ident, gen IS NOT DISTINCT FROM t || '!' FROM zoo ORDER BY id"),
        target.psql("SELECT id, ident, gen IS NOT DISTINCT FROM t || '!' FROM zoo ORDER BY id")
    );
}
