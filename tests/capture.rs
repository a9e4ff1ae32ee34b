//! End-to-end tests of `pgferry install` and `pgferry uninstall` against real clusters.

mod common;

use common::{catalog_listing, deltas, load_hostile, pgferry};
use pgferry_testkit::Cluster;

#[test]
fn install_captures_every_kind_of_change_on_hostile_names() {
    let db = Cluster::shared().create_database("capture");
    load_hostile(&db);
    let run = pgferry(&["install", "--source", &db.dsn(), "--json"]).expect(0);
    let report = run.json();
    assert_eq!(report["added"].as_array().unwrap().len(), 6, "{report}");

    // A second, unprivileged role writes, with a DMY DateStyle and escape bytea output: keys are
    // recorded in forms that do not depend on either.
    db.psql(
        "CREATE ROLE app_writer LOGIN PASSWORD 'pw';
         GRANT USAGE ON SCHEMA public, \"Sch\"\"ema. *x\" TO app_writer;
         GRANT ALL ON ALL TABLES IN SCHEMA public, \"Sch\"\"ema. *x\" TO app_writer;
         GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO app_writer;",
    );
    db.try_psql_as(
        "app_writer",
        "pw",
        "SET DateStyle = 'SQL, DMY'; SET bytea_output = 'escape'; SET TimeZone = 'Asia/Kolkata';
         INSERT INTO \"Sch\"\"ema. *x\".\"Order Lines\" VALUES (1, 1, 'a', 'b'), (1, 2, 'c', 'd');
         UPDATE \"Sch\"\"ema. *x\".\"Order Lines\" SET \"Line No\" = 3 WHERE \"Line No\" = 2;
         UPDATE \"Sch\"\"ema. *x\".\"Order Lines\" SET \"a$body$b\" = 'x';
         DELETE FROM \"Sch\"\"ema. *x\".\"Order Lines\" WHERE \"Line No\" = 1;
         INSERT INTO public.\"dated key\" VALUES ('2026-02-01', '\\x00ff', 'n');
         INSERT INTO public.\"t*\" VALUES (7, '2026-01-02 03:04:05+00', '\\x01');
         TRUNCATE public.\"MixedCase\";",
    )
    .expect("an unprivileged writer writes captured tables without grants on pgferry");
    let d = deltas(&db);
    let expected = [
        "Sch\"ema. *x.Order Lines I {1,1} -",
        "Sch\"ema. *x.Order Lines I {1,2} -",
        // A key change: the pair from the row-level key trigger, then the statement's new key.
        "Sch\"ema. *x.Order Lines U {1,3} {1,2}",
        "Sch\"ema. *x.Order Lines U {1,3} -",
        "Sch\"ema. *x.Order Lines U {1,1} -",
        "Sch\"ema. *x.Order Lines U {1,3} -",
        "Sch\"ema. *x.Order Lines D {1,1} -",
        "public.dated key I {2026-02-01,00ff} -",
        "public.t* I {2026-01-02T08:34:05+05:30,01} -",
        "public.MixedCase T - -",
    ];
    assert_eq!(d, expected);
    // Recorded keys read back to the very rows.
    assert_eq!(
        db.scalar(
            "SELECT count(*) FROM public.\"t*\" t JOIN pgferry.delta d ON d.table_id =
               (SELECT table_id FROM pgferry.captured_table WHERE table_name = 't*')
              AND t.\"when\" = d.key[1]::timestamptz AND t.bin = decode(d.key[2], 'hex')"
        ),
        "1"
    );
    // Sequences used by the captured tables are registered.
    let seqs = db.psql("SELECT sequence_name FROM pgferry.captured_sequence ORDER BY 1");
    assert!(seqs.contains("MixedCase_ID_seq"), "{seqs}");
    assert_eq!(seqs.lines().count(), 2, "{seqs}");
}

