//! `pgferry copy`: the initial copy, with a progress display (a redrawn line on a terminal,
//! a plain line every 10 s otherwise, both on stderr).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgferry_sync::initial::{CopyOptions, CopyProgress, CopyReport, ProgressView};
use pgferry_sync::SyncError;

use crate::capture::parse_dsn;
use crate::exit::{Code, Failure};
use crate::output;

#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The captured source database (libpq URL or key=value string).
    #[arg(long, value_name = "DSN")]
    pub source: String,
    /// The target database. Its schema (the captured tables, with every source column) must
    /// exist; it is registered with the source.
    #[arg(long, value_name = "DSN")]
    pub target: String,
    /// Jobs copying at once, each with one session on each side, all reading one exported
    /// source snapshot. Large tables are cut into block ranges that the jobs share.
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub jobs: u64,
    /// Copy only the captured tables matching PATTERN (`schema.table`, `*` and `?` allowed,
    /// quoted parts literal). Repeatable; default every captured table.
    #[arg(long = "table", value_name = "PATTERN")]
    pub tables: Vec<String>,
    /// Empty target tables that already hold rows before copying them (otherwise the copy is
    /// refused, naming them).
    #[arg(long)]
    pub truncate: bool,
    /// Check everything and print the plan (tables, sizes, pieces, what would be emptied);
    /// change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print a JSON report on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Cut tables (or partitions) larger than SIZE into block ranges that jobs copy in
    /// parallel, on sources running PostgreSQL 14 or later (e.g. 512kB, 64MB, 1GB; 0: never).
    #[arg(long, value_name = "SIZE", default_value = "128MB", value_parser = parse_size)]
    pub split_tables_larger_than: u64,
}

