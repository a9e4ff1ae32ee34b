//! The daemon's configuration file (TOML): named nodes and the syncs between them.
//! `docs/daemon.md` documents it, with a commented example (`docs/pgferry.example.toml`).
//!
//! Loading reports every problem at once, each naming the node or sync and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pgferry_core::{Dsn, TablePattern};
use pgferry_sync::conflict::{Rule, Rules};
use pgferry_sync::daemon::SyncSpec;
use pgferry_sync::SyncOptions;
use serde::Deserialize;

/// Default longest wait between two polls of an idle source.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    nodes: BTreeMap<String, NodeFile>,
    #[serde(default)]
    syncs: BTreeMap<String, SyncFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    dsn: String,
    /// Environment variable holding the password.
    password_env: Option<String>,
    /// File holding the password (first line; trailing newline ignored).
    password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncFile {
    /// One-way: the source node and its targets.
    source: Option<String>,
    #[serde(default)]
    targets: Vec<String>,
    /// Two-way: every node of the sync, and the conflict rule (with per-table overrides).
    #[serde(default)]
    nodes: Vec<String>,
    conflict: Option<String>,
    #[serde(default)]
    conflict_tables: BTreeMap<String, String>,
    /// Two-way: delta columns every node must declare (SCHEMA.TABLE.COLUMN).
    #[serde(default)]
    delta_columns: Vec<String>,
    #[serde(default)]
    tables: Vec<String>,
    poll_interval: Option<String>,
    max_round_pause: Option<String>,
    saturated_round_pause: Option<String>,
    split_rounds_above: Option<u64>,
    #[serde(default)]
    accept_new_tables: bool,
}

/// A loaded configuration: every node's DSN (password filled in) and the syncs.
#[derive(Debug)]
pub struct Config {
    pub nodes: BTreeMap<String, Dsn>,
    pub syncs: Vec<SyncSpec>,
}

/// Reads and checks `path`; on failure, every problem found.
pub fn load(path: &Path) -> Result<Config, Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![format!("cannot read {}: {e}", path.display())])?;
    parse(&text, &|var| std::env::var(var).ok()).map_err(|p| {
        p.into_iter()
            .map(|m| format!("{}: {m}", path.display()))
            .collect()
    })
}

