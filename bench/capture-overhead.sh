#!/usr/bin/env bash
# Capture overhead: what pgferry's capture triggers cost a source database.
#
# In one run, on one throwaway PostgreSQL cluster, measures
#   - pgbench tpcb-like throughput (scale 10, 2 clients, the same duration for every phase),
#   - the time of one bulk statement (UPDATE of 200,000 rows),
# without capture and with capture as shipped (`pgferry install` on every table), and reports
# capture / no-capture ratios. Phases alternate ABBA across rounds so slow drift cancels; an
# unmeasured warm-up runs first, and every phase starts with VACUUM and CHECKPOINT.
#
# pgbench_history has no primary key and pgferry refuses keyless tables, so the script gives it
# one (hid bigserial PRIMARY KEY), as a real user would have to. The output says so.
#
# Usage: bench/capture-overhead.sh [--json]
# Environment:
#   DURATION=30      seconds of pgbench per phase
#   ROUNDS=2         rounds; odd rounds run phases in order, even rounds in reverse (ABBA)
#   VARIANTS=        "notify": also measure capture plus a per-row pg_notify() wake-up trigger
#   STATEMENTS=0     1: also, in every phase, one pgbench client (-M prepared, 8 s) with
#                    pg_stat_statements (loaded into the cluster for this): each write's mean
#                    server time in µs, its triggers included; reported as the least over rounds
#   JSON=1           same as --json: print one JSON object on stdout instead of the table
#   PGFERRY_BIN=     use this pgferry binary instead of `cargo build --release -p pgferry`
#   PG_BIN=/usr/lib/postgresql/15/bin   server binaries (initdb, pg_ctl; pgbench/psql if there)
# Progress goes to stderr; only the result goes to stdout. Run it on a quiet machine.
set -euo pipefail
export LC_ALL=C

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

JSON=${JSON:-0}
for arg in "$@"; do
    case $arg in
        --json) JSON=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "capture-overhead: unknown argument: $arg (try --help)" >&2; exit 2 ;;
    esac
done
[[ $JSON == 1 ]] || JSON=0

DURATION=${DURATION:-30}
ROUNDS=${ROUNDS:-2}
VARIANTS=${VARIANTS:-}
STATEMENTS=${STATEMENTS:-0}
[[ $STATEMENTS == 1 ]] || STATEMENTS=0
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SCALE=10
CLIENTS=2
BULK_ROWS=200000

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "capture-overhead: DURATION must be a positive integer (seconds)" >&2; exit 2; }
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || { echo "capture-overhead: ROUNDS must be a positive integer" >&2; exit 2; }

log() { printf '%s\n' "$*" >&2; }
die() { log "capture-overhead: $*"; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# --- tools ---------------------------------------------------------------------------------
[[ -x $PG_BIN/initdb && -x $PG_BIN/pg_ctl ]] || die "no initdb/pg_ctl in $PG_BIN (set PG_BIN)"
client() { # client tools from PG_BIN when it has them, so versions match; else from PATH
    if [[ -x $PG_BIN/$1 ]]; then echo "$PG_BIN/$1"; else command -v "$1" || die "$1 not found"; fi
}
PSQL=$(client psql)
PGBENCH=$(client pgbench)

if [[ -n ${PGFERRY_BIN:-} ]]; then
    PGFERRY=$PGFERRY_BIN
else
    log "building pgferry (cargo build --release -p pgferry) ..."
    (cd "$ROOT" && cargo build --release -p pgferry >&2)
    PGFERRY=${CARGO_TARGET_DIR:-$ROOT/target}/release/pgferry
fi
[[ -x $PGFERRY ]] || die "pgferry binary not found or not executable: $PGFERRY"

# --- throwaway cluster ---------------------------------------------------------------------
# The server refuses to run as root: when we are root, server commands run as postgres.
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root but there is no postgres user to run the server"
    as_server() { (cd "$WORKDIR" && runuser -u postgres -- "$@"); }
else
    as_server() { (cd "$WORKDIR" && "$@"); }
fi

WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/pgferry-bench.XXXXXX")
PGDATA_DIR=$WORKDIR/data
SERVER_LOG=$WORKDIR/server.log
STARTED=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((rc >= 128)); then
        log "capture-overhead: interrupted; stopping the server and removing $WORKDIR"
    elif [[ $rc != 0 && -f $SERVER_LOG ]]; then
        log "--- last lines of the server log ---"
        tail -n 20 "$SERVER_LOG" >&2 || true
    fi
    if [[ $STARTED == 1 ]]; then
        as_server "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORKDIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
[[ $(id -u) == 0 ]] && chown postgres: "$WORKDIR"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
        echo $((20000 + RANDOM % 20000))
}