#[test]
fn install_is_idempotent_and_dry_run_changes_nothing() {
    let db = Cluster::shared().create_database("idem");
    db.psql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);");
    let before = catalog_listing(&db);
    let dry = pgferry(&["install", "--source", &db.dsn(), "--dry-run"]).expect(0);
    assert!(dry.stdout.contains("CREATE TRIGGER"), "{}", dry.stdout);
    assert_eq!(
        before,
        catalog_listing(&db),
        "--dry-run changed the catalog"
    );

    pgferry(&["install", "--source", &db.dsn(), "--table", "public.a"]).expect(0);
    let once = catalog_listing(&db);
    let again = pgferry(&["install", "--source", &db.dsn(), "--table", "public.a"]).expect(0);
    assert!(again.stdout.contains("no new table"), "{}", again.stdout);
    assert_eq!(once, catalog_listing(&db));

    // A capture trigger someone dropped is recreated, and said so.
    db.psql("DROP TRIGGER pgferry_update ON a");
    let repaired = pgferry(&["install", "--source", &db.dsn(), "--table", "public.a"]).expect(0);
    assert!(
        repaired
            .stdout
            .contains("repaired missing trigger pgferry_update on public.a"),
        "{}",
        repaired.stdout
    );
    assert_eq!(once, catalog_listing(&db));

    db.psql("CREATE TABLE c (id int PRIMARY KEY)");
    let more = pgferry(&["install", "--source", &db.dsn(), "--json"])
        .expect(0)
        .json();
    let added: Vec<&str> = more["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(added, ["b", "c"]);
    assert_eq!(more["already_captured"].as_array().unwrap().len(), 1);
}

#[test]
fn tables_without_a_key_are_all_listed_and_nothing_is_installed() {
    let db = Cluster::shared().create_database("nokey");
    db.psql(
        "CREATE TABLE ok (id int PRIMARY KEY);
         CREATE TABLE loose (a int);
         CREATE TABLE \"Also Loose\" (a int UNIQUE);
         CREATE TABLE uniq_ok (a int NOT NULL UNIQUE);",
    );
    let run = pgferry(&["install", "--source", &db.dsn()]).expect(1);
    assert!(run.stderr.contains("loose"), "{}", run.stderr);
    assert!(run.stderr.contains("Also Loose"), "{}", run.stderr);
    assert!(!run.stderr.contains("uniq_ok"), "{}", run.stderr);
    assert!(run.stderr.contains("--exclude"), "{}", run.stderr);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM pg_trigger"), "0");
    // The fix the message gives works.
    pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--exclude",
        "loose",
        "--exclude",
        "\"Also Loose\"",
    ])
    .expect(0);
}

#[test]
fn patterns_quote_like_sql_and_must_match() {
    let db = Cluster::shared().create_database("pattern");
    load_hostile(&db);
    let none = pgferry(&["install", "--source", &db.dsn(), "--table", "public.nope*"]).expect(1);
    assert!(none.stderr.contains("public.nope*"), "{}", none.stderr);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );

    let run = pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--table",
        "\"Sch\"\"ema. *x\".*",
        "--table",
        "public.\"t*\"",
        "--json",
    ])
    .expect(0);
    let names: Vec<String> = run.json()["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["table"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["Order Lines", "t*"]);
    let bad = pgferry(&["install", "--source", &db.dsn(), "--table", "a.b.c"]).expect(1);
    assert!(bad.stderr.contains("quote"), "{}", bad.stderr);
}

#[test]
fn a_non_superuser_owner_can_install_and_missing_privileges_are_named() {
    let cluster = Cluster::shared();
    let db = cluster.create_database("nonsuper");
    db.psql(&format!(
        "CREATE ROLE app_owner LOGIN PASSWORD 'secret-owner';
         GRANT CREATE ON DATABASE {} TO app_owner;
         CREATE ROLE no_create LOGIN PASSWORD 'secret-nc';
         GRANT CREATE ON SCHEMA public TO app_owner;",
        db.name()
    ));
    db.try_psql_as(
        "app_owner",
        "secret-owner",
        "CREATE TABLE items (id int PRIMARY KEY, v text)",
    )
    .unwrap();

    // A role that owns nothing and may not create a schema: exit 4, the privilege named.
    db.psql("GRANT USAGE ON SCHEMA public TO no_create; GRANT SELECT ON items TO no_create;");
    let denied = pgferry(&["install", "--source", &db.dsn_as("no_create", "secret-nc")]).expect(4);
    assert!(
        denied.stderr.contains("CREATE on the database"),
        "{}",
        denied.stderr
    );
    assert!(!denied.stderr.contains("secret-nc"));
    db.psql(&format!(
        "GRANT CREATE ON DATABASE {} TO no_create",
        db.name()
    ));
    let denied = pgferry(&["install", "--source", &db.dsn_as("no_create", "secret-nc")]).expect(4);
    assert!(
        denied.stderr.contains("TRIGGER on public.items")
            || denied.stderr.contains("TRIGGER on \"public\".\"items\""),
        "{}",
        denied.stderr
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );

    pgferry(&[
        "install",
        "--source",
        &db.dsn_as("app_owner", "secret-owner"),
    ])
    .expect(0);
    db.try_psql_as(
        "app_owner",
        "secret-owner",
        "INSERT INTO items VALUES (1, 'x')",
    )
    .unwrap();
    assert_eq!(deltas(&db), ["public.items I {1} -"]);
}

