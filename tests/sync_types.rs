//! Values a catch-up must carry exactly, end to end through the CLI on real clusters: a zoo of
//! column and key types (special floats, multi-megabyte values, arrays, enums, domains,
//! composites, ranges, generated and identity columns), sources and targets whose databases
//! default to unusual `DateStyle`, `TimeZone`, `IntervalStyle`, `bytea_output` and
//! `extra_float_digits`, and sources on older major versions than their targets.
//!
//! Every comparison reads both sides in a neutral session (fixed text forms set explicitly),
//! floats also by their binary form (`float4send`/`float8send`), so that neither a server's
//! defaults nor its version's float text output can hide or invent a difference.

mod common;

use common::{pgferry, sync_json};
use pgferry_testkit::{Cluster, PgBin, TestDb};

/// Fixed text forms for comparison queries, whatever the database's defaults.
const NEUTRAL: &str =
    "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres';
     SET extra_float_digits = 3; SET bytea_output = 'hex';";

/// Runs `sql` in a neutral session of `db`.
fn neutral(db: &TestDb<'_>, sql: &str) -> String {
    db.psql(&format!("{NEUTRAL}\n{sql}"))
}

/// Asserts that `sql`, run in a neutral session, gives the same output on both sides, and
/// returns it.
#[track_caller]
fn assert_same(source: &TestDb<'_>, target: &TestDb<'_>, sql: &str) -> String {
    let expected = neutral(source, sql);
    let got = neutral(target, sql);
    if expected != got {
        let diff: Vec<String> = expected
            .lines()
            .zip(got.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .map(|(a, b)| format!("source: {a}\ntarget: {b}"))
            .collect();
        panic!(
            "source and target differ ({} against {} lines) for\n{sql}\nfirst differing lines:\n{}",
            expected.lines().count(),
            got.lines().count(),
            diff.join("\n")
        );
    }
    expected
}

// ---------------------------------------------------------------------------------------------
// 1. The type zoo
// ---------------------------------------------------------------------------------------------

const ZOO_TYPES: &str = r#"
    CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'it''s "complicated"');
    CREATE DOMAIN short_text AS text CHECK (length(VALUE) <= 20 AND VALUE <> 'forbidden');
    CREATE DOMAIN recent AS date CHECK (VALUE > '1000-01-01');
    CREATE TYPE pair AS (a int, b text, c float8, d timestamptz);
"#;

/// The zoo table; `x xml` only when the server was built with libxml.
fn zoo_ddl(with_xml: bool) -> String {
    let xml = if with_xml { "x xml," } else { "" };
    format!(
        r#"{ZOO_TYPES}
        CREATE TABLE zoo (
            id bigint PRIMARY KEY,
            i2 int2, i4 int4, i8 int8,
            num numeric, num_big numeric, num_p numeric(30, 10),
            f4 float4, f8 float8,
            t text, vc varchar(10), ch char(6), qc "char", nm name,
            by bytea, bo bool,
            d date, tm time, tmz timetz, ts timestamp, tsz timestamptz, ts3 timestamp(3), iv interval,
            u uuid, js json, jb jsonb,
            ai int[], at text[], a2 int[], af float8[], ab bytea[], ats timestamptz[],
            m mood, ma mood[], dom short_text, pr pair, pra pair[],
            r4 int4range, rt tstzrange, rn numrange, mr int4multirange,
            ip inet, cn cidr, mac macaddr, mac8 macaddr8,
            mo money,
            bits bit(8), vbits varbit(16),
            {xml}
            tsv tsvector, tsq tsquery,
            pt point, bx box, pg polygon, ci circle,
            o oid, lsn pg_lsn,
            ident bigint GENERATED ALWAYS AS IDENTITY,
            gen text GENERATED ALWAYS AS (coalesce(t, '') || '!') STORED,
            gen_len int GENERATED ALWAYS AS (octet_length(by)) STORED
        );
        -- Keys of every recorded form (text, ISO, hex), through domains and enums.
        CREATE TABLE keyed (
            k_text text, k_ts timestamptz, k_bytes bytea, k_day recent, k_num numeric, k_uuid uuid,
            k_mood mood, k_ch char(4), k_time timetz, k_bits varbit,
            v text,
            PRIMARY KEY (k_text, k_ts, k_bytes, k_day, k_num, k_uuid, k_mood, k_ch, k_time, k_bits)
        );"#
    )
}

