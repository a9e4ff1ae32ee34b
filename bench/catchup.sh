#!/usr/bin/env bash
# Catch-up benchmark: pgferry sync --once against a raw COPY of the same rows and against
# PostgreSQL's native logical replication, on the same backlog, measured in one run.
#
# Workload (throwaway PostgreSQL 15 clusters on this machine, default durability; logical
# replication gets a source cluster of its own, without pgferry's triggers, so that neither
# tool decodes or reads the other's work):
#   events(id bigint primary key, account_id int, kind text, payload jsonb, amount numeric(12,2),
#          created_at timestamptz) with ROWS rows (default 1,000,000), equal on both sides;
#   pgbench -i -s 10 on the source (not captured, not replicated: background data only);
#   backlog on the source: 200,000 updates, 200,000 inserts, 50,000 deletes (scaled with ROWS).
# Reports: catch-up wall time and rows/s; raw COPY of the rows the catch-up moved (their final
# state) between the same clusters, and the ratio; logical replication (publication and
# subscription created before the backlog, subscription disabled while it is made, then
# enabled; done when a marker committed after the backlog arrives), and the ratio; pgferry's
# peak RSS at 1x and (RSS10X=1, default) 10x the backlog. Checksums of the whole table are
# compared on all three sides; a difference fails the run (exit 1). Then `pgferry verify` of the
# events table, timed against a plain count(*) on both sides at once.
#
# Usage: bench/catchup.sh [--json]     Env: ROWS, RSS10X=0|1, PGFERRY_BIN, PG_BIN, JSON=1
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options catchup "$@"
ROWS=${ROWS:-1000000}
RSS10X=${RSS10X:-1}
UPD=$((ROWS / 5)); INS=$((ROWS / 5)); DEL=$((ROWS / 20))
log() { printf '%s\n' "$*" >&2; }
. "$root/scripts/lib/throwaway-pg.sh"
bench_pgferry
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

log "starting clusters"
conf=("shared_buffers=512MB" "max_wal_size=4GB" "checkpoint_timeout=30min" "wal_level=logical" "max_replication_slots=4" "max_wal_senders=4")
pg_throwaway src "${conf[@]}"
pg_throwaway dst "${conf[@]}"
pg_throwaway lrsrc "${conf[@]}"
S="$DSN_src dbname=app"; T="$DSN_dst dbname=app"; LS="$DSN_lrsrc dbname=app"; L="$DSN_dst dbname=lr"
for d in "$DSN_src" "$DSN_dst" "$DSN_lrsrc"; do psql -X -q "$d dbname=postgres" -c "CREATE DATABASE app"; done
psql -X -q "$DSN_dst dbname=postgres" -c "CREATE DATABASE lr"
DDL="CREATE TABLE events (id bigint PRIMARY KEY, account_id int, kind text, payload jsonb, amount numeric(12,2), created_at timestamptz);
     CREATE TABLE marker (id int PRIMARY KEY);"
FILL="INSERT INTO events SELECT g, g % 5000, (ARRAY['signup','order','refund'])[1 + g % 3],
        jsonb_build_object('n', g, 's', md5(g::text)), (g % 10000) / 100.0,
        '2026-01-01'::timestamptz + g * interval '1 second' FROM generate_series(1, $ROWS) g"
log "loading $ROWS events rows on each side"
for d in "$S" "$T" "$LS" "$L"; do psql -X -q "$d" -c "$DDL" -c "$FILL" -c "VACUUM ANALYZE events"; done
for d in "$S" "$LS"; do pgbench -i -s 10 -q "$d" >/dev/null 2>&1; done
psql -X -q "$LS" -c "CREATE PUBLICATION bench FOR TABLE events, marker"
psql -X -q "$L" -c "CREATE SUBSCRIPTION bench CONNECTION '$DSN_lrsrc dbname=app' PUBLICATION bench WITH (copy_data = false, enabled = false)"
"$PGFERRY_BIN" install --source "$S" --table public.events >/dev/null
"$PGFERRY_BIN" target add --source "$S" --target "$T" >/dev/null

backlog() { # $1: repetitions of the update, $2: the source
    local reps=$1 src=$2 i
    for ((i = 0; i < reps; i++)); do
        psql -X -q "$src" -c "UPDATE events SET amount = amount + 1, payload = payload || '{\"u\": $i}' WHERE id % 5 = 0 AND id <= $ROWS"
    done
    psql -X -q "$src" -c "INSERT INTO events SELECT g, g % 5000, 'new', jsonb_build_object('n', g), 1, '2026-06-01'::timestamptz
                        FROM generate_series((SELECT max(id) + 1 FROM events), (SELECT max(id) FROM events) + $((INS * reps))) g" \
                    -c "DELETE FROM events WHERE id % 20 = 1 AND id <= $((DEL * 20 * reps))"
}
log "making the backlog: $UPD updates, $INS inserts, $DEL deletes"
backlog 1 "$S"
backlog 1 "$LS"
psql -X -q "$LS" -c "INSERT INTO marker VALUES (1)"
for d in "$S" "$T" "$LS" "$L"; do psql -X -q "$d" -c "CHECKPOINT"; done

log "pgferry sync --once"
t0=$(now)
/usr/bin/time -f '%M' -o "$_PG_BASE/rss1" "$PGFERRY_BIN" sync --source "$S" --target "$T" --once --json > "$_PG_BASE/sync1.json"
t1=$(now); pgferry_s=$(elapsed "$t0" "$t1"); rss1=$(cat "$_PG_BASE/rss1")
moved=$(python3 -c "import json; print(json.load(open('$_PG_BASE/sync1.json'))['rows'])")

