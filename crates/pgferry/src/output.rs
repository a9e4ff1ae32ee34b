//! Logging setup and report printing.

use serde::Serialize;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr; the level comes from `PGFERRY_LOG` (default `info`).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Prints a report as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode the report as JSON: {e}"),
    }
}

/// Prints statements as a SQL script.
pub fn sql_script<'a>(statements: impl Iterator<Item = (&'a str, &'a str)>) {
    println!("BEGIN;");
    for (what, sql) in statements {
        println!("-- {what}");
        println!("{};", sql.trim_end().trim_end_matches(';'));
    }
    println!("-- dry run: nothing was changed");
    println!("ROLLBACK;");
}