log "initialising a PostgreSQL cluster in $WORKDIR ..."
as_server "$PG_BIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >"$WORKDIR/initdb.log" 2>&1 ||
    { cat "$WORKDIR/initdb.log" >&2; die "initdb failed"; }
# Durability stays at the defaults (fsync, synchronous_commit, full_page_writes on): capture
# writes WAL and that cost must show. Memory and checkpoint spacing are raised so that
# checkpoints do not dominate a 30 s phase; every phase starts with an explicit CHECKPOINT.
cat >>"$PGDATA_DIR/postgresql.conf" <<'EOF'

# capture-overhead.sh
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
shared_buffers = 512MB
max_wal_size = 4GB
checkpoint_timeout = 30min
EOF
if [[ $STATEMENTS == 1 ]]; then
    echo "shared_preload_libraries = 'pg_stat_statements'" >>"$PGDATA_DIR/postgresql.conf"
fi

for attempt in 1 2 3; do
    PORT=$(free_port)
    if as_server "$PG_BIN/pg_ctl" -D "$PGDATA_DIR" -l "$SERVER_LOG" -o "-p $PORT" -w -t 60 start >/dev/null 2>&1; then
        STARTED=1
        break
    fi
    log "server did not start on port $PORT (attempt $attempt)"
done
[[ $STARTED == 1 ]] || die "could not start the PostgreSQL server"

unset PGSERVICE PGSERVICEFILE PGOPTIONS PGPASSWORD PGPASSFILE PGSSLMODE PGTARGETSESSIONATTRS PGDATABASE
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGAPPNAME=capture-overhead
DSN="host=127.0.0.1 port=$PORT user=postgres dbname=bench"
sql() { "$PSQL" -X -q -v ON_ERROR_STOP=1 -d bench "$@"; }
sql_value() { "$PSQL" -X -q -A -t -v ON_ERROR_STOP=1 -d bench -c "$1"; }

PG_VERSION=$("$PSQL" -X -A -t -d postgres -c 'SHOW server_version')
PG_VERSION=${PG_VERSION%% *}
log "PostgreSQL $PG_VERSION on 127.0.0.1:$PORT"

# --- data ----------------------------------------------------------------------------------
log "loading: pgbench -i -s $SCALE, bulk table of $BULK_ROWS rows ..."
"$PSQL" -X -q -v ON_ERROR_STOP=1 -d postgres -c 'CREATE DATABASE bench'
"$PGBENCH" -i -s "$SCALE" -q bench >"$WORKDIR/pgbench-init.log" 2>&1 ||
    { cat "$WORKDIR/pgbench-init.log" >&2; die "pgbench -i failed"; }
log "giving pgbench_history a primary key (hid bigserial): pgferry only captures tables with a key"
sql <<EOF
ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY;
CREATE TABLE bulk (id int PRIMARY KEY, v int);
INSERT INTO bulk SELECT g, 0 FROM generate_series(1, $BULK_ROWS) g;
VACUUM ANALYZE;
EOF
if [[ $STATEMENTS == 1 ]]; then sql -c 'CREATE EXTENSION pg_stat_statements'; fi

# --- phases --------------------------------------------------------------------------------
PHASES=(none capture)
[[ $VARIANTS == *notify* ]] && PHASES+=(notify)
declare -A LABEL=([none]="no capture" [capture]="capture" [notify]="capture+notify")
declare -A TPS BULK DELTA_ROWS DELTA_BYTES   # keyed "phase,round"
declare -A STMT_US                           # keyed "phase/statement,round", like the above
STMT_NAMES=(insert_history update_accounts update_tellers update_branches)