#[test]
fn connection_failures_exit_3_without_printing_the_password() {
    let db = Cluster::shared().create_database("conn");
    db.psql("CREATE ROLE pw_user LOGIN PASSWORD 'right-one'");
    let wrong = pgferry(&[
        "install",
        "--source",
        &db.dsn_as("pw_user", "hunter2-wrong"),
    ])
    .expect(3);
    assert!(!wrong.stderr.contains("hunter2"), "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("pw_user@127.0.0.1"),
        "{}",
        wrong.stderr
    );
    let url = format!(
        "postgresql://pw_user:hunter2-wrong@127.0.0.1:1/{}",
        db.name()
    );
    let unreachable = pgferry(&["install", "--source", &url]).expect(3);
    assert!(
        !unreachable.stderr.contains("hunter2"),
        "{}",
        unreachable.stderr
    );
    let bad = pgferry(&["install", "--source", "host=x password=hunter2 nonsense=1"]).expect(1);
    assert!(!bad.stderr.contains("hunter2"), "{}", bad.stderr);
    let usage = pgferry(&["install"]).expect(2);
    assert!(usage.stderr.contains("--source"), "{}", usage.stderr);
}

#[test]
fn a_newer_or_foreign_pgferry_schema_is_refused() {
    let db = Cluster::shared().create_database("newer");
    db.psql("CREATE TABLE t (id int PRIMARY KEY)");
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    db.psql("UPDATE pgferry.installation SET schema_version = 99");
    let run = pgferry(&["install", "--source", &db.dsn()]).expect(1);
    assert!(run.stderr.contains("version 99"), "{}", run.stderr);

    let other = Cluster::shared().create_database("foreign");
    other.psql("CREATE SCHEMA pgferry; CREATE TABLE t (id int PRIMARY KEY)");
    let run = pgferry(&["install", "--source", &other.dsn()]).expect(1);
    assert!(run.stderr.contains("not made by pgferry"), "{}", run.stderr);
}

#[test]
fn partitions_are_captured_once_and_moves_and_new_partitions_are_handled() {
    let db = Cluster::shared().create_database("parts");
    db.psql(
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');",
    );
    let report = pgferry(&["install", "--source", &db.dsn(), "--json"])
        .expect(0)
        .json();
    let added = report["added"].as_array().unwrap();
    assert_eq!(
        added.len(),
        1,
        "captured once, through the parent: {report}"
    );
    assert_eq!(added[0]["partitions"].as_array().unwrap().len(), 2);
    let by_partition =
        pgferry(&["install", "--source", &db.dsn(), "--table", "public.m_eu"]).expect(1);
    assert!(
        by_partition.stderr.contains("partition of"),
        "{}",
        by_partition.stderr
    );

    db.psql(
        "INSERT INTO m VALUES (1, 'eu', 'a');
         UPDATE m SET region = 'us' WHERE id = 1;
         TRUNCATE m_eu;
         CREATE TABLE m_asia PARTITION OF m FOR VALUES IN ('asia');
         INSERT INTO m VALUES (2, 'asia', 'b');",
    );
    let d = deltas(&db);
    assert_eq!(
        d,
        [
            "public.m I {1,eu} -",
            "public.m D {1,eu} -",
            "public.m I {1,us} -",
            "public.m T {public,m_eu} -",
            "public.m I {2,asia} -",
        ]
    );
    // The new partition's rows are captured through the parent's trigger; its TRUNCATE trigger
    // comes with the next install.
    let again = pgferry(&["install", "--source", &db.dsn(), "--json"])
        .expect(0)
        .json();
    assert_eq!(again["new_partitions"][0]["name"], "m_asia", "{again}");
    db.psql("TRUNCATE m_asia");
    assert_eq!(deltas(&db).last().unwrap(), "public.m T {public,m_asia} -");
}

