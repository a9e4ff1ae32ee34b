//! The `pgferry` command: parses the command line, runs the library that does the work, and
//! turns the outcome into output and an exit code (see [`exit`]).

mod capture;
mod cleanup;
mod config;
mod copy;
mod cutover;
mod demo;
mod exit;
mod output;
mod run;
mod schema;
mod sync;
mod two_way;
mod verify;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// Trigger-based PostgreSQL replication: move a live database to new infrastructure with an
/// outage of seconds, and keep databases replicated afterwards.
#[derive(Debug, Parser)]
#[command(name = "pgferry", version, about, long_about = None)]
#[command(after_help = exit::EXIT_CODES_HELP)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: output::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// A whole migration on two throwaway local clusters, under a writer load: install,
    /// pg_dump/pg_restore, clean, catch-up, cutover, verify, with the time of every step and
    /// the write outage. Removes everything it started.
    Demo(demo::DemoArgs),
    /// Install delta capture on a source database (step 1 of a migration).
    ///
    /// Adds schema pgferry (capture tables, registry, node identity) and a capture trigger to
    /// every selected table, in one transaction. Re-running adds newly matched tables only.
    Install(capture::InstallArgs),
    /// Remove everything `install` added to a source database, in one transaction.
    Uninstall(capture::UninstallArgs),
    /// Strip replication artifacts from a database restored from a dump or snapshot of a
    /// captured source (step 4 of a migration), so it can become a target.
    Clean(cleanup::CleanArgs),
    /// Create on a target the schema of the captured tables (tables, keys, indexes, sequences
    /// and the types, functions and extensions they use), from pg_dump's output, in one
    /// transaction; refuses a target that already has any of the tables.
    Schema(schema::SchemaArgs),
    /// Catch targets up with a source (step 7 of a migration): apply every captured change,
    /// in rounds at one source snapshot, with row state moved by COPY. With --node, one
    /// two-way exchange: every node's changes to every other, conflicts decided per row.
    Sync(sync::SyncArgs),
    /// Show where each target stands: pending changes per table, the age of the oldest,
    /// the last acknowledged snapshot.
    Status(sync::StatusArgs),
    /// List the conflicts a node of a two-way sync decided: table, keys, both row images, the
    /// rule and the winner.
    Conflicts(two_way::ConflictsArgs),
    /// Replicate continuously (the daemon): rounds whenever changes are committed, reconnecting
    /// after outages, one active daemon per sync (others stand by), metrics on --metrics; with
    /// --node, a two-way sync.
    Run(run::RunArgs),
    /// Check a daemon configuration: the file, every node, every sync's capture and target
    /// schemas; reports every problem at once (exit 0 ready, 1 problems, 2 bad file).
    Check(run::CheckArgs),
    /// Compare a target with its source: per table, row counts and checksums, narrowed to the
    /// differing keys (exit 0 equal, 1 different, 2 or more could not compare). On a live
    /// source, keys with pending changes are left out and counted.
    Verify(verify::VerifyArgs),
    /// Steps 6–8 of a migration: freeze every write on the source, drain every target to the
    /// final snapshot, set sequences, check what the final round touched and the row counts,
    /// and report the write outage (exit 0 cut over; 1 refused or rolled back, the source
    /// writable and nothing lost; 6 failed with the source still frozen). --reverse opens a way
    /// back: the target's writes replicate to the frozen source, and a cutover back loses none.
    Cutover(cutover::CutoverArgs),
    /// Make a source frozen by a cutover writable again (after an interrupted cutover, or to
    /// roll a finished one back).
    Unfreeze(cutover::UnfreezeArgs),
    /// Initial copy of the captured tables into a target whose schema exists: every job reads
    /// one exported source snapshot, large tables are cut into ranges the jobs share, and the
    /// snapshot is recorded so that the next catch-up applies only what the copy does not hold.
    Copy(copy::CopyArgs),
    /// Manage the source's registry of targets.
    #[command(subcommand)]
    Target(sync::TargetCommand),
}

/// Options shared by commands that change a database.
#[derive(Debug, clap::Args)]
pub struct ChangeArgs {
    /// Print what would be done (and the SQL), change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Give up waiting for a table lock after this many seconds (a long transaction holding
    /// one) instead of queueing every writer behind pgferry.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub lock_timeout: f64,
}

impl ChangeArgs {
    pub fn lock_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.lock_timeout.max(0.001))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; pgferry's own log lines only when something is wrong.
    let quiet = matches!(cli.command, Command::Demo(_));
    output::init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return exit::Code::Failure.into();
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Demo(a) => demo::demo(a).await,
            Command::Install(a) => capture::install(a).await,
            Command::Uninstall(a) => capture::uninstall(a).await,
            Command::Clean(a) => cleanup::clean(a).await,
            Command::Schema(a) => schema::schema(a).await,
            Command::Sync(a) => sync::sync(a).await,
            Command::Target(c) => sync::target(c).await,
            Command::Status(a) => sync::status(a).await,
            Command::Conflicts(a) => two_way::conflicts(a).await,
            Command::Run(a) => run::run(a).await,
            Command::Check(a) => run::check(a).await,
            Command::Verify(a) => verify::verify(a).await,
            Command::Copy(a) => copy::copy(a).await,
            Command::Cutover(a) => cutover::cutover(a).await,
            Command::Unfreeze(a) => cutover::unfreeze(a).await,
        }
    });
    match result {
        Ok(code) => code.into(),
        Err(e) => exit::report(&e).into(),
    }
}
