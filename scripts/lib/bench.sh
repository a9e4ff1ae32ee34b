# Shared by the benchmarks in bench/: their command-line options and the pgferry binary.
# Source it after setting `root` (the repository).

# bench_options NAME ARGS...: `--json` sets JSON=1 (JSON may also come from the environment),
# `-h`/`--help` prints the script's header comment, anything else is a usage error (exit 2).
bench_options() {
    local name=$1 arg
    shift
    JSON=${JSON:-0}
    for arg in "$@"; do
        case $arg in
            --json) JSON=1 ;;
            -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
            *) echo "$name: unknown argument: $arg (try --help)" >&2; exit 2 ;;
        esac
    done
}

# bench_pgferry: sets PGFERRY_BIN, building pgferry in release mode unless it was given.
bench_pgferry() {
    if [[ -z ${PGFERRY_BIN:-} ]]; then
        echo "building pgferry (cargo build --release -p pgferry)" >&2
        (cd "$root" && cargo build --release -q -p pgferry >&2)
        PGFERRY_BIN=${CARGO_TARGET_DIR:-$root/target}/release/pgferry
    fi
}

# For benchmarks that start the daemon (pid in DAEMON_PID) and a sampler (SAMPLER_PID); each
# does nothing when its pid is empty.
stop_sampler() {
    if [[ -n ${SAMPLER_PID:-} ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
        SAMPLER_PID=""
    fi
}
stop_daemon() { # SIGTERM, then up to 15 s for a clean stop; sets DAEMON_RC
    DAEMON_RC=""
    [[ -n ${DAEMON_PID:-} ]] || return 0
    kill -TERM "$DAEMON_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 150; i++)); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$DAEMON_PID" 2>/dev/null && kill -KILL "$DAEMON_PID" 2>/dev/null
    DAEMON_RC=0
    wait "$DAEMON_PID" 2>/dev/null || DAEMON_RC=$?
    DAEMON_PID=""
}
