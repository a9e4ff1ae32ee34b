#!/usr/bin/env bash
# Two-way benchmark: `pgferry run --node` against one-way `pgferry run` on the same workload,
# and the cost of deciding a conflict, in one run.
#
# Clusters (throwaway PostgreSQL 15, default durability, track_commit_timestamp = on, on this
# machine): nodes A and B, loaded alike with `pgbench -i -s SCALE` (pgbench_history given a key,
# hid bigserial) plus lat(id bigserial primary key, origin int, phase int, t0 timestamptz),
# checked equal, capture installed on both (`pgferry install`).
# Workload, per writing node, at RATE transactions/s (`pgbench -R`, CLIENTS clients,
# --max-tries=MAX_TRIES so that a deadlock with a round is retried, not fatal):
#   WORKLOAD=tpcb      pgbench's tpcb-like transaction (an account, a teller and a branch
#                      updated, a history row) plus, as its last statement, a lat row with
#                      t0 = clock_timestamp(). With both nodes writing, the SCALE branch rows
#                      and 10 x SCALE teller rows are updated on both nodes in nearly every
#                      round: real conflicts, on hot rows.
#   WORKLOAD=disjoint  node A updates accounts of the first half, node B of the second; no
#                      teller or branch update; the history and lat inserts as above. Conflicts
#                      are not expected (keys of inserts come from partitioned sequences).
#
# 1. One-way: `pgferry run --source A --target B`, the workload on A for DURATION s.
# 2. Two-way: one `pgferry sync --node a=A --node b=B --conflict latest --once
#    --sequence-partition` (each node its own sequence values, and the two-way schema), then
#    `pgferry run --node a=A --node b=B --conflict latest`, the workload on A and B at once, at
#    RATE each, for DURATION s.
#    For each phase: the TPS each pgbench achieved (and its failed and retried transactions);
#    commit-to-peer latency p50/p95/p99/max in each direction, from the lat rows of the phase:
#    the peer's commit time of the row (pg_xact_commit_timestamp(xmin): when a reader there
#    can see it) minus t0; the drain time per direction: from the end of pgbench until a marker
#    row committed then is on the peer ("keeps up" = drained within KEEPUP_DRAIN s in every
#    direction, the rate reached on every node, no failed transaction); the most lag seen in
#    /metrics per direction and the daemon's rounds; conflicts decided (rows of pgferry.conflict
#    recorded during the phase, per node and per table); CPU busy in cores (from /proc): the
#    machine, each server, the daemon, pgbench, and "other" (anything else on the machine: a
#    phase with other above ~0.1 core measured the machine).
#    After the two-way phase the daemon is stopped, a final `pgferry sync --node ... --once`
#    runs, and ordered checksums of every table must be equal on both nodes.
# 3. Conflict cost, daemon stopped: CONFLICTS rows of pgbench_accounts updated differently on
#    both nodes (the same rows), against CONFLICTS rows updated on A and CONFLICTS others on B;
#    each followed by one timed `pgferry sync --node ... --conflict latest --once --json`.
#    REPEAT pairs, alternating the order (plain, conflict / conflict, plain); every exchange
#    starts after VACUUM and CHECKPOINT on both nodes. Reports the seconds of each (medians;
#    the exchange's own time, and the command's wall time), the conflicts it decided, and the
#    extra microseconds per conflicting row: (conflict - plain) / CONFLICTS.
# At the end ordered checksums of every table are compared again. The run fails (exit 1), after
# the report, if the checksums differ at either check (`pgferry verify` then lists the keys), if
# a committed lat row is missing at the end (every transaction pgbench counts as processed wrote
# one: a missing row lost an insert/insert conflict), or if keys from the partitioned sequences
# collided (conflicts on lat or pgbench_history keys, duplicate key errors in pgbench). A
# pgbench whose clients aborted is reported with its first error; it does not stop the run.
#
# Usage: bench/two-way.sh [--json]
# Environment:
#   WORKLOAD=tpcb      tpcb (hot rows conflicting on both nodes) or disjoint (see above)
#   RATE=200           pgbench -R per writing node (transactions/s)
#   DURATION=30        seconds of pgbench in each phase
#   CLIENTS=4 JOBS=2   pgbench -c / -j per writing node
#   MAX_TRIES=10       pgbench --max-tries (deadlock retries)
#   SCALE=10           pgbench scale
#   CONFLICTS=10000    rows of the conflict-cost exchanges
#   REPEAT=3           conflict-cost pairs
#   POLL_INTERVAL=50ms pgferry run --poll-interval
#   KEEPUP_DRAIN=5     a phase keeps up if every direction drains within this many seconds
#   DRAIN_TIMEOUT=300  give up waiting for a drain after this many seconds (reported, not fatal)
#   WARMUP=5           seconds of unmeasured pgbench on A with the one-way daemon first
#   KEEP=DIR           copy the per-second samples and the pgbench, daemon and server logs there
#   JSON=1             same as --json: one JSON object on stdout instead of the tables
#   PGFERRY_BIN=       use this pgferry binary instead of `cargo build --release -p pgferry`
#   PG_BIN=/usr/lib/postgresql/15/bin   server and client binaries
# Progress goes to stderr, the result to stdout. Everything shares this machine's CPUs: two
# pgbench, two servers and the daemon; figures from a busy machine measure the machine. Needs
# bash, awk, curl, python3, /usr/bin/time and runuser (as root).
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options two-way "$@"
[[ $JSON == 1 ]] || JSON=0
WORKLOAD=${WORKLOAD:-tpcb}
RATE=${RATE:-200}
DURATION=${DURATION:-30}
CLIENTS=${CLIENTS:-4}
JOBS=${JOBS:-2}
MAX_TRIES=${MAX_TRIES:-10}
SCALE=${SCALE:-10}
CONFLICTS=${CONFLICTS:-10000}
REPEAT=${REPEAT:-3}
POLL_INTERVAL=${POLL_INTERVAL:-50ms}
KEEPUP_DRAIN=${KEEPUP_DRAIN:-5}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
WARMUP=${WARMUP:-5}
KEEP=${KEEP:-}
[[ $WORKLOAD == tpcb || $WORKLOAD == disjoint ]] || { echo "two-way: WORKLOAD must be tpcb or disjoint" >&2; exit 2; }
[[ $KEEPUP_DRAIN =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "two-way: KEEPUP_DRAIN must be a number (seconds)" >&2; exit 2; }
for v in RATE DURATION CLIENTS JOBS MAX_TRIES SCALE CONFLICTS REPEAT DRAIN_TIMEOUT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "two-way: $v must be a positive integer" >&2; exit 2; }
done
[[ $WARMUP =~ ^[0-9]+$ ]] || { echo "two-way: WARMUP must be an integer" >&2; exit 2; }
((2 * CONFLICTS <= 100000 * SCALE)) || { echo "two-way: CONFLICTS must be at most half the accounts (50000 x SCALE)" >&2; exit 2; }