# One client, prepared statements, pg_stat_statements reset first: each tpcb-like write's mean
# server time (triggers included) in µs, without the contention of the TPS runs.
measure_statements() { # phase round
    local out rows name us
    sql -c 'VACUUM' -c 'CHECKPOINT' -c 'SELECT pg_stat_statements_reset()' >/dev/null
    out=$("$PGBENCH" -n -b tpcb-like -c 1 -M prepared -T 8 bench 2>&1) ||
        { log "$out"; die "single-client pgbench failed in phase ${LABEL[$1]}"; }
    rows=$(sql_value "SELECT CASE WHEN query LIKE 'INSERT INTO pgbench_history%' THEN 'insert_history'
                                  WHEN query LIKE 'UPDATE pgbench_accounts%' THEN 'update_accounts'
                                  WHEN query LIKE 'UPDATE pgbench_tellers%' THEN 'update_tellers'
                                  ELSE 'update_branches' END
                             || ' ' || round((mean_exec_time * 1000)::numeric, 1)
                        FROM pg_stat_statements
                       WHERE query ~ '^(INSERT INTO pgbench_history|UPDATE pgbench_(accounts|tellers|branches))'")
    while read -r name us; do
        [[ -n $name ]] && STMT_US[$1/$name,$2]=$us
    done <<<"$rows"
    for name in "${STMT_NAMES[@]}"; do
        [[ -n ${STMT_US[$1/$name,$2]:-} ]] || die "pg_stat_statements has no $name in phase ${LABEL[$1]}"
    done
}

NOTIFY_TABLES=(pgbench_accounts pgbench_branches pgbench_tellers pgbench_history bulk)

declare -A PGFERRY_SHOWN
pgferry_run() { # pgferry_run SUBCOMMAND: runs it, shows its output and stops if it fails
    local out rc=0
    out=$("$PGFERRY" "$1" --source "$DSN" 2>&1) || rc=$?
    if [[ $rc != 0 ]]; then
        log "$out"
        die "\`pgferry $1 --source \"$DSN\"\` failed (exit $rc); output above"
    fi
    if [[ -z ${PGFERRY_SHOWN[$1]:-} ]]; then # full output once, then its first line
        PGFERRY_SHOWN[$1]=1
        printf '%s\n' "$out" | sed 's/^/    | /' >&2
    else
        printf '%s\n' "$out" | head -n 1 | sed 's/^/    | /' >&2
    fi
}

setup_phase() {
    case $1 in
        none) ;;
        capture) pgferry_run install ;;
        notify)
            # What a NOTIFY wake-up would have cost (pgferry polls instead): one pg_notify per
            # changed row, on top of capture. Nobody LISTENs, so this is the writers' side only
            # (queueing, and the commit-time lock every NOTIFYing transaction takes).
            pgferry_run install
            {
                echo "CREATE FUNCTION public.bench_notify() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN PERFORM pg_notify('pgferry', ''); RETURN NULL; END \$\$;"
                for t in "${NOTIFY_TABLES[@]}"; do
                    echo "CREATE TRIGGER zz_notify AFTER INSERT OR UPDATE OR DELETE ON $t FOR EACH ROW EXECUTE FUNCTION public.bench_notify();"
                done
            } | sql
            ;;
    esac
}

