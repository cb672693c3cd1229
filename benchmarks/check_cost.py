"""What the checks cost next to the init they verify, measured from `smpcheck run`'s own report.

Writes a synthetic bf16 Llama checkpoint (random weights), runs ``smpcheck run`` with each
strategy on N local ranks, and reads the JSON report: the init's wall time (load + transform +
wrap, rank 0's clock), and for smpcheck's two phases ("check": every check that reads and
compares; "forward": one batch through the wrapped model) the wall time and how much each
raised each rank's peak anonymous memory above the init's peak (as a fraction of the rank's
share of the model), and the bytes each rank read from the checkpoint. Targets (issue 11) for
the check phase: <= 0.5x the init, and <= 0.25x a rank's share added to its peak. The forward
phase unshards as the first training step will, and is reported beside it.

    python benchmarks/check_cost.py --params 2.7e8 --nproc 4 --dtype float32 \
        --strategies streaming,fsdp2,smp --out benchmarks/results/check-cost-270m
    python benchmarks/check_cost.py --projection   # the 70B on 8 x 8 arithmetic only

Also measures the digest throughput on one core (xxhash on the host, the torch-op digest
wherever torch runs it) with ``--digests``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
INIT_PHASES = ("load", "transform", "wrap")
OWN_PHASES = ("check", "forward")


def write_checkpoint(path: Path, params: float) -> int:
    """A Llama of about ``params`` parameters in bf16, written once; returns its bytes."""
    import transformers as T

    if (path / "size.json").exists():
        return int(json.loads((path / "size.json").read_text())["bytes"])
    hidden = 1024 if params < 6e8 else 2048
    inter = int(hidden * 2.6875) // 64 * 64
    per_layer = 4 * hidden * hidden + 3 * hidden * inter
    layers = max(1, round((params - 2 * 32000 * hidden) / per_layer))
    config = T.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                           num_hidden_layers=layers, num_attention_heads=16,
                           num_key_value_heads=4, tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    (path / "size.json").write_text(json.dumps({"bytes": size, "layers": layers}))
    return size


def phase_costs(report: dict, model_bytes: int, world: int) -> dict:
    """Init wall time; for each of smpcheck's phases ("check": reading and comparing,
    "forward": one batch through the wrapped model) its wall time, its ratio to the init, and
    how far it raised each rank's peak anonymous memory above the init's peak, as a fraction
    of the rank's share of the model; the bytes each rank read."""
    records = report["memory"]["ranks"]
    share = model_bytes / world
    rank0 = next(r for r in records if r["rank"] == 0)
    init_s = sum(p["end"] - p["start"] for p in rank0["phases"] if p["name"] in INIT_PHASES)
    out = {"init_s": round(init_s, 2)}
    for phase in OWN_PHASES:
        seconds = sum(p["end"] - p["start"] for p in rank0["phases"] if p["name"] == phase)
        added = []
        for record in records:
            init = max(p["peak_anon"] for p in record["phases"] if p["name"] in INIT_PHASES)
            peak = max((p["peak_anon"] for p in record["phases"] if p["name"] == phase),
                       default=init)
            added.append(round(max(0, peak - init) / share, 3))
        out[phase] = {"s": round(seconds, 2),
                      "over_init": round(seconds / init_s, 3) if init_s else None,
                      "added_peak_x_share": added}
    reads = report.get("expected", {}).get("reads", [])
    return {**out, "bytes_read_per_rank": [r["bytes"] for r in reads],
            "share_bytes": int(share),
            "checks_s": {r["name"]: round(r["seconds"], 2) for r in report["results"]},
            "all_passed": all(r["status"] in ("pass", "skip") for r in report["results"])}


def run_strategy(ckpt: Path, strategy: str, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "smpcheck", "run", str(ckpt), "--strategy", strategy,
               "--nproc-per-node", str(args.nproc), "--oversubscribe", "--report-dir", str(out),
               "--timeout", "3000", "--device", args.device]
    command += ["--dtype", args.dtype] if args.dtype else []
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    (out / f"{strategy}.log").write_text(done.stdout + done.stderr)
    report = json.loads((out / f"smpcheck-{strategy}-tp1.json").read_text())
    return {"exit_code": done.returncode, "command_s": round(time.perf_counter() - start, 1),
            **phase_costs(report, report["environment"]["model_bytes"], args.nproc)}


def projection(params: float = 70e9, nodes: int = 8, ranks_per_node: int = 8,
               node_gb_s: float = 2.0, bytes_per_param: int = 2) -> dict:
    """Bytes read per rank and per node for a fully sharded model, before and after."""
    model = params * bytes_per_param
    world = nodes * ranks_per_node
    per_rank = model / world
    per_node = per_rank * ranks_per_node
    whole_per_node = model * ranks_per_node  # before: every rank read every tensor whole
    return {
        "model_gb": model / 1e9, "world": world, "node_read_gb_s": node_gb_s,
        "now": {"per_rank_gb": per_rank / 1e9, "per_node_gb": per_node / 1e9,
                "seconds_at_bandwidth": per_node / (node_gb_s * 1e9)},
        "before": {"per_rank_gb": model / 1e9, "per_node_gb": whole_per_node / 1e9,
                   "seconds_at_bandwidth": whole_per_node / (node_gb_s * 1e9)},
    }


def digest_throughput(nbytes: int = 1 << 30) -> dict:
    """GB/s of each digest on one core over a tensor of ``nbytes``."""
    from smpcheck.shards.digest import device_digest, host_digest

    torch.set_num_threads(1)
    tensor = torch.randn(nbytes // 4)
    cases = [("xxh3_128 host", host_digest, tensor),
             ("torch-op digest (cpu)", device_digest, tensor)]
    if torch.cuda.is_available():
        gpu = tensor.cuda()
        cases += [("torch-op digest (cuda, on device)", device_digest, gpu),
                  ("copy to host + xxh3_128", lambda t: host_digest(t.cpu()), gpu)]
    out = {}
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
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=2.7e8)
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--strategies", default="streaming,fsdp2,smp")
    parser.add_argument("--dtype", default=None, help="load dtype (float32: weights owned)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-bench"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/check-cost"))
    parser.add_argument("--projection", action="store_true", help="print the 70B arithmetic")
    parser.add_argument("--digests", action="store_true", help="measure digest throughput")
    args = parser.parse_args()
    if args.projection:
        print(json.dumps(projection(), indent=2))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.workdir / f"llama-{args.params:.1e}"
    size = write_checkpoint(ckpt, args.params)
    summary = {"model": str(ckpt), "stored_bytes": size, "nproc": args.nproc,
               "dtype": args.dtype or "bfloat16 (as stored, memory-mapped)",
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "strategies": {}}
    for strategy in args.strategies.split(","):
        summary["strategies"][strategy] = run_strategy(ckpt, strategy, args, args.out)
        print(strategy, json.dumps(summary["strategies"][strategy]), flush=True)
    if args.digests:
        summary["digest_gb_per_s_one_core"] = digest_throughput()
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
