#!/usr/bin/env bash
# Benchmark busvisor against dbus-daemon on the same workloads, in one run.
#
#   scripts/bench.sh            full run (about 2-3 minutes)
#   scripts/bench.sh --quick    short, smaller run (for development)
#   scripts/bench.sh --only STR run only the rows whose name contains STR
#
# Builds the release binary and the `bus` bench target, starts
# `target/release/busvisor` and `dbus-daemon --session`, each on a unix
# socket in its own temporary directory, runs benches/bus.rs against both and
# prints the table. Both buses are stopped by PID at the end.
# Environment: CARGO_TARGET_DIR (default: ./target), DBUS_DAEMON (default:
# dbus-daemon from PATH), BUSVISOR_LOG (busvisor's --log-level via RUST_LOG,
# default: busvisor's own default).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DBUS_DAEMON=${DBUS_DAEMON:-dbus-daemon}

BENCH_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) BENCH_ARGS+=(--quick) ;;
        --only) BENCH_ARGS+=(--only "$2"); shift ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# 1,000 idle clients plus the bench's own sockets: both the bench and the
# buses (started from this shell) inherit the raised limit.
ulimit -n 4096 2>/dev/null || ulimit -n "$(ulimit -Hn)"

command -v "$DBUS_DAEMON" >/dev/null || { echo "bench.sh: $DBUS_DAEMON not found (apt-get install dbus-daemon)" >&2; exit 1; }

echo "== building (release)" >&2
cargo build --release --quiet
BENCH_EXE=$(cargo bench --bench bus --no-run --message-format=json 2>/dev/null \
    | grep '"kind":\["bench"\]' \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
[ -x "$BENCH_EXE" ] || { echo "bench.sh: bench executable not found" >&2; exit 1; }
BUSVISOR=$CARGO_TARGET_DIR/release/busvisor

D1=$(mktemp -d /tmp/busvisor-bench.XXXXXX)
D2=$(mktemp -d /tmp/dbus-daemon-bench.XXXXXX)
BV_PID=
DD_PID=
cleanup() {
    [ -n "$BV_PID" ] && kill "$BV_PID" 2>/dev/null && wait "$BV_PID" 2>/dev/null
    [ -n "$DD_PID" ] && kill "$DD_PID" 2>/dev/null && wait "$DD_PID" 2>/dev/null
    rm -rf "$D1" "$D2"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits for the first line (the address) a bus prints.
read_address() {
    local file=$1 pid=$2 i
    for i in $(seq 100); do
        if [ -s "$file" ]; then head -n1 "$file"; return 0; fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    echo "bench.sh: bus $pid did not print its address" >&2
    return 1
}

${BUSVISOR_LOG:+env RUST_LOG=$BUSVISOR_LOG} "$BUSVISOR" --nofork --address="unix:path=$D1/bus" --print-address \
    >"$D1/address" 2>"$D1/log" &
BV_PID=$!
"$DBUS_DAEMON" --session --nofork --address="unix:path=$D2/bus2" --print-address \
    >"$D2/address" 2>"$D2/log" &
DD_PID=$!
BV_ADDR=$(read_address "$D1/address" "$BV_PID") || { cat "$D1/log" >&2; exit 1; }
DD_ADDR=$(read_address "$D2/address" "$DD_PID") || { cat "$D2/log" >&2; exit 1; }

echo "== busvisor   pid $BV_PID  $BV_ADDR" >&2
echo "== dbus-daemon pid $DD_PID  $DD_ADDR ($("$DBUS_DAEMON" --version | head -n1))" >&2
echo "== $(nproc) CPUs, load average $(cut -d" " -f1-3 /proc/loadavg), RLIMIT_NOFILE $(ulimit -n), CLK_TCK $(getconf CLK_TCK)" >&2

status=0
"$BENCH_EXE" "${BENCH_ARGS[@]}" \
    --bus "busvisor,$BV_PID,$BV_ADDR" \
    --bus "dbus-daemon,$DD_PID,$DD_ADDR" || status=$?

for p in "$BV_PID" "$DD_PID"; do
    kill -0 "$p" 2>/dev/null || { echo "bench.sh: bus pid $p died during the run" >&2; status=1; }
done
if [ -s "$D1/log" ] && grep -qiE "error|warn|panic" "$D1/log"; then
    echo "== busvisor log (warnings/errors, last 20 lines):" >&2
    grep -iE "error|warn|panic" "$D1/log" | tail -n 20 >&2
fi
exit $status