const ZOO_COLUMNS: &str = "id, i2, i4, i8, num, num_big, num_p, f4, f8, t, vc, ch, qc, nm, by, bo,
    d, tm, tmz, ts, tsz, ts3, iv, u, js, jb, ai, at, a2, af, ab, ats, m, ma, dom, pr, pra,
    r4, rt, rn, mr, ip, cn, mac, mac8, mo, bits, vbits, tsv, tsq, pt, bx, pg, ci, o, lsn";

/// Rows written by a session whose text forms are all unusual: values must not depend on them.
fn zoo_rows() -> String {
    format!(
        r#"
    SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard';
    SET bytea_output = 'escape'; SET extra_float_digits = 0;
    INSERT INTO zoo ({ZOO_COLUMNS}) VALUES
    (1, 32767, -2147483648, 9223372036854775807, 'NaN',
     ('1' || repeat('0', 400) || '.' || repeat('9', 400))::numeric, -12345678901234567890.0123456789,
     3.4028235e38, 0.1::float8 + 0.2,
     E'quote '' dq " backslash \\ tab \t cr \r nl \n \\. \\N NULL \u00e9 \U0001F600 nbsp \u00a0 zwsp \u200b',
     'ten chars!', 'ab', 'x', 'a name',
     '\x00015c0a0d09ff80', true,
     '2026-02-28', '23:59:59.999999', '24:00:00+14:59', '2026-01-01 00:00:00.000001',
     '2026-06-30 12:34:56.789012+02', '2026-01-01 01:02:03.456', '1 year 2 mons -3 days 04:05:06.789012',
     'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
     '{{"b": 1,  "a": [1, 2.50, {{"c": null}}], "a": "dup", "u": "\u00e9\ud83d\ude00\u0000"}}',
     '{{"nested": {{"deep": [true, false, null, 1.50, 1e400, "\u00e9"]}}, "esc": "tab\there \"q\" \\ /"}}',
     '{{1,NULL,3}}',
     ARRAY['a', NULL, 'with "quote"', 'comma,', 'back\slash', '', 'NULL', '{{brace}}', ' spaced ', E'nl\nx'],
     '{{{{1,2}},{{3,4}}}}',
     ARRAY[0.1::float8 + 0.2, '-0', 'NaN', 'Infinity', '-Infinity', 5e-324, 1.7976931348623157e308],
     ARRAY['\x00'::bytea, '\xff5c', NULL],
     ARRAY['infinity'::timestamptz, '2026-01-01 00:00+05:30', '1800-01-01 00:00'],
     'it''s "complicated"', '{{happy,sad,"it''s \"complicated\""}}', 'domain text',
     ROW(1, 'x "y" \ z, (w)', 1.0 / 3, '2026-01-01 00:00+00')::pair,
     ARRAY[ROW(2, NULL, '-0', NULL)::pair, NULL, ROW(NULL, '', 'NaN', 'infinity')::pair],
     '[1,10)', '[2026-01-01 00:00+00,infinity)', '(0.1,1e30]', '{{[1,3), [5,7)}}',
     '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '08:00:2b:01:02:03:04:05',
     '-92233720368547758.08', B'10101010', B'101',
     'a fat cat:2A sat', 'fat & !(rat | cat)',
     '(0.1,-0)', '((0,0),(1.5,2.5))', '((0,0),(1,1),(1,0))', '<(0,0),1e-300>', 4294967295, 'FFFFFFFF/FFFFFFFF'),
    (2, -32768, 0, -9223372036854775808, '-0.0000000001', '0', 0,
     '-0', '-0',
     '', '', '', '', '',
     '\x', false,
     '4713-01-01 BC', '00:00', '00:00-15:59', '-infinity', 'infinity', '294276-12-31 23:59:59.999',
     '-178000000 years',
     '00000000-0000-0000-0000-000000000000', '""', '[]',
     '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}',
     'sad', '{{}}', '', ROW(NULL, NULL, NULL, NULL)::pair, '{{}}',
     'empty', 'empty', '(,)', '{{}}',
     '::1', '::/0', 'ff:ff:ff:ff:ff:ff', 'ff:ff:ff:ff:ff:ff:ff:ff',
     '0', B'00000000', B'',
     '', NULL,
     '(1e308,-1e308)', '((0,0),(0,0))', '((0,0))', '<(1,1),0>', 0, '0/0'),
    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
    (5, 1, 1, 1, '1.5', '1e-300'::numeric, 1, 1e-45, 1e-310,
     'float edge cases', NULL, NULL, NULL, NULL, NULL, NULL,
     '0044-03-15 BC', NULL, NULL, '0044-03-15 12:00:00 BC', '1800-01-01 00:00:00', NULL, '-1 day +1 second',
     NULL, NULL, 'null', NULL, NULL, NULL,
     ARRAY[1e-310, -5e-324, 0.30000000000000004, 1.0 / 3], NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
     NULL, NULL, NULL, NULL, NULL, NULL, NULL);
    -- Several megabytes in one row: text, bytea of every byte value, a large jsonb and array.
    INSERT INTO zoo (id, t, by, jb, at, vc)
    SELECT 4, repeat('x', 5 * 1024 * 1024) || E'\tend',
           decode(repeat((SELECT string_agg(lpad(to_hex(b), 2, '0'), '' ORDER BY b) FROM generate_series(0, 255) b), 20480), 'hex'),
           (SELECT jsonb_agg(jsonb_build_object('i', g, 's', repeat('é', 10))) FROM generate_series(1, 20000) g),
           (SELECT array_agg(repeat(chr(65 + g % 26), g % 50)) FROM generate_series(1, 50000) g),
           'big';
    -- Ordinary rows, for volume.
    INSERT INTO zoo (id, i4, num, f4, f8, t, d, tsz, iv, jb, ai, m, pr, r4)
    SELECT 100 + g, g, g / 7.0, g / 3.0, 1.0 / g, 'row ' || g, '2000-01-01'::date + g,
           '2000-01-01 00:00+00'::timestamptz + g * interval '1 hour 1.5 second', g * interval '1.5 day',
           jsonb_build_object('g', g), ARRAY[g, -g], (ARRAY['sad', 'ok', 'happy'])[1 + g % 3]::mood,
           ROW(g, 'r' || g, g * 0.1, NULL)::pair, int4range(g, g + 10)
      FROM generate_series(1, 1000) g;
    INSERT INTO keyed VALUES
     (E'tab\there', 'infinity', '\x00', '2026-02-28', 'NaN', '00000000-0000-0000-0000-000000000001',
      'sad', 'a', '24:00:00+05:30', B'1', 'one'),
     (E'nl\nback\\slash "q" ''s'' {{b,c}} \\N', '-infinity', '\x5c00ff', '1001-01-01', '-0.000',
      '00000000-0000-0000-0000-000000000002', 'ok', '', '00:00:00-15:59', B'', 'two'),
     (E'\u00e9\U0001F600', '0044-03-15 12:00:00.000001 BC', '', '9999-12-31', '1e-100'::numeric,
      '00000000-0000-0000-0000-000000000003', 'happy', 'abcd', '12:34:56.789+05:53:28', B'0101', 'three'),
     ('', '1800-01-01 00:00:00', '\xdeadbeef', '01/02/2026', '123456789012345678901234567890.123',
      '00000000-0000-0000-0000-000000000004', 'it''s "complicated"', 'x  ', '12:00', B'1111000011110000', 'four'),
     ('NULL', '2026-03-29 02:30:00.5+01', '\x0d0a', '31/12/1999', '-1',
      '00000000-0000-0000-0000-000000000005', 'ok', 'NULL', '23:59:59.999999-00:00:01', B'0', 'five');
    "#
    )
}

