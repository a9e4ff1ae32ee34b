//! `pgferry run` (the daemon) and `pgferry check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pgferry_core::ErrorClass;
use pgferry_sync::daemon::{self, Role, StateReceiver, SyncSpec};
use pgferry_sync::SyncOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::capture::parse_dsn;
use crate::config;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The configuration file (TOML: nodes and syncs; see docs/daemon.md).
    #[arg(long, value_name = "FILE", required_unless_present_any = ["source", "nodes"], conflicts_with_all = ["source", "targets", "nodes"])]
    pub config: Option<PathBuf>,
    /// Without --config: the captured source.
    #[arg(long, value_name = "DSN", requires = "targets")]
    pub source: Option<String>,
    /// Without --config: a target. Repeatable.
    #[arg(long = "target", value_name = "DSN")]
    pub targets: Vec<String>,
    #[command(flatten)]
    pub two_way: crate::two_way::TwoWayArgs,
    /// Without --config: the sync's identity (default: its targets' names, sorted), which
    /// keys the lock that keeps a second daemon for the same sync on standby.
    #[arg(long, value_name = "NAME", conflicts_with = "config")]
    pub name: Option<String>,
    /// Without --config: replicate only the captured tables matching PATTERN (`schema.table`,
    /// `*` and `?` allowed). Repeatable; default all.
    #[arg(long = "table", value_name = "PATTERN", conflicts_with = "config")]
    pub tables: Vec<String>,
    /// Without --config: the longest wait between two polls of an idle source.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = config::parse_duration, conflicts_with = "config")]
    pub poll_interval: Duration,
    /// Without --config: the longest pause before a round, after a round that applied many
    /// changes (under load, so that rounds carry more changes and cost the source less; a round
    /// of 50 changes or fewer is followed at once). 0 starts every round at once.
    #[arg(long, value_name = "DURATION", default_value = "50ms", value_parser = config::parse_round_pause, conflicts_with = "config")]
    pub max_round_pause: Duration,
    /// Without --config: when nearly every round is paced (the source writes without let-up), try
    /// this longer pause between rounds for a few seconds, and keep it while the source commits
    /// more changes per second under it than with --max-round-pause (a saturated source whose
    /// CPU or disk the rounds share); checked again every 30 s, dropped when the load falls. 0
    /// never tries it.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = config::parse_round_pause, conflicts_with = "config")]
    pub saturated_round_pause: Duration,
    /// Without --config: commit rounds holding more than ROWS changes table by table (see
    /// `pgferry sync --help`).
    #[arg(long, value_name = "ROWS", conflicts_with = "config")]
    pub split_rounds_above: Option<u64>,
    /// Serve Prometheus metrics on ADDR (`/metrics`) and a health check (`/healthz`), e.g.
    /// 127.0.0.1:9187.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The configuration file to check.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Time allowed for a clean stop after SIGTERM/SIGINT, beyond which the daemon exits anyway.
const STOP_DEADLINE: Duration = Duration::from_secs(9);

fn specs(args: &RunArgs) -> Result<Vec<SyncSpec>, Failure> {
    if let Some(path) = &args.config {
        return config::load(path)
            .map(|c| c.syncs)
            .map_err(|problems| Failure::usage(problems.join("\n")));
    }
    if !args.two_way.nodes.is_empty() {
        return args
            .two_way
            .mesh()?
            .specs(
                args.name.as_deref().unwrap_or("two-way"),
                args.poll_interval,
                &SyncOptions {
                    max_round_pause: args.max_round_pause,
                    saturated_round_pause: args.saturated_round_pause,
                    ..SyncOptions::default()
                },
            )
            .map_err(|e| {
                let class = e.class();
                Failure::new(e, class)
            });
    }
    let source = parse_dsn(args.source.as_deref().unwrap_or_default())?;
    let targets = args
        .targets
        .iter()
        .map(|t| parse_dsn(t))
        .collect::<Result<Vec<_>, _>>()?;
    let tables = crate::capture::table_patterns(&args.tables)?;
    Ok(vec![SyncSpec {
        name: args
            .name
            .clone()
            .unwrap_or_else(|| SyncSpec::default_name(&targets)),
        source,
        targets,
        tables,
        options: SyncOptions {
            accept_new_tables: false,
            split_rounds_above: args.split_rounds_above,
            max_round_pause: args.max_round_pause,
            saturated_round_pause: args.saturated_round_pause,
        },
        poll_interval: args.poll_interval,
        two_way: None,
    }])
}

pub async fn run(args: RunArgs) -> Result<Code, Failure> {
    let specs = specs(&args)?;
    if !args.two_way.nodes.is_empty() {
        let mesh = args.two_way.mesh()?;
        crate::two_way::sequences(&mesh.nodes, args.two_way.sequence_partition, false).await?;
    }
    let root = CancellationToken::new();
    let mut states: Vec<StateReceiver> = Vec::new();
    let tracker = tokio_util::task::TaskTracker::new();
    let metrics = match args.metrics {
        Some(addr) => {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0,
                ])
                .map_err(|e| Failure::new(anyhow::anyhow!("metrics: {e}"), ErrorClass::Definite))?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| Failure::new(anyhow::anyhow!("metrics: {e}"), ErrorClass::Definite))?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                Failure::usage(format!("--metrics {addr}: cannot listen there: {e}"))
            })?;
            tracing::info!(%addr, "serving /metrics and /healthz");
            Some((listener, handle))
        }
        None => None,
    };
    for spec in specs {
        let (tx, rx) = tokio::sync::watch::channel(daemon::SyncState::default());
        states.push(rx);
        tracing::info!(sync = %spec.name, source = %spec.source.redacted(), targets = spec.targets.len(), "starting sync");
        tracker.spawn(daemon::run(spec, root.child_token(), tx));
    }
    tracker.close();
    if let Some((listener, handle)) = metrics {
        let (states, stop) = (states.clone(), root.clone());
        tokio::spawn(serve(listener, handle, states, stop));
    }
    tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping: finishing or rolling back the rounds in flight");
            root.cancel();
        }
        _ = tracker.wait() => {}
    }
    if tokio::time::timeout(STOP_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("stopped before every task finished (their transactions roll back)");
    } else {
        tracing::info!("stopped");
    }
    Ok(Code::Ok)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A minimal HTTP/1.1 server: `GET /metrics` (Prometheus text) and `GET /healthz`.