#[test]
fn uninstall_restores_the_catalog_exactly() {
    let db = Cluster::shared().create_database("uninstall");
    load_hostile(&db);
    db.psql(
        "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER user_touch BEFORE UPDATE ON public.\"user\" FOR EACH ROW EXECUTE FUNCTION public.touch();
         CREATE TABLE m (id int, r int, PRIMARY KEY (id, r)) PARTITION BY RANGE (r);
         CREATE TABLE m1 PARTITION OF m FOR VALUES FROM (0) TO (10);
         INSERT INTO public.\"user\" VALUES (gen_random_uuid(), 'x', 'y');",
    );
    let before = catalog_listing(&db);
    let data_before = db.psql("SELECT * FROM public.\"user\"");
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    db.psql("UPDATE public.\"user\" SET \"from\" = 'z'");
    assert_ne!(before, catalog_listing(&db));
    let dry = pgferry(&["uninstall", "--source", &db.dsn(), "--dry-run"]).expect(0);
    assert!(dry.stdout.contains("DROP SCHEMA"), "{}", dry.stdout);
    pgferry(&["uninstall", "--source", &db.dsn()]).expect(0);
    assert_eq!(before, catalog_listing(&db));
    assert_eq!(
        data_before.replace("x", "z"),
        db.psql("SELECT * FROM public.\"user\"")
    );
    let again = pgferry(&["uninstall", "--source", &db.dsn()]).expect(0);
    assert!(
        again.stdout.contains("nothing to remove"),
        "{}",
        again.stdout
    );
}

#[test]
fn uninstall_refuses_when_user_objects_depend_on_pgferry() {
    let db = Cluster::shared().create_database("dependent");
    db.psql("CREATE TABLE t (id int PRIMARY KEY)");
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    db.psql("CREATE VIEW public.my_backlog AS SELECT count(*) FROM pgferry.delta");
    let run = pgferry(&["uninstall", "--source", &db.dsn()]).expect(1);
    assert!(run.stderr.contains("my_backlog"), "{}", run.stderr);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "1"
    );
}

#[test]
fn a_renamed_captured_table_is_reported_not_captured_twice() {
    let db = Cluster::shared().create_database("renamed");
    db.psql("CREATE TABLE old_name (id int PRIMARY KEY)");
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    db.psql("ALTER TABLE old_name RENAME TO new_name; INSERT INTO new_name VALUES (1)");
    let run = pgferry(&["install", "--source", &db.dsn()]).expect(1);
    assert!(
        run.stderr.contains("new_name") && run.stderr.contains("old_name"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("renamed"), "{}", run.stderr);
    // Writes keep being captured meanwhile.
    assert_eq!(deltas(&db), ["public.old_name I {1} -"]);
}

#[test]
fn a_writer_with_a_hostile_search_path_cannot_subvert_the_capture() {
    let db = Cluster::shared().create_database("searchpath");
    db.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE ROLE sneaky LOGIN PASSWORD 'pw';
         GRANT ALL ON t TO sneaky; GRANT USAGE ON SCHEMA public TO sneaky;
         CREATE SCHEMA evil AUTHORIZATION sneaky;",
    );
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    db.try_psql_as(
        "sneaky",
        "pw",
        "CREATE FUNCTION evil.gotcha(text, text) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'evil operator ran as %', current_user; END $$;
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.gotcha);
         CREATE FUNCTION evil.gotcha_arr(text[], text[]) RETURNS boolean LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'evil array operator ran as %', current_user; END $$;
         CREATE OPERATOR evil.= (LEFTARG = text[], RIGHTARG = text[], FUNCTION = evil.gotcha_arr);
         CREATE TABLE evil.delta (x int);
         SET search_path = evil, pg_catalog, public;
         INSERT INTO t VALUES (1, 'a');
         UPDATE t SET v = 'b';
         DELETE FROM t;",
    )
    .expect("capture never runs the writer's operators");
    assert_eq!(
        deltas(&db),
        ["public.t I {1} -", "public.t U {1} -", "public.t D {1} -"]
    );
}

