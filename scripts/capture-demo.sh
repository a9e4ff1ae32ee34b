#!/usr/bin/env bash
# pgferry's job so far, end to end on two throwaway local clusters (removed at exit):
# capture on a source, writes captured, pg_dump | pg_restore to a new host, clean the copy.
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
CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id bigint REFERENCES customers, total numeric(12,2));
CREATE TABLE events (id bigint, at date NOT NULL, kind text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
INSERT INTO customers (name) SELECT 'customer ' || g FROM generate_series(1, 1000) g;
INSERT INTO orders (customer_id, total) SELECT 1 + g % 1000, g FROM generate_series(1, 5000) g;
SQL

step "1. start recording changes on the old database"
"$pgferry" install --source "$old"

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

step "done"
cat <<'TXT'
The new database is clean and ready to be registered as a target. Catch-up (pgferry sync) and
cutover arrive with the sync-engine and migration issues; see docs/capture.md for what the
capture records and costs. The clusters are being removed now.
TXT