/// Changes of the first round, on top of the rows (same writer settings).
const ZOO_CHANGES_1: &str = r#"
    SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard';
    SET bytea_output = 'escape'; SET extra_float_digits = 0;
    UPDATE zoo SET f8 = f8 * 3, f4 = '-Infinity', jb = jb || '{"updated": true}', t = t || '+' WHERE id IN (1, 4);
    DELETE FROM zoo WHERE id BETWEEN 100 AND 199;
    UPDATE zoo SET id = id + 100000 WHERE id BETWEEN 200 AND 210;
    INSERT INTO zoo (id, t) VALUES (9, 'born and gone in one round');
    DELETE FROM zoo WHERE id = 9;
    UPDATE keyed SET k_ts = k_ts + interval '1 microsecond' WHERE v = 'three';
    UPDATE keyed SET v = 'changed' WHERE v = 'one';
    DELETE FROM keyed WHERE v = 'five';
"#;

/// Changes of the second round: the big row grows and changes key, NULLs come and go.
const ZOO_CHANGES_2: &str = r#"
    SET TimeZone = 'America/St_Johns'; SET DateStyle = 'Postgres, MDY'; SET extra_float_digits = -15;
    UPDATE zoo SET t = t || 'more', by = by || '\x00'::bytea, id = 40 WHERE id = 4;
    UPDATE zoo SET t = 'no longer null', f4 = '-0', f8 = 'Infinity', af = '{NaN,-0}' WHERE id = 3;
    UPDATE zoo SET jb = NULL, ai = NULL, pr = NULL, f8 = 'NaN' WHERE id = 2;
    UPDATE zoo SET f8 = f8 + 1e-16 WHERE id BETWEEN 500 AND 600;
    UPDATE keyed SET k_text = k_text || E'\\', k_bytes = k_bytes || '\x00'::bytea WHERE v = 'two';
    INSERT INTO keyed VALUES ('new', '2026-01-01 00:00:00.000001+00', '\x', '2026-01-01', 0,
        '00000000-0000-0000-0000-000000000006', 'sad', 'n', '00:00+00', B'', 'six');
