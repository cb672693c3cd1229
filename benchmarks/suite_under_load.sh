#!/usr/bin/env bash
# The suite beside a full load: `pytest -n auto` with two busy processes on the cores, as a
# shared CI runner has them, RUNS times. Each run's JUnit XML (every test's time), the
# pytest summary and `time`'s figures go to OUT/run-K/.
#
#   DS_ACCELERATOR=cpu benchmarks/suite_under_load.sh benchmarks/results/suite-under-load 3
set -euo pipefail
out=${1:-benchmarks/results/suite-under-load}
runs=${2:-3}
cd "$(dirname "$0")/.."
for k in $(seq 1 "$runs"); do
  dir="$out/run-$k"
  mkdir -p "$dir"
  python3 -c 'while True: pass' & busy1=$!
  python3 -c 'while True: pass' & busy2=$!
  { time pytest -n auto -q --junitxml="$dir/junit.xml" > "$dir/pytest.txt" 2>&1 ; } 2> "$dir/time.txt" || true
  kill "$busy1" "$busy2"
  tail -1 "$dir/pytest.txt"
done
