#!/usr/bin/env bash
# Benchmark busvisor against dbus-daemon on the same workloads, in one run.
#
#   scripts/bench.sh            full run (about 2-3 minutes)
#   scripts/bench.sh --quick    short, smaller run (for development)
#   scripts/bench.sh --only STR run only the rows whose name contains STR
#   scripts/bench.sh --only activation
#                               only the activation section (about 30 s;
#                               with --quick about 15 s)
#
# Builds the release binary and the `bus` and `activation` bench targets,
# starts `target/release/busvisor` and `dbus-daemon --session`, each on a unix
# socket in its own temporary directory, runs benches/bus.rs against both and
# prints the table. Both buses are stopped by PID at the end.
#
# Then the activation section (benches/activation.rs): a second pair of
# buses, busvisor with a temporary --services-dir and dbus-daemon with a
# temporary --config-file and <servicedir>, both defining the same two
# trivial services (org.example.Bench: the activation bench binary with
# --serve; org.example.BenchPy: benches/activation_service.py on the real
# python3 interpreter, not a pyenv shim). It times first call -> reply for
# cold starts on both buses and prints medians, p90/min/max and the ratio
# busvisor/dbus-daemon. It runs unless --only names something else; both
# buses are stopped by PID when it ends. Without python3 only the rust
# service is measured.
# Environment: CARGO_TARGET_DIR (default: ./target), DBUS_DAEMON (default:
# dbus-daemon from PATH), BUSVISOR_LOG (busvisor's --log-level via RUST_LOG,
# default: busvisor's own default), ACTIVATION_ITERATIONS (cold starts per bus
# and service, default 40, 20 with --quick; at least 20 is meaningful),
# BASELINE (the path of another busvisor binary, say a copy of the release
# build before a change: the main table and the activation section then also
# start it, as a third bus named busvisor-before, and run every row against
# it in the same interleaved rounds; each busvisor gets its ratio to
# dbus-daemon. Unset: only the two buses above), POLICY (the cost of
# policy: `large` for tests/fixtures/policy-large/bus.conf, a
# system.conf-shaped configuration of about 540 rules, or the path of any
# configuration file that lets the bench's clients do their work; the main
# table then also runs busvisor, the baseline and dbus-daemon with that
# file, as busvisor-large, busvisor-before-large and dbus-daemon-large (or
# -policy for another file), in the same interleaved rounds, and ends with
# scripts/policy-table.py's table: each bus's CPU per message with the
# policy against without, and busvisor-large against dbus-daemon-large.
# Unset: the stock session configuration only).
#
#   scripts/bench.sh --main     the main table only, no activation section
#
# Then the libdbus section (`--only busbench` runs it alone): busbench.py
# (../shared/bench/busbench.py beside the repository, or $BUSBENCH), whose
# clients are libdbus's (dbus-test-tool spam/echo) and raw sockets, against
# busvisor (and BASELINE as busvisor-before) and dbus-daemon, each scenario on
# a fresh bus, BUSBENCH_RUNS runs (default 3; busbench rotates the bus
# order), and its table of medians with every bus's ratio to dbus-daemon;
# then scripts/flat-bench.py: fan-out to 10 subscribers alone, with 10,000
# idle peers holding non-matching rules, and with 100,000 such rules, each
# bus against its own first row (target: within 1.1); then
# scripts/kernel-floor.py: the least any bus spends per connection and per
# call with one in flight on this machine, beside busvisor and dbus-daemon
# (needs gcc). Skipped, with a note, when busbench.py or dbus-test-tool is
# missing.
set -euo pipefail

if [ -n "${BASELINE:-}" ]; then
    [ -f "$BASELINE" ] && [ -x "$BASELINE" ] || { echo "bench.sh: BASELINE=$BASELINE is not an executable file" >&2; exit 2; }
    BASELINE=$(cd "$(dirname "$BASELINE")" && pwd)/$(basename "$BASELINE")
fi
cd "$(dirname "$0")/.."
ROOT=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
DBUS_DAEMON=${DBUS_DAEMON:-dbus-daemon}

