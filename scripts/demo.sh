#!/usr/bin/env bash
# pgferry's job so far, end to end on two throwaway local clusters (removed at exit):
# capture on a source, writes captured, pg_dump | pg_restore to a new host, clean the copy,
# more writes, catch-up with pgferry sync, and a check that both sides are equal.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
. "$root/scripts/lib/throwaway-pg.sh"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cargo build --release -q -p pgferry --manifest-path "$root/Cargo.toml"
pgferry="$root/target/release/pgferry"

step "starting two throwaway PostgreSQL clusters: old and new"
pg_throwaway old fsync=off
pg_throwaway new fsync=off
old="$DSN_old dbname=shop"; new="$DSN_new dbname=shop"
psql -X -q "$DSN_old dbname=postgres" -c "CREATE DATABASE shop"
psql -X -q "$DSN_new dbname=postgres" -c "CREATE DATABASE shop"
psql -X -q "$old" <<'SQL'
CREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers ON UPDATE CASCADE, total numeric(12,2));
CREATE TABLE events (id bigint, at date NOT NULL, kind text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 1000) g;
INSERT INTO orders (customer_id, total) SELECT 1 + g % 1000, g FROM generate_series(1, 5000) g;
SQL

step "1. start recording changes on the old database, and reserve the new one as a target"
"$pgferry" install --source "$old"
"$pgferry" target add --source "$old" --target "$new"

step "   the application keeps writing"
psql -X -q "$old" -c "UPDATE orders SET total = total + 1 WHERE id <= 100" \
    -c "INSERT INTO events VALUES (1, '2026-11-26', 'signup')" -c "DELETE FROM orders WHERE id > 4990"
psql -X "$old" -c "SELECT op, count(*) AS captured_rows FROM pgferry.delta GROUP BY op ORDER BY op"

step "2-3. dump the old database and restore it on the new one (pg_dump -Fc | pg_restore --no-owner)"
pg_dump -Fc "$old" | pg_restore --no-owner -d "$new"

step "4. strip the replication artifacts that came along (dry run, then for real)"
"$pgferry" clean --db "$new" --dry-run --watch 0.5 | grep -v '^--\|^DROP\|^BEGIN\|^ROLLBACK' || true
"$pgferry" clean --db "$new" --watch 0.5
psql -X -At "$new" -c "SELECT 'orders on the new host: ' || count(*) FROM orders"

step "   meanwhile the application kept writing on the old database"
psql -X -q "$old" -c "INSERT INTO customers (name) SELECT 'late ' || g FROM generate_series(1, 200) g" \
    -c "UPDATE orders SET total = 0 WHERE id % 7 = 0" -c "UPDATE customers SET id = id + 100000 WHERE id = 5" \
    -c "TRUNCATE events_2026" -c "INSERT INTO events VALUES (2, '2026-12-01', 'after truncate')"
"$pgferry" status --source "$old"

step "5-7. catch up the new database with everything since the dump (pgferry sync --once)"
"$pgferry" sync --source "$old" --target "$new" --once

step "   check: every table equal on both sides"
digest() {
    psql -X -At "$1" -c "SELECT md5(string_agg(x, '|' ORDER BY x)) FROM (
        SELECT 'c' || c::text AS x FROM customers c UNION ALL SELECT 'o' || o::text FROM orders o
        UNION ALL SELECT 'e' || e::text FROM events e) s"
}
a=$(digest "$old"); b=$(digest "$new")
echo "old: $a"; echo "new: $b"
[ "$a" = "$b" ] || { echo "DIFFERENT" >&2; exit 1; }
echo "equal"
"$pgferry" verify --source "$old" --target "$new"

step "done"
cat <<'TXT'
The new database caught up with the old one exactly. A real migration keeps it in step with
`pgferry run` (the daemon, docs/daemon.md) until the cutover, then stops the old application's
writers, runs `pgferry sync --once` a last time (seconds), checks with `pgferry verify`, and
starts the new application; a one-command cutover arrives next. See docs/capture.md,
docs/sync.md and docs/daemon.md. The clusters are being removed now.
TXT
