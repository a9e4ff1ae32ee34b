#!/usr/bin/env bash
# Initial copy benchmark: pgferry copy (--jobs 1 and 2) against pg_dump | pg_restore of the same
# tables (one stream, and directory format with 2 jobs on each side), and against pgcopydb when
# it is installed; data only, into the same pre-created schema (keys and indexes in place, as
# pgferry copy requires), measured in one run.
#
# Workload (throwaway PostgreSQL 15 clusters on this machine, default durability):
#   events(id bigint primary key, account_id int, kind text, payload jsonb, amount numeric(12,2),
#          created_at timestamptz) with ROWS rows (default 1,000,000, about 200 MB), and
#   pgbench -i -s SCALE (default 10: 1,000,000 pgbench_accounts rows, about 130 MB);
#   capture installed on the source (pgbench_history has no key and is empty: left out).
# Every method starts from empty target tables after a CHECKPOINT on both sides, and its result
# is checked (row count and a hash of every row, per table, against the source; a difference
# fails the run, exit 1). Methods run in the order given by METHODS, ROUNDS times (alternating
# the order on even rounds), and the best time of each is reported with the ratio to pgferry
# copy --jobs 2.
#
# Usage: bench/copy.sh [--json]
# Env: ROWS, SCALE, ROUNDS (default 1), METHODS (default "pgferry1 pgferry2 dump dumpdir
#      pgcopydb"), COPY_ARGS (more flags for pgferry copy, e.g. "--split-tables-larger-than 0"),
#      PGFERRY_BIN, PG_BIN, JSON=1
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options copy "$@"
ROWS=${ROWS:-1000000}
SCALE=${SCALE:-10}
ROUNDS=${ROUNDS:-1}
METHODS=${METHODS:-"pgferry1 pgferry2 dump dumpdir pgcopydb"}
COPY_ARGS=${COPY_ARGS:-}
log() { printf '%s\n' "$*" >&2; }
. "$root/scripts/lib/throwaway-pg.sh"
bench_pgferry
CLIENT_BIN=/usr/lib/postgresql/15/bin
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

log "starting clusters"
conf=("shared_buffers=512MB" "max_wal_size=4GB" "checkpoint_timeout=30min" "max_connections=50")
pg_throwaway src "${conf[@]}"
pg_throwaway dst "${conf[@]}"
S="$DSN_src dbname=app"; T="$DSN_dst dbname=app"
SU="postgresql://postgres@127.0.0.1:$PORT_src/app"; TU="postgresql://postgres@127.0.0.1:$PORT_dst/app"
for d in "$DSN_src" "$DSN_dst"; do psql -X -q "$d dbname=postgres" -c "CREATE DATABASE app"; done
TABLES=(public.events public.pgbench_accounts public.pgbench_branches public.pgbench_tellers)
log "loading $ROWS events rows and pgbench scale $SCALE on the source"
psql -X -q "$S" -c "CREATE TABLE events (id bigint PRIMARY KEY, account_id int, kind text, payload jsonb, amount numeric(12,2), created_at timestamptz)" \
    -c "INSERT INTO events SELECT g, g % 5000, (ARRAY['signup','order','refund'])[1 + g % 3],
          jsonb_build_object('n', g, 's', md5(g::text)), (g % 10000) / 100.0,
          '2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, $ROWS) g"
"$CLIENT_BIN/pgbench" -i -s "$SCALE" -q "$S" >/dev/null 2>&1
psql -X -q "$S" -c "VACUUM ANALYZE"
"$PGFERRY_BIN" install --source "$S" --exclude public.pgbench_history >/dev/null
"$CLIENT_BIN/pg_dump" --schema-only --no-owner --exclude-schema=pgferry "${TABLES[@]/#/--table=}" "$S" \
    | grep -v 'EXECUTE FUNCTION pgferry\.' | psql -X -q -v ON_ERROR_STOP=1 "$T" >/dev/null
size=$(psql -X -At "$S" -c "SELECT sum(pg_table_size(c))::bigint FROM unnest(ARRAY['$(IFS=,; echo "${TABLES[*]}" | sed "s/,/','/g")']::regclass[]) c")
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
log "tables to copy: $(mib "$size") MiB on the source (heap and TOAST, without indexes)"

# Per table: rows and a hash of every row's text, summed (order-independent).
check() {
    local t out=""
    for t in "${TABLES[@]}"; do
        out+="$t $(psql -X -At "$1" -c "SELECT count(*) || ' ' || coalesce(sum(hashtext(r::text)::bigint), 0) FROM $t r") "
    done
    echo "$out"
}
expected=$(check "$S")
empty_target() {
    psql -X -q "$T" -c "TRUNCATE $(IFS=,; echo "${TABLES[*]}")" -c "CHECKPOINT"
    psql -X -q "$S" -c "CHECKPOINT"
}
filters="$_PG_BASE/filters.ini"
{ echo "[include-only-table]"; for t in "${TABLES[@]}"; do echo "$t"; done; } > "$filters"
has_pgcopydb=0; command -v pgcopydb >/dev/null && has_pgcopydb=1

