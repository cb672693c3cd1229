#!/usr/bin/env bash
# The CUDA/NCCL path on one GPU (world size 1), as one short script for a lent GPU machine:
#  1. `smpcheck run --device cuda` with the SMP recipe, FSDP2 and streaming on the demo model;
#  2. the check phase against the init it verifies (benchmarks/check_cost.py) on a 270M Llama
#     loaded as fp32, measured from the run's own JSON report as on CPU;
#  3. the fresh-init judge's false-failure rate with CUDA's generators (a short run).
# Usage: OUT=dir bash benchmarks/gpu_check.sh   (writes reports and logs under $OUT)
set -uo pipefail
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SMPCHECK_CACHE=/tmp/smpcheck-cache HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -m smpcheck env | tee "$OUT/env.txt"
for strategy in smp fsdp2 streaming; do
  $PY -m smpcheck run --device cuda --nproc-per-node 1 --strategy "$strategy" \
    --report-dir "$OUT/runs" > "$OUT/run-$strategy.txt" 2>&1
  echo "exit code $strategy: $?" | tee -a "$OUT/run-$strategy.txt"
  tail -16 "$OUT/run-$strategy.txt"
done
$PY benchmarks/check_cost.py --params 2.7e8 --nproc 1 --device cuda --dtype float32 \
  --strategies streaming,fsdp2,smp --digests --out "$OUT/check-cost" > "$OUT/check_cost.txt" 2>&1
tail -60 "$OUT/check_cost.txt"
cp "$OUT/check-cost/summary.json" "$OUT/check_cost_cuda.json" 2>/dev/null
timeout 150 $PY benchmarks/init_rules_false_failures.py --device cuda --draws 2000 \
  --garbage-draws 0 --out "$OUT/init_rules_cuda.json" > "$OUT/init_rules.txt" 2>&1
tail -20 "$OUT/init_rules.txt"
