//! End-to-end tests of `pgferry schema`: the captured tables' schema created on a target from
//! pg_dump's output, then filled and caught up, and `pgferry verify` equal.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::{catalog_listing, load_hostile, partitioned_m, pgferry, sync_run, verify_run, Run};
use pgferry_testkit::{client_tool, Cluster, PgBin, TestDb};

/// An application beside the hostile fixture: an enum and a domain in a schema of their own
/// (with a hostile name), a check calling a function, serial and identity keys, foreign keys
/// between captured tables, a partitioned table, a shared sequence named in a default, an
/// extension's type, and `notcap`, which is not captured (a captured table's foreign key to it
/// is left out).
const APP: &str = r#"
    CREATE EXTENSION citext;
    CREATE SCHEMA "Kinds & Co";
    CREATE TYPE "Kinds & Co".mood AS ENUM ('sad', 'ok', 'happy');
    CREATE DOMAIN "Kinds & Co"."Positive" AS integer CHECK (VALUE > 0);
    CREATE FUNCTION "Kinds & Co".is_even(integer) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT $1 % 2 = 0';
    CREATE TABLE customers (id bigserial PRIMARY KEY, email citext UNIQUE NOT NULL, mood "Kinds & Co".mood,
                            points "Kinds & Co"."Positive" CHECK ("Kinds & Co".is_even(points)));
    COMMENT ON TABLE customers IS 'who buys';
    CREATE TABLE orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         customer_id bigint NOT NULL REFERENCES customers ON DELETE CASCADE,
                         total numeric(12,2), at timestamptz DEFAULT now());
    CREATE INDEX orders_by_customer ON orders (customer_id);
    CREATE TABLE events (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
    CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
    CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
    CREATE INDEX ON events (v);
    CREATE TABLE notcap (id int PRIMARY KEY, note text);
    CREATE SEQUENCE ticket_numbers;
    CREATE TABLE tickets (id bigint PRIMARY KEY DEFAULT nextval('ticket_numbers'),
                          notcap_id int REFERENCES notcap, order_id bigint REFERENCES orders);
    INSERT INTO notcap VALUES (1, 'n');
    INSERT INTO customers (email, mood, points) SELECT 'C' || g || '@x', 'ok', 2 * g FROM generate_series(1, 30) g;
    INSERT INTO orders (customer_id, total) SELECT 1 + g % 30, g FROM generate_series(1, 100) g;
    INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' FROM generate_series(1, 20) g;
    INSERT INTO tickets (notcap_id, order_id) VALUES (1, 1), (NULL, 2);
"#;

const WRITES: &str = r#"
    INSERT INTO customers (email, mood, points) VALUES ('new@x', 'happy', 100);
    UPDATE customers SET mood = 'sad' WHERE id <= 5;
    DELETE FROM orders WHERE id = 7;
    INSERT INTO orders (customer_id, total) VALUES (2, 9.5);
    UPDATE events SET region = 'eu' WHERE id = 1;
    INSERT INTO tickets (order_id) VALUES (3);
    INSERT INTO "Sch""ema. *x"."Order Lines" VALUES (1, 1, 'k', '$body$');
    INSERT INTO public."MixedCase" ("Value") VALUES ('a'), ('b');
    INSERT INTO public."éééééééééééééééééééééééééééééééz" (v) VALUES ('é');
"#;

/// `pgferry schema --source SOURCE --target TARGET` followed by `extra`.
fn schema_run(source: &TestDb<'_>, target: &TestDb<'_>, extra: &[&str]) -> Run {
    let (s, t) = (source.dsn(), target.dsn());
    let mut args = vec!["schema", "--source", &s, "--target", &t];
    args.extend_from_slice(extra);
    pgferry(&args)
}

/// Loads the source's rows (all but pgferry's and `notcap`) into the target, as a data-only
/// restore would.
fn load_data(source: &TestDb<'_>, target: &TestDb<'_>) {
    let out = Command::new(client_tool("pg_dump"))
        .args([
            "--data-only",
            "--exclude-schema=pgferry",
            "--exclude-table=notcap",
        ])
        .arg(source.dsn())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.psql(&format!(
        "SET session_replication_role = replica;\n{}",
        String::from_utf8(out.stdout).unwrap()
    ));
}

fn names(report: &serde_json::Value, field: &str) -> Vec<String> {
    report[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {report}"))
        .iter()
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other["table"]
                .as_str()
                .or(other["object"].as_str())
                .unwrap()
                .to_owned(),
        })
        .collect()
}

