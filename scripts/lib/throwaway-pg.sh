# Throwaway PostgreSQL clusters for scripts (demo, benchmarks). Source it, then:
#   pg_throwaway NAME [postgresql.conf lines...]   starts a cluster; sets PORT_<NAME> and DSN_<NAME>
#   (clusters are stopped with -m immediate and deleted when the script exits, however it exits)
# Env: PG_BIN (default /usr/lib/postgresql/15/bin). As root, the server runs as user postgres.
# The Rust tests use crates/pgferry-testkit instead; this is its shell counterpart.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
_PG_BASE=$(mktemp -d /tmp/pgferry-script.XXXXXX)
chmod 755 "$_PG_BASE"
_PG_DIRS=()

_pg_as_server() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

_pg_cleanup() {
    local d
    for d in "${_PG_DIRS[@]}"; do
        _pg_as_server "$PG_BIN/pg_ctl" -D "$d/data" -m immediate stop >/dev/null 2>&1 || true
    done
    rm -rf "$_PG_BASE"
}
trap _pg_cleanup EXIT
trap 'exit 130' INT TERM

_pg_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_throwaway() {
    local name=$1; shift
    local dir="$_PG_BASE/$name" port
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    _pg_as_server "$PG_BIN/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    port=$(_pg_free_port)
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = ''"
        local line
        for line in "$@"; do echo "$line"; done
    } | _pg_as_server tee -a "$dir/data/postgresql.conf" >/dev/null
    _PG_DIRS+=("$dir")
    _pg_as_server "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 60 start >/dev/null \
        || { tail -20 "$dir/data/server.log" >&2; return 1; }
    printf -v "PORT_$name" '%s' "$port"
    printf -v "DSN_$name" '%s' "host=127.0.0.1 port=$port user=postgres"
}
