//! A database of its own for one test.
//!
//! Tests share a cluster but never a database: each takes a fresh one from
//! [`Cluster::create_database`], so tests run in parallel without seeing each other's tables,
//! triggers or pgferry artifacts. Databases are not dropped afterwards; they vanish with the
//! cluster.

use crate::cluster::{psql, Cluster, Input};

/// A fresh database in a [`Cluster`], with helpers that run SQL in it as the superuser.
#[derive(Debug)]
pub struct TestDb<'a> {
    cluster: &'a Cluster,
    name: String,
}

impl<'a> TestDb<'a> {
    pub(crate) fn new(cluster: &'a Cluster, name: String) -> TestDb<'a> {
        TestDb { cluster, name }
    }

    /// The database name (plain lowercase, needs no quoting).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cluster the database lives in.
    pub fn cluster(&self) -> &'a Cluster {
        self.cluster
    }

    /// A key=value DSN for the superuser `postgres` (trusted, no password).
    pub fn dsn(&self) -> String {
        self.cluster.dsn(&self.name)
    }

    /// A key=value DSN for role `user` with `password`.
    pub fn dsn_as(&self, user: &str, password: &str) -> String {
        self.cluster.dsn_as(&self.name, user, password)
    }

    /// Runs `sql` through psql as the superuser; returns stdout (`-At`: unaligned, tuples only).
    ///
    /// # Panics
    /// If psql fails; the message carries its stderr.
    pub fn psql(&self, sql: &str) -> String {
        self.cluster.psql(&self.name, sql)
    }

    /// Like [`TestDb::psql`], but a failure returns psql's stderr.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        self.cluster.try_psql(&self.name, sql)
    }

    /// The first line of `sql`'s output (the value of a one-row, one-column query).
    ///
    /// # Panics
    /// If psql fails.
    pub fn scalar(&self, sql: &str) -> String {
        self.psql(sql).lines().next().unwrap_or_default().to_owned()
    }

    /// Runs `sql` through psql as role `user` with `password` (to test privileges); a failure
    /// returns psql's stderr.
    pub fn try_psql_as(&self, user: &str, password: &str, sql: &str) -> Result<String, String> {
        psql(&self.dsn_as(user, password), Input::Sql(sql))
    }
}