#[test]
fn the_schema_takes_the_rows_and_the_catch_up_and_verifies_equal() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_src");
    let target = cluster.create_database("schema_dst");
    load_hostile(&source);
    source.psql(APP);
    pgferry(&["install", "--source", &source.dsn(), "--exclude", "notcap"]).expect(0);

    let report = schema_run(&source, &target, &["--json"]).expect(0).json();
    let tables = names(&report, "tables");
    for t in [
        "public.customers",
        "public.orders",
        "public.events",
        "public.events_eu",
        "public.tickets",
        "\"Sch\"\"ema. *x\".\"Order Lines\"",
        "public.\"éééééééééééééééééééééééééééééééz\"",
    ] {
        assert!(tables.contains(&t.to_owned()), "{t} not in {tables:?}");
    }
    assert!(!tables.iter().any(|t| t.contains("notcap")), "{tables:?}");
    let sequences = names(&report, "sequences");
    for s in [
        "public.ticket_numbers",
        "public.orders_id_seq",
        "public.customers_id_seq",
    ] {
        assert!(
            sequences.contains(&s.to_owned()),
            "{s} not in {sequences:?}"
        );
    }
    let objects = names(&report, "objects").join("\n");
    for o in [
        "extension citext",
        "type \"Kinds & Co\".mood",
        "schema Kinds & Co",
    ] {
        assert!(objects.contains(o), "{o} not in {objects}");
    }
    let left_out = names(&report, "left_out").join("\n");
    assert!(left_out.contains("tickets_notcap_id_fkey"), "{left_out}");
    assert!(!left_out.contains("tickets_order_id_fkey"), "{left_out}");

    // What the target got: no capture, no table that is not captured, the types and keys.
    assert_eq!(
        target.scalar("SELECT to_regclass('public.notcap') IS NULL"),
        "t"
    );
    assert_eq!(
        target.scalar(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
              JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'pgferry'"
        ),
        "0"
    );
    assert_eq!(
        target.scalar("SELECT string_agg(conname, ',' ORDER BY conname) FROM pg_constraint WHERE contype = 'f'"),
        "orders_customer_id_fkey,tickets_order_id_fkey"
    );
    assert_eq!(
        target.scalar("SELECT enum_range(NULL::\"Kinds & Co\".mood)::text"),
        "{sad,ok,happy}"
    );
    assert!(target
        .try_psql("INSERT INTO customers (email, points) VALUES ('odd@x', 3)")
        .is_err());
    assert_eq!(
        target.scalar("SELECT obj_description('public.customers'::regclass)"),
        "who buys"
    );

    // Fill it as a data-only restore would, write more, catch up, compare.
    load_data(&source, &target);
    source.psql(WRITES);
    sync_run(&source, &target, &[]).expect(0);
    let verdict = verify_run(&source, &target).expect(0).json();
    assert_eq!(verdict["equal"], true, "{verdict}");
    // The sequences moved forward with the catch-up: the next values do not collide.
    target.psql("INSERT INTO tickets (order_id) VALUES (4)");
}

#[test]
fn a_table_already_on_the_target_is_refused_by_name_and_nothing_is_created() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_exists_src");
    let target = cluster.create_database("schema_exists_dst");
    load_hostile(&source);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    target.psql("CREATE TABLE public.\"MixedCase\" (x int)");
    let before = catalog_listing(&target);
    let refused = schema_run(&source, &target, &[]).expect(1);
    assert!(
        refused.stderr.contains("public.\"MixedCase\"")
            && refused.stderr.contains("nothing was created"),
        "{}",
        refused.stderr
    );
    assert_eq!(before, catalog_listing(&target));
    // Left out with --table, the rest is created.
    schema_run(
        &source,
        &target,
        &["--table", "\"Sch\"\"ema. *x\".*", "--table", "user"],
    )
    .expect(0);
    assert_eq!(
        target.scalar("SELECT to_regclass('\"Sch\"\"ema. *x\".\"Order Lines\"') IS NOT NULL AND to_regclass('public.user') IS NOT NULL AND to_regclass('public.\"t*\"') IS NULL"),
        "t"
    );
}