/// Parses a configuration; `env` reads environment variables.
pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Vec<String>> {
    let file: File = toml::from_str(text).map_err(|e| vec![e.to_string().trim().to_owned()])?;
    let mut problems = Vec::new();
    let mut nodes = BTreeMap::new();
    for (name, node) in &file.nodes {
        let mut dsn = match Dsn::parse(&node.dsn) {
            Ok(d) => d,
            Err(e) => {
                problems.push(format!("node {name}: dsn: {e}"));
                continue;
            }
        };
        let password = match (&node.password_env, &node.password_file) {
            (Some(_), Some(_)) => {
                problems.push(format!(
                    "node {name}: give password_env or password_file, not both"
                ));
                None
            }
            (Some(var), None) => match env(var) {
                Some(p) => Some(p),
                None => {
                    problems.push(format!(
                        "node {name}: password_env: environment variable {var} is not set"
                    ));
                    None
                }
            },
            (None, Some(file)) => match std::fs::read_to_string(file) {
                Ok(p) => Some(p.lines().next().unwrap_or("").to_owned()),
                Err(e) => {
                    problems.push(format!(
                        "node {name}: password_file: cannot read {}: {e}",
                        file.display()
                    ));
                    None
                }
            },
            (None, None) => None,
        };
        if let Some(p) = password {
            dsn = dsn.with("password", &p);
        }
        nodes.insert(name.clone(), dsn);
    }
    if file.syncs.is_empty() {
        problems.push("no [syncs.NAME] section: nothing to replicate".into());
    }
    let mut syncs = Vec::new();
    for (name, sync) in &file.syncs {
        let node = |role: &str, n: &str, problems: &mut Vec<String>| -> Option<Dsn> {
            match nodes.get(n) {
                Some(d) => Some(d.clone()),
                None if file.nodes.contains_key(n) => None, // its own problem is reported
                None => {
                    problems.push(format!(
                        "sync {name}: {role} {n:?} is not a node (define [nodes.{n}])"
                    ));
                    None
                }
            }
        };
        let mut setting = |key: &str,
                           text: &Option<String>,
                           parse: fn(&str) -> Result<Duration, String>,
                           default: Duration| {
            match text.as_deref().map(parse) {
                None => default,
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    problems.push(format!("sync {name}: {key}: {e}"));
                    default
                }
            }
        };
        let poll_interval = setting(
            "poll_interval",
            &sync.poll_interval,
            parse_duration,
            DEFAULT_POLL_INTERVAL,
        );
        let max_round_pause = setting(
            "max_round_pause",
            &sync.max_round_pause,
            parse_round_pause,
            pgferry_sync::DEFAULT_MAX_ROUND_PAUSE,
        );
        let saturated_round_pause = setting(
            "saturated_round_pause",
            &sync.saturated_round_pause,
            parse_round_pause,
            pgferry_sync::DEFAULT_SATURATED_ROUND_PAUSE,
        );
        if !sync.nodes.is_empty() {
            if sync.source.is_some() || !sync.targets.is_empty() {
                problems.push(format!(
                    "sync {name}: give nodes (two-way) or source and targets (one-way), not both"
                ));
            }
            if !sync.tables.is_empty() || sync.split_rounds_above.is_some() {
                problems.push(format!(
                    "sync {name}: tables and split_rounds_above are for one-way syncs (a two-way sync replicates every captured table)"
                ));
            }
            let mut members = Vec::new();
            for n in &sync.nodes {
                if let Some(dsn) = node("node", n, &mut problems) {
                    members.push(pgferry_sync::two_way::Node {
                        name: n.clone(),
                        dsn,
                    });
                }
            }
            let rules = match sync.conflict.as_deref().map(Rule::parse) {
                None => {
                    problems.push(format!(
                        "sync {name}: conflict: a two-way sync needs a rule (prefer:NODE, latest, abort, skip or custom:FUNCTION)"
                    ));
                    None
                }
                Some(Err(e)) => {
                    problems.push(format!("sync {name}: conflict: {e}"));
                    None
                }
                Some(Ok(r)) => Some(Rules::new(r)),
            };
            let mut overrides = Vec::new();
            for (pattern, rule) in &sync.conflict_tables {
                match Rules::parse_override(&format!("{pattern}={rule}")) {
                    Ok(o) => overrides.push(o),
                    Err(e) => problems.push(format!("sync {name}: conflict_tables: {e}")),
                }
            }
            let mut delta_columns = Vec::new();
            for d in &sync.delta_columns {
                match pgferry_install::DeltaColumn::parse(d) {
                    Ok(d) => delta_columns.push(d),
                    Err(e) => problems.push(format!("sync {name}: delta_columns: {e}")),
                }
            }
            if let Some(mut rules) = rules {
                rules.tables = overrides;
                if members.len() == sync.nodes.len() {
                    match (pgferry_sync::two_way::Mesh {
                        nodes: members,
                        rules,
                        delta_columns,
                    })
                    .specs(
                        name,
                        poll_interval,
                        &SyncOptions {
                            max_round_pause,
                            saturated_round_pause,
                            ..SyncOptions::default()
                        },
                    ) {
                        Ok(specs) => syncs.extend(specs),
                        Err(e) => problems.push(format!("sync {name}: {e}")),
                    }
                }
            }
            continue;
        }
        if sync.conflict.is_some()
            || !sync.conflict_tables.is_empty()
            || !sync.delta_columns.is_empty()
        {
            problems.push(format!(
                "sync {name}: conflict rules are for two-way syncs (give nodes instead of source and targets)"
            ));
        }
        let Some(source_name) = &sync.source else {
            problems.push(format!(
                "sync {name}: give source and targets (one-way) or nodes (two-way)"
            ));
            continue;
        };
        let source = node("source", source_name, &mut problems);
        if sync.targets.is_empty() {
            problems.push(format!("sync {name}: targets: give at least one node"));
        }
        let mut targets = Vec::new();
        for t in &sync.targets {
            if t == source_name {
                problems.push(format!(
                    "sync {name}: node {t} is both the source and a target"
                ));
            }
            if let Some(d) = node("target", t, &mut problems) {
                targets.push(d);
            }
        }
        let mut tables = Vec::new();
        for p in &sync.tables {
            match TablePattern::parse(p) {
                Ok(p) => tables.push(p),
                Err(e) => problems.push(format!("sync {name}: tables: {e}")),
            }
        }
        if let Some(source) = source {
            syncs.push(SyncSpec {
                name: name.clone(),
                source,
                targets,
                tables,
                options: SyncOptions {
                    accept_new_tables: sync.accept_new_tables,
                    split_rounds_above: sync.split_rounds_above,
                    max_round_pause,
                    saturated_round_pause,
                },
                poll_interval,
                two_way: None,
            });
        }
    }
    if problems.is_empty() {
        Ok(Config { nodes, syncs })
    } else {
        Err(problems)
    }
}

