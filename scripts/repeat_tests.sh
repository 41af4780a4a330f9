#!/usr/bin/env bash
# Runs the same tests N times beside one busy process (a CPU-bound Python loop), one line per run: how the
# multi-process tests were shown not to flake on a loaded machine.
#   bash scripts/repeat_tests.sh 30 tests/test_distributed.py tests/test_reliability_training.py \
#       -k "torchrun or ddp or survivors or distributed or two_process or local_negatives"
set -uo pipefail
cd "$(dirname "$0")/.."
runs=$1
shift
python -c "while True: pass" &
busy=$!
trap 'kill $busy' EXIT
failed=0
for run in $(seq 1 "$runs"); do
    start=$SECONDS
    output=$(python -m pytest -q -p no:cacheprovider -x "$@" 2>&1)
    status=$?
    summary=$(tail -n 1 <<< "$output")
    [ "$status" -eq 0 ] || failed=$((failed + 1))
    echo "run $run: $((SECONDS - start)) s, load $(cut -d' ' -f1 /proc/loadavg): $summary"
done
echo "$failed of $runs runs failed"
[ "$failed" -eq 0 ]