#[test]
fn a_dry_run_prints_the_script_and_changes_nothing() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_dry_src");
    let target = cluster.create_database("schema_dry_dst");
    load_hostile(&source);
    source.psql(APP);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let before = catalog_listing(&target);
    let run = schema_run(&source, &target, &["--dry-run", "--table", "orders"]).expect(0);
    assert_eq!(before, catalog_listing(&target));
    assert!(run.stdout.contains("\nBEGIN;\n"), "{}", run.stdout);
    assert!(
        run.stdout.contains("CREATE TABLE public.orders"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.trim_end().ends_with("ROLLBACK;"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("\\restrict"), "{}", run.stdout);
    // Only what the chosen table needs: not the other tables, not their types.
    assert!(
        !run.stdout.contains("CREATE TABLE public.customers"),
        "{}",
        run.stdout
    );
    assert!(!run.stdout.contains("mood"), "{}", run.stdout);
    // Its foreign key needs customers, which is not chosen: left out, and said so.
    assert!(
        run.stdout.contains("orders_customer_id_fkey") && run.stdout.contains("left out"),
        "{}",
        run.stdout
    );
    // The script is what would run: psql runs it, and it rolls back.
    target.psql(&run.stdout);
    assert_eq!(before, catalog_listing(&target));

    let e = schema_run(&source, &target, &["--table", "nothing*"]).expect(1);
    assert!(
        e.stderr.contains("matches no captured table"),
        "{}",
        e.stderr
    );
    let e = schema_run(&source, &target, &["--table", "a.b.c"]).expect(2);
    assert!(e.stderr.contains("invalid table pattern"), "{}", e.stderr);
}

#[test]
fn a_source_without_capture_is_refused() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_nocap_src");
    let target = cluster.create_database("schema_nocap_dst");
    let e = schema_run(&source, &target, &[]).expect(1);
    assert!(e.stderr.contains("pgferry install"), "{}", e.stderr);
}

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_pg_dump_older_than_the_source_is_refused_naming_the_version_needed() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_old_src");
    let target = cluster.create_database("schema_old_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY)");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let dir = tempfile::tempdir().unwrap();
    for tool in ["pg_dump", "pg_restore"] {
        script(
            dir.path(),
            tool,
            &format!("echo '{tool} (PostgreSQL) 9.6.24'"),
        );
    }
    let fake = dir.path().join("pg_dump");
    let e = schema_run(&source, &target, &["--pg-dump", fake.to_str().unwrap()]).expect(1);
    let major = cluster.bin().major();
    assert!(
        e.stderr.contains(&format!("PostgreSQL {major}"))
            && e.stderr.contains("9.6.24")
            && e.stderr.contains(&format!("postgresql-client-{major}")),
        "{}",
        e.stderr
    );
    assert_eq!(target.scalar("SELECT to_regclass('public.t') IS NULL"), "t");
}

#[test]
fn the_password_reaches_pg_dump_in_a_passfile_never_on_its_command_line() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_pw_src");
    let target = cluster.create_database("schema_pw_dst");
    source.psql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let (role, password) = ("schema_dumper", "s3:cr\\et pass");
    cluster.psql(
        "postgres",
        &format!(
            "CREATE ROLE {role} SUPERUSER LOGIN PASSWORD '{}'",
            password.replace('\'', "''")
        ),
    );
    // Wrappers that record what pg_dump and pg_restore were given, then run the real ones.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("calls.log");
    for tool in ["pg_dump", "pg_restore"] {
        script(
            dir.path(),
            tool,
            &format!(
                "echo \"argv: $*\" >> '{log}'\nenv | grep '^PG' | sed 's/^/env: /' >> '{log}'\nexec '{}' \"$@\"",
                client_tool(tool).display(),
                log = log.display()
            ),
        );
    }
    let (s, t) = (source.dsn_as(role, password), target.dsn_as(role, password));
    let wrapper = dir.path().join("pg_dump");
    let run = pgferry(&[
        "schema",
        "--source",
        &s,
        "--target",
        &t,
        "--pg-dump",
        wrapper.to_str().unwrap(),
    ])
    .expect(0);
    assert!(!run.stdout.contains("s3:cr") && !run.stderr.contains("s3:cr"));
    let calls = std::fs::read_to_string(&log).unwrap();
    assert!(calls.contains("env: PGPASSFILE="), "{calls}");
    assert!(calls.contains(&format!("env: PGUSER={role}")), "{calls}");
    assert!(
        !calls.contains("s3:cr") && !calls.contains("PGPASSWORD"),
        "{calls}"
    );
    assert_eq!(
        target.scalar("SELECT to_regclass('public.t') IS NOT NULL"),
        "t"
    );
}

