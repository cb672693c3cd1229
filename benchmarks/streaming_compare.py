"""Host memory and time of each strategy on a synthetic ~1B-parameter bf16 Llama, 4 ranks.

Writes the checkpoint locally (random weights), then runs
``smpcheck compare CKPT --strategies naive,smp,fsdp2,streaming --nproc-per-node 4`` and
prints the table the README quotes.

    python benchmarks/streaming_compare.py --params 1.0e9 --nproc 4 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


def write_checkpoint(path: Path, params: float) -> int:
    """A Llama of about ``params`` parameters in bf16, written shard by shard."""
    import transformers as T

    hidden, layers = 2048, max(1, round((params - 2 * 32000 * 2048) / (12.5 * 2048**2)))
    config = T.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=5504,
                           num_hidden_layers=layers, num_attention_heads=16,
                           num_key_value_heads=16, tie_word_embeddings=False,
                           dtype="bfloat16")
    if (path / "config.json").exists():
        return int(json.loads((path / "size.json").read_text())["bytes"])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = T.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    (path / "size.json").write_text(json.dumps({"bytes": size}))
    return size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=float, default=1.0e9)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--strategies", default="naive,smp,fsdp2,streaming")
    parser.add_argument("--dtype", default=None,
                        help="load in this dtype (float32 from the bf16 checkpoint: every rank "
                        "owns its weights, the 'ready to train' case)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    ckpt = args.workdir / f"llama-{args.params:.1e}"
    start = time.perf_counter()
    size = write_checkpoint(ckpt, args.params)
    print(f"checkpoint {ckpt}: {size / 2**30:.2f} GiB, written in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    command = [sys.executable, "-m", "smpcheck", "compare", str(ckpt), "--strategies",
               args.strategies, "--nproc-per-node", str(args.nproc), "--oversubscribe",
               "--report-dir", str(args.out / f"compare-{args.params:.0e}-{args.dtype or 'bf16'}"),
               "--timeout", "3000"] + (["--dtype", args.dtype] if args.dtype else [])
    subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