async fn serve(
    listener: tokio::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
    states: Vec<StateReceiver>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let (handle, states) = (handle.clone(), states.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            let read = async {
                while len < buf.len() {
                    let n = stream.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<(), std::io::Error>(())
            };
            if !matches!(
                tokio::time::timeout(Duration::from_secs(5), read).await,
                Ok(Ok(()))
            ) {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, kind, body) = match path {
                "/metrics" => {
                    refresh_gauges(&states);
                    ("200 OK", "text/plain; version=0.0.4", handle.render())
                }
                "/healthz" => {
                    let (healthy, body) = health(&states);
                    (
                        if healthy {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        },
                        "application/json",
                        body,
                    )
                }
                _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Gauges that depend on the time of the scrape.
fn refresh_gauges(states: &[StateReceiver]) {
    for s in daemon::summary(states).values() {
        for t in &s.targets {
            if let Some(lag) = t.lag_seconds() {
                metrics::gauge!("pgferry_lag_seconds", "sync" => s.name.clone(), "target" => t.target.clone())
                    .set(lag);
            }
        }
    }
}

/// Healthy: every sync is active with every target connected, or on standby.
fn health(states: &[StateReceiver]) -> (bool, String) {
    let summary = daemon::summary(states);
    let healthy = summary.values().all(|s| match s.role {
        Role::Standby => true,
        Role::Active => s.targets.iter().all(|t| t.up),
        Role::Starting | Role::Stopped => false,
    });
    let body = serde_json::json!({
        "healthy": healthy,
        "syncs": summary.values().map(|s| serde_json::json!({
            "name": s.name,
            "source": s.source,
            "role": s.role,
            "capture_rows": s.capture_rows,
            "targets": s.targets.iter().map(|t| serde_json::json!({
                "target": t.target,
                "up": t.up,
                "error": t.error,
                "snapshot": t.snapshot,
                "lag_seconds": t.lag_seconds(),
                "pending": t.pending,
                "rounds": t.rounds,
                "rows": t.rows,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    (healthy, format!("{body}\n"))
}

/// `pgferry check --config FILE`: the file, every node, every sync's capture and targets;
/// every problem at once.
pub async fn check(args: CheckArgs) -> Result<Code, Failure> {
    let config = match config::load(&args.config) {
        Ok(c) => c,
        Err(problems) => {
            if args.json {
                output::json(&serde_json::json!({"ok": false, "problems": problems}));
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
            }
            return Ok(Code::Usage);
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let mut checked = Vec::new();
    for (name, dsn) in &config.nodes {
        match pgferry_core::Session::connect(dsn, "check").await {
            Ok(_) => checked.push(format!("node {name}: connected ({})", dsn.redacted())),
            Err(e) => problems.push(format!("node {name}: {}", pgferry_core::error::chain(&e))),
        }
    }
    for sync in &config.syncs {
        for t in &sync.targets {
            let found = pgferry_sync::check_target(&sync.source, t, &sync.tables).await;
            if found.is_empty() {
                checked.push(format!("sync {}: target {} ready", sync.name, t.redacted()));
            }
            for e in found {
                problems.push(format!(
                    "sync {} → {}: {}",
                    sync.name,
                    t.redacted(),
                    pgferry_core::error::chain(&e)
                ));
            }
        }
    }
    let mut meshes: Vec<&std::sync::Arc<pgferry_sync::two_way::Mesh>> = Vec::new();
    for sync in &config.syncs {
        if let Some(tw) = &sync.two_way {
            if !meshes.iter().any(|m| std::sync::Arc::ptr_eq(m, &tw.mesh)) {
                meshes.push(&tw.mesh);
            }
        }
    }
    for mesh in meshes {
        let names: Vec<&str> = mesh.nodes.iter().map(|n| n.name.as_str()).collect();
        let mut found: Vec<String> = pgferry_sync::two_way::check(mesh)
            .await
            .iter()
            .map(|e| pgferry_core::error::chain(e))
            .collect();
        let pairs: Vec<(String, pgferry_core::Dsn)> = mesh
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.dsn.clone()))
            .collect();
        match pgferry_sync::sequence_partition::collisions(&pairs).await {
            Ok(list) => found.extend(list.iter().map(|c| c.to_string().replace('\n', " "))),
            Err(e) => found.push(pgferry_core::error::chain(&e)),
        }
        if found.is_empty() {
            checked.push(format!(
                "two-way nodes {}: same tables captured, replica role allowed",
                names.join(", ")
            ));
        }
        for e in found {
            problems.push(format!("two-way nodes {}: {e}", names.join(", ")));
        }
    }
    problems.dedup();
    if args.json {
        output::json(&serde_json::json!({
            "ok": problems.is_empty(),
            "checked": checked,
            "problems": problems,
        }));
    } else {
        for c in &checked {
            println!("ok: {c}");
        }
        for p in &problems {
            println!("problem: {p}");
        }
    }
    Ok(if problems.is_empty() {
        Code::Ok
    } else {
        Code::Refused
    })
}
