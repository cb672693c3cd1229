"""Fine-tune with ``transformers.Trainer`` under FSDP; smpcheck checks the wrapped model on
every rank before the first optimizer step, and stops every rank if something is wrong.

    torchrun --nproc-per-node 8 examples/trainer_fsdp.py /fsx/llama-3-8b --out runs/ft
    torchrun --nproc-per-node 2 examples/trainer_fsdp.py MODEL --out /tmp/ft --cpu  # as CI
    torchrun --nproc-per-node 8 examples/trainer_fsdp.py MODEL --out runs/ft --deepspeed 3

The smpcheck part is one line: ``callbacks=[SmpcheckCallback()]``. Reports land in
``<out>/smpcheck/smpcheck-trainer.{html,json,junit.xml}``. The data set is a stand-in (random
token ids, built in memory) so the script runs offline; bring your own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from smpcheck.integrations.shutdown import close_process_groups
from smpcheck.integrations.transformers import SmpcheckCallback


def token_dataset(vocab_size: int, rows: int = 16, length: int = 16) -> list[dict]:
    """Random token ids as a causal-LM data set (labels are the inputs)."""
    ids = torch.randint(0, vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def deepspeed_config(stage: int) -> dict:
    """A ZeRO config as users pass it (``"auto"`` values filled in by the Trainer)."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}


def training_args(out: str, *, fsdp_version: int, cpu: bool, max_steps: int,
                  deepspeed_stage: int | None = None,
                  save_steps: int | None = None) -> TrainingArguments:
    """FSDP through the Trainer's own ``fsdp_config``, or DeepSpeed ZeRO through its
    ``deepspeed`` argument: what users write today."""
    sharding = ({"deepspeed": deepspeed_config(deepspeed_stage)} if deepspeed_stage else
                {"fsdp": True, "fsdp_config": {"version": fsdp_version}})
    return TrainingArguments(
        output_dir=out, max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-4,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], logging_steps=1, disable_tqdm=True,
        use_cpu=cpu, ddp_backend="gloo" if cpu else None, **sharding,
    )


def build_trainer(model_path: str, out: str, *, fsdp_version: int = 2, cpu: bool = False,
                  max_steps: int = 2, callbacks: Sequence = (),
                  deepspeed_stage: int | None = None, save_steps: int | None = None) -> Trainer:
    # Before from_pretrained: under ZeRO-3 the arguments make it build the model inside
    # deepspeed.zero.Init, each rank holding only its partition.
    args = training_args(out, fsdp_version=fsdp_version, cpu=cpu, max_steps=max_steps,
                         deepspeed_stage=deepspeed_stage, save_steps=save_steps)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path)
    loaded = time.perf_counter()
    trainer = Trainer(model=model, train_dataset=token_dataset(model.config.vocab_size),
                      args=args, callbacks=list(callbacks))
    if trainer.args.process_index == 0:
        print(f"[example] from_pretrained {loaded - start:.2f} s, Trainer() "
              f"{time.perf_counter() - loaded:.2f} s", flush=True)
    return trainer


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="checkpoint directory (or a cached hub id)")
    parser.add_argument("--out", required=True, help="the Trainer's output_dir")
    parser.add_argument("--fsdp-version", type=int, choices=(1, 2), default=2)
    parser.add_argument("--deepspeed", type=int, choices=(1, 2, 3), metavar="STAGE",
                        help="DeepSpeed ZeRO of this stage instead of FSDP")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--cpu", action="store_true",
                        help="CPU ranks with gloo (CI): FSDP made to apply on CPU")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, extra_callbacks: Sequence = ()) -> None:
    trainer = build_trainer(args.model, args.out, fsdp_version=args.fsdp_version, cpu=args.cpu,
                            max_steps=args.max_steps, deepspeed_stage=args.deepspeed,
                            callbacks=[*extra_callbacks, SmpcheckCallback()])
    result = trainer.train()
    if trainer.args.process_index == 0:
        print(f"[example] trained {result.global_step} steps, loss {result.training_loss:.3f}",
              flush=True)


def main(argv: Sequence[str] | None = None, extra_callbacks: Sequence = ()) -> None:
    args = parse(argv)
    if args.cpu:  # accelerate drops the FSDP plugin on CPU unless told otherwise
        from smpcheck.integrations.cpu import enable_fsdp_on_cpu

        enable_fsdp_on_cpu()
    train(args, extra_callbacks)
    close_process_groups()  # the trainer is gone: free FSDP's groups before Python exits


if __name__ == "__main__":
    main()
