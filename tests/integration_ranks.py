"""Rank-side driver for tests/test_integrations.py, launched the way users launch training
(``torchrun`` / ``accelerate launch``). It runs the example scripts' own building blocks and
adds what only a test needs: a fault planted on rank 1 after wrapping, a record of optimizer
steps, a count of collectives. Each rank writes what it saw to ``OUT/<mode>-rank<r>.json``.

    torchrun --standalone --nproc-per-node 2 tests/integration_ranks.py MODE CKPT OUT [VERSION]

Modes: ``trainer-fault``, ``trainer-collectives``, ``accelerate-fault``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import accelerate_fsdp  # noqa: E402 - the example scripts, as users run them
import trainer_fsdp  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from smpcheck.integrations import SmpcheckFailed  # noqa: E402
from smpcheck.integrations.accelerate import LoadingMonitor, verify_prepared  # noqa: E402
from smpcheck.integrations.cpu import enable_fsdp_on_cpu  # noqa: E402
from smpcheck.integrations.shutdown import close_process_groups  # noqa: E402
from smpcheck.integrations.transformers import SmpcheckCallback  # noqa: E402
from smpcheck.shards.pieces import iter_pieces  # noqa: E402

BAD_RANK = 1
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor",
               "broadcast", "broadcast_object_list", "barrier", "gather", "gather_object",
               "scatter", "scatter_object_list", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "send", "recv",
               "isend", "irecv", "monitored_barrier")


@torch.no_grad()
def plant(model: torch.nn.Module, fault: str) -> str:
    """Corrupt this rank's piece of one tensor; return the tensor's name."""
    if fault == "inv_freq":  # a non-persistent buffer zeroed: placeholders never recomputed
        name, piece = next((p.name, p) for p in iter_pieces(model)
                           if p.name.endswith("rotary_emb.inv_freq"))
        piece.data.zero_()
        return name
    name = "model.layers.1.mlp.up_proj.weight"  # one bit of this rank's shard flipped
    piece = next(p for p in iter_pieces(model) if p.name == name)
    piece.data.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 20)
    return name


class PlantOnRank1(TrainerCallback):
    """Runs before SmpcheckCallback: corrupts the wrapped model on rank 1 only."""

    def __init__(self, fault: str) -> None:
        self.fault = fault

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if dist.get_rank() == BAD_RANK:
            plant(model, self.fault)


class StepRecorder(TrainerCallback):
    """Writes a file per optimizer step: none may exist when the checks stopped training."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_optimizer_step(self, args, state, control, **kwargs):
        (self.out / f"step-rank{dist.get_rank()}-{state.global_step}").touch()


def trainer_fault(checkpoint: str, out: Path, version: int | str) -> dict[str, Any]:
    """``version`` 1 or 2: FSDP of that version; ``"zero3"``: DeepSpeed ZeRO-3."""
    fault = "inv_freq" if version == 2 else "bitflip"
    argv = [checkpoint, "--out", str(out / "trainer"), "--cpu",
            *(["--deepspeed", "3"] if version == "zero3" else ["--fsdp-version", str(version)])]
    try:
        trainer_fsdp.main(argv, extra_callbacks=[PlantOnRank1(fault), StepRecorder(out)])
    except SmpcheckFailed as exc:
        _write(out, "trainer-fault", {"error": str(exc), "fault": fault})
        raise  # the exit code stays non-zero, as in a user's run
    return {"error": None}