/// `64MB`, `1GB`, `512kB`, `4096` (bytes): PostgreSQL's units, powers of 1024.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 64MB)"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" | "k" => 1 << 10,
        "MB" | "M" => 1 << 20,
        "GB" | "G" => 1 << 30,
        "TB" | "T" => 1 << 40,
        u => return Err(format!("unknown unit {u:?} (use B, kB, MB, GB or TB)")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

pub async fn copy(a: CopyArgs) -> Result<Code, Failure> {
    let source = parse_dsn(&a.source)?;
    let target = parse_dsn(&a.target)?;
    let tables = crate::capture::table_patterns(&a.tables)?;
    let opts = CopyOptions {
        tables,
        jobs: a.jobs as usize,
        truncate: a.truncate,
        dry_run: a.dry_run,
        split_above: a.split_tables_larger_than,
    };
    let progress = Arc::new(CopyProgress::default());
    let display = (!a.dry_run).then(|| tokio::spawn(show_progress(progress.clone())));
    let result = pgferry_sync::initial::copy(&source, &target, &opts, &progress).await;
    if let Some(d) = display {
        d.abort();
        let _ = d.await;
        if std::io::stderr().is_terminal() {
            eprint!("\r\x1b[2K");
        }
    }
    let report = result.map_err(|e: SyncError| {
        let class = e.class();
        let interrupted = matches!(e, SyncError::CopyInterrupted { .. });
        let mut f = Failure::new(e, class);
        // Rows were written: not "refused, nothing changed".
        if interrupted {
            f.refused = false;
        }
        f
    })?;
    if a.json {
        output::json(&report);
    } else {
        print(&report);
    }
    Ok(Code::Ok)
}

fn print(r: &CopyReport) {
    if r.dry_run {
        println!(
            "plan: copy {} table(s) from {} into {} with {} job(s){}",
            r.tables.len(),
            r.source,
            r.target,
            r.jobs,
            if r.replica_role {
                ""
            } else {
                " (without the replica role: the target's tables have no foreign keys or triggers)"
            }
        );
        for t in &r.tables {
            let what = match t.action {
                "resumed" => format!(
                    "keep: copied completely at snapshot {} by an interrupted copy",
                    t.snapshot.as_deref().unwrap_or("?")
                ),
                a => format!(
                    "{a}: ~{} rows, {}, {} relation(s), {} piece(s)",
                    t.estimated_rows,
                    size(t.size_bytes),
                    t.relations,
                    t.pieces
                ),
            };
            println!("  {}  {what}", t.table);
        }
        println!(
            "{}",
            match (&r.name, r.already_replicating) {
                (None, _) => "the target would be registered with the source",
                (Some(_), true) =>
                    "the target replicates from this source: its progress would stay, the copied tables would be listed as received",
                (Some(_), false) => "the target is registered and has applied nothing yet",
            }
        );
        println!("dry run: nothing was changed");
        return;
    }
    println!(
        "copied {} table(s), {} rows ({}) from {} into {} in {:.2} s ({:.0} rows/s, {}/s, {} job(s)){}",
        r.tables.len(),
        r.rows,
        size(r.bytes),
        r.source,
        r.target,
        r.seconds,
        r.rows_per_second,
        size(r.bytes_per_second as u64),
        r.jobs,
        r.snapshot
            .as_deref()
            .map(|s| format!(" at source snapshot {s}"))
            .unwrap_or_default()
    );
    for t in &r.tables {
        if t.action == "resumed" {
            println!(
                "  {}  kept: copied completely at snapshot {} by an earlier, interrupted copy",
                t.table,
                t.snapshot.as_deref().unwrap_or("?")
            );
        } else {
            println!(
                "  {}  {} rows, {}, {} piece(s), {:.2} s{}",
                t.table,
                t.rows,
                size(t.bytes),
                t.pieces,
                t.seconds,
                if t.action == "truncate and copy" {
                    " (emptied first)"
                } else {
                    ""
                }
            );
        }
    }
    match (&r.applied_snapshot, r.already_replicating) {
        (Some(p), true) => println!(
            "the target keeps its progress (snapshot {p}); the copied tables are listed as received and the next round brings them forward"
        ),
        (Some(p), false) => println!(
            "the target's progress is now snapshot {p} (acknowledged to the source): the next round applies only what the copy does not hold"
        ),
        (None, _) => println!(
            "the target has applied nothing yet: the copied tables are recorded at their copy snapshot until its first round (captured tables not copied here must be copied, or loaded and accepted, first)"
        ),
    }
    if r.sequences_advanced > 0 {
        println!("{} sequence(s) moved forward", r.sequences_advanced);
    }
    println!("next: `pgferry sync --once` or `pgferry run` catches the target up");
}

/// `12.3 MiB`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `1:02:03` or `2:03`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// One progress line: bar (on a terminal), percent, rows, bytes, rate, ETA, tables.
fn line(v: &ProgressView, elapsed: Duration, bar: bool) -> String {
    let fraction = if v.tables_done == v.tables {
        1.0
    } else if v.estimated_rows > 0 {
        (v.rows as f64 / v.estimated_rows as f64).min(0.99)
    } else {
        0.0
    };
    let secs = elapsed.as_secs_f64().max(0.001);
    let eta = if (0.01..1.0).contains(&fraction) {
        clock(Duration::from_secs_f64(secs * (1.0 - fraction) / fraction))
    } else {
        "?".to_owned()
    };
    let mut out = String::from("copy ");
    if bar {
        let width = 24;
        let full = (fraction * width as f64).round() as usize;
        out.push('[');
        out.push_str(&"#".repeat(full));
        out.push_str(&".".repeat(width - full.min(width)));
        out.push_str("] ");
    }
    out.push_str(&format!(
        "{:3.0}%  {} of ~{} rows  {}  {}/s  ETA {eta}  tables {}/{}",
        fraction * 100.0,
        v.rows,
        v.estimated_rows,
        size(v.bytes),
        size((v.bytes as f64 / secs) as u64),
        v.tables_done,
        v.tables
    ));
    if !bar && !v.copying.is_empty() {
        out.push_str(&format!("  (copying {})", v.copying.join(", ")));
    }
    out
}

/// Draws progress until aborted: a redrawn line every 200 ms on a terminal, a plain line every
/// 10 s otherwise.
async fn show_progress(progress: Arc<CopyProgress>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(10)
    };
    let mut started: Option<Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(v) = progress.view() else { continue };
        let since = *started.get_or_insert_with(Instant::now);
        let text = line(&v, since.elapsed().max(every), tty);
        let mut err = std::io::stderr().lock();
        let _ = if tty {
            write!(err, "\r\x1b[2K{text}")
        } else {
            writeln!(err, "{text}")
        };
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_postgres() {
        assert_eq!(parse_size("512kB"), Ok(512 << 10));
        assert_eq!(parse_size("64MB"), Ok(64 << 20));
        assert_eq!(parse_size("1GB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("MB").is_err());
    }

    #[test]
    fn a_progress_line_has_rows_bytes_rate_and_eta() {
        let v = ProgressView {
            rows: 500,
            bytes: 2 << 20,
            estimated_rows: 1000,
            tables: 4,
            tables_done: 1,
            copying: vec!["public.t".into()],
        };
        let plain = line(&v, Duration::from_secs(10), false);
        assert_eq!(
            plain,
            "copy  50%  500 of ~1000 rows  2.0 MiB  204.8 KiB/s  ETA 0:10  tables 1/4  (copying public.t)"
        );
        let bar = line(&v, Duration::from_secs(10), true);
        assert!(
            bar.starts_with("copy [############............]  50%"),
            "{bar}"
        );
    }
}
