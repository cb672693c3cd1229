#!/usr/bin/env bash
# Second GPU session's script (world size 1, NCCL): the fine-tuning setups judged on CUDA
# (benchmarks/gpu_finetune.py), then the check phase against the init on a 1.06B-parameter
# Llama in bf16 as stored (memory-mapped), as on CPU (benchmarks/check_cost.py).
# Usage: OUT=dir bash benchmarks/gpu_finetune_and_1b.sh
set -uo pipefail
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT/logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
finish() { tar czf "$OUT/logs.tar.gz" -C "$OUT" logs 2>/dev/null; }
trap finish EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/logs/gpu.txt"
$PY -c "import torch, transformers, accelerate, peft; print(torch.__version__, transformers.__version__, accelerate.__version__, peft.__version__)" | tee -a "$OUT/logs/gpu.txt"
timeout 180 $PY benchmarks/gpu_finetune.py --device cuda --out "$OUT/gpu_finetune_cuda.json" \
  > "$OUT/logs/gpu_finetune.txt" 2>&1
echo "gpu_finetune exit $?"; grep -v "^\[\|Warn\|warn" "$OUT/logs/gpu_finetune.txt" | tail -12 | cut -c1-400
timeout 300 $PY benchmarks/check_cost.py --params 1.2e9 --nproc 1 --device cuda \
  --strategies streaming,fsdp2,smp --out "$OUT/logs/check-cost-1b" > "$OUT/logs/check_cost.txt" 2>&1
echo "check_cost exit $?"; grep -E '^(streaming|fsdp2|smp) ' "$OUT/logs/check_cost.txt" | cut -c1-420
cp "$OUT/logs/check-cost-1b/summary.json" "$OUT/check_cost_1b_cuda.json" 2>/dev/null
rm -f "$OUT"/logs/check-cost-1b/*.html  # the JSON reports and logs come back in the tarball