log "raw COPY of the same rows (their final state) into an empty table"
psql -X -q "$T" -c "CREATE TABLE events_copy (LIKE events INCLUDING ALL)" -c "CHECKPOINT"
t0=$(now)
psql -X -q "$S" -c "\\copy (SELECT * FROM events WHERE id % 5 = 0 OR id > $ROWS) TO STDOUT" | psql -X -q "$T" -c "\\copy events_copy FROM STDIN"
t1=$(now); copy_s=$(elapsed "$t0" "$t1")

log "logical replication: enable the subscription, wait for the marker"
t0=$(now)
psql -X -q "$L" -c "ALTER SUBSCRIPTION bench ENABLE"
deadline=$(( $(date +%s) + 600 ))
until [ "$(psql -X -At "$L" -c 'SELECT count(*) FROM marker')" = 1 ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { log "logical replication did not finish in 10 minutes"; exit 1; }
    sleep 0.02
done
t1=$(now); lr_s=$(elapsed "$t0" "$t1")
psql -X -q "$L" -c "ALTER SUBSCRIPTION bench DISABLE"

sum() { psql -X -At "$1" -c "SELECT count(*) || ' ' || md5(string_agg(e::text, '|' ORDER BY id)) FROM events e"; }
cs=$(sum "$S"); ct=$(sum "$T"); cls=$(sum "$LS"); cl=$(sum "$L")
ok_p=equal; [ "$cs" = "$ct" ] || ok_p=DIFFERENT
ok_l=equal; [ "$cls" = "$cl" ] || ok_l=DIFFERENT
[ "$cs" = "$cls" ] || { log "the two sources differ: the workload is not deterministic"; exit 1; }

log "pgferry verify against count(*) on both sides"
t0=$(now)
"$PGFERRY_BIN" verify --source "$S" --target "$T" --table public.events --json > "$_PG_BASE/verify.json" \
    || { log "pgferry verify did not find the tables equal"; ok_p=DIFFERENT; }
t1=$(now); verify_s=$(elapsed "$t0" "$t1")
t0=$(now)
psql -X -q -At "$S" -c "SELECT count(*) FROM events" >/dev/null & psql -X -q -At "$T" -c "SELECT count(*) FROM events" >/dev/null; wait
t1=$(now); count_s=$(elapsed "$t0" "$t1")

rss10=""
if [ "$RSS10X" = 1 ]; then
    log "10x backlog for peak memory"
    backlog 10 "$S"
    /usr/bin/time -f '%M' -o "$_PG_BASE/rss10" "$PGFERRY_BIN" sync --source "$S" --target "$T" --once --json > "$_PG_BASE/sync10.json"
    rss10=$(cat "$_PG_BASE/rss10")
    [ "$(sum "$S")" = "$(sum "$T")" ] || ok_p=DIFFERENT
fi

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
rps=$(awk -v r="$moved" -v s="$pgferry_s" 'BEGIN { printf "%.0f", r / s }')
ver=$(psql -X -At "$S" -c "SHOW server_version")
if [ "$JSON" = 1 ]; then
    printf '{"server_version":"%s","rows":%s,"backlog":{"updates":%s,"inserts":%s,"deletes":%s},"pgferry_seconds":%s,"rows_moved":%s,"rows_per_second":%s,"raw_copy_seconds":%s,"ratio_to_raw_copy":%s,"logical_replication_seconds":%s,"ratio_to_logical_replication":%s,"peak_rss_kib_1x":%s,"peak_rss_kib_10x":%s,"checksums":{"pgferry":"%s","logical_replication":"%s"},"verify_seconds":%s,"count_seconds":%s}\n' \
        "$ver" "$ROWS" "$UPD" "$INS" "$DEL" "$pgferry_s" "$moved" "$rps" "$copy_s" "$(ratio "$pgferry_s" "$copy_s")" "$lr_s" "$(ratio "$pgferry_s" "$lr_s")" "$rss1" "${rss10:-null}" "$ok_p" "$ok_l" "$verify_s" "$count_s"
else
    echo "catch-up benchmark, PostgreSQL $ver, events $ROWS rows, backlog $UPD updates + $INS inserts + $DEL deletes"
    printf '%-34s %9s %10s %10s\n' "" seconds rows/s "pgferry/this"
    printf '%-34s %9s %10s\n' "pgferry sync --once" "$pgferry_s" "$rps"
    printf '%-34s %9s %10s %10s\n' "raw COPY of the $moved rows moved" "$copy_s" "" "$(ratio "$pgferry_s" "$copy_s")"
    printf '%-34s %9s %10s %10s\n' "native logical replication" "$lr_s" "" "$(ratio "$pgferry_s" "$lr_s")"
    echo "pgferry peak RSS: 1x $((rss1 / 1024)) MiB${rss10:+, 10x $((rss10 / 1024)) MiB}"
    echo "checksums: pgferry $ok_p, logical replication $ok_l"
    echo "pgferry verify of events: $verify_s s; count(*) on both sides at once: $count_s s (ratio $(ratio "$verify_s" "$count_s"))"
fi
[ "$ok_p" = equal ] && [ "$ok_l" = equal ] || { log "checksums differ"; exit 1; }