"#;

/// Every row of the zoo: a digest and (for rows that are not huge) the text of the whole row,
/// plus the binary form of every float.
const ZOO_ROWS: &str = "
    SELECT id, md5(z::text), octet_length(z::text),
           CASE WHEN octet_length(z::text) < 20000 THEN z::text END,
           encode(float4send(f4), 'hex'), encode(float8send(f8), 'hex'),
           (SELECT string_agg(coalesce(encode(float8send(e), 'hex'), '-'), ',') FROM unnest(af) e),
           encode(float8send((pr).c), 'hex'),
           (SELECT string_agg(coalesce(encode(float8send(e.c), 'hex'), '-'), ',') FROM unnest(pra) e),
           md5(by), octet_length(t), ident, gen_len
      FROM zoo z ORDER BY id";

const KEYED_ROWS: &str = "SELECT k::text, encode(k_bytes, 'hex') FROM keyed k ORDER BY k::text";

#[test]
fn a_zoo_of_column_and_key_types_round_trips_exactly() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("types_zoo_src");
    let target = cluster.create_database("types_zoo_dst");
    let with_xml = source.try_psql("SELECT '<a/>'::xml").is_ok();
    source.psql(&zoo_ddl(with_xml));
    target.psql(&zoo_ddl(with_xml));
    pgferry(&["install", "--source", &source.dsn()]).expect(0);

    source.psql(&zoo_rows());
    if with_xml {
        source.psql(
            r#"UPDATE zoo SET x = '<a href="x&amp;y">text &lt; more <b>é</b><![CDATA[<raw>]]></a>' WHERE id = 1;
               UPDATE zoo SET x = 'just text, a fragment' WHERE id = 2;"#,
        );
    }
    source.psql(ZOO_CHANGES_1);
    let report = sync_json(&source, &target);
    assert_eq!(report["rounds"], 1, "{report}");

    let rows = assert_same(&source, &target, ZOO_ROWS);
    // The comparison saw what it should: special values, the big row, the generated columns.
    assert_eq!(target.scalar("SELECT count(*) FROM zoo"), "906");
    for needle in ["NaN", "Infinity", "infinity", "happy", "8000000000000000"] {
        assert!(rows.contains(needle), "{needle} missing from\n{rows}");
    }
    assert_eq!(
        target.scalar("SELECT octet_length(t) || ' ' || octet_length(by) || ' ' || gen_len FROM zoo WHERE id = 4"),
        format!("{} {} {}", 5 * 1024 * 1024 + 5, 5 * 1024 * 1024, 5 * 1024 * 1024)
    );
    assert_same(&source, &target, KEYED_ROWS);
    assert_eq!(target.scalar("SELECT count(*) FROM keyed"), "4");
    assert_eq!(
        target.scalar("SELECT count(*) FROM zoo WHERE gen IS DISTINCT FROM coalesce(t, '') || '!'"),
        "0"
    );
    if with_xml {
        assert_same(
            &source,
            &target,
            "SELECT id, x::text FROM zoo WHERE x IS NOT NULL ORDER BY id",
        );
    }

    source.psql(ZOO_CHANGES_2);
    let report = sync_json(&source, &target);
    assert_eq!(report["rounds"], 1, "{report}");
    assert_same(&source, &target, ZOO_ROWS);
    assert_same(&source, &target, KEYED_ROWS);
    assert_eq!(target.scalar("SELECT count(*) FROM zoo WHERE id = 40"), "1");
    let again = sync_json(&source, &target);
    assert_eq!(again["rows"], 0, "{again}");
    // Identity values were kept, and the identity sequence carried forward: the next row gets
    // the same identity on both sides.
    let next = "INSERT INTO zoo (id) VALUES (7) RETURNING ident";
    assert_eq!(source.scalar(next), target.scalar(next));
    // verify agrees, on every type of the zoo (the row inserted just above is pending on the
    // source and left out).
    let verdict = common::verify_run(&source, &target);
    assert_eq!(verdict.code, 0, "{}{}", verdict.stdout, verdict.stderr);
}

