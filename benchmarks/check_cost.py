"""What the checks cost next to the init they verify, and how fast digests run.

Writes a synthetic Llama checkpoint of a few hundred MB (bf16, random weights), runs the SMP
recipe (rank-0 load, FSDP1 with sync_module_states) on N ranks, then ``smpcheck.verify``
with the checkpoint, and records each phase's seconds; also the digest throughput on one
core (xxhash on the host, the torch-op digest wherever torch runs it).

    python benchmarks/check_cost.py --nproc 2 --out benchmarks/results/check_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smpcheck.runner import run_on_ranks  # noqa: E402

CONFIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
              num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False,
              max_position_embeddings=512)


def write_model(path: Path) -> int:
    """A bf16 Llama with random weights; returns its size in bytes."""
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def recipe_then_verify(path: str, device: str) -> dict:
    import torch.distributed as dist

    import smpcheck
    from reference_impl import DelayedParamIniter, apply_fsdp1, load_on_rank0

    dist.barrier()
    start = time.perf_counter()
    model = load_on_rank0(path)
    initer = DelayedParamIniter(model, device=device) if dist.get_rank() else None
    model = apply_fsdp1(model, device=device, initer=initer)
    dist.barrier()
    init_s = time.perf_counter() - start
    start = time.perf_counter()
    report = smpcheck.verify(model, checkpoint=path)
    verify_s = time.perf_counter() - start
    return {"init_s": init_s, "verify_s": verify_s, "ok": report.ok,
            "checks": {r.name: round(r.seconds, 3) for r in report.results}}


def digest_throughput(nbytes: int = 1 << 30) -> dict:
    """GB/s of each digest on one core over a tensor of ``nbytes``."""
    from smpcheck.digest import device_digest, host_digest

    torch.set_num_threads(1)  # "per core" on the host side
    tensor = torch.randn(nbytes // 4)
    out = {}
    cases = [("xxh3_128 host", host_digest, tensor),
             ("torch-op digest (cpu)", device_digest, tensor)]
    if torch.cuda.is_available():
        gpu = tensor.cuda()
        cases += [("torch-op digest (cuda, on device)", device_digest, gpu),
                  ("copy to host + xxh3_128", lambda t: host_digest(t.cpu()), gpu)]
    for name, fn, data in cases:
        fn(data)
        if data.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(data)
        if data.is_cuda:
            torch.cuda.synchronize()
        out[name] = round(nbytes / (time.perf_counter() - start) / 1e9, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        size = write_model(Path(tmp) / "llama")
        results = run_on_ranks(recipe_then_verify, args.nproc, device=args.device,
                               args=(str(Path(tmp) / "llama"), args.device), timeout=1800)
    summary = {
        "model_bytes": size, "nproc": args.nproc, "device": args.device,
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "init_s": round(max(r["init_s"] for r in results), 2),
        "verify_s": round(max(r["verify_s"] for r in results), 2),
        "per_check_s": results[0]["checks"], "all_passed": all(r["ok"] for r in results),
        "digest_gb_per_s_one_core": digest_throughput(),
    }
    summary["verify_over_init"] = round(summary["verify_s"] / summary["init_s"], 2)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