/// A source on an older major (binaries from npm, skipped when npm cannot be reached) gets its
/// schema onto the system's PostgreSQL with the system's pg_dump, takes the rows and the
/// catch-up, and verifies equal. On 10 the partitions are captured, not their parent, which
/// is created as their parent.
fn older_source(major: &str) {
    let bin = match PgBin::npm(major) {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("skipped: no PostgreSQL {major} from npm: {e}");
            return;
        }
    };
    let old = Cluster::shared_for(&bin);
    let source = old.create_database("schema_old_major");
    let target = Cluster::shared().create_database("schema_from_old");
    load_hostile(&source);
    source.psql(partitioned_m(bin.major()));
    source.psql(
        "CREATE SCHEMA kinds; CREATE TYPE kinds.mood AS ENUM ('sad', 'ok');
         CREATE DOMAIN kinds.pos AS int CHECK (VALUE > 0);
         CREATE TABLE moods (id serial PRIMARY KEY, m kinds.mood, p kinds.pos);
         INSERT INTO moods (m, p) VALUES ('ok', 1), ('sad', 2);
         INSERT INTO m VALUES (1, 'eu', 'a'), (2, 'us', 'b');",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let report = schema_run(&source, &target, &["--json"]).expect(0).json();
    let tables = names(&report, "tables");
    assert!(
        tables.contains(&"public.m".to_owned()) && tables.contains(&"public.m_eu".to_owned()),
        "{tables:?}"
    );
    let roles: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["table"] == "public.m")
        .map(|t| t["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [if bin.major() >= 11 {
            "captured"
        } else {
            "parent"
        }]
    );
    load_data(&source, &target);
    source.psql(
        "INSERT INTO moods (m, p) VALUES ('sad', 3); UPDATE m SET v = 'c' WHERE id = 2;
         INSERT INTO public.\"MixedCase\" (\"Value\") VALUES ('x');",
    );
    sync_run(&source, &target, &[]).expect(0);
    let verdict = verify_run(&source, &target).expect(0).json();
    assert_eq!(verdict["equal"], true, "{verdict}");
}

#[test]
fn a_postgresql_12_source() {
    older_source("12");
}

#[test]
fn a_postgresql_10_source() {
    older_source("10");
}

#[test]
fn owners_and_grants_are_kept_only_with_privileges() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("schema_priv_src");
    let plain = cluster.create_database("schema_priv_plain");
    let kept = cluster.create_database("schema_priv_kept");
    source.psql(
        "CREATE ROLE schema_app_owner; CREATE ROLE schema_app_reader;
         CREATE TABLE t (id int PRIMARY KEY);
         ALTER TABLE t OWNER TO schema_app_owner;
         GRANT SELECT ON t TO schema_app_reader;",
    );
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    let owner_and_acl = "SELECT pg_get_userbyid(relowner) || ' ' || coalesce(relacl::text, '-')
                           FROM pg_class WHERE oid = 'public.t'::regclass";
    schema_run(&source, &plain, &[]).expect(0);
    assert_eq!(plain.scalar(owner_and_acl), "postgres -");
    schema_run(&source, &kept, &["--privileges"]).expect(0);
    let got = kept.scalar(owner_and_acl);
    assert!(
        got.starts_with("schema_app_owner ") && got.contains("schema_app_reader=r/"),
        "{got}"
    );
}

/// A source newer than every installed pg_dump (18, when no pg_dump 18 is installed) is refused
/// naming the version needed; with one installed, the schema is created.
#[test]
fn a_postgresql_18_source_needs_a_pg_dump_18() {
    let bin = match PgBin::npm("18") {
        Ok(bin) => bin,
        Err(e) => {
            eprintln!("skipped: no PostgreSQL 18 from npm: {e}");
            return;
        }
    };
    let source = Cluster::shared_for(&bin).create_database("schema_pg18");
    let target = Cluster::shared().create_database("schema_from_pg18");
    source.psql("CREATE TABLE t (id int PRIMARY KEY)");
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    if Path::new("/usr/lib/postgresql/18/bin/pg_dump").is_file() {
        schema_run(&source, &target, &[]).expect(0);
        return;
    }
    let e = schema_run(&source, &target, &[]).expect(1);
    assert!(
        e.stderr.contains("the source runs PostgreSQL 18")
            && e.stderr.contains("postgresql-client-18")
            && e.stderr.contains("--pg-dump"),
        "{}",
        e.stderr
    );
    assert_eq!(target.scalar("SELECT to_regclass('public.t') IS NULL"), "t");
}
