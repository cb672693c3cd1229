#!/usr/bin/env bash
# The CUDA/NCCL path on one GPU (world size 1): `smpcheck run --device cuda` with the SMP
# recipe and FSDP2 on the demo model, then the check-cost benchmark on a ~300 MB bf16 Llama
# (init vs verify seconds, digest GB/s on the device vs copying to the host).
# Usage: OUT=dir bash benchmarks/gpu_check.sh   (writes reports and logs under $OUT)
set -uo pipefail
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SMPCHECK_CACHE=/tmp/smpcheck-cache HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -m smpcheck env | tee "$OUT/env.txt"
for strategy in smp fsdp2; do
  /usr/bin/time -v $PY -m smpcheck run --device cuda --nproc-per-node 1 --strategy "$strategy" \
    --report-dir "$OUT" 2>"$OUT/time-$strategy.txt" | tee "$OUT/run-$strategy.txt"
  echo "exit code $strategy: ${PIPESTATUS[0]}" | tee -a "$OUT/run-$strategy.txt"
done
$PY benchmarks/check_cost.py --nproc 1 --device cuda --out "$OUT/check_cost_cuda.json" \
  2>&1 | tail -40 | tee "$OUT/check_cost.txt"