class Counter:
    """Counts calls to torch.distributed's collectives, and those made inside callbacks."""

    def __init__(self) -> None:
        self.total = 0
        self.in_callbacks = 0
        self.inside = False
        c10d = dist.distributed_c10d
        for name in COLLECTIVES:
            for namespace in (dist, c10d):
                original = getattr(namespace, name, None)
                if original is not None:
                    setattr(namespace, name, self._counted(original))

    def _counted(self, original: Any) -> Any:
        @functools.wraps(original)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.total += 1
            self.in_callbacks += self.inside
            return original(*args, **kwargs)

        return call

    def around(self, callback: SmpcheckCallback) -> SmpcheckCallback:
        """Count what ``callback``'s own events issue."""
        for event in ("on_init_end", "on_train_begin", "on_step_begin", "on_optimizer_step",
                      "on_step_end", "on_train_end", "on_log"):
            setattr(callback, event, self._inside(getattr(callback, event)))
        return callback

    def _inside(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.inside = True
            try:
                return method(*args, **kwargs)
            finally:
                self.inside = False

        return call


class PlainVerify(TrainerCallback):
    """Runs ``smpcheck.verify`` by hand at the same moment, counting its collectives. It runs
    twice and counts the second: the first forward through an FSDP1 model makes FSDP's own
    one-time collectives (lazy init), which the callback's verify, run after it, never sees."""

    def __init__(self, counter: Counter, checkpoint: str) -> None:
        self.counter, self.checkpoint, self.collectives, self.first = counter, checkpoint, None, 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        import smpcheck

        before = self.counter.total
        smpcheck.verify(model, checkpoint=self.checkpoint)
        self.first = self.counter.total - before
        before = self.counter.total
        smpcheck.verify(model, checkpoint=self.checkpoint)
        self.collectives = self.counter.total - before


def trainer_collectives(checkpoint: str, out: Path, version: int) -> dict[str, Any]:
    """Three identical trainings: no callback, the callback disabled, the callback enabled
    (beside a hand-made ``verify`` at the same moment, for its count of collectives)."""
    enable_fsdp_on_cpu()
    counter = Counter()
    counts: dict[str, Any] = {}
    for case in ("none", "disabled", "enabled"):
        callback = SmpcheckCallback(enabled=case == "enabled",
                                    report_dir=out / f"reports-{case}")
        plain = PlainVerify(counter, checkpoint)
        extra = {"none": [], "disabled": [counter.around(callback)],
                 "enabled": [plain, counter.around(callback)]}[case]
        trainer = trainer_fsdp.build_trainer(checkpoint, str(out / case), fsdp_version=version,
                                             cpu=True, callbacks=extra)
        counter.total = counter.in_callbacks = 0
        trainer.train()
        counts[case] = {"total": counter.total, "in_callbacks": counter.in_callbacks,
                        "steps": trainer.state.global_step,
                        "plain_verify": plain.collectives, "plain_first": plain.first,
                        "report": callback.report.environment if callback.report else None}
    return counts


def accelerate_fault(checkpoint: str, out: Path, version: int) -> dict[str, Any]:
    """The accelerate example's loading and prepare; verify, plant on rank 1, verify again."""
    enable_fsdp_on_cpu()
    accelerator = accelerate_fsdp.make_accelerator(fsdp_version=version, cpu=True,
                                                   cpu_ram_efficient_loading=True)
    with LoadingMonitor() as loading:
        model, _ = accelerate_fsdp.load_and_prepare(checkpoint, accelerator, loading)
    clean = verify_prepared(model, accelerator, checkpoint=checkpoint, loading=loading,
                            report_dir=out, stem="clean")
    name = plant(model, "inv_freq" if version == 2 else "bitflip") if (
        dist.get_rank() == BAD_RANK) else None
    try:
        verify_prepared(model, accelerator, checkpoint=checkpoint, report_dir=out,
                        stem="planted")
        error = None
    except SmpcheckFailed as exc:
        error = str(exc)
    plugin = accelerator.state.fsdp_plugin
    return {"clean_ok": clean.ok, "environment": clean.environment, "error": error,
            "planted": name, "plugin": {"fsdp_version": plugin.fsdp_version,
                                        "cpu_ram_efficient_loading":
                                            plugin.cpu_ram_efficient_loading}}


def _write(out: Path, mode: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}-rank{dist.get_rank()}.json").write_text(json.dumps(data, default=str))


def trainer_resume(checkpoint: str, out: Path, version: int) -> dict[str, Any]:
    """Train one step saving a checkpoint (every save checked), then resume from it as users
    do (``train(resume_from_checkpoint=True)``): the resumed model is compared with the
    checkpoint it resumed from, not with the base model it was first loaded from."""
    enable_fsdp_on_cpu()
    saves = SmpcheckCallback(check_saves=True, report_dir=out / "reports-first")
    first = trainer_fsdp.build_trainer(checkpoint, str(out / "run"), fsdp_version=version,
                                       cpu=True, max_steps=1, save_steps=1, callbacks=[saves])
    first.train()
    resumed = SmpcheckCallback(report_dir=out / "reports-resumed")
    second = trainer_fsdp.build_trainer(checkpoint, str(out / "run"), fsdp_version=version,
                                        cpu=True, max_steps=2, callbacks=[resumed])
    second.train(resume_from_checkpoint=True)
    report = resumed.report
    return {"saves": [(r.ok, r.environment.get("saved_layout")) for r in saves.saves],
            "source": report.environment["checkpoint_source"],
            "parity": report.result("checkpoint_parity").status.value,
            "steps": second.state.global_step}


MODES = {"trainer-fault": trainer_fault, "trainer-collectives": trainer_collectives,
         "trainer-resume": trainer_resume,
         "accelerate-fault": accelerate_fault}

if __name__ == "__main__":
    mode, ckpt, out_dir = sys.argv[1:4]
    given = sys.argv[4] if len(sys.argv) > 4 else "2"
    fsdp_version = int(given) if given.isdigit() else given
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = MODES[mode](ckpt, Path(out_dir), fsdp_version)
    _write(Path(out_dir), mode, result)
    close_process_groups()