#[test]
fn statement_capture_for_plain_tables_row_capture_for_inheritance_trees() {
    let db = Cluster::shared().create_database("modes");
    db.psql(
        "CREATE TABLE plain (id int PRIMARY KEY, v int);
         CREATE TABLE parent (id int PRIMARY KEY, v int);
         CREATE TABLE child (extra text) INHERITS (parent);
         ALTER TABLE child ADD PRIMARY KEY (id);",
    );
    let report = pgferry(&["install", "--source", &db.dsn(), "--json"])
        .expect(0)
        .json();
    let modes: Vec<(String, String)> = report["added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["table"]["name"].as_str().unwrap().to_owned(),
                t["mode"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        modes,
        [
            ("child".into(), "row".into()),
            ("parent".into(), "row".into()),
            ("plain".into(), "statement".into())
        ]
    );
    db.psql(
        "INSERT INTO plain SELECT g, g FROM generate_series(1, 3) g;
         INSERT INTO plain VALUES (3, 0), (4, 0) ON CONFLICT (id) DO UPDATE SET v = excluded.v;
         UPDATE plain SET id = id + 10 WHERE id = 1;
         DELETE FROM plain WHERE id = 2;
         INSERT INTO child VALUES (1, 1, 'x');
         UPDATE parent SET v = v + 1;
         CREATE FUNCTION public.renumber() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN NEW.id := NEW.id + 100; RETURN NEW; END $$;
         CREATE TRIGGER renumber BEFORE UPDATE ON plain FOR EACH ROW WHEN (NEW.v = 42)
           EXECUTE FUNCTION public.renumber();
         UPDATE plain SET v = 42 WHERE id = 4;",
    );
    assert_eq!(
        deltas(&db),
        [
            "public.plain I {1} -",
            "public.plain I {2} -",
            "public.plain I {3} -",
            // INSERT … ON CONFLICT: the updated rows, then the inserted ones.
            "public.plain U {3} -",
            "public.plain I {4} -",
            "public.plain U {11} {1}",
            "public.plain U {11} -",
            "public.plain D {2} -",
            "public.child I {1} -",
            // A statement on the parent that changes a child's row is captured as the child's.
            "public.child U {1} -",
            // A key changed by a BEFORE trigger, though the UPDATE did not name it.
            "public.plain U {104} {4}",
            "public.plain U {104} -",
        ]
    );
}

/// Capture rows of `table` as `op key old_key delta_old delta_new`, in capture order.
fn delta_values(db: &pgferry_testkit::TestDb<'_>, table: &str) -> Vec<String> {
    db.psql(&format!(
        "SELECT d.op::text || ' ' || coalesce(d.key::text, '-') || ' ' || coalesce(d.old_key::text, '-')
                || ' ' || coalesce(d.delta_old::text, '-') || ' ' || coalesce(d.delta_new::text, '-')
           FROM pgferry.delta d JOIN pgferry.captured_table t USING (table_id)
          WHERE t.table_name = '{table}'
          ORDER BY d.xid, d.ctid"
    ))
    .lines()
    .map(str::to_owned)
    .collect()
}

/// `CREATE TABLE` of a table with delta-column candidates, under hostile names.
const ACCOUNTS: &str = "CREATE SCHEMA \"Sch\"\"ema. *x\";
     CREATE TABLE \"Sch\"\"ema. *x\".\"Acct $x$\" (
         id int PRIMARY KEY, note text, \"Bal ance\" numeric(12, 2), hits bigint NOT NULL DEFAULT 0,
         small smallint, f float8, r real, day date, \"Mixed\" integer);
     CREATE TABLE other (id int PRIMARY KEY, v int);";

#[test]
fn delta_columns_record_old_and_new_values_of_those_columns_only() {
    let db = Cluster::shared().create_database("delta_cols");
    db.psql(ACCOUNTS);
    let table = "\"Sch\"\"ema. *x\".\"Acct $x$\"";
    // Given out of the table's column order, and once twice: recorded in column order, once.
    let (hits, bal) = (format!("{table}.hits"), format!("{table}.\"Bal ance\""));
    let args = [
        "install",
        "--source",
        &db.dsn(),
        "--table",
        "public.other",
        "--delta-column",
        &hits,
        "--delta-column",
        &bal,
        "--delta-column",
        &hits,
    ];
    let dry = pgferry(&[&args[..], &["--dry-run"]].concat()).expect(0);
    assert!(dry.stdout.contains("delta_old numeric[]"), "{}", dry.stdout);
    assert!(dry.stdout.contains("delta_columns"), "{}", dry.stdout);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );

    // Selected though --table names another table only.
    let report = pgferry(&[&args[..], &["--json"]].concat()).expect(0).json();
    let added = report["added"].as_array().unwrap();
    assert_eq!(added.len(), 2, "{report}");
    let acct = added
        .iter()
        .find(|t| t["table"]["name"] == "Acct $x$")
        .unwrap();
    assert_eq!(acct["mode"], "row", "{report}");
    assert_eq!(
        acct["delta_columns"],
        serde_json::json!(["Bal ance", "hits"])
    );
    let other = added
        .iter()
        .find(|t| t["table"]["name"] == "other")
        .unwrap();
    assert_eq!(other["mode"], "statement");
    assert_eq!(other["delta_columns"], serde_json::json!([]));
    assert_eq!(
        db.psql("SELECT table_name || ' ' || coalesce(delta_columns::text, '-') FROM pgferry.captured_table ORDER BY 1").trim_end(),
        "Acct $x$ {\"Bal ance\",hits}\nother -"
    );
    assert_eq!(
        db.psql(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = '\"Sch\"\"ema. *x\".\"Acct $x$\"'::regclass ORDER BY 1"
        ).trim_end(),
        "pgferry_capture\npgferry_truncate"
    );

    db.psql(&format!(
        "INSERT INTO {table} (id, note, \"Bal ance\", hits) VALUES (1, 'a', 10.50, 3), (2, 'b', NULL, 0);
         UPDATE {table} SET \"Bal ance\" = \"Bal ance\" - 2.5, hits = hits + 1 WHERE id = 1;
         UPDATE {table} SET id = 3, hits = 7 WHERE id = 2;
         UPDATE {table} SET note = 'c', day = '2026-01-01';
         DELETE FROM {table} WHERE id = 1;
         INSERT INTO other VALUES (1, 1); UPDATE other SET v = 2; DELETE FROM other;"
    ));
    assert_eq!(
        delta_values(&db, "Acct $x$"),
        [
            "I {1} - - {10.50,3}",
            "I {2} - - {NULL,0}",
            "U {1} - {10.50,3} {8.00,4}",
            // A key change: one row with the pair, and the values before and after.
            "U {3} {2} {NULL,0} {NULL,7}",
            "U {1} - {8.00,4} {8.00,4}",
            "U {3} - {NULL,7} {NULL,7}",
            "D {1} - {8.00,4} -",
        ]
    );
    // Other tables keep their capture: no delta values.
    assert_eq!(
        delta_values(&db, "other"),
        ["I {1} - - -", "U {1} - - -", "D {1} - - -"]
    );

    // The same declaration again changes nothing.
    let before = catalog_listing(&db);
    let again = pgferry(&args).expect(0);
    assert!(again.stdout.contains("no new table"), "{}", again.stdout);
    assert!(
        again
            .stdout
            .contains("already captured: 2 table(s), unchanged"),
        "{}",
        again.stdout
    );
    assert_eq!(before, catalog_listing(&db));

    // A partitioned table is captured as a whole: a partition's column is pointed at its parent;
    // the parent's delta columns follow a row moved between partitions.
    db.psql(
        "CREATE TABLE m (id int, region text, qty int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');",
    );
    let part = pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--delta-column",
        "m_eu.qty",
    ])
    .expect(1);
    assert!(
        part.stderr.contains("partition of public.m") && part.stderr.contains("public.m_eu.qty"),
        "{}",
        part.stderr
    );
    pgferry(&["install", "--source", &db.dsn(), "--delta-column", "m.qty"]).expect(0);
    db.psql("INSERT INTO m VALUES (1, 'eu', 5); UPDATE m SET region = 'us', qty = 4;");
    assert_eq!(
        delta_values(&db, "m"),
        ["I {1,eu} - - {5}", "D {1,eu} - {5} -", "I {1,us} - - {4}"]
    );
}