teardown_phase() { # phase round
    [[ $1 == none ]] && return 0
    local r
    r=$(sql_value "SELECT count(*) || ' ' || pg_total_relation_size('pgferry.delta') FROM pgferry.delta")
    DELTA_ROWS[$1,$2]=${r% *}
    DELTA_BYTES[$1,$2]=${r#* }
    [[ $1 == notify ]] && sql -c 'SET client_min_messages = warning' -c 'DROP FUNCTION public.bench_notify() CASCADE'
    pgferry_run uninstall
}

run_phase() { # phase round
    local phase=$1 round=$2 out tps ms
    log "[round $round/$ROUNDS] ${LABEL[$phase]}"
    setup_phase "$phase"
    # Same starting state for every phase: no dead rows left by the previous one, no pending
    # dirty pages.
    sql -c 'VACUUM' -c 'CHECKPOINT'
    out=$("$PGBENCH" -n -b tpcb-like -c "$CLIENTS" -j "$CLIENTS" -T "$DURATION" bench 2>&1) ||
        { log "$out"; die "pgbench failed in phase ${LABEL[$phase]}"; }
    tps=$(awk '/^tps = / { print $3; exit }' <<<"$out")
    [[ -n $tps ]] || { log "$out"; die "no tps line in the pgbench output"; }
    out=$(sql -c '\timing on' -c 'UPDATE bulk SET v = v + 1' 2>&1) ||
        { log "$out"; die "bulk UPDATE failed in phase ${LABEL[$phase]}"; }
    ms=$(awk '/^Time: / { print $2; exit }' <<<"$out")
    [[ -n $ms ]] || { log "$out"; die "no timing in the psql output"; }
    TPS[$phase,$round]=$tps
    BULK[$phase,$round]=$ms
    if [[ $STATEMENTS == 1 ]]; then measure_statements "$phase" "$round"; fi
    teardown_phase "$phase" "$round"
    local extra=""
    [[ $phase != none ]] && extra=", pgferry.delta ${DELTA_ROWS[$phase,$round]} rows / ${DELTA_BYTES[$phase,$round]} bytes"
    log "    tps $tps, bulk update $ms ms$extra"
}

# Warm-up, not measured: the first writes after loading pay one-off costs (new WAL segments are
# created and zero-filled, later ones are recycled; caches fill) that would otherwise land on
# whichever phase runs first.
WARMUP=$((DURATION < 10 ? DURATION : 10))
log "warm-up: pgbench for $WARMUP s and one bulk update (not measured)"
"$PGBENCH" -n -b tpcb-like -c "$CLIENTS" -j "$CLIENTS" -T "$WARMUP" bench >"$WORKDIR/warmup.log" 2>&1 ||
    { cat "$WORKDIR/warmup.log" >&2; die "warm-up pgbench failed"; }
sql -c 'UPDATE bulk SET v = v + 1'

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")
for ((round = 1; round <= ROUNDS; round++)); do
    if ((round % 2 == 1)); then
        order=("${PHASES[@]}")
    else
        order=()
        for ((i = ${#PHASES[@]} - 1; i >= 0; i--)); do order+=("${PHASES[i]}"); done
    fi
    for phase in "${order[@]}"; do run_phase "$phase" "$round"; done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo "?")

# --- report --------------------------------------------------------------------------------
mean() { # mean ARRAY_NAME phase
    local -n arr=$1
    local r vals=()
    for ((r = 1; r <= ROUNDS; r++)); do vals+=("${arr[$2,$r]}"); done
    awk 'BEGIN { s = 0; for (i = 1; i < ARGC; i++) s += ARGV[i]; printf "%.3f", s / (ARGC - 1) }' "${vals[@]}"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
least() { # least ARRAY_NAME key: the least of the rounds' values
    local -n arr=$1
    local r vals=()
    for ((r = 1; r <= ROUNDS; r++)); do vals+=("${arr[$2,$r]}"); done
    awk 'BEGIN { m = ARGV[1]; for (i = 2; i < ARGC; i++) if (ARGV[i] + 0 < m + 0) m = ARGV[i]; printf "%.1f", m }' "${vals[@]}"
}

declare -A TPS_MEAN BULK_MEAN TPS_RATIO BULK_RATIO DROWS_MEAN DBYTES_MEAN
for p in "${PHASES[@]}"; do
    TPS_MEAN[$p]=$(mean TPS "$p")
    BULK_MEAN[$p]=$(mean BULK "$p")
done
for p in "${PHASES[@]}"; do
    TPS_RATIO[$p]=$(ratio "${TPS_MEAN[$p]}" "${TPS_MEAN[none]}")
    BULK_RATIO[$p]=$(ratio "${BULK_MEAN[$p]}" "${BULK_MEAN[none]}")
    if [[ $p != none ]]; then
        DROWS_MEAN[$p]=$(mean DELTA_ROWS "$p")
        DBYTES_MEAN[$p]=$(mean DELTA_BYTES "$p")
    fi
done
declare -A STMT_LEAST STMT_SUM   # keyed "phase/statement" and "phase"
if [[ $STATEMENTS == 1 ]]; then
    for p in "${PHASES[@]}"; do
        for n in "${STMT_NAMES[@]}"; do STMT_LEAST[$p/$n]=$(least STMT_US "$p/$n"); done
        STMT_SUM[$p]=$(for n in "${STMT_NAMES[@]}"; do echo "${STMT_LEAST[$p/$n]}"; done |
            awk '{ s += $1 } END { printf "%.1f", s }')
    done
fi

if [[ $JSON == 1 ]]; then
    join() { local IFS=,; echo "$*"; }
    phases_json=()
    for p in "${PHASES[@]}"; do
        tps_r=() bulk_r=() drows_r=() dbytes_r=()
        for ((r = 1; r <= ROUNDS; r++)); do
            tps_r+=("${TPS[$p,$r]}")
            bulk_r+=("${BULK[$p,$r]}")
            if [[ $p != none ]]; then
                drows_r+=("${DELTA_ROWS[$p,$r]}")
                dbytes_r+=("${DELTA_BYTES[$p,$r]}")
            fi
        done
        j="\"$p\":{\"label\":\"${LABEL[$p]}\",\"tps\":[$(join "${tps_r[@]}")],\"tps_mean\":${TPS_MEAN[$p]},\"tps_ratio\":${TPS_RATIO[$p]}"
        j+=",\"bulk_update_ms\":[$(join "${bulk_r[@]}")],\"bulk_update_ms_mean\":${BULK_MEAN[$p]},\"bulk_update_ratio\":${BULK_RATIO[$p]}"
        if [[ $p != none ]]; then
            j+=",\"delta_rows\":[$(join "${drows_r[@]}")],\"delta_bytes\":[$(join "${dbytes_r[@]}")]"
        fi
        if [[ $STATEMENTS == 1 ]]; then
            st=()
            for n in "${STMT_NAMES[@]}"; do
                per=()
                for ((r = 1; r <= ROUNDS; r++)); do per+=("${STMT_US[$p/$n,$r]}"); done
                st+=("\"$n\":{\"us\":[$(join "${per[@]}")],\"least_us\":${STMT_LEAST[$p/$n]}}")
            done
            j+=",\"statement_server_us\":{$(join "${st[@]}"),\"sum_least_us\":${STMT_SUM[$p]}}"
        fi
        phases_json+=("$j}")
    done
    printf '{"postgresql":"%s","pgbench":{"script":"tpcb-like","scale":%d,"clients":%d,"jobs":%d,"duration_s":%d},' \
        "$PG_VERSION" "$SCALE" "$CLIENTS" "$CLIENTS" "$DURATION"
    printf '"rounds":%d,"order":"ABBA","bulk_rows":%d,"pgbench_history_key":"hid bigserial primary key (added by the benchmark)",' \
        "$ROUNDS" "$BULK_ROWS"
    printf '"loadavg_start":"%s","loadavg_end":"%s","cpus":%s,"phases":{%s}}\n' \
        "$LOAD_START" "$LOAD_END" "$(nproc 2>/dev/null || echo null)" "$(join "${phases_json[@]}")"
    exit 0
fi

echo "capture overhead, PostgreSQL $PG_VERSION, pgbench tpcb-like scale $SCALE, $CLIENTS clients, $DURATION s x $ROUNDS round(s), ABBA order"
echo "(pgbench_history was given a primary key, hid bigserial, so that pgferry can capture it)"
echo "bulk: UPDATE bulk SET v = v + 1 over $BULK_ROWS rows, one statement"
echo
{
    hdr="phase"
    for ((r = 1; r <= ROUNDS; r++)); do hdr+=" tps(r$r)"; done
    hdr+=" tps(mean) ratio"
    for ((r = 1; r <= ROUNDS; r++)); do hdr+=" bulk_ms(r$r)"; done
    hdr+=" bulk_ms(mean) ratio"
    echo "$hdr"
    for p in "${PHASES[@]}"; do
        line="${LABEL[$p]// /_}"
        for ((r = 1; r <= ROUNDS; r++)); do line+=" $(printf '%.1f' "${TPS[$p,$r]}")"; done
        line+=" $(printf '%.1f %.2f' "${TPS_MEAN[$p]}" "${TPS_RATIO[$p]}")"
        for ((r = 1; r <= ROUNDS; r++)); do line+=" $(printf '%.0f' "${BULK[$p,$r]}")"; done
        line+=" $(printf '%.0f %.2fx' "${BULK_MEAN[$p]}" "${BULK_RATIO[$p]}")"
        echo "$line"
    done
} | awk '
    { n[NR] = NF; for (i = 1; i <= NF; i++) { c[NR, i] = $i; if (length($i) > w[i]) w[i] = length($i) } }
    END {
        for (l = 1; l <= NR; l++) {
            first = c[l, 1]; gsub(/_/, " ", first)
            line = sprintf("%-" w[1] "s", first)
            for (i = 2; i <= n[l]; i++) line = line sprintf("  %" w[i] "s", c[l, i])
            print line
        }
    }'
echo
for p in "${PHASES[@]}"; do
    [[ $p == none ]] && continue
    printf 'pgferry.delta at the end of a %s phase: %.0f rows, %.1f MiB (mean over rounds)\n' \
        "${LABEL[$p]}" "${DROWS_MEAN[$p]}" "$(awk -v b="${DBYTES_MEAN[$p]}" 'BEGIN { print b / 1048576 }')"
done
if [[ $STATEMENTS == 1 ]]; then
    echo
    echo "server time per statement, one client, -M prepared (µs, pg_stat_statements mean_exec_time with triggers; least over rounds)"
    printf '%-16s' phase; printf ' %16s' "${STMT_NAMES[@]}" sum; echo
    for p in "${PHASES[@]}"; do
        printf '%-16s' "${LABEL[$p]}"
        for n in "${STMT_NAMES[@]}"; do printf ' %16s' "${STMT_LEAST[$p/$n]}"; done
        printf ' %16s\n' "${STMT_SUM[$p]}"
    done
fi
echo "ratios: tps = phase mean / no-capture mean (1.00 = no cost); bulk = phase time / no-capture time"
echo "host: $(nproc 2>/dev/null || echo '?') CPUs, load average at start $LOAD_START, at end $LOAD_END (a busy host makes these numbers noisy)"