BENCH_ARGS=()
ACT_ARGS=()
ONLY=
NO_ACT=
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) BENCH_ARGS+=(--quick); ACT_ARGS+=(--quick) ;;
        --main) NO_ACT=1 ;;
        --only) ONLY=$2; BENCH_ARGS+=(--only "$2"); shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# 1,000 idle clients plus the bench's own sockets (10,000 in flat-bench):
# both the bench and the buses (started from this shell) inherit the raised
# soft limit; the hard one stays as it is.
ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || ulimit -Sn 4096 2>/dev/null || true

command -v "$DBUS_DAEMON" >/dev/null || { echo "bench.sh: $DBUS_DAEMON not found (apt-get install dbus-daemon)" >&2; exit 1; }

echo "== building (release)" >&2
cargo build --release --quiet
# The main table runs unless only the activation section is asked for; the
# activation section runs unless --only names something it does not contain.
RUN_MAIN=1
RUN_ACT=1
RUN_BB=1
case "$ONLY" in activation | busbench) RUN_MAIN= ;; esac
[ -n "$ONLY" ] && case activation in *"$ONLY"*) ;; *) RUN_ACT= ;; esac
[ -n "$ONLY" ] && case busbench in *"$ONLY"*) ;; *) RUN_BB= ;; esac
[ -n "$NO_ACT" ] && RUN_ACT= && RUN_BB=
# POLICY: the configuration of the -large (-policy) buses.
POLICY_CONF=
POLICY_TAG=
case "${POLICY:-}" in
    "") ;;
    large) POLICY_CONF=$ROOT/tests/fixtures/policy-large/bus.conf; POLICY_TAG=large ;;
    *) POLICY_CONF=$POLICY; POLICY_TAG=policy ;;
esac
if [ -n "$POLICY_CONF" ]; then
    [ -f "$POLICY_CONF" ] || { echo "bench.sh: POLICY=$POLICY: no file $POLICY_CONF" >&2; exit 2; }
    POLICY_CONF=$(cd "$(dirname "$POLICY_CONF")" && pwd)/$(basename "$POLICY_CONF")
fi
# The zbus benches are built only for the sections that run them.
if [ -n "$RUN_MAIN$RUN_ACT" ]; then
    ARTIFACTS=$(cargo bench --bench bus --bench activation --no-run --message-format=json 2>/dev/null)
    bench_exe() {
        grep '"kind":\["bench"\]' <<<"$ARTIFACTS" | grep "\"name\":\"$1\"" \
            | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1
    }
    BENCH_EXE=$(bench_exe bus)
    ACT_EXE=$(bench_exe activation)
    [ -x "$BENCH_EXE" ] && [ -x "$ACT_EXE" ] || { echo "bench.sh: bench executable not found" >&2; exit 1; }
fi
BUSVISOR=$CARGO_TARGET_DIR/release/busvisor

