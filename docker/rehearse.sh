#!/bin/sh
# The rehearsal's migration, run by the pgferry container of docker-compose.yml: capture on the
# source, the captured tables' schema and rows onto the target, then the daemon with metrics.
# SOURCE and TARGET are DSNs without passwords; the password comes from PGPASSWORD (or a
# passfile), never from a command line.
set -eu
: "${SOURCE:?set SOURCE to the source DSN}" "${TARGET:?set TARGET to the target DSN}"
METRICS="${METRICS:-0.0.0.0:9187}"

# 1. Capture every table of the source (re-running adds only what is new).
pgferry install --source "$SOURCE"

if [ "$(psql -X -q -t -A -d "$TARGET" -c "SELECT to_regclass('pgferry.applied') IS NOT NULL")" = t ]; then
    echo "the target already replicates from the source: straight to the daemon"
else
    # Reserve the target, so that nothing it needs is purged while its copy is made.
    pgferry target add --source "$SOURCE" --target "$TARGET"
    # 2-3. The captured tables' schema, then their rows.
    pgferry schema --source "$SOURCE" --target "$TARGET"
    if pgferry copy --help >/dev/null 2>&1; then
        pgferry copy --source "$SOURCE" --target "$TARGET"
    else
        # A data-only dump taken after install: what it misses, the catch-up brings.
        { echo "SET session_replication_role = replica;"
          pg_dump --data-only --exclude-schema=pgferry -d "$SOURCE"
        } | psql -X -q -v ON_ERROR_STOP=1 -d "$TARGET"
    fi
fi

# 5-7. The daemon: continuous catch-up, metrics on /metrics, health on /healthz.
exec pgferry run --source "$SOURCE" --target "$TARGET" --metrics "$METRICS"
