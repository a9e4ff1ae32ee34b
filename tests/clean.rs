//! End-to-end tests of `pgferry clean` against real clusters: a pg_dump/pg_restore copy of a
//! captured source, the Bucardo fixture, and a live source that must be refused.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{catalog_listing, dump, fixture, load_hostile, pgferry, restore};
use pgferry_testkit::{client_tool, Cluster, TestDb};

fn user_data(db: &TestDb<'_>) -> String {
    db.psql(
        "SELECT 'ol ' || count(*) FROM \"Sch\"\"ema. *x\".\"Order Lines\"
         UNION ALL SELECT 'user ' || string_agg(\"from\", ',' ORDER BY \"from\") FROM public.\"user\"",
    )
}

#[test]
fn a_restored_copy_of_a_captured_source_is_cleaned_completely() {
    let cluster = Cluster::shared();
    let source = cluster.create_database("src");
    load_hostile(&source);
    source.psql(
        "CREATE FUNCTION public.touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
         CREATE TRIGGER pgferry_lookalike BEFORE UPDATE ON public.\"user\" FOR EACH ROW EXECUTE FUNCTION public.touch();
         INSERT INTO \"Sch\"\"ema. *x\".\"Order Lines\" VALUES (1, 1, 'a', 'b');",
    );
    let pristine = catalog_listing(&source);
    pgferry(&["install", "--source", &source.dsn()]).expect(0);
    source.psql("INSERT INTO public.\"user\" VALUES (gen_random_uuid(), 'after install', NULL)");

    let copy = cluster.create_database("copy");
    let file = tempfile::NamedTempFile::new().unwrap();
    dump(&source, file.path());
    restore(file.path(), &copy);
    assert_eq!(copy.scalar("SELECT count(*) FROM pgferry.delta"), "1");

    let dry = pgferry(&["clean", "--db", &copy.dsn(), "--dry-run", "--watch", "0.5"]).expect(0);
    assert!(
        dry.stdout.contains("DROP SCHEMA \"pgferry\""),
        "{}",
        dry.stdout
    );
    assert!(
        !dry.stdout.contains("pgferry_lookalike"),
        "a user's trigger is not ours: {}",
        dry.stdout
    );
    assert_eq!(
        copy.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "1"
    );

    let run = pgferry(&["clean", "--db", &copy.dsn(), "--watch", "0.5", "--json"]).expect(0);
    let report = run.json();
    assert_eq!(
        report["pgferry"]["triggers"].as_array().unwrap().len(),
        6 * 5, // six tables, four capture triggers and a TRUNCATE trigger each
        "{report}"
    );
    // Nothing of pgferry is left, no identity either; user objects and data are all there.
    assert_eq!(catalog_listing(&copy), pristine);
    assert_eq!(user_data(&copy), user_data(&source));
    let again = pgferry(&["clean", "--db", &copy.dsn(), "--watch", "0.5"]).expect(0);
    assert!(
        again.stdout.contains("nothing to clean"),
        "{}",
        again.stdout
    );
}

#[test]
fn bucardo_artifacts_are_removed_and_user_objects_survive() {
    let db = Cluster::shared().create_database("bucardo");
    let fixture = fixture("bucardo-source.sql");
    db.cluster().psql_file(db.name(), &fixture);
    let data = db.psql(
        "SELECT (SELECT count(*) FROM public.customers), (SELECT count(*) FROM public.orders),
                (SELECT count(*) FROM public.\"Order Lines\")",
    );
    let without = pgferry(&["clean", "--db", &db.dsn(), "--watch", "0"]).expect(0);
    assert!(
        without.stdout.contains("nothing to clean"),
        "{}",
        without.stdout
    );

    let report = pgferry(&[
        "clean",
        "--db",
        &db.dsn(),
        "--bucardo",
        "--watch",
        "0",
        "--json",
    ])
    .expect(0)
    .json();
    assert!(
        report["bucardo"]["triggers"].as_array().unwrap().len() >= 12,
        "{report}"
    );
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'bucardo'"),
        "0"
    );
    let triggers = db.psql("SELECT tgrelid::regclass::text || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1");
    assert!(
        !triggers.contains("bucardo") && !triggers.contains("btrunc"),
        "{triggers}"
    );
    assert!(triggers.contains("user_touch"), "{triggers}");
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_proc WHERE proname = 'touch'"),
        "1"
    );
    assert_eq!(
        db.psql(
            "SELECT (SELECT count(*) FROM public.customers), (SELECT count(*) FROM public.orders),
                    (SELECT count(*) FROM public.\"Order Lines\")"
        ),
        data
    );
    // The user trigger still works.
    db.psql("UPDATE public.customers SET name = name");
}

#[test]
fn a_live_source_is_refused_and_left_alone() {
    let db = Cluster::shared().create_database("live");
    db.psql("CREATE TABLE t (id bigserial PRIMARY KEY, v int)");
    pgferry(&["install", "--source", &db.dsn()]).expect(0);

    // Applications writing captured tables while clean watches.
    let writer_dsn = db.dsn();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut child = Command::new(client_tool("psql"))
            .args(["-X", "-q", &writer_dsn])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            writeln!(
                stdin,
                "INSERT INTO t (v) VALUES (1); SELECT pg_sleep(0.05);"
            )
            .unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(stdin);
        child.wait().unwrap();
    });
    let before = catalog_listing(&db);
    let run = pgferry(&["clean", "--db", &db.dsn(), "--watch", "3"]).expect(1);
    assert!(run.stderr.contains("capture row"), "{}", run.stderr);
    assert!(run.stderr.contains("pgferry uninstall"), "{}", run.stderr);
    assert_eq!(catalog_listing(&db), before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();

    // Another sign: a pgferry session connected, or a target acknowledging recently.
    db.psql("INSERT INTO pgferry.target (name, acked_at) VALUES ('new-host', now())");
    let run = pgferry(&["clean", "--db", &db.dsn(), "--watch", "0"]).expect(1);
    assert!(run.stderr.contains("new-host"), "{}", run.stderr);
    let forced = pgferry(&["clean", "--db", &db.dsn(), "--watch", "0", "--force"]).expect(0);
    assert!(forced.stderr.contains("--force"), "{}", forced.stderr);
    assert_eq!(
        db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgferry'"),
        "0"
    );
}