#[test]
fn delta_columns_on_a_captured_table_regenerate_its_capture_and_cleanup_finds_it() {
    let cluster = Cluster::shared();
    let db = cluster.create_database("delta_again");
    db.psql(ACCOUNTS);
    let pristine = catalog_listing(&db);
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    let table = "\"Sch\"\"ema. *x\".\"Acct $x$\"";
    db.psql(&format!(
        "INSERT INTO {table} (id, hits, small) VALUES (1, 1, 1)"
    ));

    // Statement capture gives way to row capture with the delta columns, in one transaction.
    let (hits, small) = (format!("{table}.hits"), format!("{table}.small"));
    let run = pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--delta-column",
        &hits,
        "--json",
    ])
    .expect(0)
    .json();
    assert_eq!(run["added"].as_array().unwrap().len(), 0, "{run}");
    let changed = &run["delta_columns_changed"][0];
    assert_eq!(changed["table"]["name"], "Acct $x$", "{run}");
    assert_eq!(changed["delta_columns"], serde_json::json!(["hits"]));
    assert_eq!(changed["previous"], serde_json::json!([]));
    assert_eq!(changed["previous_mode"], "statement");
    assert_eq!(
        db.psql(&format!(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = '{}'::regclass ORDER BY 1",
            table.replace('\'', "''")
        ))
        .trim_end(),
        "pgferry_capture\npgferry_truncate"
    );
    assert_eq!(
        db.scalar("SELECT capture_mode || ' ' || delta_columns::text FROM pgferry.captured_table WHERE table_name = 'Acct $x$'"),
        "row {hits}"
    );
    db.psql(&format!("UPDATE {table} SET hits = hits + 1, small = 2"));
    assert_eq!(
        delta_values(&db, "Acct $x$"),
        ["I {1} - - -", "U {1} - {1} {2}"]
    );

    // Re-declaring the same changes nothing; a different set for the table replaces it.
    let listing = catalog_listing(&db);
    let same = pgferry(&["install", "--source", &db.dsn(), "--delta-column", &hits]).expect(0);
    assert!(!same.stdout.contains("regenerated"), "{}", same.stdout);
    assert_eq!(listing, catalog_listing(&db));
    let more = pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--delta-column",
        &small,
        "--delta-column",
        &hits,
    ])
    .expect(0);
    assert!(
        more.stdout
            .contains("delta columns: hits, small (were: hits); capture regenerated"),
        "{}",
        more.stdout
    );
    db.psql(&format!("UPDATE {table} SET small = small + 1"));
    assert_eq!(
        delta_values(&db, "Acct $x$").last().unwrap(),
        "U {1} - {2,2} {2,3}"
    );
    // A dropped trigger of a table with delta columns is recreated with them.
    db.psql(&format!("DROP TRIGGER pgferry_capture ON {table}"));
    let repaired = pgferry(&["install", "--source", &db.dsn()]).expect(0);
    assert!(
        repaired
            .stdout
            .contains("repaired missing trigger pgferry_capture"),
        "{}",
        repaired.stdout
    );
    db.psql(&format!("DELETE FROM {table}"));
    assert_eq!(
        delta_values(&db, "Acct $x$").last().unwrap(),
        "D {1} - {2,3} -"
    );

    // A restored copy is cleaned completely.
    let copy = cluster.create_database("delta_again_copy");
    let file = tempfile::NamedTempFile::new().unwrap();
    common::dump(&db, file.path());
    common::restore(file.path(), &copy);
    pgferry(&["clean", "--db", &copy.dsn(), "--watch", "0.5"]).expect(0);
    assert_eq!(catalog_listing(&copy), pristine);

    // A one-way sync reads the capture as before.
    let target = cluster.create_database("delta_again_t");
    common::copy_schema(&db, &target);
    db.psql(&format!(
        "INSERT INTO {table} (id, hits, small) VALUES (5, 50, 5)"
    ));
    common::sync_json(&db, &target);
    assert_eq!(common::contents(&db), common::contents(&target));

    // Uninstall leaves nothing.
    pgferry(&["uninstall", "--source", &db.dsn()]).expect(0);
    assert_eq!(catalog_listing(&db), pristine);
}

