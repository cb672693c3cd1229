"""The fine-tuning setups on the CUDA/NCCL path (world size 1), for a lent GPU machine.

Writes tiny Llama and Mixtral checkpoints, then judges with ``verify`` on ``cuda``:
a new classification head and LoRA adapters under FSDP2 (the recipe's ``apply_fsdp2``), a
vocabulary resized with ``resize_token_embeddings``, and Mixtral's fused experts; each clean,
then with one fault planted (garbage head, ``lora_B`` not zero, NaN in an added vocabulary
row, one expert element changed). Prints one JSON line per case with each check's status and
the tensors named.

    python benchmarks/gpu_finetune.py --out reports/gpu-finetune.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smpcheck  # noqa: E402
from smpcheck.shards.pieces import iter_pieces  # noqa: E402
from tests.faults import while_planted  # noqa: E402
from tests.models import FAMILIES, MIXTRAL, write_checkpoint  # noqa: E402


def verdicts(model, path: Path) -> dict:
    report = smpcheck.verify(model, checkpoint=path)
    return {r.name: [r.status.value, sorted({f.tensor for f in r.errors})]
            for r in report.results if r.status.value != "skip"}


def planted(model, path: Path, pattern: str, fill) -> dict:
    pieces = [p for p in iter_pieces(model) if pattern in p.name and p.is_param]
    return while_planted(pieces, fill, lambda: verdicts(model, path))


def wrap(model, device: str):
    from reference_impl import apply_fsdp2

    return apply_fsdp2(model, device=device)


def cases(root: Path, device: str) -> dict:
    from peft import LoraConfig

    from reference_impl import attach_adapter, load_on_rank0, resize_vocabulary

    cls, kwargs = FAMILIES["llama-gqa-untied"]
    llama = write_checkpoint(cls(**kwargs), root / "llama", seed=3)
    out = {}
    head = wrap(load_on_rank0(llama, model_class="AutoModelForSequenceClassification",
                              num_labels=3, pad_token_id=0), device)
    out["seq-cls head"] = verdicts(head, llama)
    out["seq-cls head, garbage"] = planted(head, llama, "score.", lambda d: d.mul_(1e-18))
    lora = attach_adapter(load_on_rank0(llama), peft_config=LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora = wrap(lora, device)
    out["lora"] = verdicts(lora, llama)
    out["lora, lora_B not zero"] = planted(lora, llama, "lora_B", lambda d: d.add_(0.02))
    resized = wrap(resize_vocabulary(load_on_rank0(llama), kwargs["vocab_size"] + 8), device)
    out["resized vocabulary"] = verdicts(resized, llama)

    def nan_in_added_row(data: torch.Tensor) -> None:
        if data.dim() == 2 and data.shape[0] > kwargs["vocab_size"]:
            data[kwargs["vocab_size"] + 2] = float("nan")

    out["resized vocabulary, NaN in an added row"] = planted(resized, llama, "embed_tokens",
                                                             nan_in_added_row)
    mcls, mkwargs = MIXTRAL
    mixtral = write_checkpoint(mcls(**mkwargs), root / "mixtral", seed=4)
    moe = wrap(load_on_rank0(mixtral), device)
    out["mixtral fused experts"] = verdicts(moe, mixtral)
    out["mixtral, one expert element changed"] = planted(
        moe, mixtral, "experts.down_proj", lambda d: d.view(-1)[7].add_(0.5))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/smpcheck-gpu-finetune"))
    parser.add_argument("--out", type=Path, default=Path("reports/gpu-finetune.json"))
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29633")
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(0)
    try:
        out = cases(args.workdir, args.device)
    finally:
        dist.destroy_process_group()
    out = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "cases": out}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    for name, verdict in out["cases"].items():
        print(name, json.dumps({k: v for k, v in verdict.items()}), flush=True)


if __name__ == "__main__":
    main()
