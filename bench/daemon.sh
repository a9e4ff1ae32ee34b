#!/usr/bin/env bash
# Daemon benchmark: `pgferry run` under a fixed write rate and at full speed, in one run.
#
# Clusters (throwaway PostgreSQL 15, default durability, on this machine): a source and a
# target, both loaded with `pgbench -i -s SCALE` (pgbench_history given a key, hid bigserial)
# plus a latency table, checked equal, the whole source captured (`pgferry install`), and a
# third "twin" cluster loaded the same way, never captured: the no-capture baseline. With
# LOGICAL=1 (default), a fourth, "pub" (wal_level=logical), loaded the same way, publishes the
# same tables to a database "logical" on the target cluster (native logical replication, the
# tracker's reference: it "costs 19% of pgbench TPS with its subscriber running"), so that the
# run measures it beside pgferry on the same machine, in the same conditions.
# Latency table: source lat(id bigserial primary key, t0 timestamptz), target the same plus
# `arrived timestamptz default clock_timestamp()` (pgferry copies only the source's columns);
# the target has track_commit_timestamp = on.
#
# 0. Single-row commits on an idle source (the tracker's reference: Bucardo 0.5-0.7 s, native
#    logical replication 1-2 ms): IDLE_COMMITS autocommit inserts into lat, IDLE_GAP s apart.
# 1. Latency, for each rate in RATES (transactions/s, default 200 and 1000): with the daemon
#    running, `pgbench -R RATE -T DURATION` of a tpcb-like transaction that also inserts one lat
#    row with t0 = clock_timestamp() as its last statement. Reports commit-to-target latency
#    p50/p95/p99/max over that run's rows: target commit time of the row
#    (pg_xact_commit_timestamp, when a reader can see it) minus t0, and also `arrived` - t0;
#    the TPS pgbench achieved; the daemon's RSS (VmRSS, sampled every second) and replication
#    lag (/metrics); rounds and their mean duration; the time to drain after pgbench ends;
#    pgferry.delta at the end (rows, bytes) and its most rows during the run.
# 2. Full speed (pgbench -b tpcb-like, no -R, TPS_DURATION s per phase), ROUNDS rounds in
#    ABCD/DCBA order: "no capture" (the twin cluster), "capture" (source, daemon stopped: its
#    backlog is caught up, and timed, before the next daemon phase), "capture + daemon" and
#    "native logical replication" (pgbench on pub, its subscription applying on the target
#    cluster; its drain time is measured with a marker row too).
#    Reports TPS and ratios to no capture; for the daemon phase, lag (max; at 25/50/75/100%
#    of the run; 5 s after), pending changes, rounds and their mean duration, RSS, and the
#    drain time: from the end of pgbench until a marker row committed then is on the target.
#    "Keeps up" = drained within KEEPUP_DRAIN seconds. If a daemon phase does not keep up,
#    lower rates (-R at 80/60/40/20% of its TPS) are tried to find the highest one it does.
# 3. Correctness: at the end, with the target drained, ordered checksums of every table on
#    both sides (lat without `arrived`); any difference fails the run (exit 1). The logical
#    replication pair is compared the same way and reported (its difference does not fail the run).
# For every measured run, CPU busy in cores (from /proc): the machine, the loaded server, the
# target server, the daemon process, the daemon's sessions on the source, pgbench, and "other"
# (everything else on the machine: a run with other above ~0.1 core measured the machine).
#
# Usage: bench/daemon.sh [--json]
# Environment:
#   RATES="200 1000"   fixed rates of the latency runs (transactions/s)
#   DURATION=60        seconds of each latency run
#   TPS_DURATION=30    seconds of each full-speed phase
#   ROUNDS=2           full-speed rounds (odd: ABC, even: CBA)
#   CLIENTS=4 JOBS=2   pgbench -c / -j for every run
#   SCALE=10           pgbench scale
#   POLL_INTERVAL=50ms pgferry run --poll-interval
#   DAEMON_ARGS=       more `pgferry run` options, e.g. "--max-round-pause 50ms" (word-split)
#   KEEPUP_DRAIN=5     a daemon phase keeps up if it drains within this many seconds
#   LOGICAL=1          0 leaves out the native logical replication phase (and its cluster)
#   WARMUP=10          seconds of unmeasured full-speed pgbench on source and twin first
#   IDLE_COMMITS=20 IDLE_GAP=0.3   single-row commits on the idle source, and the gap (s)
#   KEEP=DIR           copy the per-second samples, pgbench logs and the daemon's log there
#   JSON=1             same as --json: one JSON object on stdout instead of the tables
#   PGFERRY_BIN=       use this pgferry binary instead of `cargo build --release -p pgferry`
#   PG_BIN=/usr/lib/postgresql/15/bin   server and client binaries
# Progress goes to stderr, the result to stdout. Everything shares this machine's CPUs:
# pgbench, the servers and the daemon. Needs bash, awk, curl, python3, /usr/bin/time and
# runuser (as root).
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options daemon "$@"
[[ $JSON == 1 ]] || JSON=0
RATES=${RATES:-200 1000}
DURATION=${DURATION:-60}
TPS_DURATION=${TPS_DURATION:-30}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
POLL_INTERVAL=${POLL_INTERVAL:-50ms}
DAEMON_ARGS=${DAEMON_ARGS:-}
KEEPUP_DRAIN=${KEEPUP_DRAIN:-5}
WARMUP=${WARMUP:-10}
IDLE_COMMITS=${IDLE_COMMITS:-20}
IDLE_GAP=${IDLE_GAP:-0.3}
KEEP=${KEEP:-}
LOGICAL=${LOGICAL:-1}
[[ $LOGICAL == 0 || $LOGICAL == 1 ]] || { echo "daemon: LOGICAL must be 0 or 1" >&2; exit 2; }
DRAIN_TIMEOUT=600
[[ $KEEPUP_DRAIN =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "daemon: KEEPUP_DRAIN must be a number (seconds)" >&2; exit 2; }
[[ $IDLE_GAP =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "daemon: IDLE_GAP must be a number (seconds)" >&2; exit 2; }
for v in DURATION TPS_DURATION ROUNDS CLIENTS JOBS SCALE IDLE_COMMITS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "daemon: $v must be a positive integer" >&2; exit 2; }
done
[[ $WARMUP =~ ^[0-9]+$ ]] || { echo "daemon: WARMUP must be an integer" >&2; exit 2; }
for r in $RATES; do [[ $r =~ ^[1-9][0-9]*$ ]] || { echo "daemon: RATES must be positive integers" >&2; exit 2; }; done

log() { printf '%s\n' "$*" >&2; }
die() { log "daemon: $*"; exit 1; }
. "$root/scripts/lib/throwaway-pg.sh"
W=$_PG_BASE
client() { if [[ -x $PG_BIN/$1 ]]; then echo "$PG_BIN/$1"; else command -v "$1" || die "$1 not found"; fi; }
PSQL=$(client psql)
PGBENCH=$(client pgbench)
command -v curl >/dev/null || die "curl not found"
bench_pgferry
[[ -x $PGFERRY_BIN ]] || die "pgferry binary not found: $PGFERRY_BIN"

# --- processes this script starts: the daemon and the sampler (stop_daemon, stop_sampler:
# scripts/lib/bench.sh) -----------------------------------------------------------------
DAEMON_PID="" SAMPLER_PID=""
on_exit() {
    local rc=$?
    trap - EXIT
    stop_sampler
    stop_daemon
    if [[ $rc != 0 && -s $W/daemon.log ]]; then
        log "--- last lines of the daemon's log ---"
        tail -n 15 "$W/daemon.log" >&2 || true
    fi
    _pg_cleanup
    exit "$rc"
}
trap on_exit EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
q() { "$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$1" -c "$2"; }

# --- clusters and data -------------------------------------------------------------------
conf=("shared_buffers=256MB" "max_wal_size=4GB" "checkpoint_timeout=30min")
if ((LOGICAL)); then
    log "starting four clusters (source, target, no-capture twin, logical replication publisher)"
else
    log "starting three clusters (source, target, no-capture twin)"
fi
pg_throwaway src "${conf[@]}"
pg_throwaway dst "${conf[@]}" "track_commit_timestamp=on"
pg_throwaway twin "${conf[@]}"
S="$DSN_src dbname=bench"; T="$DSN_dst dbname=bench"; B="$DSN_twin dbname=bench"
# P: the logical replication publisher; L: its subscriber, a second database of the target cluster.
P="" L=""
DBS=("$S" "$T" "$B")
if ((LOGICAL)); then
    pg_throwaway pub "${conf[@]}" "wal_level=logical"
    P="$DSN_pub dbname=bench"; L="$DSN_dst dbname=logical"
    DBS+=("$P" "$L")
    q "$DSN_pub dbname=postgres" "CREATE DATABASE bench"
    q "$DSN_dst dbname=postgres" "CREATE DATABASE logical"
fi
for d in "$DSN_src" "$DSN_dst" "$DSN_twin"; do q "$d dbname=postgres" "CREATE DATABASE bench"; done
PG_VERSION=$(q "$S" "SHOW server_version"); PG_VERSION=${PG_VERSION%% *}
log "loading pgbench -i -s $SCALE on each"
for d in "${DBS[@]}"; do
    "$PGBENCH" -i -s "$SCALE" -q "$d" >"$W/init.log" 2>&1 || { cat "$W/init.log" >&2; die "pgbench -i failed"; }
    q "$d" "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"
done
q "$S" "CREATE TABLE lat (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL)"
q "$T" "CREATE TABLE lat (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL, arrived timestamptz DEFAULT clock_timestamp())"
if ((LOGICAL)); then
    for d in "$P" "$L"; do q "$d" "CREATE TABLE lat (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL)"; done
fi
for d in "${DBS[@]}"; do q "$d" "VACUUM ANALYZE"; done

# Ordered checksum of every table; lat without the target's arrival column.
TABLES=("pgbench_accounts aid t" "pgbench_branches bid t" "pgbench_tellers tid t" "pgbench_history hid t" "lat id ROW(t.id,t.t0)")
checksums() { # DSN -> one line per table
    local spec name key expr
    for spec in "${TABLES[@]}"; do
        read -r name key expr <<<"$spec"
        printf '%s %s\n' "$name" "$(q "$1" "SELECT count(*) || ' ' || coalesce(md5(string_agg(md5(($expr)::text), '' ORDER BY $key)), '-') FROM $name t")"
    done
}
log "checking that source and target start equal"
[[ "$(checksums "$S")" == "$(checksums "$T")" ]] || die "source and target differ after loading"
if ((LOGICAL)); then
    [[ "$(checksums "$P")" == "$(checksums "$L")" ]] || die "publisher and subscriber differ after loading"
    # Both were loaded alike, so the subscription starts without a copy, as pgferry's target does.
    q "$P" "CREATE PUBLICATION bench FOR TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history, lat"
    q "$L" "CREATE SUBSCRIPTION bench CONNECTION '$DSN_pub dbname=bench' PUBLICATION bench WITH (copy_data = false)"
fi

out=$("$PGFERRY_BIN" install --source "$S" 2>&1) || { log "$out"; die "pgferry install failed"; }

# --- the daemon ----------------------------------------------------------------------------
MPORT=$(_pg_free_port)
METRICS="http://127.0.0.1:$MPORT"
STOP_RCS=()
start_daemon() {
    # shellcheck disable=SC2086 # DAEMON_ARGS is a list of options
    "$PGFERRY_BIN" run --source "$S" --target "$T" --poll-interval "$POLL_INTERVAL" \
        --metrics "127.0.0.1:$MPORT" $DAEMON_ARGS >>"$W/daemon.log" 2>&1 &
    DAEMON_PID=$!
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$DAEMON_PID" 2>/dev/null || { DAEMON_PID=""; die "pgferry run exited at start"; }
        curl -sf --max-time 1 "$METRICS/healthz" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "pgferry run not healthy after 30 s"
}
halt_daemon() { # stop it and require a clean exit
    stop_daemon
    STOP_RCS+=("$DAEMON_RC")
    [[ $DAEMON_RC == 0 ]] || die "pgferry run exited $DAEMON_RC after SIGTERM"
}
rss_kib() { awk '/^VmRSS/ { print $2 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo NA; }
hwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo NA; }
scrape() { # lag pending capture_rows rounds round_seconds_sum round_count
    curl -s --max-time 1 "$METRICS/metrics" 2>/dev/null | awk '
        /^pgferry_lag_seconds[{ ]/ { lag = $NF }
        /^pgferry_pending_changes[{ ]/ { p = $NF }
        /^pgferry_capture_rows[{ ]/ { c = $NF }
        /^pgferry_rounds_total[{ ]/ { r = $NF }
        /^pgferry_round_duration_seconds_sum[{ ]/ { s = $NF }
        /^pgferry_round_duration_seconds_count[{ ]/ { n = $NF }
        END { printf "%s %s %s %s %s %s\n", lag == "" ? "NA" : lag, p == "" ? "NA" : p, c == "" ? "NA" : c,
                     r == "" ? 0 : r, s == "" ? 0 : s, n == "" ? 0 : n }'
}
# The capture table's rows, bytes and dead rows, and what autovacuum is vacuuming on the source.
SAMPLE_SQL="SELECT (SELECT count(*) FROM pgferry.delta), pg_total_relation_size('pgferry.delta'),
                   (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'pgferry.delta'::regclass),
                   coalesce((SELECT string_agg(relid::regclass::text, ',') FROM pg_stat_progress_vacuum), '-')"
start_sampler() { # FILE T0: one line a second: seconds-since-T0 rss_kib lag pending capture_gauge rounds round_sum round_count
    #                delta_rows delta_bytes delta_dead_rows vacuuming
    local file=$1 t0=$2
    : >"$file"
    (
        trap 'exit 0' TERM
        while :; do
            echo "$(elapsed "$t0" "$(now)") $(rss_kib) $(scrape) $(q "$S" "$SAMPLE_SQL" 2>/dev/null | tr '|' ' ' || echo NA NA NA -)" >>"$file"
            sleep 1
        done
    ) &
    SAMPLER_PID=$!
}
drain() { drain_to "$S" "$T"; }
drain_to() { # SOURCE TARGET: seconds from now until a marker committed now on SOURCE is on TARGET
    local t0 id deadline
    t0=$(now)
    id=$(q "$1" "INSERT INTO lat (t0) VALUES (clock_timestamp()) RETURNING id")
    deadline=$(($(date +%s) + DRAIN_TIMEOUT))
    until [[ $(q "$2" "SELECT count(*) FROM lat WHERE id = $id") == 1 ]]; do
        [[ $(date +%s) -lt $deadline ]] || die "the target did not catch up within $DRAIN_TIMEOUT s"
        [[ -n $DAEMON_PID ]] && ! kill -0 "$DAEMON_PID" 2>/dev/null && die "pgferry run died"
        sleep 0.05
    done
    elapsed "$t0" "$(now)"
}
delta_size() { q "$S" "SELECT count(*) || ' ' || pg_total_relation_size('pgferry.delta') FROM pgferry.delta"; }
settle() { for d in "${DBS[@]}"; do q "$d" "VACUUM"; q "$d" "CHECKPOINT"; done; }
pgbench_run() { # DSN LOGFILE ARGS... -> prints tps
    local dsn=$1 logf=$2; shift 2
    /usr/bin/time -f '%U %S' -o "$logf.cpu" "$PGBENCH" -n -P 5 -c "$CLIENTS" -j "$JOBS" "$@" "$dsn" >"$logf" 2>&1 ||
        { cat "$logf" >&2; die "pgbench failed"; }
    local tps
    tps=$(awk '/^tps = / { print $3; exit }' "$logf")
    [[ -n $tps ]] || { cat "$logf" >&2; die "no tps line in pgbench's output"; }
    echo "$tps"
}
# Sample statistics over a sampler file: max of column C (numeric values only)
col_max() { awk -v c="$2" '$c != "NA" && ($c + 0 > m || m == "") { m = $c + 0 } END { print (m == "" ? "null" : m) }' "$1"; }
col_at() { # FILE COL SECONDS: value of the sample nearest that time
    awk -v c="$2" -v t="$3" '$c != "NA" { d = $1 - t; if (d < 0) d = -d; if (best == "" || d < best) { best = d; v = $c } } END { print (v == "" ? "null" : v) }' "$1"
}
col_delta() { # FILE COL T_FROM T_TO: value at T_TO minus value at T_FROM
    awk -v a="$(col_at "$1" "$2" "$3")" -v b="$(col_at "$1" "$2" "$4")" 'BEGIN { if (a == "null" || b == "null") print "null"; else print b - a }'
}
r3() { awk -v x="$1" 'BEGIN { if (x == "null" || x == "") print "null"; else printf "%.3f", x }'; }

# CPU accounting, in clock ticks: the machine (busy time from /proc/stat), each cluster (its
# postmaster, its live children, and the children it has reaped), the daemon process, and the
# daemon's own sessions on the source (application_name pgferry ...).
HZ=$(getconf CLK_TCK)
cluster_ticks() { # NAME
    local pm
    pm=$(head -n 1 "$_PG_BASE/$1/data/postmaster.pid")
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v pm="$pm" '$1 == pm { s += $14 + $15 + $16 + $17 } $4 == pm { s += $14 + $15 } END { print s + 0 }'
}
pid_ticks() { # PID...
    local p s=0
    for p in "$@"; do s=$((s + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    echo "$s"
}
cpu_snapshot() { # machine source_cluster target_cluster twin_cluster daemon daemon_source_sessions pub_cluster
    local pids
    pids=$(q "$S" "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgferry%'" | tr '\n' ' ')
    # shellcheck disable=SC2086
    echo "$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat) $(cluster_ticks src) $(cluster_ticks dst) $(cluster_ticks twin) $(if [[ -n $DAEMON_PID ]]; then pid_ticks "$DAEMON_PID"; else echo 0; fi) $(pid_ticks $pids) $(if ((LOGICAL)); then cluster_ticks pub; else echo 0; fi)"
}
cpu_cores() { # SNAP0 SNAP1 SECONDS PGBENCH_LOG -> cores busy: machine src dst twin daemon daemon_src pgbench other pub
    # other = machine - the servers - the daemon - pgbench: this script's samplers and
    # anything else running on the machine (a busy machine shows here).
    awk -v a="$1" -v b="$2" -v s="$3" -v hz="$HZ" -v pg="$(awk '{ print $1 + $2 }' "$4.cpu" 2>/dev/null || echo 0)" 'BEGIN {
        split(a, x, " "); split(b, y, " ");
        for (i = 1; i <= 7; i++) c[i] = (y[i] - x[i]) / hz / s
        for (i = 1; i <= 6; i++) printf "%.2f ", c[i]
        p = pg / s; o = c[1] - c[2] - c[3] - c[4] - c[7] - c[5] - p; printf "%.2f %.2f %.2f\n", p, (o < 0 ? 0 : o), c[7] }'
}

start_daemon
log "daemon up (pid $DAEMON_PID, metrics on $METRICS); warm-up: ${WARMUP}s of pgbench on source and twin"
if ((WARMUP > 0)); then
    pgbench_run "$S" "$W/warm.log" -b tpcb-like -T "$WARMUP" >/dev/null
    pgbench_run "$B" "$W/warm.log" -b tpcb-like -T "$WARMUP" >/dev/null
    if ((LOGICAL)); then pgbench_run "$P" "$W/warm.log" -b tpcb-like -T "$WARMUP" >/dev/null; fi
fi
drain >/dev/null
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# --- 0. single-row commits on an idle source ----------------------------------------------
# What the tracker's reference figures measure (Bucardo 0.5-0.7 s, logical replication 1-2 ms):
# one autocommit INSERT at a time, IDLE_COMMITS of them, IDLE_GAP apart (so the daemon's poll
# has backed off to its interval, as on a quiet source), then percentiles as below.
log "single-row commits on an idle source: $IDLE_COMMITS inserts, ${IDLE_GAP}s apart"
lo=$(q "$S" "SELECT coalesce(max(id), 0) FROM lat")
for ((i = 0; i < IDLE_COMMITS; i++)); do
    sleep "$IDLE_GAP"
    q "$S" "INSERT INTO lat (t0) VALUES (clock_timestamp())"
done
hi=$(q "$S" "SELECT max(id) FROM lat")
drain >/dev/null

# --- 1. latency at fixed rates -------------------------------------------------------------
cp "$root/bench/lat.sql" "$W/lat.sql"
declare -A L
pct_sql() { # LO HI EXPR -> n p50 p95 p99 max (ms)
    q "$T" "SELECT count(*), round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 2),
                   round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms))::numeric, 2),
                   round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 2), round(max(ms)::numeric, 2)
              FROM (SELECT extract(epoch FROM ($3 - t0)) * 1000 AS ms FROM lat WHERE id > $1 AND id <= $2) x" | tr '|' ' '
}
read -r n IDLE_P50 IDLE_P95 IDLE_P99 IDLE_MAX <<<"$(pct_sql "$lo" "$hi" "pg_xact_commit_timestamp(xmin)")"
read -r n IDLE_A50 x IDLE_A99 IDLE_AMAX <<<"$(pct_sql "$lo" "$hi" "arrived")"
IDLE_MIN=$(q "$T" "SELECT round(min(extract(epoch FROM (pg_xact_commit_timestamp(xmin) - t0)) * 1000)::numeric, 2) FROM lat WHERE id > $lo AND id <= $hi")
log "    commit to target: p50 $IDLE_P50 ms, p95 $IDLE_P95, max $IDLE_MAX (min $IDLE_MIN)"
for rate in $RATES; do
    log "latency run: pgbench -R $rate -T $DURATION -c $CLIENTS -j $JOBS (tpcb-like + one lat row)"
    settle
    lo=$(q "$S" "SELECT coalesce(max(id), 0) FROM lat")
    t0=$(now)
    start_sampler "$W/lat-$rate.samples" "$t0"
    c0=$(cpu_snapshot)
    L[$rate,tps]=$(pgbench_run "$S" "$W/lat-$rate.log" -f "$W/lat.sql" -s "$SCALE" -R "$rate" -T "$DURATION")
    t1=$(now)
    L[$rate,cpu]=$(cpu_cores "$c0" "$(cpu_snapshot)" "$(elapsed "$t0" "$t1")" "$W/lat-$rate.log")
    L[$rate,src_ms]=$(awk '/^latency average = / { print $4; exit }' "$W/lat-$rate.log")
    hi=$(q "$S" "SELECT max(id) FROM lat")
    L[$rate,drain]=$(drain)
    stop_sampler
    sleep 2 # a purge pass (once a second) after the drain
    read -r L[$rate,delta_rows] L[$rate,delta_bytes] <<<"$(delta_size)"
    L[$rate,txns]=$(q "$S" "SELECT count(*) FROM lat WHERE id > $lo AND id <= $hi")
    read -r n L[$rate,p50] L[$rate,p95] L[$rate,p99] L[$rate,max] <<<"$(pct_sql "$lo" "$hi" "pg_xact_commit_timestamp(xmin)")"
    [[ $n == "${L[$rate,txns]}" ]] || die "rate $rate: $n latency rows on the target, ${L[$rate,txns]} on the source"
    read -r n L[$rate,a50] L[$rate,a95] L[$rate,a99] L[$rate,amax] <<<"$(pct_sql "$lo" "$hi" "arrived")"
    f=$W/lat-$rate.samples
    dur=$(elapsed "$t0" "$t1")
    L[$rate,rss_start]=$(col_at "$f" 2 0); L[$rate,rss_max]=$(col_max "$f" 2); L[$rate,rss_end]=$(col_at "$f" 2 "$dur")
    L[$rate,lag_max]=$(r3 "$(col_max "$f" 3)"); L[$rate,pending_max]=$(col_max "$f" 4); L[$rate,capture_max]=$(col_max "$f" 5); L[$rate,delta_max]=$(col_max "$f" 9); L[$rate,delta_bytes_max]=$(col_max "$f" 10)
    L[$rate,rounds]=$(col_delta "$f" 6 0 "$dur")
    rs=$(col_delta "$f" 7 0 "$dur"); rn=$(col_delta "$f" 8 0 "$dur")
    L[$rate,round_ms]=$(awk -v s="$rs" -v n="$rn" 'BEGIN { if (n == "null" || n + 0 == 0) print "null"; else printf "%.1f", 1000 * s / n }')
    log "    tps ${L[$rate,tps]}, latency p50 ${L[$rate,p50]} p95 ${L[$rate,p95]} p99 ${L[$rate,p99]} ms, RSS max ${L[$rate,rss_max]} KiB, delta ${L[$rate,delta_rows]} rows"
done

# --- 2. full speed: no capture, capture, capture + daemon, native logical replication -------
declare -A TPS K CPU
CATCHUPS=()
LABELS=([0]="no capture (twin)" [1]="capture, daemon stopped" [2]="capture + daemon" [3]="native logical replication")
KEY=(none capture daemon)
ORDER="ABC/CBA"
if ((LOGICAL)); then KEY+=(logical); ORDER="ABCD/DCBA"; fi
full_phase() { # PHASE ROUND
    local p=$1 r=$2 t0 t1 dur f rs rn
    case $p in
        none | capture | logical) [[ -n $DAEMON_PID ]] && halt_daemon ;;
        daemon)
            if [[ -z $DAEMON_PID ]]; then
                local backlog
                backlog=$(delta_size); backlog=${backlog% *}
                start_daemon
                CATCHUPS+=("$backlog $(drain)")
                log "    daemon restarted: backlog of $backlog capture rows caught up in ${CATCHUPS[-1]#* } s"
                # Let a purge pass (once a second) remove the backlog before the VACUUM below, so
                # that every daemon phase starts without the backlog's dead capture rows.
                sleep 2
            fi
            ;;
    esac
    settle
    log "[round $r/$ROUNDS] full speed, $p: pgbench -b tpcb-like -T $TPS_DURATION -c $CLIENTS -j $JOBS"
    if [[ $p != daemon ]]; then
        local dsn=$S c0
        case $p in none) dsn=$B ;; logical) dsn=$P ;; esac
        t0=$(now); c0=$(cpu_snapshot)
        TPS[$p,$r]=$(pgbench_run "$dsn" "$W/full-$p-$r.log" -b tpcb-like -T "$TPS_DURATION")
        CPU[$p,$r]=$(cpu_cores "$c0" "$(cpu_snapshot)" "$(elapsed "$t0" "$(now)")" "$W/full-$p-$r.log")
        [[ $p == capture ]] && K[capture_delta,$r]=$(delta_size)
        if [[ $p == logical ]]; then
            K[logical_drain,$r]=$(drain_to "$P" "$L")
            log "    tps ${TPS[$p,$r]}, the subscriber drained in ${K[logical_drain,$r]} s"
        else
            log "    tps ${TPS[$p,$r]}"
        fi
        return 0
    fi
    f=$W/full-$r.samples
    t0=$(now)
    start_sampler "$f" "$t0"
    local c0; c0=$(cpu_snapshot)
    TPS[$p,$r]=$(pgbench_run "$S" "$W/full-$p-$r.log" -b tpcb-like -T "$TPS_DURATION")
    t1=$(now)
    dur=$(elapsed "$t0" "$t1")
    CPU[$p,$r]=$(cpu_cores "$c0" "$(cpu_snapshot)" "$dur" "$W/full-$p-$r.log")
    K[drain,$r]=$(drain)
    local wait_more
    wait_more=$(awk -v d="${K[drain,$r]}" 'BEGIN { w = 6 - d; print (w > 0 ? w : 0) }')
    sleep "$wait_more"
    stop_sampler
    local x
    for x in 25 50 75 100; do K[lag$x,$r]=$(r3 "$(col_at "$f" 3 "$(awk -v d="$dur" -v x="$x" 'BEGIN { print d * x / 100 }')")"); done
    K[lag_after5,$r]=$(r3 "$(col_at "$f" 3 "$(awk -v d="$dur" 'BEGIN { print d + 5 }')")")
    K[lag_max,$r]=$(r3 "$(awk -v d="$dur" '$1 <= d' "$f" | awk '$3 != "NA" && ($3 + 0 > m || m == "") { m = $3 + 0 } END { print (m == "" ? "null" : m) }')")
    K[pending_max,$r]=$(col_max "$f" 4)
    K[capture_max,$r]=$(col_max "$f" 5)
    K[delta_max,$r]=$(awk -v d="$dur" '$1 <= d' "$f" | awk '$9 != "NA" && ($9 + 0 > m || m == "") { m = $9 + 0 } END { print (m == "" ? "null" : m) }')
    K[delta_bytes_max,$r]=$(col_max "$f" 10)
    K[rss_max,$r]=$(col_max "$f" 2)
    K[rounds,$r]=$(col_delta "$f" 6 0 "$dur")
    rs=$(col_delta "$f" 7 0 "$dur"); rn=$(col_delta "$f" 8 0 "$dur")
    K[round_ms,$r]=$(awk -v s="$rs" -v n="$rn" 'BEGIN { if (n == "null" || n + 0 == 0) print "null"; else printf "%.1f", 1000 * s / n }')
    K[keeps_up,$r]=$(awk -v d="${K[drain,$r]}" -v k="$KEEPUP_DRAIN" 'BEGIN { print (d <= k ? "true" : "false") }')
    log "    tps ${TPS[$p,$r]}, lag max ${K[lag_max,$r]} s, drained in ${K[drain,$r]} s, keeps up: ${K[keeps_up,$r]}"
}
for ((r = 1; r <= ROUNDS; r++)); do
    order=("${KEY[@]}")
    if ((r % 2 == 0)); then for ((i = 0; i < ${#KEY[@]}; i++)); do order[i]=${KEY[-1 - i]}; done; fi
    for p in "${order[@]}"; do full_phase "$p" "$r"; done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

mean() { # PHASE
    local r s=""
    for ((r = 1; r <= ROUNDS; r++)); do s+=" ${TPS[$1,$r]}"; done
    awk -v s="$s" 'BEGIN { n = split(s, a, " "); t = 0; for (i = 1; i <= n; i++) t += a[i]; printf "%.1f", t / n }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
declare -A MEAN
for p in "${KEY[@]}"; do MEAN[$p]=$(mean "$p"); done

# Highest rate kept up: the full rate if every daemon phase kept up, else search below it.
all_kept=true
for ((r = 1; r <= ROUNDS; r++)); do [[ ${K[keeps_up,$r]} == true ]] || all_kept=false; done
SEARCH=()
if [[ $all_kept == true ]]; then
    keepup_rate=${MEAN[daemon]}; keepup_how="full speed"
else
    keepup_rate=null; keepup_how="none of the rates tried"
    [[ -n $DAEMON_PID ]] || { start_daemon; drain >/dev/null; }
    for pct in 80 60 40 20; do
        rate=$(awk -v t="${MEAN[daemon]}" -v p="$pct" 'BEGIN { printf "%d", t * p / 100 }')
        ((rate > 0)) || continue
        settle
        log "keep-up search: pgbench -b tpcb-like -R $rate -T $TPS_DURATION"
        tps=$(pgbench_run "$S" "$W/search-$rate.log" -b tpcb-like -R "$rate" -T "$TPS_DURATION")
        d=$(drain)
        kept=$(awk -v d="$d" -v k="$KEEPUP_DRAIN" 'BEGIN { print (d <= k ? "true" : "false") }')
        SEARCH+=("$rate $tps $d $kept")
        log "    tps $tps, drained in $d s, keeps up: $kept"
        if [[ $kept == true ]]; then keepup_rate=$tps; keepup_how="-R $rate"; break; fi
    done
fi

# --- 3. correctness ------------------------------------------------------------------------
[[ -n $DAEMON_PID ]] || {
    backlog=$(delta_size); backlog=${backlog% *}
    start_daemon
    CATCHUPS+=("$backlog $(drain)")
    log "daemon restarted: backlog of $backlog capture rows caught up in ${CATCHUPS[-1]#* } s"
}
drain >/dev/null
sleep 2 # a purge pass, so that the capture table's final size means something
RSS_HWM=$(hwm_kib)
halt_daemon
log "comparing checksums of every table"
checksums "$S" >"$W/sum.src"; checksums "$T" >"$W/sum.dst"
if cmp -s "$W/sum.src" "$W/sum.dst"; then CHECK=equal; else CHECK=DIFFERENT; diff "$W/sum.src" "$W/sum.dst" >&2 || true; fi
LCHECK=null
if ((LOGICAL)); then
    drain_to "$P" "$L" >/dev/null
    if [[ "$(checksums "$P")" == "$(checksums "$L")" ]]; then LCHECK=equal; else LCHECK=DIFFERENT; fi
fi
read -r FINAL_DELTA_ROWS FINAL_DELTA_BYTES <<<"$(delta_size)"

# --- report --------------------------------------------------------------------------------
CPUS=$(nproc)
mib() { awk -v k="$1" 'BEGIN { if (k == "null" || k == "NA") print "?"; else printf "%.1f", k / 1024 }'; }
cpu_json() { read -r a b c d e f g h i <<<"$1"; echo "{\"machine\":$a,\"source\":$b,\"target\":$c,\"twin\":$d,\"daemon\":$e,\"daemon_source_sessions\":$f,\"pgbench\":$g,\"other\":$h,\"publisher\":$i}"; }
mib_b() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
if [[ $JSON == 1 ]]; then
    j="{\"postgresql\":\"$PG_VERSION\",\"cpus\":$CPUS,\"loadavg_start\":\"$LOAD_START\",\"loadavg_end\":\"$LOAD_END\""
    j+=",\"pgbench\":{\"scale\":$SCALE,\"clients\":$CLIENTS,\"jobs\":$JOBS},\"poll_interval\":\"$POLL_INTERVAL\",\"daemon_args\":\"$DAEMON_ARGS\""
    j+=",\"idle_single_row\":{\"commits\":$IDLE_COMMITS,\"gap_s\":$IDLE_GAP,\"visible_ms\":{\"min\":$IDLE_MIN,\"p50\":$IDLE_P50,\"p95\":$IDLE_P95,\"p99\":$IDLE_P99,\"max\":$IDLE_MAX},\"arrived_ms\":{\"p50\":$IDLE_A50,\"p99\":$IDLE_A99,\"max\":$IDLE_AMAX}}"
    j+=",\"latency_runs\":["
    sep=""
    for rate in $RATES; do
        j+="$sep{\"rate\":$rate,\"duration_s\":$DURATION,\"tps\":${L[$rate,tps]},\"rate_reached\":$(awk -v t="${L[$rate,tps]}" -v r="$rate" 'BEGIN { print (t >= 0.95 * r ? "true" : "false") }'),\"pgbench_latency_ms\":${L[$rate,src_ms]:-null},\"transactions\":${L[$rate,txns]}"
        j+=",\"visible_ms\":{\"p50\":${L[$rate,p50]},\"p95\":${L[$rate,p95]},\"p99\":${L[$rate,p99]},\"max\":${L[$rate,max]}}"
        j+=",\"arrived_ms\":{\"p50\":${L[$rate,a50]},\"p95\":${L[$rate,a95]},\"p99\":${L[$rate,a99]},\"max\":${L[$rate,amax]}}"
        j+=",\"drain_s\":${L[$rate,drain]},\"lag_max_s\":${L[$rate,lag_max]},\"pending_max\":${L[$rate,pending_max]}"
        j+=",\"rounds\":${L[$rate,rounds]},\"round_mean_ms\":${L[$rate,round_ms]}"
        j+=",\"rss_kib\":{\"start\":${L[$rate,rss_start]},\"max\":${L[$rate,rss_max]},\"end\":${L[$rate,rss_end]}}"
        j+=",\"capture_rows_gauge_max\":${L[$rate,capture_max]},\"delta_rows_max\":${L[$rate,delta_max]},\"delta_bytes_max\":${L[$rate,delta_bytes_max]},\"cpu_cores\":$(cpu_json "${L[$rate,cpu]}"),\"delta_end_rows\":${L[$rate,delta_rows]},\"delta_end_bytes\":${L[$rate,delta_bytes]}}"
        sep=","
    done
    j+="],\"full_speed\":{\"duration_s\":$TPS_DURATION,\"rounds\":$ROUNDS,\"order\":\"$ORDER\",\"phases\":{"
    sep=""
    for p in "${KEY[@]}"; do
        list=""; for ((r = 1; r <= ROUNDS; r++)); do list+="${list:+,}${TPS[$p,$r]}"; done
        cl=""; for ((r = 1; r <= ROUNDS; r++)); do cl+="${cl:+,}$(cpu_json "${CPU[$p,$r]}")"; done
        j+="$sep\"$p\":{\"cpu_cores\":[$cl],\"tps\":[$list],\"tps_mean\":${MEAN[$p]},\"ratio\":$(ratio "${MEAN[$p]}" "${MEAN[none]}")}"
        [[ $p == daemon ]] && j="${j%\}},\"ratio_to_capture\":$(ratio "${MEAN[daemon]}" "${MEAN[capture]}")}"
        if [[ $p == logical ]]; then
            dl=""; for ((r = 1; r <= ROUNDS; r++)); do dl+="${dl:+,}${K[logical_drain,$r]}"; done
            j="${j%\}},\"drain_s\":[$dl]}"
        fi
        sep=","
    done
    j+="},\"daemon_rounds\":["
    sep=""
    for ((r = 1; r <= ROUNDS; r++)); do
        j+="$sep{\"round\":$r,\"tps\":${TPS[daemon,$r]},\"lag_s\":{\"max\":${K[lag_max,$r]},\"at25\":${K[lag25,$r]},\"at50\":${K[lag50,$r]},\"at75\":${K[lag75,$r]},\"at100\":${K[lag100,$r]},\"after5\":${K[lag_after5,$r]}}"
        j+=",\"drain_s\":${K[drain,$r]},\"keeps_up\":${K[keeps_up,$r]},\"pending_max\":${K[pending_max,$r]},\"capture_rows_gauge_max\":${K[capture_max,$r]},\"delta_rows_max\":${K[delta_max,$r]},\"delta_bytes_max\":${K[delta_bytes_max,$r]}"
        j+=",\"rounds\":${K[rounds,$r]},\"round_mean_ms\":${K[round_ms,$r]},\"rss_max_kib\":${K[rss_max,$r]}}"
        sep=","
    done
    j+="],\"capture_only_delta\":["
    sep=""
    for ((r = 1; r <= ROUNDS; r++)); do read -r a b <<<"${K[capture_delta,$r]}"; j+="$sep{\"rows\":$a,\"bytes\":$b}"; sep=","; done
    j+="],\"catchups\":["
    sep=""
    for c in "${CATCHUPS[@]}"; do read -r a b <<<"$c"; j+="$sep{\"backlog_rows\":$a,\"seconds\":$b}"; sep=","; done
    j+="]},\"keepup\":{\"highest_tps\":$keepup_rate,\"how\":\"$keepup_how\",\"drain_limit_s\":$KEEPUP_DRAIN,\"search\":["
    sep=""
    for s in "${SEARCH[@]}"; do read -r a b c d <<<"$s"; j+="$sep{\"rate\":$a,\"tps\":$b,\"drain_s\":$c,\"keeps_up\":$d}"; sep=","; done
    stops=""; for s in "${STOP_RCS[@]}"; do stops+="${stops:+,}$s"; done
    j+="]},\"daemon_rss_hwm_kib\":$RSS_HWM,\"sigterm_exit_codes\":[$stops],\"delta_final\":{\"rows\":$FINAL_DELTA_ROWS,\"bytes\":$FINAL_DELTA_BYTES},\"checksums\":\"$CHECK\",\"logical_replication_checksums\":$([[ $LCHECK == null ]] && echo null || echo "\"$LCHECK\"")}"
    echo "$j"
else
    echo "daemon benchmark, PostgreSQL $PG_VERSION, pgbench scale $SCALE, -c $CLIENTS -j $JOBS, pgferry run --poll-interval $POLL_INTERVAL${DAEMON_ARGS:+ $DAEMON_ARGS}"
    echo "host: $CPUS CPUs shared by pgbench, the servers and the daemon; load average at start $LOAD_START, at end $LOAD_END"
    echo
    echo "single-row commits on an idle source ($IDLE_COMMITS, ${IDLE_GAP} s apart), commit to target: min $IDLE_MIN ms, p50 $IDLE_P50, p95 $IDLE_P95, max $IDLE_MAX (arrived: p50 $IDLE_A50, max $IDLE_AMAX)"
    echo
    echo "latency at a fixed rate ($DURATION s each; tpcb-like + one lat row; ms from the workload's t0 to the target)"
    printf '%-6s %7s %7s | %7s %7s %7s %8s | %8s %8s | %7s %7s %8s %8s | %8s %8s %10s\n' \
        rate tps txns p50 p95 p99 max arr.p50 arr.p99 drain_s lag_max rounds round_ms rss_MiB delta_max delta_end
    for rate in $RATES; do
        printf '%-6s %7.1f %7s | %7s %7s %7s %8s | %8s %8s | %7s %7s %8s %8s | %8s %8s %10s\n' \
            "$rate" "${L[$rate,tps]}" "${L[$rate,txns]}" "${L[$rate,p50]}" "${L[$rate,p95]}" "${L[$rate,p99]}" "${L[$rate,max]}" \
            "${L[$rate,a50]}" "${L[$rate,a99]}" "${L[$rate,drain]}" "${L[$rate,lag_max]}" "${L[$rate,rounds]}" "${L[$rate,round_ms]}" \
            "$(mib "${L[$rate,rss_max]}")" "${L[$rate,delta_max]}" "${L[$rate,delta_rows]}/$(mib_b "${L[$rate,delta_bytes]}")M"
    done
    for rate in $RATES; do
        awk -v t="${L[$rate,tps]}" -v r="$rate" 'BEGIN { exit !(t < 0.95 * r) }' &&
            echo "  rate $rate was not reached: the source committed ${L[$rate,tps]} TPS (pgbench latency ${L[$rate,src_ms]} ms)"
    done
    echo "  p50..max: target commit time (pg_xact_commit_timestamp) - t0; arr.*: the target's arrived default - t0"
    echo "  rss_MiB: daemon VmRSS max (start ${L[${RATES%% *},rss_start]} KiB); delta_max: most rows in pgferry.delta (count(*) each second); delta_end: rows/size of pgferry.delta 2 s after the drain"
    echo
    echo "full speed (pgbench -b tpcb-like, no -R, $TPS_DURATION s x $ROUNDS rounds, $ORDER)"
    hdr=$(printf '%-26s' phase); for ((r = 1; r <= ROUNDS; r++)); do hdr+=$(printf ' %8s' "tps(r$r)"); done
    echo "$hdr $(printf '%9s %8s %10s' mean ratio vs_capture)"
    for i in "${!KEY[@]}"; do
        p=${KEY[$i]}; line=$(printf '%-26s' "${LABELS[$i]}")
        for ((r = 1; r <= ROUNDS; r++)); do line+=$(printf ' %8.1f' "${TPS[$p,$r]}"); done
        vs=""; [[ $p == daemon ]] && vs=$(ratio "${MEAN[daemon]}" "${MEAN[capture]}")
        echo "$line $(printf '%9s %8s %10s' "${MEAN[$p]}" "$(ratio "${MEAN[$p]}" "${MEAN[none]}")" "$vs")"
    done
    echo "  ratio: phase mean / no-capture mean (1.00 = no cost); vs_capture: capture + daemon / capture alone (the daemon's own cost)"
    if ((LOGICAL)); then
        dl=""; for ((r = 1; r <= ROUNDS; r++)); do dl+="${dl:+, }${K[logical_drain,$r]}"; done
        echo "  native logical replication: pgbench on the publisher (wal_level=logical), subscription applying on the target cluster; drained in $dl s after pgbench ended"
    fi
    echo
    echo "keep-up during capture + daemon at full speed (lag = pgferry_lag_seconds, sampled each second)"
    printf '%-5s %8s %8s %7s %7s %7s %7s %8s %8s %9s %8s %9s %8s %8s %8s\n' round tps lag_max lag25% lag50% lag75% lag100% lag+5s drain_s keeps_up pend_max delta_max rounds round_ms rss_MiB
    for ((r = 1; r <= ROUNDS; r++)); do
        printf '%-5s %8.1f %8s %7s %7s %7s %7s %8s %8s %9s %8s %9s %8s %8s %8s\n' "$r" "${TPS[daemon,$r]}" "${K[lag_max,$r]}" "${K[lag25,$r]}" "${K[lag50,$r]}" \
            "${K[lag75,$r]}" "${K[lag100,$r]}" "${K[lag_after5,$r]}" "${K[drain,$r]}" "${K[keeps_up,$r]}" "${K[pending_max,$r]}" "${K[delta_max,$r]}" "${K[rounds,$r]}" "${K[round_ms,$r]}" "$(mib "${K[rss_max,$r]}")"
    done
    echo "  keeps up = drained (a marker committed when pgbench ended reached the target) within $KEEPUP_DRAIN s"
    for s in "${SEARCH[@]}"; do read -r a b c d <<<"$s"; echo "  search: -R $a -> tps $b, drained in $c s, keeps up: $d"; done
    echo "highest tpcb-like rate kept up: $keepup_rate TPS ($keepup_how)"
    for ((r = 1; r <= ROUNDS; r++)); do read -r a b <<<"${K[capture_delta,$r]}"; echo "capture phase $r left $a capture rows ($(mib_b "$b") MiB) in pgferry.delta"; done
    for c in "${CATCHUPS[@]}"; do read -r a b <<<"$c"; echo "daemon restarted on a backlog of $a capture rows: caught up in $b s"; done
    echo
    echo "CPU busy during each measured run, in cores (of $CPUS); source = the loaded server (the twin for no capture, the publisher for logical replication)"
    printf '%-30s %8s %8s %8s %8s %11s %8s %6s\n' run machine source target daemon daemon_src pgbench other
    cpu_line() {
        read -r a b c d e f g h i <<<"$2"
        case $1 in *"no capture"*) b=$d ;; *logical*) b=$i ;; esac
        printf '%-30s %8s %8s %8s %8s %11s %8s %6s\n' "$1" "$a" "$b" "$c" "$e" "$f" "$g" "$h"
    }
    for rate in $RATES; do cpu_line "latency -R $rate" "${L[$rate,cpu]}"; done
    for ((r = 1; r <= ROUNDS; r++)); do for i in "${!KEY[@]}"; do cpu_line "${LABELS[$i]} r$r" "${CPU[${KEY[$i]},$r]}"; done; done
    echo "  daemon_src: the daemon's sessions on the source (included in source); target: the whole target server (with the subscription's apply worker);"
    echo "  other: machine - servers - daemon - pgbench (this script's sampling, and anything else running: noise)"
    echo
    echo "daemon peak RSS (VmHWM) over the run: $(mib "$RSS_HWM") MiB; exit codes after SIGTERM: ${STOP_RCS[*]}"
    echo "pgferry.delta at the very end: $FINAL_DELTA_ROWS rows, $(mib_b "$FINAL_DELTA_BYTES") MiB"
    echo "checksums of every table, source vs target: $CHECK"
    if ((LOGICAL)); then echo "checksums of every table, logical replication publisher vs subscriber: $LCHECK"; fi
fi
if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP"
    cp "$W"/*.samples "$W"/*.log "$W"/*.cpu "$KEEP"/ 2>/dev/null || true
    echo "*.samples columns: seconds_since_start daemon_rss_kib lag_s pending_changes capture_rows_gauge rounds_total round_seconds_sum round_count delta_rows delta_bytes delta_dead_rows(statistics) relations_being_vacuumed" >"$KEEP/columns.txt"
    log "samples, pgbench and daemon logs copied to $KEEP"
fi
[[ $CHECK == equal ]] || { log "checksums differ"; exit 1; }
