//! End-to-end tests of TLS: every `sslmode` against a server with `ssl = on` whose certificate
//! (for `127.0.0.1` and `pgferry-test.invalid`) is signed by a CA made here with the `openssl`
//! command, and whose `pg_hba.conf` accepts TLS connections only (`hostssl`), so any session that
//! gets through is encrypted; and against the shared cluster, which has `ssl = off`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::Run;
use pgferry_core::{Dsn, Session};
use pgferry_testkit::{Cluster, ClusterSetup, PgBin, TestDb};

/// The name in the server certificate besides the IP address 127.0.0.1 (`.invalid` never
/// resolves: tests reach it through `hostaddr`).
const CERT_DNS_NAME: &str = "pgferry-test.invalid";

/// Certificates made once per test binary.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// The CA that signed the server's certificate.
    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A CA that signed nothing the server has.
    fn other_ca(&self) -> PathBuf {
        self.dir.path().join("other-ca.crt")
    }

    /// A home directory without `.postgresql/root.crt`.
    fn empty_home(&self) -> PathBuf {
        self.dir.path().join("home-empty")
    }

    /// A home directory whose `.postgresql/root.crt` is the CA.
    fn home_with_root(&self) -> PathBuf {
        self.dir.path().join("home-root")
    }
}

const OPENSSL_CONF: &str = "
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:pgferry-test.invalid
authorityKeyIdentifier = keyid
";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed to make test certificates (Debian: openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("openssl.cnf"), OPENSSL_CONF).unwrap();
        let key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
        for (name, cn) in [("ca", "pgferry test CA"), ("other-ca", "pgferry other CA")] {
            let (keyout, out, subj) = (
                format!("{name}.key"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut args = vec![
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
            ];
            args.extend(key);
            args.extend([
                "-nodes", "-keyout", &keyout, "-out", &out, "-days", "30", "-subj", &subj,
            ]);
            openssl(d, &args);
        }
        let mut args = vec!["req", "-new", "-config", "openssl.cnf"];
        args.extend(key);
        args.extend([
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=pgferry test server",
        ]);
        openssl(d, &args);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "2",
                "-days",
                "30",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                "server",
                "-out",
                "server.crt",
            ],
        );
        let pki = Pki { dir };
        std::fs::create_dir_all(pki.empty_home()).unwrap();
        std::fs::create_dir_all(pki.home_with_root().join(".postgresql")).unwrap();
        std::fs::copy(pki.ca(), pki.home_with_root().join(".postgresql/root.crt")).unwrap();
        pki
    })
}

/// A cluster with `ssl = on` and the certificate `NAME.crt` (key `NAME.key`) of the PKI
/// directory, that accepts TLS connections only.
fn start_tls_cluster(name: &str) -> Cluster {
    let read = |file: String| std::fs::read(pki().dir.path().join(file)).unwrap();
    Cluster::start_setup(
        &PgBin::system(),
        &ClusterSetup {
            conf: vec![
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
            ],
            hba: Some(
                "hostssl all postgres 127.0.0.1/32 trust\n\
                 hostssl all all 127.0.0.1/32 md5\n"
                    .into(),
            ),
            files: vec![
                ("server.crt".into(), read(format!("{name}.crt"))),
                ("server.key".into(), read(format!("{name}.key"))),
            ],
        },
    )
    .expect("start a cluster with ssl = on")
}

/// The cluster whose certificate the test CA signed.
fn tls_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| start_tls_cluster("server"))
}

/// The name in the self-signed certificate's common name.
const SELF_SIGNED_CN: &str = "pgferry-cn.invalid";

/// The cluster whose certificate is made with the one-liner of PostgreSQL's documentation
/// (with the system's openssl.cnf): self-signed, a CA certificate itself, its host only in the
/// common name, and the `-text` dump before the PEM block.
fn self_signed_cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let subj = format!("/CN={SELF_SIGNED_CN}");
        openssl(
            pki().dir.path(),
            &[
                "req",
                "-new",
                "-x509",
                "-days",
                "365",
                "-nodes",
                "-text",
                "-out",
                "selfsigned.crt",
                "-keyout",
                "selfsigned.key",
                "-subj",
                &subj,
            ],
        );
        start_tls_cluster("selfsigned")
    })
}