/// `250ms`, `2s`, `1.5s`, `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .map_or((t, ""), |i| t.split_at(i));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 50ms, 2s, 1m)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("{text:?} is not a duration (e.g. 50ms, 2s, 1m)")),
    };
    if !(0.001..=3600.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range (1ms to 1h)"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `max_round_pause` and `saturated_round_pause`: 0 (none), or a duration up to 1 s.
pub fn parse_round_pause(text: &str) -> Result<Duration, String> {
    if text
        .trim()
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        == "0"
    {
        return Ok(Duration::ZERO);
    }
    let d = parse_duration(text)?;
    if d > Duration::from_secs(1) {
        return Err(format!("{text:?} is out of range (0 to 1s)"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_pauses_parse_from_zero_to_a_second() {
        for zero in ["0", "0ms", " 0s "] {
            assert_eq!(parse_round_pause(zero), Ok(Duration::ZERO), "{zero}");
        }
        assert_eq!(parse_round_pause("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_round_pause("1s"), Ok(Duration::from_secs(1)));
        for bad in ["2s", "soon", "-1ms", ""] {
            assert!(parse_round_pause(bad).is_err(), "{bad}");
        }
    }

    fn env(var: &str) -> Option<String> {
        (var == "OLD_PW").then(|| "s3cret".to_owned())
    }

    #[test]
    fn a_full_configuration_loads() {
        let c = parse(
            r#"
            [nodes.old]
            dsn = "host=old.example dbname=app user=pgferry"
            password_env = "OLD_PW"
            [nodes.new]
            dsn = "postgresql://pgferry@new.example/app"
            [syncs.main]
            source = "old"
            targets = ["new"]
            tables = ["public.*"]
            poll_interval = "20ms"
            max_round_pause = "5ms"
            saturated_round_pause = "300ms"
            split_rounds_above = 1000000
            "#,
            &env,
        )
        .unwrap();
        assert_eq!(c.syncs.len(), 1);
        let s = &c.syncs[0];
        assert_eq!(s.name, "main");
        assert_eq!(s.poll_interval, Duration::from_millis(20));
        assert_eq!(s.options.split_rounds_above, Some(1_000_000));
        assert_eq!(s.options.max_round_pause, Duration::from_millis(5));
        assert_eq!(s.options.saturated_round_pause, Duration::from_millis(300));
        assert_eq!(c.nodes["old"].get("password"), Some("s3cret"));
        assert!(!format!("{:?}", c.nodes["old"]).contains("s3cret"));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = parse(
            r#"
            [nodes.old]
            dsn = "host=old dbname=app"
            password_env = "MISSING_PW"
            [nodes.bad]
            dsn = "host=x sslmode=bogus"
            [syncs.main]
            source = "old"
            targets = ["nowhere", "old"]
            tables = ["a.b.c"]
            poll_interval = "soon"
            max_round_pause = "2s"
            saturated_round_pause = "often"
            "#,
            &env,
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "MISSING_PW",
            "node bad: dsn",
            "\"nowhere\" is not a node",
            "both the source and a target",
            "tables:",
            "poll_interval",
            "max_round_pause",
            "saturated_round_pause",
        ] {
            assert!(all.contains(needle), "{needle:?} missing from:\n{all}");
        }
    }

    #[test]
    fn a_two_way_sync_becomes_one_sync_per_node() {
        let c = parse(
            r#"
            [nodes.a]
            dsn = "host=a dbname=app"
            [nodes.b]
            dsn = "host=b dbname=app"
            [nodes.c]
            dsn = "host=c dbname=app"
            [syncs.mesh]
            nodes = ["a", "b", "c"]
            conflict = "latest"
            conflict_tables = { "public.accounts" = "abort" }
            "#,
            &env,
        )
        .unwrap_or_else(|p| panic!("{p:?}"));
        let names: Vec<&str> = c.syncs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["mesh:a", "mesh:b", "mesh:c"]);
        assert!(c.syncs.iter().all(|s| s.targets.len() == 2));
        let tw = c.syncs[1].two_way.as_ref().unwrap();
        assert_eq!(tw.source, "b");
        assert_eq!(tw.mesh.rules.tables.len(), 1);
        let problems = parse(
            r#"
            [nodes.a]
            dsn = "host=a dbname=app"
            [syncs.mesh]
            nodes = ["a", "z"]
            source = "a"
            [syncs.one]
            source = "a"
            targets = ["a"]
            conflict = "latest"
            "#,
            &env,
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "sync mesh: give nodes (two-way) or source",
            "sync mesh: node \"z\" is not a node",
            "sync mesh: conflict: a two-way sync needs a rule",
            "sync one: conflict rules are for two-way syncs",
        ] {
            assert!(all.contains(needle), "{needle:?} not in {all}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let problems =
            parse("[nodes.a]\ndsn = \"host=a\"\npasword_env = \"X\"\n", &env).unwrap_err();
        assert!(problems[0].contains("pasword_env"), "{problems:?}");
    }

    #[test]
    fn the_documented_example_loads() {
        let example = include_str!("../../../docs/pgferry.example.toml");
        let env = |var: &str| (var == "PGFERRY_OLD_PASSWORD").then(|| "pw".to_owned());
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "new-password\n").unwrap();
        let example = example.replace(
            "/etc/pgferry/new.password",
            &file.path().display().to_string(),
        );
        let c = parse(&example, &env).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(c.syncs[0].targets.len(), 2);
        assert_eq!(c.nodes["new"].get("password"), Some("new-password"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("0ms").is_err());
    }
}
