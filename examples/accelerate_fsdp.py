"""Load a model under accelerate's FSDP plugin (``cpu_ram_efficient_loading``: transformers'
own rank-0 loading), check it after ``accelerator.prepare`` on every rank, then train.

    accelerate launch --use_fsdp --fsdp_version 2 --fsdp_cpu_ram_efficient_loading true \\
        --num_processes 8 examples/accelerate_fsdp.py /fsx/llama-3-8b --out runs/acc
    torchrun --nproc-per-node 2 examples/accelerate_fsdp.py MODEL --out /tmp/acc --cpu \\
        --fsdp-version 1 --no-cpu-ram-efficient-loading                     # as CI

Under ``accelerate launch --use_fsdp`` the plugin comes from the launcher (its environment);
under ``torchrun`` from this script's flags. The memory of the loading is recorded from
before ``from_pretrained``, and each rank says whether it read the checkpoint itself. Reports
land in ``<out>/smpcheck-accelerate.{html,json,junit.xml}``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from transformers import AutoModelForCausalLM

from smpcheck.integrations.accelerate import LoadingMonitor, verify_prepared
from smpcheck.integrations.shutdown import close_process_groups


def make_accelerator(*, fsdp_version: int, cpu_ram_efficient_loading: bool,
                     cpu: bool) -> Accelerator:
    """The plugin from ``accelerate launch``'s environment when it set one, else from flags."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return Accelerator(cpu=cpu)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_version, cpu_ram_efficient_loading=cpu_ram_efficient_loading,
        auto_wrap_policy="TRANSFORMER_BASED_WRAP", state_dict_type="FULL_STATE_DICT",
        reshard_after_forward=True if fsdp_version == 2 else "FULL_SHARD")
    return Accelerator(cpu=cpu, fsdp_plugin=plugin)


def load_and_prepare(model_path: str, accelerator: Accelerator,
                     loading: LoadingMonitor) -> tuple[Any, torch.optim.Optimizer]:
    """``from_pretrained`` and ``prepare``, each a phase of the loading record."""
    with loading.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(model_path)
    loading.probe(model, model_path)  # did this rank read the files, or wait for rank 0?
    with loading.phase("wrap"):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer


def train(model: Any, optimizer: torch.optim.Optimizer, accelerator: Accelerator,
          steps: int) -> float:
    """A few steps on random token ids (a stand-in for your data)."""
    generator = torch.Generator().manual_seed(accelerator.process_index)
    vocab = model.config.vocab_size
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 16), generator=generator).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return float(loss)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory")
    parser.add_argument("--out", required=True, help="where the reports go")
    parser.add_argument("--fsdp-version", type=int, choices=(1, 2), default=2)
    parser.add_argument("--cpu-ram-efficient-loading", action=argparse.BooleanOptionalAction,
                        default=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--cpu", action="store_true",
                        help="CPU ranks with gloo (CI): FSDP made to apply on CPU")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    accelerator = make_accelerator(fsdp_version=args.fsdp_version, cpu=args.cpu,
                                   cpu_ram_efficient_loading=args.cpu_ram_efficient_loading)
    with LoadingMonitor() as loading:
        model, optimizer = load_and_prepare(args.model, accelerator, loading)
    report = verify_prepared(model, accelerator, checkpoint=args.model, loading=loading,
                             report_dir=args.out)  # raises on every rank if a check failed
    if accelerator.is_main_process:
        print(f"[example] {report.environment['loading_verdict']}", flush=True)
    loss = train(model, optimizer, accelerator, args.steps)
    if accelerator.is_main_process:
        print(f"[example] trained {args.steps} steps, loss {loss:.3f}", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    if args.cpu:  # accelerate drops the FSDP plugin on CPU unless told otherwise
        from smpcheck.integrations.cpu import enable_fsdp_on_cpu

        enable_fsdp_on_cpu()
    run(args)
    close_process_groups()  # the model is gone: free FSDP's groups before Python exits


if __name__ == "__main__":
    main()
