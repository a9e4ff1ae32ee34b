#!/usr/bin/env bash
# Cutover benchmark: the write outage of `pgferry cutover` while pgbench writes at a fixed rate
# until the freeze, with the daemon keeping the target in step beforehand.
#
# Setup (throwaway PostgreSQL 15 clusters on this machine): pgbench -i -s SCALE (default 10:
# 1,000,000 accounts) on the source, pgbench_history given a bigserial key; pgferry install;
# target add; pg_dump -Fc | pg_restore onto the target; pgferry clean; the daemon started.
# Then for each RATE (default "200 1000") and each count mode (row counts inside the freeze,
# and --no-counts): pgbench -R RATE (tpcb-like, 4 clients) runs for WARM seconds (default 10)
# with the daemon replicating, then `pgferry cutover` runs while pgbench keeps writing; its
# JSON report gives the outage and each step's time. Checksums of every table are compared
# (a difference fails the run), then the source is unfrozen for the next case.
#
# Usage: bench/cutover.sh [--json]     Env: SCALE, RATES, WARM, PGFERRY_BIN, PG_BIN, JSON=1
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options cutover "$@"
SCALE=${SCALE:-10}
RATES=${RATES:-"200 1000"}
WARM=${WARM:-10}
log() { printf '%s\n' "$*" >&2; }
. "$root/scripts/lib/throwaway-pg.sh"
bench_pgferry
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"; _pg_cleanup' EXIT

log "starting clusters"
conf=("shared_buffers=256MB" "max_wal_size=4GB" "checkpoint_timeout=30min")
pg_throwaway src "${conf[@]}"
pg_throwaway dst "${conf[@]}"
S="$DSN_src dbname=app"; T="$DSN_dst dbname=app"
for d in "$DSN_src" "$DSN_dst"; do psql -X -q "$d dbname=postgres" -c "CREATE DATABASE app"; done
log "pgbench -i -s $SCALE on the source"
pgbench -i -s "$SCALE" -q "$S" >/dev/null 2>&1
psql -X -q "$S" -c "ALTER TABLE pgbench_history ADD COLUMN id bigserial PRIMARY KEY" -c "VACUUM ANALYZE"
"$PGFERRY_BIN" install --source "$S" >/dev/null
"$PGFERRY_BIN" target add --source "$S" --target "$T" >/dev/null
log "pg_dump | pg_restore onto the target, clean"
pg_dump -Fc "$S" | pg_restore --no-owner -d "$T"
"$PGFERRY_BIN" clean --db "$T" --watch 0.2 >/dev/null
"$PGFERRY_BIN" sync --source "$S" --target "$T" --once >/dev/null

digest() {
    psql -X -At "$1" -c "SELECT string_agg(t || ' ' || n || ' ' || h, ' ' ORDER BY t) FROM (
        SELECT 'a' t, count(*) n, sum(hashtext(a::text)) h FROM pgbench_accounts a
        UNION ALL SELECT 'b', count(*), sum(hashtext(b::text)) FROM pgbench_branches b
        UNION ALL SELECT 't', count(*), sum(hashtext(x::text)) FROM pgbench_tellers x
        UNION ALL SELECT 'h', count(*), sum(hashtext(h::text)) FROM pgbench_history h) s"
}

results=()
for rate in $RATES; do
    for counts in counts no-counts; do
        flags=(); [ "$counts" = no-counts ] && flags=(--no-counts)
        "$PGFERRY_BIN" run --source "$S" --target "$T" --poll-interval 50ms >"$work/daemon.log" 2>&1 &
        daemon=$!
        pgbench -n -c 4 -j 2 -R "$rate" -T 600 "$S" >"$work/pgbench.log" 2>&1 &
        bench=$!
        sleep "$WARM"
        log "rate $rate/s, $counts: cutover"
        "$PGFERRY_BIN" cutover --source "$S" --target "$T" --json "${flags[@]}" >"$work/cutover.json" || {
            cat "$work/cutover.json" >&2; exit 1; }
        kill "$bench" 2>/dev/null || true; wait "$bench" 2>/dev/null || true
        kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true
        a=$(digest "$S"); b=$(digest "$T")
        if [ "$a" != "$b" ]; then log "checksums differ after the cutover: $a / $b"; exit 1; fi
        summary=$(python3 - "$work/cutover.json" "$rate" "$counts" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
steps = {s["step"]: s["seconds"] for s in r["steps"] if s["in_outage"]}
t = r["targets"][0]
print(json.dumps({"rate": int(sys.argv[2]), "counts": sys.argv[3] == "counts",
                  "outage_seconds": round(r["outage_seconds"], 3),
                  "final_round_changes": t["final_changes"], "final_round_rows": t["final_rows"],
                  "lag_at_start_seconds": round(t["lag_seconds"], 3),
                  "outage_steps": {k: round(v, 3) for k, v in steps.items()}}))
PY
)
        results+=("$summary")
        log "  $summary"
        # Back to the start: the source writable and replicating again, the target re-registered.
        "$PGFERRY_BIN" unfreeze --source "$S" >/dev/null
        psql -X -q "$S" -c "DELETE FROM pgferry.target"
        "$PGFERRY_BIN" target add --source "$S" --target "$T" >/dev/null
        "$PGFERRY_BIN" sync --source "$S" --target "$T" --once >/dev/null
    done
done

if [ "$JSON" = 1 ]; then
    printf '{"scale": %s, "warm_seconds": %s, "runs": [%s]}\n' "$SCALE" "$WARM" "$(IFS=,; echo "${results[*]}")"
else
    printf '%-6s %-10s %10s %14s %12s  %s\n' rate counts outage_s final_changes lag_start_s "outage steps (s)"
    for r in "${results[@]}"; do
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("%-6d %-10s %10.3f %14d %12.3f  %s" % (r["rate"], "yes" if r["counts"] else "no", r["outage_seconds"], r["final_round_changes"], r["lag_at_start_seconds"], " ".join("%s=%.3f" % kv for kv in r["outage_steps"].items())))' "$r"
    done
fi