#[test]
fn unusable_delta_columns_are_all_named_and_nothing_changes() {
    let db = Cluster::shared().create_database("delta_refused");
    db.psql(ACCOUNTS);
    let table = "\"Sch\"\"ema. *x\".\"Acct $x$\"";
    let bad = [
        format!("{table}.nope"),
        format!("{table}.mixed"),
        format!("{table}.note"),
        format!("{table}.f"),
        format!("{table}.r"),
        format!("{table}.day"),
        format!("{table}.id"),
        "nosuch.qty".to_owned(),
    ];
    let check = |db: &pgferry_testkit::TestDb<'_>| {
        let mut args = vec!["install", "--source", &db.dsn()]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        for b in &bad {
            args.push("--delta-column".into());
            args.push(b.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let before = catalog_listing(db);
        let run = pgferry(&args).expect(1);
        let err = &run.stderr;
        let t = "\"Sch\"\"ema. *x\".\"Acct $x$\"";
        for needle in [
            format!("{t}.nope: {t} has no column nope"),
            format!("{t}.mixed: {t} has no column mixed (did you mean \"Mixed\"?"),
            format!("{t}.note is of type text: only smallint, integer, bigint and numeric"),
            format!("{t}.f is of type double precision: floating-point"),
            format!("{t}.r is of type real: floating-point"),
            format!("{t}.day is of type date"),
            format!("{t}.id: it is part of the replication key of {t}"),
            "public.nosuch.qty: there is no table public.nosuch".to_owned(),
            "8 delta column(s) cannot be used".to_owned(),
            "nothing was installed".to_owned(),
        ] {
            assert!(err.contains(&needle), "missing {needle:?} in:\n{err}");
        }
        assert_eq!(
            before,
            catalog_listing(db),
            "a refused install changed the catalog"
        );
    };
    // Refused on a fresh source: no schema made.
    check(&db);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );
    // And on a captured one: its capture untouched.
    pgferry(&["install", "--source", &db.dsn()]).expect(0);
    check(&db);

    // Malformed names are usage errors.
    for text in ["qty", "a.b.c.d", "a..c", "my table.c"] {
        let run = pgferry(&["install", "--source", &db.dsn(), "--delta-column", text]).expect(2);
        assert!(run.stderr.contains("delta column"), "{}", run.stderr);
    }
    // An excluded table cannot also have delta columns.
    let both = pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--exclude",
        "other",
        "--delta-column",
        "other.v",
    ])
    .expect(1);
    assert!(both.stderr.contains("--exclude other"), "{}", both.stderr);
}