/// A fresh database on the TLS cluster with an empty table `items`.
fn tls_db(prefix: &str) -> TestDb<'static> {
    let db = tls_cluster().create_database(prefix);
    db.psql("CREATE TABLE items (id int PRIMARY KEY, v text)");
    db
}

/// `db`'s DSN with more parameters (`key=value …`).
fn dsn(db: &TestDb<'_>, extra: &str) -> String {
    format!("{} {extra}", db.dsn())
}

/// Runs pgferry with a home directory of its own and no `PGSSL*` variables but `env`.
fn pgferry_env(args: &[&str], home: &Path, env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgferry"));
    cmd.args(args)
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env("HOME", home)
        .env("PGFERRY_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run pgferry");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn pgferry(args: &[&str]) -> Run {
    pgferry_env(args, &pki().empty_home(), &[])
}

/// `pgferry install --dry-run` against `dsn`: connects and reads the catalog, changes nothing.
fn probe(dsn: &str) -> Run {
    pgferry(&["install", "--source", dsn, "--dry-run"])
}

/// Asserts a run failed with the connection exit code and a message containing `needle`.
#[track_caller]
fn refused(run: Run, needle: &str) -> String {
    let run = run.expect(3);
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?} in:\n{}",
        run.stderr
    );
    run.stderr
}

#[test]
fn sync_with_verify_full_on_both_ends_moves_the_rows() {
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    let source = tls_db("tls_src");
    let target = tls_db("tls_dst");
    let tls = format!("sslmode=verify-full sslrootcert={ca}");
    let (s, t) = (dsn(&source, &tls), dsn(&target, &tls));
    pgferry(&["install", "--source", &s]).expect(0);
    source.psql("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g");
    pgferry(&["sync", "--source", &s, "--target", &t, "--once"]).expect(0);
    assert_eq!(
        target.scalar("SELECT count(*) || ' ' || sum(id) FROM items"),
        "100 5050"
    );
    // The URL form, with the environment's root certificate (libpq's PGSSLROOTCERT).
    source.psql("UPDATE items SET v = 'changed' WHERE id <= 10");
    let url = |db: &TestDb<'_>| {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}?sslmode=verify-full",
            db.cluster().port(),
            db.name()
        )
    };
    pgferry_env(
        &[
            "sync",
            "--source",
            &url(&source),
            "--target",
            &url(&target),
            "--once",
        ],
        &pki().empty_home(),
        &[("PGSSLROOTCERT", ca)],
    )
    .expect(0);
    assert_eq!(
        target.scalar("SELECT count(*) FROM items WHERE v = 'changed'"),
        "10"
    );
}