// ---------------------------------------------------------------------------------------------
// 2. Databases whose default text forms differ
// ---------------------------------------------------------------------------------------------

const STYLED_DDL: &str = "
    CREATE TABLE ev (at timestamptz PRIMARY KEY, d date, ts timestamp, iv interval, f float8, b bytea, t text);
    CREATE TABLE ev2 (d date, ts timestamp, tm time, b bytea, v float8, PRIMARY KEY (d, ts, tm, b));";

/// Written in the source database's own defaults (`SQL, DMY`, Asia/Kolkata, escape bytea,
/// no extra float digits): literals like `01/02/2026` mean 1 February here.
const STYLED_ROWS: &str = r#"
    INSERT INTO ev VALUES
      ('01/02/2026 10:00:00.123456', '31/12/1999', '01/02/2026 23:59:59.999999', '1 year 2 mons -3 days 04:05:06.789012',
       0.1::float8 + 0.2, '\x00015c0a0d7f80ff', E'back\\slash'),
      ('1800-01-01 00:00:00', '0044-03-15 BC', '0044-03-15 12:00 BC', '-1 day +1 second', 1.0 / 3, '\x5c5c', 'pre-1900 Kolkata offset'),
      ('infinity', 'infinity', '-infinity', '-178000000 years', 'NaN', '\x', ''),
      ('-infinity', '-infinity', 'infinity', '0', '-0', NULL, NULL),
      ('2026-03-29 02:30:00+01', '2026-02-28', '2026-03-08 02:30:00', '1.5 days', 1e-310, '\xdeadbeef', 'DST gap elsewhere'),
      ('0044-03-15 12:00:00.000001 BC', '4713-01-01 BC', '294276-12-31 23:59:59.999999', '-1 mons +1 day -00:00:00.000001',
       1.7976931348623157e308, '\xff', 'extremes'),
      ('2026-06-30 12:34:56.789012+14', NULL, NULL, NULL, 'Infinity', NULL, 'NULLs');
    INSERT INTO ev
    SELECT '2000-01-01 00:00+05:30'::timestamptz + g * interval '1 hour 0.000001 second', '2000-01-01'::date + g,
           '2000-01-01'::timestamp + g * interval '1 minute', g * interval '1 day 1.5 second', 1.0 / g,
           decode(lpad(to_hex(g), 8, '0'), 'hex'), 'row ' || g
      FROM generate_series(1, 300) g;
    INSERT INTO ev2 VALUES
      ('01/02/2026', '01/02/2026 10:00', '24:00:00', '\x00', 0.1::float8 + 0.2),
      ('0044-03-15 BC', '0044-03-15 00:00 BC', '00:00', '\x5c', '-0'),
      ('infinity', '-infinity', '12:34:56.789012', '\x', 'NaN');"#;

const STYLED_CHANGES: &str = r#"
    UPDATE ev SET at = at + interval '1 microsecond', f = f * 3 WHERE t = 'pre-1900 Kolkata offset';
    UPDATE ev SET iv = iv * 2, b = b || '\x00'::bytea, d = d + 1 WHERE t LIKE 'row 1%';
    DELETE FROM ev WHERE t LIKE 'row 2%';
    UPDATE ev SET at = 'epoch' WHERE t = 'DST gap elsewhere';
    UPDATE ev2 SET b = '\xffff', v = 1e-320 WHERE d = '01/02/2026';
    INSERT INTO ev2 VALUES ('29/02/2028', '29/02/2028 12:00', '12:00:00.5', '\x0d0a', 1.0 / 7);"#;

const STYLED_ROWS_CMP: &str = "
    SELECT e::text, encode(float8send(f), 'hex'), extract(epoch FROM at), extract(epoch FROM iv) FROM ev e ORDER BY at;
    SELECT e::text, encode(float8send(v), 'hex') FROM ev2 e ORDER BY d, ts, tm, b;";