log() { printf '%s\n' "$*" >&2; }
die() { log "two-way: $*"; exit 1; }
. "$root/scripts/lib/throwaway-pg.sh"
W=$_PG_BASE
client() { if [[ -x $PG_BIN/$1 ]]; then echo "$PG_BIN/$1"; else command -v "$1" || die "$1 not found"; fi; }
PSQL=$(client psql)
PGBENCH=$(client pgbench)
command -v curl >/dev/null || die "curl not found"
command -v python3 >/dev/null || die "python3 not found"
bench_pgferry
[[ -x $PGFERRY_BIN ]] || die "pgferry binary not found: $PGFERRY_BIN"

# --- processes this script starts: the daemon, the sampler, pgbench (stop_daemon, stop_sampler:
# scripts/lib/bench.sh) -----------------------------------------------------------------
DAEMON_PID="" SAMPLER_PID="" BENCH_PIDS=() BENCH_RCS=()
on_exit() {
    local rc=$? p
    trap - EXIT
    for p in "${BENCH_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    stop_sampler
    stop_daemon
    if [[ $rc != 0 && -n ${DAEMON_LOG:-} && -s ${DAEMON_LOG:-} ]]; then
        log "--- last lines of the daemon's log ($DAEMON_LOG) ---"
        tail -n 15 "$DAEMON_LOG" >&2 || true
    fi
    _pg_cleanup
    exit "$rc"
}
trap on_exit EXIT

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
q() { "$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$1" -c "$2"; }

# --- clusters and data -------------------------------------------------------------------
log "starting two clusters (nodes a and b)"
conf=("shared_buffers=256MB" "max_wal_size=4GB" "checkpoint_timeout=30min" "track_commit_timestamp=on")
pg_throwaway a "${conf[@]}"
pg_throwaway b "${conf[@]}"
A="$DSN_a dbname=bench"; B="$DSN_b dbname=bench"
declare -A DSN=([a]=$A [b]=$B) ORIGIN=([a]=1 [b]=2) PEER=([a]=b [b]=a)
for d in "$DSN_a" "$DSN_b"; do q "$d dbname=postgres" "CREATE DATABASE bench"; done
PG_VERSION=$(q "$A" "SHOW server_version"); PG_VERSION=${PG_VERSION%% *}
log "loading pgbench -i -s $SCALE on each"
for d in "$A" "$B"; do
    "$PGBENCH" -i -s "$SCALE" -q "$d" >"$W/init.log" 2>&1 || { cat "$W/init.log" >&2; die "pgbench -i failed"; }
    q "$d" "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"
    # origin: 1 written on a, 2 on b (drain markers -1, -2, with negative ids); phase: 1 one-way,
    # 2 two-way, 0 other.
    q "$d" "CREATE TABLE lat (id bigserial PRIMARY KEY, origin int NOT NULL, phase int NOT NULL, t0 timestamptz NOT NULL)"
    q "$d" "VACUUM ANALYZE"
done

# Ordered checksum of every table.
TABLES=("pgbench_accounts aid" "pgbench_branches bid" "pgbench_tellers tid" "pgbench_history hid" "lat id")
checksums() { # DSN -> one line per table
    local spec name key
    for spec in "${TABLES[@]}"; do
        read -r name key <<<"$spec"
        printf '%s %s\n' "$name" "$(q "$1" "SELECT count(*) || ' ' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY $key)), '-') FROM $name t")"
    done
}
compare() { # LABEL -> equal or DIFFERENT (differences, and pgferry verify's keys, on stderr)
    checksums "$A" >"$W/sum.a"; checksums "$B" >"$W/sum.b"
    if cmp -s "$W/sum.a" "$W/sum.b"; then echo equal; else
        log "checksums differ ($1):"; diff "$W/sum.a" "$W/sum.b" >&2 || true
        "$PGFERRY_BIN" verify --source "$A" --target "$B" >"$W/verify-$2.log" 2>&1 || true
        log "pgferry verify --source a --target b:"; head -n 30 "$W/verify-$2.log" >&2
        echo DIFFERENT
    fi
}
log "checking that the nodes start equal"
[[ $(compare start start) == equal ]] || die "the nodes differ after loading"
for n in a b; do
    out=$("$PGFERRY_BIN" install --source "${DSN[$n]}" 2>&1) || { log "$out"; die "pgferry install on $n failed"; }
done

# --- workload --------------------------------------------------------------------------------
# pgbench's custom scripts get :scale 1 unless -s gives it (it is not read from the tables).
if [[ $WORKLOAD == tpcb ]]; then
    cat >"$W/work.sql" <<'EOF'