#[test]
fn the_daemon_replicates_under_verify_full() {
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    let source = tls_db("tlsd_src");
    let target = tls_db("tlsd_dst");
    let tls = format!("sslmode=verify-full sslrootcert={ca}");
    let (s, t) = (dsn(&source, &tls), dsn(&target, &tls));
    pgferry(&["install", "--source", &s]).expect(0);
    let daemon = Command::new(env!("CARGO_BIN_EXE_pgferry"))
        .args(["run", "--source", &s, "--target", &t])
        .env_remove("PGPASSWORD")
        .env_remove("PGSSLMODE")
        .env_remove("PGSSLROOTCERT")
        .env("HOME", pki().empty_home())
        .env("PGFERRY_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pgferry run");
    source.psql("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g");
    common::wait_for(std::time::Duration::from_secs(30), "rows over TLS", || {
        target.scalar("SELECT count(*) FROM items") == "100"
    });
    // Every session the daemon holds on either server is encrypted.
    for db in [&source, &target] {
        assert_eq!(
            db.scalar(
                "SELECT count(*) FILTER (WHERE NOT s.ssl) || '/' || count(*) FROM pg_stat_ssl s
                   JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'pgferry%'"
            )
            .split('/')
            .next(),
            Some("0")
        );
    }
    let term = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let out = daemon.wait_with_output().expect("daemon exit");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn verify_full_checks_the_host_name_against_the_certificate() {
    let db = tls_db("tls_name");
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    // The certificate names 127.0.0.1 and pgferry-test.invalid, not localhost.
    let wrong = db
        .dsn()
        .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1");
    let stderr = refused(
        probe(&format!("{wrong} sslmode=verify-full sslrootcert={ca}")),
        "server certificate does not match host localhost (sslmode=verify-full)",
    );
    assert!(stderr.contains("sslmode=verify-ca"), "{stderr}");
    // A DNS name the certificate lists passes; verify-ca does not look at the name.
    let named = db.dsn().replace(
        "host=127.0.0.1",
        &format!("host={CERT_DNS_NAME} hostaddr=127.0.0.1"),
    );
    probe(&format!("{named} sslmode=verify-full sslrootcert={ca}")).expect(0);
    probe(&format!("{wrong} sslmode=verify-ca sslrootcert={ca}")).expect(0);
}

#[test]
fn verify_ca_and_verify_full_refuse_a_certificate_from_another_ca() {
    let db = tls_db("tls_ca");
    let other = pki().other_ca();
    let other = other.to_str().unwrap();
    for mode in ["verify-ca", "verify-full"] {
        refused(
            probe(&dsn(&db, &format!("sslmode={mode} sslrootcert={other}"))),
            &format!(
                "server certificate is not signed by a CA in sslrootcert {other} (sslmode={mode})"
            ),
        );
    }
    // require with a root certificate verifies the chain, as libpq does.
    refused(
        probe(&dsn(&db, &format!("sslmode=require sslrootcert={other}"))),
        "server certificate is not signed by a CA",
    );
}

#[test]
fn verify_modes_find_the_root_certificate_where_libpq_looks() {
    let db = tls_db("tls_root");
    // No sslrootcert and no ~/.postgresql/root.crt: the message says where to put it.
    let home = pki().empty_home();
    let expected = home.join(".postgresql/root.crt");
    refused(
        probe(&dsn(&db, "sslmode=verify-ca")),
        &expected.display().to_string(),
    );
    refused(
        probe(&dsn(
            &db,
            "sslmode=verify-full sslrootcert=/nonexistent/ca.pem",
        )),
        "sslrootcert /nonexistent/ca.pem: no such file",
    );
    // ~/.postgresql/root.crt, and PGSSLMODE from the environment.
    let plain = db.dsn();
    let dry = ["install", "--source", &plain, "--dry-run"];
    pgferry_env(
        &dry,
        &pki().home_with_root(),
        &[("PGSSLMODE", "verify-full")],
    )
    .expect(0);
    // With that root file there, require verifies the chain too (libpq), and passes.
    pgferry_env(&dry, &pki().home_with_root(), &[("PGSSLMODE", "require")]).expect(0);
    refused(
        pgferry_env(&dry, &pki().empty_home(), &[("PGSSLMODE", "verify-full")]),
        "sslmode=verify-full needs the CA certificate",
    );
}

#[test]
fn sslrootcert_system_trusts_the_system_roots_and_means_verify_full() {
    let db = tls_db("tls_system");
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    let dry = |dsn: &str, ssl_cert_file: &str| {
        let args = ["install", "--source", dsn, "--dry-run"];
        pgferry_env(
            &args,
            &pki().empty_home(),
            &[("SSL_CERT_FILE", ssl_cert_file)],
        )
    };
    // SSL_CERT_FILE stands for the system's store, as with OpenSSL.
    dry(&dsn(&db, "sslrootcert=system"), ca).expect(0);
    let wrong = db
        .dsn()
        .replace("host=127.0.0.1", "host=localhost hostaddr=127.0.0.1");
    refused(
        dry(&format!("{wrong} sslrootcert=system"), ca),
        "server certificate does not match host localhost (sslmode=verify-full)",
    );
    let other = pki().other_ca();
    refused(
        dry(&dsn(&db, "sslrootcert=system"), other.to_str().unwrap()),
        "not signed by a CA in the system's trusted roots",
    );
    let run = dry(&dsn(&db, "sslmode=require sslrootcert=system"), ca).expect(1);
    assert!(
        run.stderr
            .contains("weak sslmode=require may not be used with sslrootcert=system"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_self_signed_certificate_listed_in_the_root_file_is_trusted_under_its_common_name() {
    let db = self_signed_cluster().create_database("tls_self_signed");
    db.psql("CREATE TABLE items (id int PRIMARY KEY, v text)");
    let crt = pki().dir.path().join("selfsigned.crt");
    let root = format!("sslrootcert={}", crt.display());
    let named = db.dsn().replace(
        "host=127.0.0.1",
        &format!("host={SELF_SIGNED_CN} hostaddr=127.0.0.1"),
    );
    probe(&format!("{named} sslmode=verify-full {root}")).expect(0);
    probe(&dsn(&db, &format!("sslmode=verify-ca {root}"))).expect(0);
    probe(&dsn(&db, &format!("sslmode=require {root}"))).expect(0);
    refused(
        probe(&dsn(&db, &format!("sslmode=verify-full {root}"))),
        "server certificate does not match host 127.0.0.1 (sslmode=verify-full)",
    );
    let ca = pki().ca();
    refused(
        probe(&dsn(
            &db,
            &format!("sslmode=verify-ca sslrootcert={}", ca.display()),
        )),
        &format!(
            "server certificate is a CA certificate not found in sslrootcert {} (sslmode=verify-ca)",
            ca.display()
        ),
    );
}

#[test]
fn require_prefer_and_allow_take_the_self_signed_server_without_a_root_certificate() {
    let db = tls_db("tls_require");
    for mode in ["require", "prefer", "allow"] {
        probe(&dsn(&db, &format!("sslmode={mode}"))).expect(0);
    }
    // The server takes TLS connections only: disable is turned away by pg_hba.conf.
    refused(probe(&dsn(&db, "sslmode=disable")), "cannot connect to");
}

#[test]
fn require_against_a_server_without_tls_fails_and_prefer_falls_back() {
    let db = Cluster::shared().create_database("tls_off");
    db.psql("CREATE TABLE items (id int PRIMARY KEY, v text)");
    assert_eq!(db.scalar("SHOW ssl"), "off");
    let ca = pki().ca();
    for mode in ["require", "verify-ca", "verify-full"] {
        let tls = format!("sslmode={mode} sslrootcert={}", ca.display());
        refused(
            probe(&dsn(&db, &tls)),
            &format!("server does not support TLS (sslmode={mode})"),
        );
    }
    for mode in ["disable", "allow", "prefer"] {
        probe(&dsn(&db, &format!("sslmode={mode}"))).expect(0);
    }
}

#[test]
fn tls_errors_never_show_the_password() {
    let db = tls_db("tls_secret");
    db.psql("CREATE ROLE tls_user LOGIN PASSWORD 'hunter2-secret'");
    let other = pki().other_ca();
    let with_password = format!(
        "{} sslmode=verify-full sslrootcert={}",
        db.dsn_as("tls_user", "hunter2-secret"),
        other.display()
    );
    let stderr = refused(probe(&with_password), "not signed by a CA");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(stderr.contains("tls_user@127.0.0.1"), "{stderr}");
    // With the right CA the role logs in with its SCRAM password over TLS (where the server
    // offers SCRAM-SHA-256-PLUS, with channel binding).
    let ca = pki().ca();
    let right = format!(
        "{} sslmode=verify-full sslrootcert={}",
        db.dsn_as("tls_user", "hunter2-secret"),
        ca.display()
    );
    assert!(encrypted(&right).unwrap());
}

/// Whether a session opened through pgferry_core with `dsn` is encrypted, per `pg_stat_ssl`.
fn encrypted(dsn: &str) -> Result<bool, pgferry_core::Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let session = Session::connect(&Dsn::parse(dsn)?, "tls test").await?;
        session.is_encrypted().await
    })
}

#[test]
fn sessions_are_encrypted_as_the_mode_says() {
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    let on = tls_db("tls_session");
    // Every mode but disable gets TLS from a server that offers it (allow after the plain
    // attempt is turned away). Root certificates are given so that a developer's own
    // ~/.postgresql/root.crt cannot change the outcome.
    for mode in ["allow", "prefer", "require", "verify-ca", "verify-full"] {
        let tls = format!("sslmode={mode} sslrootcert={ca}");
        assert!(encrypted(&dsn(&on, &tls)).unwrap(), "{mode}");
    }
    let e = encrypted(&dsn(&on, "sslmode=disable")).unwrap_err();
    assert_eq!(e.class(), pgferry_core::ErrorClass::Authentication, "{e}");
    // A server without TLS: plain for disable, allow and prefer.
    let off = Cluster::shared().create_database("tls_session_off");
    for mode in ["disable", "allow", "prefer"] {
        assert!(
            !encrypted(&dsn(&off, &format!("sslmode={mode}"))).unwrap(),
            "{mode}"
        );
    }
    let e = encrypted(&dsn(&off, "sslmode=require")).unwrap_err();
    assert!(matches!(e, pgferry_core::Error::Tls { .. }), "{e:?}");
    assert_eq!(e.class(), pgferry_core::ErrorClass::Connection);
}

#[test]
fn schema_gives_pg_dump_the_dsns_tls_settings() {
    use std::os::unix::fs::PermissionsExt;
    let ca = pki().ca();
    let ca = ca.to_str().unwrap();
    let source = tls_db("tls_schema_src");
    let tls = format!("sslmode=verify-full sslrootcert={ca}");
    let s = dsn(&source, &tls);
    pgferry(&["install", "--source", &s]).expect(0);
    // pg_dump and pg_restore wrapped, to record the TLS settings they are given.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tls.log");
    for tool in ["pg_dump", "pg_restore"] {
        let path = dir.path().join(tool);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nenv | grep '^PGSSL' >> '{}'\nexec '{}' \"$@\"\n",
                log.display(),
                pgferry_testkit::client_tool(tool).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let wrapper = dir.path().join("pg_dump");
    let wrapper = wrapper.to_str().unwrap();
    // The DSN's settings win over the environment's, for pg_dump as for pgferry (inherited,
    // PGSSLMODE=disable would be refused by the server, which takes TLS only).
    let target = tls_cluster().create_database("tls_schema_dst");
    let other = pki().other_ca();
    pgferry_env(
        &[
            "schema",
            "--source",
            &s,
            "--target",
            &dsn(&target, &tls),
            "--pg-dump",
            wrapper,
        ],
        &pki().empty_home(),
        &[
            ("PGSSLMODE", "disable"),
            ("PGSSLROOTCERT", other.to_str().unwrap()),
        ],
    )
    .expect(0);
    assert_eq!(
        target.scalar("SELECT to_regclass('public.items') IS NOT NULL"),
        "t"
    );
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(
        seen.contains("PGSSLMODE=verify-full\n") && seen.contains(&format!("PGSSLROOTCERT={ca}\n")),
        "{seen}"
    );
    assert!(
        !seen.contains("disable") && !seen.contains("other-ca"),
        "{seen}"
    );
    // sslrootcert=system, which pg_dump's libpq 15 does not know: it gets the system's bundle
    // (SSL_CERT_FILE standing for it), still under verify-full.
    std::fs::remove_file(&log).unwrap();
    let target = tls_cluster().create_database("tls_schema_system");
    let system = |db: &TestDb<'_>| dsn(db, "sslrootcert=system");
    pgferry_env(
        &[
            "schema",
            "--source",
            &system(&source),
            "--target",
            &system(&target),
            "--pg-dump",
            wrapper,
        ],
        &pki().empty_home(),
        &[("SSL_CERT_FILE", ca)],
    )
    .expect(0);
    assert_eq!(
        target.scalar("SELECT to_regclass('public.items') IS NOT NULL"),
        "t"
    );
    let seen = std::fs::read_to_string(&log).unwrap();
    assert!(
        seen.contains("PGSSLMODE=verify-full\n") && seen.contains(&format!("PGSSLROOTCERT={ca}\n")),
        "{seen}"
    );
}