run_method() { # $1: method; prints seconds
    local m=$1 t0 t1 dir
    case $m in
        pgferry1 | pgferry2)
            t0=$(now)
            "$PGFERRY_BIN" copy --source "$S" --target "$T" --jobs "${m#pgferry}" --truncate --json $COPY_ARGS > "$_PG_BASE/$m.json"
            t1=$(now) ;;
        dump)
            t0=$(now)
            "$CLIENT_BIN/pg_dump" -Fc --data-only "${TABLES[@]/#/--table=}" "$S" \
                | "$CLIENT_BIN/pg_restore" --data-only --exit-on-error --disable-triggers -d "$T"
            t1=$(now) ;;
        dumpdir)
            dir="$_PG_BASE/dumpdir"; rm -rf "$dir"
            t0=$(now)
            "$CLIENT_BIN/pg_dump" -Fd -j 2 --data-only "${TABLES[@]/#/--table=}" -f "$dir" "$S"
            "$CLIENT_BIN/pg_restore" -j 2 --data-only --exit-on-error --disable-triggers -d "$T" "$dir"
            t1=$(now) ;;
        pgcopydb)
            dir="$_PG_BASE/pgcopydb"; rm -rf "$dir"
            t0=$(now)
            pgcopydb copy table-data --source "$SU" --target "$TU" --table-jobs 2 --dir "$dir" \
                --filters "$filters" >"$_PG_BASE/pgcopydb.log" 2>&1 \
                || { tail -20 "$_PG_BASE/pgcopydb.log" >&2; exit 1; }
            t1=$(now) ;;
    esac
    elapsed "$t0" "$t1"
}

declare -A best
order=($METHODS)
for ((round = 1; round <= ROUNDS; round++)); do
    list=("${order[@]}")
    if ((round % 2 == 0)); then
        list=(); for ((i = ${#order[@]} - 1; i >= 0; i--)); do list+=("${order[$i]}"); done
    fi
    for m in "${list[@]}"; do
        if [ "$m" = pgcopydb ] && [ "$has_pgcopydb" = 0 ]; then continue; fi
        empty_target
        log "round $round: $m (load: $(cut -d' ' -f1-3 /proc/loadavg))"
        s=$(run_method "$m")
        got=$(check "$T")
        [ "$got" = "$expected" ] || { log "$m: the target differs from the source"; log "source: $expected"; log "target: $got"; exit 1; }
        log "  $s s"
        if [ -z "${best[$m]:-}" ] || awk -v a="$s" -v b="${best[$m]}" 'BEGIN { exit !(a < b) }'; then best[$m]=$s; fi
    done
done

label() {
    case $1 in
        pgferry1) echo "pgferry copy --jobs 1" ;;
        pgferry2) echo "pgferry copy --jobs 2" ;;
        dump) echo "pg_dump -Fc | pg_restore" ;;
        dumpdir) echo "pg_dump -Fd -j2 + pg_restore -j2" ;;
        pgcopydb) echo "pgcopydb copy table-data --table-jobs 2" ;;
    esac
}
ref=${best[pgferry2]:-${best[pgferry1]:-}}
ver=$(psql -X -At "$S" -c "SHOW server_version")
rows=$(psql -X -At "$S" -c "SELECT (SELECT count(*) FROM events) + (SELECT count(*) FROM pgbench_accounts)")
if [ "$JSON" = 1 ]; then
    printf '{"server_version":"%s","rows":%s,"bytes":%s,"rounds":%s,"seconds":{' "$ver" "$rows" "$size" "$ROUNDS"
    sep=""
    for m in "${order[@]}"; do
        [ -n "${best[$m]:-}" ] || continue
        printf '%s"%s":%s' "$sep" "$m" "${best[$m]}"; sep=","
    done
    printf '},"pgcopydb":%s}\n' "$([ "$has_pgcopydb" = 1 ] && echo true || echo false)"
else
    echo "initial copy benchmark, PostgreSQL $ver, $rows rows in 4 tables, $(mib "$size") MiB, best of $ROUNDS round(s)"
    printf '%-42s %8s %8s %16s\n' "" seconds "MiB/s" "this/pgferry -j2"
    for m in "${order[@]}"; do
        [ -n "${best[$m]:-}" ] || continue
        printf '%-42s %8s %8s %16s\n' "$(label "$m")" "${best[$m]}" \
            "$(awk -v b="$size" -v s="${best[$m]}" 'BEGIN { printf "%.0f", b / 1048576 / s }')" \
            "${ref:+$(awk -v a="${best[$m]}" -v b="$ref" 'BEGIN { printf "%.2f", a / b }')}"
    done
    [ "$has_pgcopydb" = 1 ] || echo "(pgcopydb not installed: apt-get install pgcopydb)"
    echo "every method's result checked equal to the source"
fi
