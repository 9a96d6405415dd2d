#!/usr/bin/env bash
# Runs the README's test command (.ci/run) N times in a row (default 3) with two busy
# processes beside it, as a loaded 2-core machine would be, and stops at the first failure.
# Each run's output goes to ci-busy-logs/run-K.log; the last line says how many passed.
#
#   scripts/ci-busy.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
logs=ci-busy-logs
mkdir -p "$logs"

busy_pids=()
stop_busy() {
    if [ "${#busy_pids[@]}" -gt 0 ]; then
        kill "${busy_pids[@]}" 2>/dev/null || true
    fi
}
trap stop_busy EXIT
# Two spinning interpreters: each keeps one core at 100% for as long as the runs last.
for _ in 1 2; do
    python3 -c "while True: pass" &
    busy_pids+=("$!")
done

passed=0
for k in $(seq 1 "$runs"); do
    start=$(date +%s)
    if bash .ci/run >"$logs/run-$k.log" 2>&1; then
        passed=$((passed + 1))
        echo "run $k: passed in $(($(date +%s) - start)) s ($(tail -n 1 "$logs/run-$k.log"))"
    else
        echo "run $k: FAILED after $(($(date +%s) - start)) s; see $logs/run-$k.log"
        grep -E "^(FAILED|ERROR)" "$logs/run-$k.log" || tail -n 20 "$logs/run-$k.log"
        break
    fi
done
echo "ci-busy: $passed of $runs runs passed beside two busy processes"
[ "$passed" -eq "$runs" ]