/// The capture skips pgferry's own apply (`pgferry.apply` set by a role that may use schema
/// pgferry) and nothing else: an application that sets `pgferry.apply` itself is still captured.
#[test]
fn an_application_setting_the_apply_mark_is_still_captured() {
    let db = Cluster::shared().create_database("capture_guard");
    db.psql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE r (id int PRIMARY KEY, n int);
         CREATE ROLE guard_app LOGIN PASSWORD 'pw-app';
         GRANT ALL ON t, r TO guard_app;",
    );
    pgferry(&[
        "install",
        "--source",
        &db.dsn(),
        "--delta-column",
        "public.r.n",
    ])
    .expect(0);
    db.try_psql_as(
        "guard_app",
        "pw-app",
        "SET pgferry.apply = 'on';
         INSERT INTO t VALUES (1, 'a'), (2, 'b');
         UPDATE t SET v = 'c' WHERE id = 2;
         INSERT INTO r VALUES (1, 1);
         BEGIN; SET LOCAL pgferry.apply = 'on'; DELETE FROM t WHERE id = 1; TRUNCATE r; COMMIT;",
    )
    .expect("the application writes");
    assert_eq!(
        deltas(&db),
        [
            "public.t I {1} -",
            "public.t I {2} -",
            "public.t U {2} -",
            "public.r I {1} -",
            "public.t D {1} -",
            "public.r T - -",
        ]
    );
    // pgferry's own apply (a role that may use schema pgferry) is skipped, TRUNCATE included.
    db.psql(
        "BEGIN; SET LOCAL pgferry.apply = 'on';
         INSERT INTO t VALUES (3, 'x'); UPDATE r SET n = 2; DELETE FROM t WHERE id = 2; TRUNCATE t;
         COMMIT;",
    );
    assert_eq!(deltas(&db).len(), 6, "{:?}", deltas(&db));
}

#[test]
fn an_install_that_deadlocks_with_an_application_starts_over_and_succeeds() {
    let cluster = Cluster::shared();
    let db = cluster.create_database("install_deadlock");
    db.psql(
        "CREATE TABLE a_first (id int PRIMARY KEY); CREATE TABLE b_second (id int PRIMARY KEY);",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (app, conn) = tokio_postgres::connect(&db.dsn(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        // The application writes b_second, then (below) a_first; the install locks a_first,
        // then waits for b_second. The application's deadlock check comes late, so PostgreSQL
        // ends the install's transaction, not the application's.
        app.batch_execute("SET deadlock_timeout = '10s'; BEGIN; INSERT INTO b_second VALUES (1)")
            .await
            .unwrap();
        let install = std::process::Command::new(env!("CARGO_BIN_EXE_pgferry"))
            .args(["install", "--source", &db.dsn()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while db.scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE application_name = 'pgferry install' AND wait_event_type = 'Lock'",
        ) == "0"
        {
            assert!(
                std::time::Instant::now() < deadline,
                "install never waited for the lock"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        app.batch_execute("INSERT INTO a_first VALUES (1)")
            .await
            .expect("the application is not the one ended");
        app.batch_execute("COMMIT").await.unwrap();
        let out = install.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "install failed:\n{stderr}");
        assert!(
            stderr.contains("deadlock"),
            "no deadlock was met:\n{stderr}"
        );
    });
    assert_eq!(
        db.scalar("SELECT count(*) FROM pgferry.captured_table"),
        "2"
    );
    assert_eq!(db.scalar("SELECT count(*) FROM a_first, b_second"), "1");
}
