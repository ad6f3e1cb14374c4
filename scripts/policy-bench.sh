#!/usr/bin/env bash
# The cost of policy, over several runs: runs `POLICY=large scripts/bench.sh
# --main` (the main table only) RUNS times, keeps each run's output, and
# prints scripts/policy-table.py's table of the medians.
#
#   scripts/policy-bench.sh                 3 full runs (about 8 minutes each
#                                           with BASELINE, 6 buses)
#   scripts/policy-bench.sh --runs 5 --quick
#   scripts/policy-bench.sh --out DIR       keep the runs in DIR (default: a
#                                           new /tmp/policy-bench.XXXXXX)
#   scripts/policy-bench.sh --md            the final table in markdown
#
# Environment: POLICY (default large), BASELINE (the busvisor before a
# change: its rows with and without the policy too), and everything
# scripts/bench.sh reads.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=3
OUT=
ARGS=(--main)
TABLE=()
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) RUNS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --quick) ARGS+=(--quick) ;;
        --only) ARGS+=(--only "$2"); shift ;;
        --md) TABLE+=(--md) ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "policy-bench.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
export POLICY=${POLICY:-large}
[ -n "$OUT" ] || OUT=$(mktemp -d /tmp/policy-bench.XXXXXX)
mkdir -p "$OUT"
TAG=large
[ "$POLICY" = large ] || TAG=policy
FILES=()
for i in $(seq "$RUNS"); do
    echo "== run $i of $RUNS: $OUT/run-$i.txt" >&2
    scripts/bench.sh "${ARGS[@]}" >"$OUT/run-$i.txt" 2>"$OUT/run-$i.log" || {
        echo "policy-bench.sh: run $i failed (see $OUT/run-$i.log)" >&2
        tail -n 20 "$OUT/run-$i.log" >&2
        exit 1
    }
    FILES+=("$OUT/run-$i.txt")
done
python3 scripts/policy-table.py --tag "$TAG" "${TABLE[@]}" "${FILES[@]}"