\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO lat (origin, phase, t0) VALUES (:origin, :phase, clock_timestamp());
END;
EOF
else
    cat >"$W/work.sql" <<'EOF'
\set aid random(:alo, :ahi)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO lat (origin, phase, t0) VALUES (:origin, :phase, clock_timestamp());
END;
EOF
fi
HALF=$((50000 * SCALE))
declare -A ALO=([a]=1 [b]=$((HALF + 1))) AHI=([a]=$HALF [b]=$((2 * HALF)))
start_pgbench() { # NODE PHASE LOGFILE SECONDS: pgbench in the background, its pid in BENCH_PIDS
    local n=$1 ph=$2 logf=$3 secs=$4
    /usr/bin/time -f '%U %S' -o "$logf.cpu" "$PGBENCH" -n -P 5 -c "$CLIENTS" -j "$JOBS" -R "$RATE" -T "$secs" \
        --max-tries="$MAX_TRIES" -f "$W/work.sql" -s "$SCALE" -D origin="${ORIGIN[$n]}" -D phase="$ph" \
        -D alo="${ALO[$n]}" -D ahi="${AHI[$n]}" "${DSN[$n]}" >"$logf" 2>&1 &
    BENCH_PIDS+=($!)
}
wait_pgbench() { # waits for every pgbench started; their exit codes in BENCH_RCS, in that order
    local p rc
    BENCH_RCS=()
    for p in "${BENCH_PIDS[@]}"; do rc=0; wait "$p" || rc=$?; BENCH_RCS+=("$rc"); done
    BENCH_PIDS=()
}
bench_figures() { # LOGFILE -> tps failed retried latency_ms processed
    awk '/^tps = / { t = $3 } /^number of failed transactions: / { f = $5 } /^number of transactions retried: / { r = $5 }
         /^latency average = / { l = $4 } /^number of transactions actually processed: / { n = $6 }
         END { printf "%s %s %s %s %s\n", (t == "" ? "null" : t), (f == "" ? 0 : f), (r == "" ? 0 : r), (l == "" ? "null" : l), (n == "" ? 0 : n) }' "$1"
}

