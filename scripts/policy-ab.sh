#!/usr/bin/env bash
# One bench row, two buses, finer than the table: runs the row of
# benches/bus.rs N times against bus A and bus B (interleaved within each
# run, as bench.sh does) and reads each bus's CPU time in nanoseconds from
# /proc/PID/task/*/schedstat around each whole run. The table's CPU column
# counts 10 ms ticks, too coarse for a few percent on the short rows; this
# counts the row's setup (connecting its clients) too, the same for both.
#
#   scripts/policy-ab.sh ROW [N]          A: busvisor with session.conf,
#                                         B: busvisor with the large policy
#                                         (tests/fixtures/policy-large)
#   A=/old/busvisor B_CONF= scripts/policy-ab.sh ROW
#                                         another binary, both with session.conf
#   A=dbus-daemon A_CONF=tests/fixtures/policy-large/bus.conf scripts/policy-ab.sh ROW
#                                         dbus-daemon and busvisor, both with
#                                         the large policy
#
# A, B: the bus binaries (default: the release busvisor); A_CONF, B_CONF:
# their --config-file (empty: the session configuration; default: none for
# A, the large policy for B). ROW is a substring of a row name ("signal
# fan-out, 10", "pipelined calls, 4"). Prints per run: each bus's CPU in ms
# and B/A, then the median B/A. A row whose phases end on their time limit
# (a slow bus, or connection setup) does different work on each bus: its
# B/A is not a cost ratio. Needs a release build and the bench binary
# (scripts/bench.sh builds both).
set -euo pipefail
cd "$(dirname "$0")/.."
ROW=${1:?usage: policy-ab.sh ROW [N]}
N=${2:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
A=${A:-$CARGO_TARGET_DIR/release/busvisor}
B=${B:-$CARGO_TARGET_DIR/release/busvisor}
A_CONF=${A_CONF-}
B_CONF=${B_CONF-tests/fixtures/policy-large/bus.conf}
BENCH_EXE=$(cargo bench --bench bus --no-run --message-format=json 2>/dev/null \
    | grep '"kind":\["bench"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
[ -x "$BENCH_EXE" ] || { echo "policy-ab.sh: bench executable not found" >&2; exit 1; }

D=$(mktemp -d /tmp/policy-ab.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
    rm -rf "$D"
}
trap cleanup EXIT
ulimit -n 4096 2>/dev/null || true

# start NAME BINARY CONFIG: dbus-daemon without a configuration file takes
# --session; busvisor's default is the session configuration.
start() {
    local name=$1 bin=$2 conf=$3 i args=()
    if [ -n "$conf" ]; then
        args=(--config-file="$conf")
    elif [[ $(basename "$bin") == dbus-daemon* ]]; then
        args=(--session)
    fi
    "$bin" --nofork --print-address --address="unix:path=$D/$name" "${args[@]}" \
        >"$D/$name.address" 2>"$D/$name.log" &
    PIDS+=($!)
    for i in $(seq 100); do [ -s "$D/$name.address" ] && return 0; sleep 0.05; done
    echo "policy-ab.sh: bus $name did not start" >&2
    cat "$D/$name.log" >&2
    exit 1
}
start a "$A" "$A_CONF"
start b "$B" "$B_CONF"
. "$(dirname "$0")/bus-pid.sh"
PA=$(bus_pid "${PIDS[0]}") PB=$(bus_pid "${PIDS[1]}")
ns() {
    python3 -c "import glob,sys; print(sum(int(open(f).read().split()[0]) for f in glob.glob(f'/proc/{sys.argv[1]}/task/*/schedstat')))" "$1"
}
echo "A: $A ${A_CONF:-(session)}; B: $B ${B_CONF:-(session)}; row: $ROW" >&2
RATIOS=()
for i in $(seq "$N"); do
    a0=$(ns "$PA") b0=$(ns "$PB")
    "$BENCH_EXE" --only "$ROW" --bus "a,$PA,$(head -n1 "$D/a.address")" \
        --bus "b,$PB,$(head -n1 "$D/b.address")" >/dev/null 2>&1
    a1=$(ns "$PA") b1=$(ns "$PB")
    r=$(python3 -c "print(f'{($b1-$b0)/($a1-$a0):.3f}')")
    RATIOS+=("$r")
    printf 'run %d: A %d ms, B %d ms, B/A %s\n' "$i" $(((a1 - a0) / 1000000)) $(((b1 - b0) / 1000000)) "$r"
done
python3 -c "import statistics,sys; v=sorted(map(float,sys.argv[1:])); print(f'B/A median {statistics.median(v):.3f} (min {v[0]:.3f}, max {v[-1]:.3f}, {len(v)} runs)')" "${RATIOS[@]}"
