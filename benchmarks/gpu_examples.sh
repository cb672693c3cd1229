#!/usr/bin/env bash
# Third GPU session's script (world size 1, NCCL, CUDA): both examples as users launch them,
# twice each, each ending in close_process_groups(); every exit code and the last lines.
# Usage: OUT=dir bash benchmarks/gpu_examples.sh
set -uo pipefail
OUT=${OUT:-reports/gpu-examples}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)" | tee -a "$OUT/gpu.txt"
$PY -c "from pathlib import Path; from tests.models import write_family; write_family('llama-gqa-tied', Path('$WORK'))"
for example in trainer_fsdp accelerate_fsdp; do
  for i in 1 2; do
    timeout 100 $PY -m torch.distributed.run --standalone --nproc-per-node 1 \
      examples/$example.py "$WORK/llama-gqa-tied" --out "$WORK/out-$example-$i" \
      > "$OUT/$example-$i.txt" 2>&1
    echo "$example run $i exit $?" | tee -a "$OUT/exits.txt"
    grep -E "^\[(example|smpcheck)\]|terminate|Error|Fatal" "$OUT/$example-$i.txt" | cut -c1-300 | tail -4
  done
done