# --- the daemon ----------------------------------------------------------------------------
MPORT=$(_pg_free_port)
METRICS="http://127.0.0.1:$MPORT"
STOP_RCS=()
start_daemon() { # LOGFILE ARGS...
    DAEMON_LOG=$1; shift
    "$PGFERRY_BIN" run "$@" --poll-interval "$POLL_INTERVAL" --metrics "127.0.0.1:$MPORT" >>"$DAEMON_LOG" 2>&1 &
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
hwm_kib() { awk '/^VmHWM/ { print $2 }' "/proc/$DAEMON_PID/status" 2>/dev/null || echo null; }
scrape() { # lag_ab lag_ba rounds_ab rounds_ba: per direction, from the sync's name (two-way:b is b -> a)
    curl -s --max-time 1 "$METRICS/metrics" 2>/dev/null | awk '
        function dir(line) { return (line ~ /sync="[^"]*:b"/) ? "ba" : "ab" }
        /^pgferry_lag_seconds[{ ]/ { lag[dir($0)] = $NF }
        /^pgferry_rounds_total[{ ]/ { r[dir($0)] += $NF }
        END { printf "%s %s %s %s\n", ("ab" in lag) ? lag["ab"] : "NA", ("ba" in lag) ? lag["ba"] : "NA", r["ab"] + 0, r["ba"] + 0 }'
}
start_sampler() { # FILE T0: one line a second: seconds-since-T0 lag_ab lag_ba rounds_ab rounds_ba
    local file=$1 t0=$2
    : >"$file"
    (
        trap 'exit 0' TERM
        while :; do
            echo "$(elapsed "$t0" "$(now)") $(scrape)" >>"$file"
            sleep 1
        done
    ) &
    SAMPLER_PID=$!
}
col_max() { awk -v c="$2" '$c != "NA" && ($c + 0 > m || m == "") { m = $c + 0 } END { print (m == "" ? "null" : m) }' "$1"; }
col_last() { awk -v c="$2" '$c != "NA" { v = $c } END { print (v == "" ? "null" : v) }' "$1"; }
col_first() { awk -v c="$2" '$c != "NA" { print $c; exit }' "$1"; }
drain() { # NODE... -> per node, seconds until a marker it committed now is on its peer ("null": not within DRAIN_TIMEOUT)
    local t0 n deadline out=""
    declare -A id done_at
    t0=$(now)
    # Markers take negative keys of their own (not the sequence's), so they never conflict.
    for n in "$@"; do
        id[$n]=$(q "${DSN[$n]}" "INSERT INTO lat (id, origin, phase, t0)
                                 VALUES (-((extract(epoch FROM clock_timestamp()) * 1000000)::bigint * 4 + ${ORIGIN[$n]}), -${ORIGIN[$n]}, 0, clock_timestamp())
                                 RETURNING id") || die "inserting a marker on $n failed"
    done
    deadline=$(($(date +%s) + DRAIN_TIMEOUT))
    while :; do
        local left=0
        for n in "$@"; do
            [[ -n ${done_at[$n]:-} ]] && continue
            if [[ $(q "${DSN[${PEER[$n]}]}" "SELECT count(*) FROM lat WHERE id = ${id[$n]}") == 1 ]]; then
                done_at[$n]=$(elapsed "$t0" "$(now)")
            else
                left=1
            fi
        done
        ((left)) || break
        if [[ $(date +%s) -ge $deadline ]]; then
            for n in "$@"; do [[ -n ${done_at[$n]:-} ]] || done_at[$n]=null; done
            log "    not drained within $DRAIN_TIMEOUT s"
            break
        fi
        [[ -n $DAEMON_PID ]] && ! kill -0 "$DAEMON_PID" 2>/dev/null && die "pgferry run died"
        sleep 0.05
    done
    for n in "$@"; do out+="${out:+ }${done_at[$n]}"; done
    echo "$out"
}
settle() { for d in "$A" "$B"; do q "$d" "VACUUM"; q "$d" "CHECKPOINT"; done; }
conflict_count() { # DSN -> rows of pgferry.conflict (0 before the first two-way exchange)
    if [[ $(q "$1" "SELECT to_regclass('pgferry.conflict') IS NULL") == t ]]; then echo 0; return; fi
    q "$1" "SELECT coalesce(max(conflict_id), 0) FROM pgferry.conflict"
}
conflicts_by_table() { # DSN FROM_ID -> "table=count,..." of conflicts recorded after FROM_ID
    q "$1" "SELECT coalesce(string_agg(table_name || '=' || n, ',' ORDER BY table_name), '') FROM (SELECT table_name, count(*) n FROM pgferry.conflict WHERE conflict_id > $2 GROUP BY 1) x"
}

# CPU accounting, in clock ticks: the machine (busy time from /proc/stat), each cluster (its
# postmaster, its live children, and the children it has reaped), the daemon process.
HZ=$(getconf CLK_TCK)
cluster_ticks() { # NAME
    local pm
    pm=$(head -n 1 "$_PG_BASE/$1/data/postmaster.pid")
    cat /proc/[0-9]*/stat 2>/dev/null | awk -v pm="$pm" '$1 == pm { s += $14 + $15 + $16 + $17 } $4 == pm { s += $14 + $15 } END { print s + 0 }'
}
pid_ticks() { awk '{ print $14 + $15 + $16 + $17 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
cpu_snapshot() { # machine a b daemon
    echo "$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat) $(cluster_ticks a) $(cluster_ticks b) $(if [[ -n $DAEMON_PID ]]; then pid_ticks "$DAEMON_PID"; else echo 0; fi)"
}
cpu_cores() { # SNAP0 SNAP1 SECONDS PGBENCH_LOG... -> cores busy: machine a b daemon pgbench other
    local a=$1 b=$2 s=$3 pg=0 f
    shift 3
    for f in "$@"; do pg=$(awk -v p="$pg" '{ print p + $1 + $2 }' "$f.cpu" 2>/dev/null || echo "$pg"); done
    awk -v a="$a" -v b="$b" -v s="$s" -v hz="$HZ" -v pg="$pg" 'BEGIN {
        split(a, x, " "); split(b, y, " ");
        for (i = 1; i <= 4; i++) { c[i] = (y[i] - x[i]) / hz / s; printf "%.2f ", c[i] }
        p = pg / s; o = c[1] - c[2] - c[3] - c[4] - p; printf "%.2f %.2f\n", p, (o < 0 ? 0 : o) }'
}
pct() { # PEER_DSN ORIGIN PHASE -> n p50 p95 p99 max (ms): the peer's commit time of the row - t0
    q "$1" "SELECT count(*), coalesce(round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 2)::text, 'null'),
                   coalesce(round((percentile_cont(0.95) WITHIN GROUP (ORDER BY ms))::numeric, 2)::text, 'null'),
                   coalesce(round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 2)::text, 'null'),
                   coalesce(round(max(ms)::numeric, 2)::text, 'null')
              FROM (SELECT extract(epoch FROM (pg_xact_commit_timestamp(xmin) - t0)) * 1000 AS ms
                      FROM lat WHERE origin = $2 AND phase = $3) x" | tr '|' ' '
}

# --- 1 and 2: one-way and two-way phases -----------------------------------------------------
declare -A P # P[phase,key]
run_phase() { # PHASE(oneway|twoway) PHASE_NO NODES...
    local ph=$1 no=$2 n t0 t1 dur c0 f logs=() c
    shift 2
    local nodes=("$@")
    settle
    for n in a b; do P[$ph,cid0_$n]=$(conflict_count "${DSN[$n]}"); done
    log "$ph: pgbench -R $RATE -T $DURATION -c $CLIENTS -j $JOBS ($WORKLOAD) on ${nodes[*]}"
    f=$W/$ph.samples
    t0=$(now)
    start_sampler "$f" "$t0"
    c0=$(cpu_snapshot)
    for n in "${nodes[@]}"; do start_pgbench "$n" "$no" "$W/$ph-$n.log" "$DURATION"; logs+=("$W/$ph-$n.log"); done
    # A pgbench whose clients aborted (an error --max-tries does not retry, such as a duplicate
    # key) is reported with its first error, not fatal: its figures cover what it ran.
    wait_pgbench
    local rcs=("${BENCH_RCS[@]}")
    t1=$(now)
    dur=$(elapsed "$t0" "$t1")
    P[$ph,cpu]=$(cpu_cores "$c0" "$(cpu_snapshot)" "$dur" "${logs[@]}")
    local drains
    read -r -a drains <<<"$(drain "${nodes[@]}")"
    sleep 1
    stop_sampler
    P[$ph,rounds_ab]=$(awk -v a="$(col_first "$f" 4)" -v b="$(col_last "$f" 4)" 'BEGIN { print b - a }')
    P[$ph,rounds_ba]=$(awk -v a="$(col_first "$f" 5)" -v b="$(col_last "$f" 5)" 'BEGIN { print b - a }')
    P[$ph,lag_max_ab]=$(col_max "$f" 2); P[$ph,lag_max_ba]=$(col_max "$f" 3)
    P[$ph,keeps_up]=true
    local i=0
    for n in "${nodes[@]}"; do
        P[$ph,aborted_$n]=false; P[$ph,error_$n]=""
        if [[ ${rcs[$i]} != 0 ]]; then
            P[$ph,aborted_$n]=true
            P[$ph,error_$n]=$(grep -m 1 -E '^pgbench: error: client' "$W/$ph-$n.log" | sed 's/^pgbench: error: //; s/"/'"'"'/g' || true)
            log "    pgbench on $n exited ${rcs[$i]}: ${P[$ph,error_$n]:-see $W/$ph-$n.log}"
        fi
        read -r P[$ph,tps_$n] P[$ph,failed_$n] P[$ph,retried_$n] P[$ph,bench_ms_$n] P[$ph,processed_$n] <<<"$(bench_figures "$W/$ph-$n.log")"
        P[$ph,drain_$n]=${drains[$i]}
        ((++i))
        awk -v t="${P[$ph,tps_$n]}" -v r="$RATE" -v d="${P[$ph,drain_$n]}" -v k="$KEEPUP_DRAIN" -v fl="${P[$ph,failed_$n]}" \
            'BEGIN { exit !(t == "null" || t < 0.95 * r || d == "null" || d > k || fl > 0) }' && P[$ph,keeps_up]=false
        [[ ${P[$ph,aborted_$n]} == false ]] || P[$ph,keeps_up]=false
        P[$ph,txns_$n]=$(q "${DSN[$n]}" "SELECT count(*) FROM lat WHERE origin = ${ORIGIN[$n]} AND phase = $no")
    done
    P[$ph,conflicts]=0 P[$ph,seq_conflicts]=0
    for n in a b; do
        c=$(conflict_count "${DSN[$n]}")
        P[$ph,conflicts_$n]=$((c - P[$ph,cid0_$n]))
        P[$ph,conflicts]=$((P[$ph,conflicts] + P[$ph,conflicts_$n]))
        P[$ph,conflict_tables_$n]=""
        ((P[$ph,conflicts_$n] == 0)) || P[$ph,conflict_tables_$n]=$(conflicts_by_table "${DSN[$n]}" "${P[$ph,cid0_$n]}")
        ((P[$ph,conflicts_$n] == 0)) || P[$ph,seq_conflicts]=$((P[$ph,seq_conflicts] + $(q "${DSN[$n]}" "SELECT count(*) FROM pgferry.conflict WHERE conflict_id > ${P[$ph,cid0_$n]} AND table_name IN ('public.lat', 'public.pgbench_history')")))
    done
    local msg="    "
    for n in "${nodes[@]}"; do msg+="$n: tps ${P[$ph,tps_$n]} (failed ${P[$ph,failed_$n]}, retried ${P[$ph,retried_$n]}), drained to ${PEER[$n]} in ${P[$ph,drain_$n]} s; "; done
    log "${msg}conflicts ${P[$ph,conflicts]}, keeps up: ${P[$ph,keeps_up]}"
}
latencies() { # PHASE PHASE_NO NODES...: after every row arrived
    local ph=$1 no=$2 n cnt
    shift 2
    for n in "$@"; do
        read -r cnt P[$ph,p50_$n] P[$ph,p95_$n] P[$ph,p99_$n] P[$ph,max_$n] <<<"$(pct "${DSN[${PEER[$n]}]}" "${ORIGIN[$n]}" "$no")"
        P[$ph,arrived_$n]=$cnt
        log "    $n -> ${PEER[$n]}: ${cnt}/${P[$ph,txns_$n]} rows, p50 ${P[$ph,p50_$n]} p95 ${P[$ph,p95_$n]} p99 ${P[$ph,p99_$n]} max ${P[$ph,max_$n]} ms"
    done
}
exchange() { # [ARGS...] -> wall_s exchange_s rows conflicts (pgferry sync --node ... --once --json ARGS)
    local t0 t1 out
    t0=$(now)
    out=$("$PGFERRY_BIN" sync --node a="$A" --node b="$B" --conflict latest --once --json "$@" 2>"$W/exchange.err") ||
        { cat "$W/exchange.err" >&2; die "pgferry sync --node ... --once failed"; }
    t1=$(now)
    echo "$out" >>"$W/exchanges.json"
    printf '%s %s\n' "$(elapsed "$t0" "$t1")" "$(python3 -c 'import json, sys; r = json.load(sys.stdin); print(round(r["seconds"], 4), r["rows"], r["conflicts"])' <<<"$out")"
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
start_daemon "$W/daemon-oneway.log" --source "$A" --target "$B"
if ((WARMUP > 0)); then
    log "one-way daemon up (pid $DAEMON_PID); warm-up: ${WARMUP}s of pgbench on a"
    start_pgbench a 0 "$W/warm.log" "$WARMUP"
    wait_pgbench
    [[ ${BENCH_RCS[0]} == 0 ]] || { cat "$W/warm.log" >&2; die "pgbench failed"; }
fi
drain a >/dev/null
run_phase oneway 1 a
latencies oneway 1 a
P[oneway,hwm]=$(hwm_kib)
halt_daemon

log "two-way: partitioning sequences and a first exchange (pgferry sync --node ... --sequence-partition --once)"
read -r FIRST_WALL w r c <<<"$(exchange --sequence-partition)"
log "    ${FIRST_WALL} s, $r rows, $c conflicts"
start_daemon "$W/daemon-twoway.log" --node a="$A" --node b="$B" --conflict latest
run_phase twoway 2 a b
latencies twoway 2 a b
P[twoway,hwm]=$(hwm_kib)
halt_daemon
log "final exchange (daemon stopped), then checksums"
read -r FINAL_WALL FINAL_S FINAL_ROWS FINAL_CONFLICTS <<<"$(exchange)"
CHECK_TWOWAY=$(compare "after the two-way phase" twoway)
# Every transaction pgbench counts as processed committed one lat row on its node; a row that
# is missing now lost a conflict to the peer's row of the same key (an insert/insert conflict:
# the nodes handed out the same sequence value), and that transaction's other rows may be gone too.
LOST=0
for spec in "oneway 1 a" "twoway 2 a" "twoway 2 b"; do
    read -r ph no n <<<"$spec"
    P[$ph,kept_$n]=$(q "${DSN[$n]}" "SELECT count(*) FROM lat WHERE origin = ${ORIGIN[$n]} AND phase = $no")
    P[$ph,lost_$n]=$((P[$ph,processed_$n] - P[$ph,kept_$n]))
    LOST=$((LOST + P[$ph,lost_$n]))
    ((P[$ph,lost_$n] == 0)) || log "two-way: $ph: ${P[$ph,lost_$n]} of ${P[$ph,processed_$n]} committed lat rows written on $n are gone (lost an insert/insert conflict)"
done
log "    final exchange: $FINAL_ROWS rows, $FINAL_CONFLICTS conflicts in $FINAL_S s; checksums: $CHECK_TWOWAY"
[[ $CHECK_TWOWAY == equal ]] || log "two-way: the nodes differ after the two-way phase"

# --- 3. conflict cost ------------------------------------------------------------------------
# plain: CONFLICTS rows updated on a, CONFLICTS others on b; conflict: the same CONFLICTS rows
# updated differently on both (b after a, so with `latest` b's rows win on both nodes).
prepare() { # plain|conflict
    local hi_b lo_b
    if [[ $1 == plain ]]; then lo_b=$((CONFLICTS + 1)); hi_b=$((2 * CONFLICTS)); else lo_b=1; hi_b=$CONFLICTS; fi
    q "$A" "UPDATE pgbench_accounts SET abalance = abalance + 1, filler = 'a' WHERE aid BETWEEN 1 AND $CONFLICTS"
    q "$B" "UPDATE pgbench_accounts SET abalance = abalance - 1, filler = 'b' WHERE aid BETWEEN $lo_b AND $hi_b"
    settle
}
declare -A X # X[kind,i] = wall exchange rows conflicts
for ((i = 1; i <= REPEAT; i++)); do
    if ((i % 2 == 1)); then order=(plain conflict); else order=(conflict plain); fi
    for k in "${order[@]}"; do
        prepare "$k"
        X[$k,$i]=$(exchange)
        read -r w s r c <<<"${X[$k,$i]}"
        log "conflict cost [$i/$REPEAT] $k: $CONFLICTS rows on each node, exchange $s s (wall $w s), $r rows, $c conflicts"
    done
done
median() { tr ' ' '\n' | awk 'NF' | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.4f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col_of() { # KIND FIELD(1..4) -> space-separated values over the repeats
    local i s=""
    for ((i = 1; i <= REPEAT; i++)); do s+=" $(awk -v f="$2" '{ print $f }' <<<"${X[$1,$i]}")"; done
    echo "$s"
}
declare -A M
for k in plain conflict; do
    M[$k,wall]=$(col_of "$k" 1 | median); M[$k,s]=$(col_of "$k" 2 | median); M[$k,conflicts]=$(col_of "$k" 4 | median)
done
PER_ROW_US=$(awk -v c="${M[conflict,s]}" -v p="${M[plain,s]}" -v n="$CONFLICTS" 'BEGIN { printf "%.1f", (c - p) * 1e6 / n }')
PER_ROW_WALL_US=$(awk -v c="${M[conflict,wall]}" -v p="${M[plain,wall]}" -v n="$CONFLICTS" 'BEGIN { printf "%.1f", (c - p) * 1e6 / n }')
COST_RATIO=$(awk -v c="${M[conflict,s]}" -v p="${M[plain,s]}" 'BEGIN { printf "%.2f", c / p }')
CHECK_END=$(compare "at the end" end)
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# --- report --------------------------------------------------------------------------------
CPUS=$(nproc)
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "null" || b == "null" || b + 0 == 0) print "null"; else printf "%.3f", a / b }'; }
sum2() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a + b }'; }
TOTAL_ONEWAY=${P[oneway,tps_a]}
TOTAL_TWOWAY=$(sum2 "${P[twoway,tps_a]}" "${P[twoway,tps_b]}")
OVERALL=equal; [[ $CHECK_TWOWAY == equal && $CHECK_END == equal ]] || OVERALL=DIFFERENT
LOST_NOTE=""
((LOST == 0)) || LOST_NOTE="$LOST committed lat rows were lost to insert/insert conflicts on keys both nodes handed out: the partitioned sequences did not stay apart (see pg_sequences on both nodes)"
# Keys of lat and pgbench_history come from the partitioned sequences: a conflict on them, or a
# duplicate key error in pgbench, means the two nodes handed out the same values.
DUP_ERRORS=$(cat "$W"/twoway-[ab].log | grep -c 'duplicate key value violates unique constraint' || true)
SEQ_NOTE=""
((P[twoway,seq_conflicts] + DUP_ERRORS == 0)) ||
    SEQ_NOTE="the nodes handed out the same sequence values: ${P[twoway,seq_conflicts]} conflicts on lat/pgbench_history keys, $DUP_ERRORS duplicate key errors in pgbench (see pg_sequences on both nodes)"
HOT_NOTE=""
if [[ $WORKLOAD == tpcb && ${P[twoway,keeps_up]} == false ]]; then
    HOT_NOTE="two-way did not keep up with tpcb-like at $RATE/s per node: its $SCALE branch and $((10 * SCALE)) teller rows are updated on both nodes in nearly every round; WORKLOAD=disjoint measures two-way without hot rows"
fi
if [[ $JSON == 1 ]]; then
    cpu_json() { read -r a b c d e f <<<"$1"; echo "{\"machine\":$a,\"a\":$b,\"b\":$c,\"daemon\":$d,\"pgbench\":$e,\"other\":$f}"; }
    dir_json() { # PHASE NODE
        local ph=$1 n=$2
        echo "{\"from\":\"$n\",\"to\":\"${PEER[$n]}\",\"tps\":${P[$ph,tps_$n]},\"rate_reached\":$(awk -v t="${P[$ph,tps_$n]}" -v r="$RATE" 'BEGIN { print (t != "null" && t >= 0.95 * r ? "true" : "false") }'),\"transactions\":${P[$ph,processed_$n]},\"lat_rows_lost\":${P[$ph,lost_$n]},\"failed\":${P[$ph,failed_$n]},\"retried\":${P[$ph,retried_$n]},\"aborted\":${P[$ph,aborted_$n]},\"error\":\"${P[$ph,error_$n]}\",\"pgbench_latency_ms\":${P[$ph,bench_ms_$n]},\"arrived\":${P[$ph,arrived_$n]},\"to_peer_ms\":{\"p50\":${P[$ph,p50_$n]},\"p95\":${P[$ph,p95_$n]},\"p99\":${P[$ph,p99_$n]},\"max\":${P[$ph,max_$n]}},\"drain_s\":${P[$ph,drain_$n]},\"lag_max_s\":${P[$ph,lag_max_${n}${PEER[$n]}]},\"rounds\":${P[$ph,rounds_${n}${PEER[$n]}]}}"
    }
    phase_json() { # PHASE NODES...
        local ph=$1 n sep="" d=""
        shift
        for n in "$@"; do d+="$sep$(dir_json "$ph" "$n")"; sep=","; done
        echo "{\"directions\":[$d],\"keeps_up\":${P[$ph,keeps_up]},\"conflicts\":${P[$ph,conflicts]},\"conflicts_on_sequence_keys\":${P[$ph,seq_conflicts]},\"conflicts_by_node\":{\"a\":{\"total\":${P[$ph,conflicts_a]},\"tables\":\"${P[$ph,conflict_tables_a]}\"},\"b\":{\"total\":${P[$ph,conflicts_b]},\"tables\":\"${P[$ph,conflict_tables_b]}\"}},\"cpu_cores\":$(cpu_json "${P[$ph,cpu]}"),\"daemon_rss_hwm_kib\":${P[$ph,hwm]}}"
    }
    reps() { # KIND
        local i sep="" o=""
        for ((i = 1; i <= REPEAT; i++)); do read -r w s r c <<<"${X[$1,$i]}"; o+="$sep{\"wall_s\":$w,\"exchange_s\":$s,\"rows\":$r,\"conflicts\":$c}"; sep=","; done
        echo "[$o]"
    }
    stops=""; for s in "${STOP_RCS[@]}"; do stops+="${stops:+,}$s"; done
    j="{\"postgresql\":\"$PG_VERSION\",\"cpus\":$CPUS,\"loadavg_start\":\"$LOAD_START\",\"loadavg_end\":\"$LOAD_END\",\"workload\":\"$WORKLOAD\""
    j+=",\"pgbench\":{\"scale\":$SCALE,\"rate_per_node\":$RATE,\"duration_s\":$DURATION,\"clients\":$CLIENTS,\"jobs\":$JOBS,\"max_tries\":$MAX_TRIES},\"poll_interval\":\"$POLL_INTERVAL\",\"keepup_drain_s\":$KEEPUP_DRAIN"
    j+=",\"oneway\":$(phase_json oneway a),\"twoway\":$(phase_json twoway a b)"
    j+=",\"throughput\":{\"oneway_tps\":$TOTAL_ONEWAY,\"twoway_tps_total\":$TOTAL_TWOWAY,\"ratio\":$(ratio "$TOTAL_TWOWAY" "$TOTAL_ONEWAY")}"
    j+=",\"first_exchange_wall_s\":$FIRST_WALL,\"final_exchange\":{\"wall_s\":$FINAL_WALL,\"exchange_s\":$FINAL_S,\"rows\":$FINAL_ROWS,\"conflicts\":$FINAL_CONFLICTS}"
    j+=",\"conflict_cost\":{\"rows\":$CONFLICTS,\"repeat\":$REPEAT,\"plain\":$(reps plain),\"conflict\":$(reps conflict)"
    j+=",\"median_exchange_s\":{\"plain\":${M[plain,s]},\"conflict\":${M[conflict,s]}},\"median_wall_s\":{\"plain\":${M[plain,wall]},\"conflict\":${M[conflict,wall]}}"
    j+=",\"extra_us_per_conflicting_row\":$PER_ROW_US,\"extra_us_per_conflicting_row_wall\":$PER_ROW_WALL_US,\"ratio\":$COST_RATIO}"
    j+=",\"sigterm_exit_codes\":[$stops],\"checksums\":{\"after_twoway\":\"$CHECK_TWOWAY\",\"end\":\"$CHECK_END\"}"
    [[ -z $HOT_NOTE ]] || j+=",\"note\":\"$HOT_NOTE\""
    [[ -z $LOST_NOTE ]] || j+=",\"lost_note\":\"$LOST_NOTE\""
    [[ -z $SEQ_NOTE ]] || j+=",\"sequence_note\":\"$SEQ_NOTE\""
    j+=",\"pgbench_duplicate_key_errors\":$DUP_ERRORS"
    j+=",\"lat_rows_lost\":$LOST"
    echo "$j}"
else
    echo "two-way benchmark, PostgreSQL $PG_VERSION, workload $WORKLOAD, pgbench scale $SCALE, -R $RATE per writing node, $DURATION s, -c $CLIENTS -j $JOBS, --max-tries $MAX_TRIES"
    echo "host: $CPUS CPUs shared by pgbench, both servers and the daemon; load average at start $LOAD_START, at end $LOAD_END"
    echo
    echo "throughput and commit-to-peer latency (ms from the workload's t0 to the peer's commit of the row)"
    printf '%-8s %-6s %7s %6s %5s %6s %7s | %8s %8s %8s %8s | %7s %7s %6s | %s\n' phase dir tps txns lost failed retried p50 p95 p99 max drain_s lag_max rounds keeps_up
    for spec in "oneway a" "twoway a" "twoway b"; do
        read -r ph n <<<"$spec"
        k=""; [[ $spec == "oneway a" || $spec == "twoway a" ]] && k=${P[$ph,keeps_up]}
        d="${n}${PEER[$n]}"
        printf '%-8s %-6s %7.1f %6s %5s %6s %7s | %8s %8s %8s %8s | %7s %7s %6s | %s\n' "$ph" "$n->${PEER[$n]}" "${P[$ph,tps_$n]}" "${P[$ph,processed_$n]}" \
            "${P[$ph,lost_$n]}" "${P[$ph,failed_$n]}" "${P[$ph,retried_$n]}" "${P[$ph,p50_$n]}" "${P[$ph,p95_$n]}" "${P[$ph,p99_$n]}" "${P[$ph,max_$n]}" \
            "${P[$ph,drain_$n]}" "${P[$ph,lag_max_$d]}" "${P[$ph,rounds_$d]}" "$k"
    done
    echo "  tps, txns: each node's pgbench; lost: committed lat rows of those transactions missing at the end (an insert/insert"
    echo "  conflict with the peer's row of the same key); failed/retried: pgbench's failed transactions and those retried after a deadlock"
    echo "  drain_s: from the end of pgbench until a marker committed then is on the peer; lag_max: pgferry_lag_seconds (sampled each second)"
    echo "  keeps up = every direction drained within $KEEPUP_DRAIN s, -R $RATE reached (95%) on every node, no failed transaction"
    echo "throughput: one-way $(printf %.1f "$TOTAL_ONEWAY") TPS (a only), two-way $TOTAL_TWOWAY TPS (a + b): ratio $(ratio "$TOTAL_TWOWAY" "$TOTAL_ONEWAY")"
    echo "conflicts decided during the two-way phase: ${P[twoway,conflicts]} (recorded on a: ${P[twoway,conflicts_a]}${P[twoway,conflict_tables_a]:+ (${P[twoway,conflict_tables_a]})}; on b: ${P[twoway,conflicts_b]}${P[twoway,conflict_tables_b]:+ (${P[twoway,conflict_tables_b]})})"
    echo "final exchange after the daemon stopped: $FINAL_ROWS rows, $FINAL_CONFLICTS conflicts in $FINAL_S s; checksums of every table: $CHECK_TWOWAY"
    [[ -z $HOT_NOTE ]] || echo "NOTE: $HOT_NOTE"
    [[ -z $LOST_NOTE ]] || echo "LOST ROWS: $LOST_NOTE"
    [[ -z $SEQ_NOTE ]] || echo "SEQUENCES COLLIDED: $SEQ_NOTE"
    for spec in "oneway a" "twoway a" "twoway b"; do
        read -r ph n <<<"$spec"
        [[ ${P[$ph,aborted_$n]} == false ]] || echo "pgbench on $n aborted in the $ph phase: ${P[$ph,error_$n]}"
    done
    echo
    echo "CPU busy during each phase, in cores (of $CPUS)"
    printf '%-8s %8s %6s %6s %7s %8s %6s\n' phase machine a b daemon pgbench other
    for ph in oneway twoway; do read -r c1 c2 c3 c4 c5 c6 <<<"${P[$ph,cpu]}"; printf '%-8s %8s %6s %6s %7s %8s %6s\n' "$ph" "$c1" "$c2" "$c3" "$c4" "$c5" "$c6"; done
    echo "  other: machine - servers - daemon - pgbench (this script's sampling, and anything else running: noise)"
    echo
    echo "conflict cost: one pgferry sync --node a --node b --conflict latest --once after $CONFLICTS accounts updated on each node ($REPEAT pairs, alternating order)"
    printf '%-9s %-28s %-28s %10s %10s %10s\n' kind exchange_s wall_s median_s median_wall conflicts
    for k in plain conflict; do
        printf '%-9s %-28s %-28s %10s %10s %10s\n' "$k" "$(col_of "$k" 2 | xargs | tr ' ' ',')" "$(col_of "$k" 1 | xargs | tr ' ' ',')" "${M[$k,s]}" "${M[$k,wall]}" "${M[$k,conflicts]}"
    done
    echo "  plain: rows 1..$CONFLICTS changed on a, $((CONFLICTS + 1))..$((2 * CONFLICTS)) on b; conflict: rows 1..$CONFLICTS changed on both"
    echo "extra per conflicting row: $PER_ROW_US us (exchange time; $PER_ROW_WALL_US us by wall time); conflict / plain: $COST_RATIO"
    echo
    echo "daemon peak RSS (VmHWM): one-way ${P[oneway,hwm]} KiB, two-way ${P[twoway,hwm]} KiB; exit codes after SIGTERM: ${STOP_RCS[*]}"
    echo "checksums of every table, a vs b: after the two-way phase $CHECK_TWOWAY, at the end $CHECK_END"
fi
if [[ -n $KEEP ]]; then
    mkdir -p "$KEEP"
    cp "$W"/*.samples "$W"/*.log "$W"/*.cpu "$W"/exchanges.json "$KEEP"/ 2>/dev/null || true
    for n in a b; do cp "$W/$n/data/server.log" "$KEEP/server-$n.log" 2>/dev/null || true; done
    echo "*.samples columns: seconds_since_start lag_a_to_b lag_b_to_a rounds_a_to_b rounds_b_to_a" >"$KEEP/columns.txt"
    log "samples, pgbench and daemon logs copied to $KEEP"
fi
[[ $OVERALL == equal ]] || { log "checksums differ"; exit 1; }
((LOST == 0)) || { log "committed rows were lost"; exit 1; }
[[ -z $SEQ_NOTE ]] || { log "sequence values collided"; exit 1; }