#[test]
fn databases_with_unusual_default_text_forms_get_identical_values() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("types_styled_src");
    let target = cluster.create_database("types_styled_dst");
    cluster.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {src} SET DateStyle = 'SQL, DMY';
             ALTER DATABASE {src} SET TimeZone = 'Asia/Kolkata';
             ALTER DATABASE {src} SET IntervalStyle = 'iso_8601';
             ALTER DATABASE {src} SET bytea_output = 'escape';
             ALTER DATABASE {src} SET extra_float_digits = 0;
             ALTER DATABASE {dst} SET DateStyle = 'German';
             ALTER DATABASE {dst} SET IntervalStyle = 'sql_standard';
             ALTER DATABASE {dst} SET TimeZone = 'America/New_York';
             ALTER DATABASE {dst} SET bytea_output = 'escape';
             ALTER DATABASE {dst} SET extra_float_digits = 0;",
            src = source.name(),
            dst = target.name()
        ),
    );
    // The settings are in force for new sessions.
    assert_eq!(
        source.scalar("SELECT current_setting('DateStyle') || ' ' || current_setting('TimeZone')"),
        "SQL, DMY Asia/Kolkata"
    );
    assert_eq!(
        target.scalar(
            "SELECT current_setting('DateStyle') || ' ' || current_setting('IntervalStyle')"
        ),
        "German, DMY sql_standard"
    );
    source.psql(STYLED_DDL);
    target.psql(STYLED_DDL);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(STYLED_ROWS);
    let report = sync_json(&source, &target);
    assert_eq!(report["rounds"], 1, "{report}");
    let rows = assert_same(&source, &target, STYLED_ROWS_CMP);
    // `01/02/2026 10:00:00.123456` in `SQL, DMY` at Asia/Kolkata.
    assert!(
        rows.contains("(\"2026-02-01 04:30:00.123456+00\""),
        "{rows}"
    );
    assert_eq!(target.scalar("SELECT count(*) FROM ev"), "307");

    source.psql(STYLED_CHANGES);
    sync_json(&source, &target);
    assert_same(&source, &target, STYLED_ROWS_CMP);
    // What the target's own users see, in the target's own styles, is the source's values.
    assert_eq!(
        target.scalar("SELECT b FROM ev2 WHERE d = '01.02.2026'"),
        "\\377\\377"
    );
    assert_eq!(
        target.scalar("SELECT iv FROM ev WHERE t = 'pre-1900 Kolkata offset'"),
        "+0-0 -1 +0:00:01"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Older sources, newer targets
// ---------------------------------------------------------------------------------------------

/// An application schema valid on PostgreSQL 10 to 18: PostgreSQL 10 has no keys on partitioned
/// parents, so there each partition has its own.
fn app_ddl(source_major: u32) -> String {
    let partitions = if source_major >= 11 {
        "CREATE TABLE ev (id int NOT NULL, region text NOT NULL, at timestamptz NOT NULL, payload jsonb, w float8,
                          PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE ev_eu PARTITION OF ev FOR VALUES IN ('eu');
         CREATE TABLE ev_us PARTITION OF ev FOR VALUES IN ('us');"
    } else {
        "CREATE TABLE ev (id int NOT NULL, region text NOT NULL, at timestamptz NOT NULL, payload jsonb, w float8)
             PARTITION BY LIST (region);
         CREATE TABLE ev_eu PARTITION OF ev (PRIMARY KEY (id, region)) FOR VALUES IN ('eu');
         CREATE TABLE ev_us PARTITION OF ev (PRIMARY KEY (id, region)) FOR VALUES IN ('us');"
    };
    format!(
        "CREATE TYPE status AS ENUM ('new', 'active', 'gone');
         CREATE TABLE acct (id serial PRIMARY KEY, name text NOT NULL, balance numeric(20, 4), score float8,
                            ratio float4, info jsonb, tags text[], seen timestamptz, born date, photo bytea,
                            flags bit varying(8), span interval, uid uuid, st status, doc json);
         CREATE TABLE ledger (acct_id int NOT NULL, at timestamptz NOT NULL, amount numeric, note text,
                              PRIMARY KEY (acct_id, at));
         {partitions}"
    )
}

/// The same initial data on both sides (deterministic: no random values, no `now()`).
const APP_DATA: &str = r#"
    INSERT INTO acct (name, balance, score, ratio, info, tags, seen, born, photo, flags, span, uid, st, doc)
    SELECT 'acct ' || g, g * 1.2345, g / 3.0, g / 7.0,
           jsonb_build_object('g', g, 's', E'\u00e9"\\', 'a', jsonb_build_array(g, null, true)),
           ARRAY['t' || g, NULL, 'quote"d'], '2026-01-01 00:00+00'::timestamptz + g * interval '1 minute 0.5 second',
           '2000-01-01'::date + g, decode(md5(g::text), 'hex'), (g % 256)::bit(8)::varbit, g * interval '1 day 1 second',
           md5(g::text)::uuid, (ARRAY['new', 'active', 'gone'])[1 + g % 3]::status, ('{"g": ' || g || ',  "raw": true}')::json
      FROM generate_series(1, 300) g;
    INSERT INTO ledger SELECT 1 + g % 50, '2026-01-01 00:00+00'::timestamptz + g * interval '1.000001 second', g / 100.0, 'l' || g
      FROM generate_series(1, 300) g;
    INSERT INTO ev SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, '2026-01-01 00:00+00'::timestamptz + g * interval '1 hour',
                          jsonb_build_object('g', g), g * 0.1
      FROM generate_series(1, 100) g;"#;

/// Changes on the source after install: every kind, with floats that need 17 digits.
fn app_changes(source_major: u32) -> String {
    // PostgreSQL 10 cannot move a row to another partition by UPDATE.
    let move_partition = if source_major >= 11 {
        "UPDATE ev SET region = 'us' WHERE id = 4 AND region = 'eu';"
    } else {
        "DELETE FROM ev WHERE id = 4 AND region = 'eu'; INSERT INTO ev VALUES (4, 'us', '2026-01-01 00:00+00', NULL, NULL);"
    };
    format!(
        r#"
    SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Pacific/Chatham'; SET extra_float_digits = 0; SET bytea_output = 'escape';
    INSERT INTO acct (name, balance, score, ratio, info, tags, seen, born, photo, flags, span, uid, st, doc) VALUES
      ('new', 'NaN', 0.1::float8 + 0.2, '-0', '{{"k": [1.50, "\u00e9"]}}', '{{}}', 'infinity', '0044-03-15 BC', '\x00ff', B'1',
       '-1 year +2 days -00:00:00.000001', '00000000-0000-0000-0000-000000000000', 'new', '{{"dup": 1, "dup": 2}}'),
      ('floats', -1e-4, 5e-324, 3.4028235e38, NULL, NULL, '-infinity', NULL, '\x', NULL, NULL, NULL, NULL, NULL),
      ('specials', 0, 'Infinity', 'NaN', 'null', '{{NULL}}', '1800-01-01 00:00+00', '31/12/1999', NULL, B'', '0', NULL, 'gone', 'null'),
      (E'tab\tnl\nbs\\', NULL, '-Infinity', '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
    UPDATE acct SET score = score * 1.1, info = info || '{{"u": true}}', ratio = ratio / 3 WHERE id % 3 = 0;
    UPDATE acct SET span = span * -1, photo = photo || '\x5c'::bytea WHERE id % 7 = 0;
    DELETE FROM acct WHERE id % 10 = 0;
    UPDATE acct SET id = id + 5000 WHERE id IN (7, 11);
    UPDATE ledger SET at = at + interval '1 microsecond', amount = -amount WHERE acct_id = 5;
    DELETE FROM ledger WHERE acct_id = 6;
    INSERT INTO ledger VALUES (1000, '0044-03-15 12:00 BC', 1e-30, 'ancient'), (1000, 'infinity', 'NaN', 'future');
    UPDATE ev SET payload = payload || '{{"changed": 1}}', w = 0.1::float8 * 3 WHERE id < 20;
    UPDATE ev SET id = id + 1000 WHERE id = 2 AND region = 'eu';
    TRUNCATE ev_us;
    INSERT INTO ev VALUES (1001, 'us', '2026-06-01 00:00+00', '{{"after": "truncate"}}', '-0');
    {move_partition}"#
    )
}

/// The application's rows, in forms that are the same on every version (floats by their bits).
const APP_ROWS: &str = r#"
    SELECT ROW(id, name, balance, encode(float8send(score), 'hex'), encode(float4send(ratio), 'hex'), info, tags, seen,
               born, encode(photo, 'hex'), flags, span, uid, st, doc::text)::text FROM acct ORDER BY id;
    SELECT l::text FROM ledger l ORDER BY acct_id, at;
    SELECT ROW(tableoid::regclass, id, region, at, payload, encode(float8send(w), 'hex'))::text FROM ev ORDER BY region, id;"#;

fn catch_up_across_versions(source_major: &str, target_major: Option<&str>) {
    let sbin =
        PgBin::npm(source_major).unwrap_or_else(|e| panic!("PostgreSQL {source_major}: {e}"));
    let tcluster = match target_major {
        Some(v) => {
            Cluster::shared_for(&PgBin::npm(v).unwrap_or_else(|e| panic!("PostgreSQL {v}: {e}")))
        }
        None => Cluster::shared(),
    };
    let source = Cluster::shared_for(&sbin).create_database("types_xv_src");
    let target = tcluster.create_database("types_xv_dst");
    // Same DDL and data on both sides (pg_dump 15 cannot dump an 18 server).
    for db in [&source, &target] {
        db.psql(&app_ddl(sbin.major()));
        db.psql(APP_DATA);
    }
    assert_same(&source, &target, APP_ROWS);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(&app_changes(sbin.major()));
    let report = sync_json(&source, &target);
    assert_eq!(report["rounds"], 1, "{report}");
    let rows = assert_same(&source, &target, APP_ROWS);
    assert!(rows.contains("after") && rows.contains("ancient"), "{rows}");
    assert_eq!(target.scalar("SELECT count(*) FROM ev_us"), "2");

    // A second round on top of the first.
    source.psql(
        "UPDATE acct SET balance = -1, score = 1.0 / 3 WHERE id < 50;
         INSERT INTO ev VALUES (2000, 'eu', '2026-07-01 00:00+00', NULL, 1e-310);
         DELETE FROM ledger WHERE note = 'future';",
    );
    sync_json(&source, &target);
    assert_same(&source, &target, APP_ROWS);
    assert_eq!(
        source.scalar("SELECT last_value FROM acct_id_seq"),
        target.scalar("SELECT last_value FROM acct_id_seq")
    );
    // verify compares normalised forms: float text differs between these versions, the
    // checksums do not.
    let verdict = common::verify_run(&source, &target);
    assert_eq!(verdict.code, 0, "{}{}", verdict.stdout, verdict.stderr);
}

#[test]
fn postgresql_10_source_to_15_target() {
    catch_up_across_versions("10", None);
}

#[test]
fn postgresql_12_source_to_15_target() {
    catch_up_across_versions("12", None);
}

#[test]
fn postgresql_12_source_to_18_target() {
    catch_up_across_versions("12", Some("18"));
}

// ---------------------------------------------------------------------------------------------
// 4. Type names and search_path
// ---------------------------------------------------------------------------------------------

const APP_SCHEMA_DDL: &str = "
    CREATE SCHEMA app;
    CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
    CREATE TABLE app.visits (id int PRIMARY KEY, m app.mood);
    CREATE TABLE app.moods (k app.mood PRIMARY KEY, v text);";

/// Source and target databases, both with the DDL above and the default `search_path`.
fn search_path_pair<'c>(cluster: &'c Cluster, prefix: &str) -> (TestDb<'c>, TestDb<'c>) {
    let source = cluster.create_database(&format!("{prefix}_src"));
    let target = cluster.create_database(&format!("{prefix}_dst"));
    source.psql(APP_SCHEMA_DDL);
    target.psql(APP_SCHEMA_DDL);
    (source, target)
}

const APP_SCHEMA_ROWS: &str = "
    SELECT v::text FROM app.visits v ORDER BY id;
    SELECT m::text FROM app.moods m ORDER BY k;";

#[test]
fn a_source_whose_search_path_reaches_the_type_schema_syncs_to_a_target_whose_does_not() {
    // An application database usually sets its search_path; a target made from a schema-only
    // dump does not get `ALTER DATABASE … SET`.
    let cluster = Cluster::shared();
    let (source, target) = search_path_pair(cluster, "types_sp_src_only");
    cluster.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {} SET search_path = app, public",
            source.name()
        ),
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql(
        "INSERT INTO visits VALUES (1, 'happy'), (2, NULL); INSERT INTO moods VALUES ('ok', 'x');",
    );
    sync_json(&source, &target);
    assert_same(&source, &target, APP_SCHEMA_ROWS);
    assert_eq!(target.scalar("SELECT count(*) FROM app.visits"), "2");
}

#[test]
fn key_types_recorded_at_install_do_not_depend_on_its_search_path() {
    // Install runs with a search_path that reaches `app` (say, the role's setting); sync later
    // runs in sessions whose search_path does not.
    let cluster = Cluster::shared();
    let (source, target) = search_path_pair(cluster, "types_sp_install");
    cluster.psql(
        "postgres",
        &format!(
            "ALTER DATABASE {} SET search_path = app, public",
            source.name()
        ),
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    cluster.psql(
        "postgres",
        &format!("ALTER DATABASE {} RESET search_path", source.name()),
    );
    source.psql(
        "INSERT INTO app.visits VALUES (1, 'happy'); INSERT INTO app.moods VALUES ('ok', 'x');",
    );
    sync_json(&source, &target);
    assert_same(&source, &target, APP_SCHEMA_ROWS);
}
