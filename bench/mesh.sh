#!/usr/bin/env bash
# Mesh benchmark: what a two-way sync of three nodes pays over one of two for the same changes
# (the provenance a third node keeps, crates/pgferry-sync/src/mesh.rs), in one run.
#
# One throwaway PostgreSQL 15 cluster holds five databases: a two-node mesh (a2, b2) and a
# three-node mesh (a3, b3, c3), each with t(id int primary key, v text, n int) of ROWS rows,
# capture installed, registered by a first exchange (`pgferry sync --node … --conflict latest
# --once`). Then REPEAT times, alternating which mesh goes first: CHANGED rows updated on node a,
# one timed exchange of each mesh (`--json`: the seconds of each direction that moved rows).
# Reported: per direction applying the rows, the median seconds in each mesh, and the extra per
# applied row. At the end every node of each mesh must hold the same rows and the provenance
# tables must be empty (every node has everything).
#
# Usage: bench/mesh.sh [--json]     Env: ROWS (200000), CHANGED (20000), REPEAT (3), PGFERRY_BIN, PG_BIN, JSON=1
set -euo pipefail
export LC_ALL=C
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/bench.sh"
bench_options mesh "$@"
ROWS=${ROWS:-200000}
CHANGED=${CHANGED:-20000}
REPEAT=${REPEAT:-3}
log() { printf '%s\n' "$*" >&2; }
. "$root/scripts/lib/throwaway-pg.sh"
bench_pgferry
work=$(mktemp -d)
trap 'rm -rf "$work"; _pg_cleanup' EXIT

log "starting a cluster"
pg_throwaway mesh "shared_buffers=256MB" "max_wal_size=4GB" "checkpoint_timeout=30min"
dsn() { printf '%s dbname=%s' "$DSN_mesh" "$1"; }
every=$((ROWS / CHANGED))
for db in a2 b2 a3 b3 c3; do
    psql -X -q "$(dsn postgres)" -c "CREATE DATABASE $db"
    psql -X -q "$(dsn "$db")" -c "CREATE TABLE t (id int PRIMARY KEY, v text, n int)" \
        -c "INSERT INTO t SELECT g, 'x', 0 FROM generate_series(1, $ROWS) g" -c "VACUUM ANALYZE t"
    "$PGFERRY_BIN" install --source "$(dsn "$db")" >/dev/null
done
exchange() { # NODES: 2 or 3; prints the JSON report
    local nodes=(--node "a=$(dsn a$1)" --node "b=$(dsn b$1)")
    [ "$1" = 3 ] && nodes+=(--node "c=$(dsn c3)")
    "$PGFERRY_BIN" sync "${nodes[@]}" --conflict latest --once --json 2>"$work/sync.log" || {
        cat "$work/sync.log" >&2; exit 1; }
}
exchange 2 >/dev/null
exchange 3 >/dev/null

declare -A times=([2]="" [3]="")
for rep in $(seq 1 "$REPEAT"); do
    order="2 3"; [ $((rep % 2)) = 0 ] && order="3 2"
    for m in $order; do
        psql -X -q "$(dsn a$m)" -c "UPDATE t SET n = n + 1 WHERE id % $every = $((rep % every))"
        secs=$(exchange "$m" | python3 -c 'import json,sys
r = json.load(sys.stdin)
print(" ".join("%.4f" % d["seconds"] for d in r["directions"] if d["rows"]))')
        log "rep $rep, $m nodes: directions applying rows took $secs s"
        times[$m]="${times[$m]} $secs"
    done
done

for m in 2 3; do
    for node in b c; do
        [ "$m" = 2 ] && [ "$node" = c ] && continue
        a=$(psql -X -At "$(dsn a$m)" -c "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM t")
        o=$(psql -X -At "$(dsn $node$m)" -c "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM t")
        [ "$a" = "$o" ] || { log "node $node of the $m-node mesh differs from a"; exit 1; }
    done
done
left=0
for db in a3 b3 c3; do
    left=$((left + $(psql -X -At "$(dsn "$db")" -c "SELECT count(*) FROM pgferry.row_origin")))
done

python3 - "$CHANGED" "$left" "$JSON" "${times[2]}" "${times[3]}" <<'PY'
import json, statistics, sys
changed, left, as_json = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
two = [float(x) for x in sys.argv[4].split()]
three = [float(x) for x in sys.argv[5].split()]
m2, m3 = statistics.median(two), statistics.median(three)
extra_us = (m3 - m2) / changed * 1e6
r = {"changed_rows": changed, "two_nodes_direction_s": two, "three_nodes_direction_s": three,
     "median_two_s": m2, "median_three_s": m3, "extra_us_per_row": round(extra_us, 1),
     "ratio": round(m3 / m2, 2), "provenance_rows_left": left, "nodes_equal": True}
if as_json:
    print(json.dumps(r))
else:
    print(f"mesh benchmark: {changed} rows updated on a, applied to each other node by one direction")
    print(f"  two nodes:   median {m2:.3f} s per direction ({' '.join('%.3f' % x for x in two)})")
    print(f"  three nodes: median {m3:.3f} s per direction ({' '.join('%.3f' % x for x in three)})")
    print(f"  provenance costs {extra_us:.1f} us per applied row ({m3 / m2:.2f}x); rows left in pgferry.row_origin: {left}; nodes equal")
PY