D1=$(mktemp -d /tmp/busvisor-bench.XXXXXX)
D2=$(mktemp -d /tmp/dbus-daemon-bench.XXXXXX)
D3=$(mktemp -d /tmp/busvisor-act.XXXXXX)
D4=$(mktemp -d /tmp/dbus-daemon-act.XXXXXX)
# The baseline's sockets and logs (BASELINE only).
D5=
[ -n "${BASELINE:-}" ] && D5=$(mktemp -d /tmp/busvisor-before-bench.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    rm -rf "$D1" "$D2" "$D3" "$D4" ${D5:+"$D5"}
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

# bus_pid: the process whose CPU and memory the table reads.
. "$ROOT/scripts/bus-pid.sh"

# Stops the buses of one section by PID (and forgets them).
stop_buses() {
    local p
    for p in "$@"; do
        kill "$p" 2>/dev/null && wait "$p" 2>/dev/null
    done
    PIDS=()
}

# Reports buses that died and a busvisor's warnings; sets status.
# Usage: check_buses LABEL LOG PID...
check_buses() {
    local label=$1 log=$2 p
    shift 2
    for p in "$@"; do
        kill -0 "$p" 2>/dev/null || { echo "bench.sh: bus pid $p died during the run" >&2; status=1; }
    done
    if [ -s "$log" ] && grep -qiE "error|warn|panic" "$log"; then
        echo "== $label log (warnings/errors, last 20 lines):" >&2
        grep -iE "error|warn|panic" "$log" | tail -n 20 >&2
    fi
}

# With BASELINE: starts it as busvisor-before with the given arguments,
# stdout to $D5/NAME.address and stderr to $D5/NAME.log; sets BL_PID and
# BL_ADDR and adds the bus to BUS_ARGS (before dbus-daemon, the reference,
# which must come last).
BUS_ARGS=()
start_baseline() {
    local name=$1
    shift
    [ -n "${BASELINE:-}" ] || return 0
    ${BUSVISOR_LOG:+env RUST_LOG=$BUSVISOR_LOG} "$BASELINE" --nofork --print-address "$@" \
        >"$D5/$name.address" 2>"$D5/$name.log" &
    BL_PID=$!
    PIDS+=("$BL_PID")
    BL_ADDR=$(read_address "$D5/$name.address" "$BL_PID") || { cat "$D5/$name.log" >&2; exit 1; }
    echo "== busvisor-before pid $BL_PID  $BL_ADDR  ($BASELINE)" >&2
    BUS_ARGS+=(--bus "busvisor-before,$(bus_pid "$BL_PID"),$BL_ADDR")
}

echo "== $(nproc) CPUs, load average $(cut -d" " -f1-3 /proc/loadavg), RLIMIT_NOFILE $(ulimit -n), CLK_TCK $(getconf CLK_TCK)" >&2
status=0

# Starts a bus of the main table: NAME DIR COMMAND ARGS..., with
# --nofork --print-address added, stdout to DIR/NAME.address and stderr to
# DIR/NAME.log; adds it to BUS_ARGS and MAIN_BUSES (NAME PID LOG triples).
MAIN_BUSES=()
start_bus() {
    local name=$1 dir=$2 pid addr
    shift 2
    ${BUSVISOR_LOG:+env RUST_LOG=$BUSVISOR_LOG} "$@" --nofork --print-address \
        >"$dir/$name.address" 2>"$dir/$name.log" &
    pid=$!
    PIDS+=("$pid")
    addr=$(read_address "$dir/$name.address" "$pid") || { cat "$dir/$name.log" >&2; exit 1; }
    echo "== $name pid $pid  $addr  ($*)" >&2
    BUS_ARGS+=(--bus "$name,$(bus_pid "$pid"),$addr")
    MAIN_BUSES+=("$name" "$pid" "$dir/$name.log")
}

if [ -n "$RUN_MAIN" ]; then
    echo "== $("$DBUS_DAEMON" --version | head -n1)" >&2
    BUS_ARGS=()
    # dbus-daemon with session.conf last: the reference of the ratios.
    start_bus busvisor "$D1" "$BUSVISOR" --address="unix:path=$D1/bus"
    [ -n "$POLICY_CONF" ] && start_bus "busvisor-$POLICY_TAG" "$D1" "$BUSVISOR" \
        --config-file="$POLICY_CONF" --address="unix:path=$D1/bus-$POLICY_TAG"
    if [ -n "${BASELINE:-}" ]; then
        start_bus busvisor-before "$D5" "$BASELINE" --address="unix:path=$D5/bus"
        [ -n "$POLICY_CONF" ] && start_bus "busvisor-before-$POLICY_TAG" "$D5" "$BASELINE" \
            --config-file="$POLICY_CONF" --address="unix:path=$D5/bus-$POLICY_TAG"
    fi
    [ -n "$POLICY_CONF" ] && start_bus "dbus-daemon-$POLICY_TAG" "$D2" "$DBUS_DAEMON" \
        --config-file="$POLICY_CONF" --address="unix:path=$D2/bus-$POLICY_TAG"
    start_bus dbus-daemon "$D2" "$DBUS_DAEMON" --session --address="unix:path=$D2/bus2"

    if [ -n "$POLICY_CONF" ]; then
        "$BENCH_EXE" "${BENCH_ARGS[@]}" "${BUS_ARGS[@]}" | tee "$D1/table" || status=$?
        python3 "$ROOT/scripts/policy-table.py" --tag "$POLICY_TAG" "$D1/table" || status=$?
    else
        "$BENCH_EXE" "${BENCH_ARGS[@]}" "${BUS_ARGS[@]}" || status=$?
    fi

    for ((i = 0; i < ${#MAIN_BUSES[@]}; i += 3)); do
        check_buses "${MAIN_BUSES[i]}" "${MAIN_BUSES[i + 2]}" "${MAIN_BUSES[i + 1]}"
    done
    stop_buses "${PIDS[@]}"
fi

if [ -n "$RUN_BB" ]; then
    BUSBENCH=${BUSBENCH:-$ROOT/../shared/bench/busbench.py}
    if [ ! -f "$BUSBENCH" ] || ! command -v dbus-test-tool >/dev/null; then
        echo "bench.sh: libdbus section skipped: needs $BUSBENCH and dbus-test-tool (package dbus-tests)" >&2
    else
        echo "== libdbus section: busbench.py, ${BUSBENCH_RUNS:-3} runs, load average $(cut -d" " -f1-3 /proc/loadavg)" >&2
        D6=$(mktemp -d /tmp/busbench.XXXXXX)
        BB_BUSES=(--bus "busvisor=$BUSVISOR --nofork --print-address --config-file={config}")
        [ -n "${BASELINE:-}" ] && BB_BUSES+=(--bus "busvisor-before=$BASELINE --nofork --print-address --config-file={config}")
        BB_BUSES+=(--bus "dbus-daemon=$DBUS_DAEMON --nofork --print-address --config-file={config}")
        BB_ARGS=(--runs "${BUSBENCH_RUNS:-3}" --baseline dbus-daemon --workdir "$D6")
        # --quick: a tenth of the work per row.
        for a in "${BENCH_ARGS[@]}"; do
            [ "$a" = --quick ] && BB_ARGS+=(--rtt-count 2000 --pipe-count 10000 --connect-count 300 --fanout-deliveries 50000 --act-count 5)
        done
        python3 "$BUSBENCH" "${BB_BUSES[@]}" "${BB_ARGS[@]}" --out "$D6/busbench.jsonl" \
            --scenarios rtt,pipelined,payload4k,pairs,driver,fanout,fanoutbg,connect,memory,activation \
            2> >(grep -v '^\[run .* {' >&2) || status=$?
        BUSBENCH=$BUSBENCH python3 "$ROOT/scripts/flat-bench.py" "${BB_BUSES[@]}" "${BB_ARGS[@]}" \
            --out "$D6/flat.jsonl" 2> >(grep -v '^\[run .* {' >&2) || status=$?
        if command -v gcc >/dev/null; then
            FLOOR_ARGS=(--busvisor "$BUSVISOR" --dbus-daemon "$DBUS_DAEMON")
            for a in "${BENCH_ARGS[@]}"; do
                [ "$a" = --quick ] && FLOOR_ARGS+=(--runs 3 --connections 300 --calls 2000)
            done
            BUSBENCH=$BUSBENCH python3 "$ROOT/scripts/kernel-floor.py" "${FLOOR_ARGS[@]}" 2>/dev/null || status=$?
        else
            echo "bench.sh: the kernel's floor skipped: needs gcc" >&2
        fi
        echo "== load average after the libdbus section: $(cut -d" " -f1-3 /proc/loadavg)" >&2
        rm -rf "$D6"
    fi
fi

if [ -n "$RUN_ACT" ]; then
    echo "== activation section" >&2
    [ -n "${ACTIVATION_ITERATIONS:-}" ] && ACT_ARGS+=(--iterations "$ACTIVATION_ITERATIONS")
    # The interpreter itself: a pyenv-style shim in front of it would add its
    # own startup to every activation.
    PYTHON=$(python3 -c 'import sys; print(sys.executable)' 2>/dev/null || true)
    PY_SERVICE=$ROOT/benches/activation_service.py
    for path in "$ACT_EXE" "$PYTHON" "$PY_SERVICE"; do
        case "$path" in *[[:space:]\'\"\\]*)
            echo "bench.sh: path with spaces or quotes not supported here: $path" >&2; exit 1 ;;
        esac
    done
    if [ -n "$PYTHON" ]; then
        ACT_ARGS+=(--python "$PYTHON" --services rust,python)
    else
        echo "bench.sh: no python3: measuring the rust service only" >&2
        ACT_ARGS+=(--services rust)
    fi

    # busvisor: one TOML file per service in its own --services-dir.
    mkdir -p "$D3/services"
    cat >"$D3/services/bench.toml" <<EOT
name = "org.example.Bench"
exec = ["$ACT_EXE", "--serve", "org.example.Bench"]
restart = "no"
EOT
    if [ -n "$PYTHON" ]; then
        cat >"$D3/services/benchpy.toml" <<EOT
name = "org.example.BenchPy"
exec = ["$PYTHON", "$PY_SERVICE", "org.example.BenchPy"]
restart = "no"
EOT
    fi
    # dbus-daemon: a configuration with only this service directory.
    mkdir -p "$D4/services"
    cat >"$D4/services/org.example.Bench.service" <<EOT
[D-BUS Service]
Name=org.example.Bench
Exec='$ACT_EXE' --serve org.example.Bench
EOT
    if [ -n "$PYTHON" ]; then
        cat >"$D4/services/org.example.BenchPy.service" <<EOT
[D-BUS Service]
Name=org.example.BenchPy
Exec='$PYTHON' '$PY_SERVICE' org.example.BenchPy
EOT
    fi
    cat >"$D4/session.conf" <<EOT
<busconfig>
  <type>session</type>
  <listen>unix:path=$D4/bus</listen>
  <auth>EXTERNAL</auth>
  <servicedir>$D4/services</servicedir>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
EOT

    ${BUSVISOR_LOG:+env RUST_LOG=$BUSVISOR_LOG} "$BUSVISOR" --nofork --address="unix:path=$D3/bus" --print-address \
        --services-dir "$D3/services" >"$D3/address" 2>"$D3/log" &
    BV2_PID=$!
    PIDS+=("$BV2_PID")
    "$DBUS_DAEMON" --config-file="$D4/session.conf" --nofork --print-address \
        >"$D4/address" 2>"$D4/log" &
    DD2_PID=$!
    PIDS+=("$DD2_PID")
    BV2_ADDR=$(read_address "$D3/address" "$BV2_PID") || { cat "$D3/log" >&2; exit 1; }
    DD2_ADDR=$(read_address "$D4/address" "$DD2_PID") || { cat "$D4/log" >&2; exit 1; }
    echo "== busvisor   pid $BV2_PID  $BV2_ADDR  --services-dir $D3/services" >&2
    echo "== dbus-daemon pid $DD2_PID  $DD2_ADDR  --config-file $D4/session.conf" >&2
    [ -n "$PYTHON" ] && echo "== python: $PYTHON ($("$PYTHON" --version 2>&1))" >&2
    # The baseline reads the same definitions: each bus starts its own instances.
    BUS_ARGS=(--bus "busvisor,$(bus_pid "$BV2_PID"),$BV2_ADDR")
    start_baseline act --address="unix:path=$D5/act-bus" --services-dir "$D3/services"

    "$ACT_EXE" "${ACT_ARGS[@]}" "${BUS_ARGS[@]}" \
        --bus "dbus-daemon,$DD2_PID,$DD2_ADDR" || status=$?

    check_buses busvisor "$D3/log" "$BV2_PID" "$DD2_PID"
    [ -n "${BASELINE:-}" ] && check_buses busvisor-before "$D5/act.log" "$BL_PID"
    stop_buses "${PIDS[@]}"
fi
exit $status
