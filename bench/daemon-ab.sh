#!/usr/bin/env bash
# Daemon A/B: two (or more) pgferry binaries, each running `pgferry run` in turn on the same pair
# of clusters, interleaved and repeated, so that a shared machine's drift lands on every binary
# alike. Shorter and narrower than bench/daemon.sh: it measures, per run, what a change to the
# daemon's rounds moves:
#   - the TPS pgbench reached (fixed rate RATE, or `max` for full speed, or 0 for an idle source);
#   - rounds per second (from /metrics) and source transactions per second (pg_stat_database,
#     pgbench's included);
#   - CPU in cores of the daemon's sessions on the source, of its sessions on the target, and of
#     the daemon process (from /proc), and of the whole machine (its busy time: other work shows
#     here);
#   - commit-to-target latency p50/p99 of the run's `lat` rows (target commit timestamp - t0,
#     written by the workload as its last statement, as in bench/daemon.sh).
# Before each run the capture table is vacuumed, so that no run inherits another's dead rows.
#
# Usage: bench/daemon-ab.sh NAME=BINARY [NAME=BINARY]...
#   e.g. bench/daemon-ab.sh before=/tmp/pgferry-old after=target/release/pgferry
#   BINARY `none`: the same run with no daemon (capture only: what the triggers alone cost).
# Environment:
#   RATE=200       pgbench -R (transactions/s); `max` = no -R; 0 = no pgbench (idle cost)
#   DURATION=10    seconds of each run
#   REPEAT=3       runs per binary, interleaved (A B A B ...)
#   SCALE=10       pgbench scale
#   FSYNC=on       `off` takes the disk out of the comparison (a shared, busy disk makes commit
#                  times, not pgferry, the measurement); say so with the figures
#   PG_BIN=/usr/lib/postgresql/15/bin
# Output: one line per run on stdout, progress on stderr. Needs bash, awk, bc, curl, python3,
# runuser (as root).
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
RATE=${RATE:-200}
DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
SCALE=${SCALE:-10}
FSYNC=${FSYNC:-on}
[[ $# -ge 1 ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2; }
declare -a NAMES BINS
for arg in "$@"; do
    [[ $arg == *=* ]] || { echo "daemon-ab: expected NAME=BINARY, got $arg" >&2; exit 2; }
    NAMES+=("${arg%%=*}"); BINS+=("${arg#*=}")
    [[ ${arg#*=} == none || -x ${arg#*=} ]] || { echo "daemon-ab: not executable: ${arg#*=}" >&2; exit 2; }
done
[[ $RATE == max || $RATE =~ ^[0-9]+$ ]] || { echo "daemon-ab: RATE must be a number or max" >&2; exit 2; }
for v in DURATION REPEAT SCALE; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "daemon-ab: $v must be a positive integer" >&2; exit 2; }
done

log() { printf '%s\n' "$*" >&2; }
. "$root/scripts/lib/throwaway-pg.sh"
W=$_PG_BASE
PSQL=$PG_BIN/psql PGBENCH=$PG_BIN/pgbench
q() { "$PSQL" -X -q -At -v ON_ERROR_STOP=1 "$1" -c "$2"; }
DAEMON_PID=""
on_exit() {
    local rc=$?
    trap - EXIT
    if [[ -n $DAEMON_PID ]]; then kill "$DAEMON_PID" 2>/dev/null || true; wait "$DAEMON_PID" 2>/dev/null || true; fi
    _pg_cleanup
    exit "$rc"
}
trap on_exit EXIT

log "starting source and target (fsync=$FSYNC), loading pgbench -i -s $SCALE"
conf=("shared_buffers=256MB" "max_wal_size=4GB" "checkpoint_timeout=30min" "fsync=$FSYNC")
pg_throwaway src "${conf[@]}"
pg_throwaway dst "${conf[@]}" "track_commit_timestamp=on"
S="$DSN_src dbname=bench"; T="$DSN_dst dbname=bench"
for d in "$DSN_src" "$DSN_dst"; do q "$d dbname=postgres" "CREATE DATABASE bench"; done
for d in "$S" "$T"; do
    "$PGBENCH" -i -s "$SCALE" -q "$d" >"$W/init.log" 2>&1 || { cat "$W/init.log" >&2; exit 1; }
    q "$d" "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY"
done
q "$S" "CREATE TABLE lat (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL)"
q "$T" "CREATE TABLE lat (id bigserial PRIMARY KEY, t0 timestamptz NOT NULL)"
for d in "$S" "$T"; do q "$d" "VACUUM ANALYZE"; done
INSTALLER=
for b in "${BINS[@]}"; do [[ $b == none ]] || { INSTALLER=$b; break; }; done
[[ -n $INSTALLER ]] || { echo "daemon-ab: at least one BINARY must be a pgferry" >&2; exit 2; }
"$INSTALLER" install --source "$S" >"$W/install.log" 2>&1 || { cat "$W/install.log" >&2; exit 1; }
cp "$root/bench/lat.sql" "$W/lat.sql"
MPORT=$(_pg_free_port)
ticks() { { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v pids=" $1 " 'index(pids, " " $1 " ") { s += $14 + $15 } END { print s + 0 }'; }
machine() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
rounds() { curl -s --max-time 1 "127.0.0.1:$MPORT/metrics" | awk '/^pgferry_rounds_total[{ ]/ { r = $NF } END { print r + 0 }'; }
xacts() { q "$S" "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"; }
HZ=$(getconf CLK_TCK)
cores() { echo "scale=3; ($2 - $1) / $HZ / $DURATION" | bc; }

run() { # NAME BINARY -> one line
    local name=$1 bin=$2 i
    q "$S" "VACUUM pgferry.delta"
    if [[ $bin == none ]]; then
        run_alone "$name"
        return
    fi
    "$bin" run --source "$S" --target "$T" --metrics "127.0.0.1:$MPORT" >>"$W/daemon-$name.log" 2>&1 &
    DAEMON_PID=$!
    for ((i = 0; i < 300; i++)); do
        curl -sf --max-time 1 "127.0.0.1:$MPORT/healthz" >/dev/null 2>&1 && break
        kill -0 "$DAEMON_PID" 2>/dev/null || { log "pgferry run ($name) exited"; exit 1; }
        sleep 0.1
    done
    sleep 2
    local spids tpids lo hi x0 x1 r0 r1 a0 a1 b0 b1 c0 c1 m0 m1 tps=0 rr=""
    spids=$(q "$S" "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE application_name LIKE 'pgferry%'")
    tpids=$(q "$T" "SELECT string_agg(pid::text, ' ') FROM pg_stat_activity WHERE application_name LIKE 'pgferry%'")
    lo=$(q "$S" "SELECT coalesce(max(id), 0) FROM lat")
    x0=$(xacts); r0=$(rounds); a0=$(ticks "$spids"); b0=$(ticks "$tpids"); c0=$(ticks "$DAEMON_PID"); m0=$(machine)
    if [[ $RATE == 0 ]]; then
        sleep "$DURATION"
    else
        [[ $RATE == max ]] || rr="-R $RATE"
        # shellcheck disable=SC2086
        tps=$("$PGBENCH" -n -f "$W/lat.sql" -s "$SCALE" $rr -c 4 -j 2 -T "$DURATION" "$S" 2>&1 | awk '/^tps = / { print $3 }')
    fi
    a1=$(ticks "$spids"); b1=$(ticks "$tpids"); c1=$(ticks "$DAEMON_PID"); m1=$(machine); r1=$(rounds); x1=$(xacts)
    hi=$(q "$S" "SELECT coalesce(max(id), 0) FROM lat")
    for ((i = 0; i < 600; i++)); do
        [[ $(q "$T" "SELECT count(*) FROM lat WHERE id = $hi") == 1 || $hi == 0 ]] && break
        sleep 0.1
    done
    local lat
    lat=$(q "$T" "SELECT coalesce(round((percentile_cont(0.5) WITHIN GROUP (ORDER BY ms))::numeric, 1) || ' ' ||
                  round((percentile_cont(0.99) WITHIN GROUP (ORDER BY ms))::numeric, 1), '- -')
                    FROM (SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin) - t0) * 1000 AS ms
                            FROM lat WHERE id > $lo AND id <= $hi) x")
    kill "$DAEMON_PID"; wait "$DAEMON_PID" || true; DAEMON_PID=""
    printf '%-10s tps %6.0f  rounds/s %4d  src_xacts/s %5d  cores: daemon_src %s target %s daemon %s machine %s  lat_ms p50/p99 %s  load %s\n' \
        "$name" "${tps:-0}" $(((${r1%.*} - ${r0%.*}) / DURATION)) $(((x1 - x0) / DURATION)) \
        "$(cores "$a0" "$a1")" "$(cores "$b0" "$b1")" "$(cores "$c0" "$c1")" "$(cores "$m0" "$m1")" "$lat" "$(cut -d' ' -f1 /proc/loadavg)"
}

run_alone() { # NAME: pgbench with capture and no daemon
    local tps=0 rr="" m0 m1 x0 x1
    x0=$(xacts); m0=$(machine)
    if [[ $RATE == 0 ]]; then
        sleep "$DURATION"
    else
        [[ $RATE == max ]] || rr="-R $RATE"
        # shellcheck disable=SC2086
        tps=$("$PGBENCH" -n -f "$W/lat.sql" -s "$SCALE" $rr -c 4 -j 2 -T "$DURATION" "$S" 2>&1 | awk '/^tps = / { print $3 }')
    fi
    m1=$(machine); x1=$(xacts)
    printf '%-10s tps %6.0f  (no daemon)  src_xacts/s %5d  cores: machine %s  load %s\n' \
        "$1" "${tps:-0}" $(((x1 - x0) / DURATION)) "$(cores "$m0" "$m1")" "$(cut -d' ' -f1 /proc/loadavg)"
}

log "runs: ${NAMES[*]} x $REPEAT, RATE=$RATE, ${DURATION}s each; machine: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for ((k = 1; k <= REPEAT; k++)); do
    for i in "${!NAMES[@]}"; do run "${NAMES[$i]}" "${BINS[$i]}"; done
done
log "load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
