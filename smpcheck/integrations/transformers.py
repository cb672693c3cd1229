"""``SmpcheckCallback``: smpcheck inside ``transformers.Trainer`` (and TRL's trainers built on
it), in one line.

Where it runs, and why there: ``Trainer.train`` wraps the model (``accelerator.prepare``:
FSDP1, FSDP2, DDP; or keeps transformers' own ``tp_plan`` DTensors), builds the optimizer,
and only then fires ``on_train_begin``, before the first forward and the first optimizer step.
Under FSDP the ``model`` that event receives *is* the wrapped model (the Trainer replaces
``self.model`` with it); under DDP it is the module inside DDP, which holds the same tensors.
So one ``verify`` there sees exactly what training will update, and a failure stops every
rank before a single step is taken.

Example:
    >>> trainer = Trainer(model=model, args=args, train_dataset=data,  # doctest: +SKIP
    ...                   callbacks=[SmpcheckCallback()])
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from smpcheck.integrations.outcome import (
    check_on_failure,
    checkpoint_of,
    conclude,
    rank,
    timed_verify,
    wrapping,
)
from smpcheck.report.model import Report
from smpcheck.saves import ADAPTER, CHECKPOINT_PREFIX, resumed_from, saved_layout, verify_saved

DISABLE_ENV = "SMPCHECK_DISABLE"


class SmpcheckCallback(TrainerCallback):
    """Verify the wrapped model once, on every rank, before the first optimizer step.

    Args:
        checkpoint: checkpoint directory the weights should equal (safetensors or DCP;
            default: the model's ``name_or_path`` when that is a local directory or a cached
            hub id, and on a resumed run the checkpoint it resumed from).
        checks: names of the checks to run (default: all of them).
        on_failure: ``"raise"`` stops training on every rank with the same one-sentence
            :class:`~smpcheck.integrations.outcome.SmpcheckFailed`; ``"warn"`` warns and
            lets it go on.
        report_dir: where rank 0 writes ``smpcheck-trainer.{html,json,junit.xml}`` (default:
            ``<output_dir>/smpcheck``).
        enabled: False makes every event a no-op (no collective, no file). Default: on,
            unless the environment sets ``SMPCHECK_DISABLE=1``, so a launch script can switch
            it off without editing the training script.
        adapter: the PEFT adapter directory a trained adapter was loaded from
            (``PeftModel.from_pretrained``): its tensors are compared with that file instead
            of being judged as a fresh init (PEFT does not record where it loaded them from).
        config_overrides: config fields set on purpose at load (``num_labels=3``), as for
            :func:`smpcheck.verify`.
        check_saves: also check every checkpoint the Trainer writes, on its save event
            (:func:`smpcheck.verify_saved`); a save that differs from the live model stops
            (or warns) as a failed check does. Off by default: it reads the files back.

    On a resumed run (``resume_from_checkpoint``) the model is compared with the Trainer
    checkpoint it resumed from (full, FSDP sharded/DCP, or adapter-only saves).

    It verifies once per callback (a second ``train()`` would judge trained weights against the
    checkpoint). After training starts, ``callback.report`` holds the report; its results are
    the same on every rank.
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None,
                 checks: Iterable[str] | None = None, on_failure: str = "raise",
                 report_dir: str | os.PathLike | None = None, enabled: bool | None = None,
                 stem: str = "smpcheck-trainer", adapter: str | os.PathLike | None = None,
                 config_overrides: dict[str, Any] | None = None,
                 check_saves: bool = False) -> None:
        self.checkpoint = checkpoint
        self.check_saves = check_saves
        self.saves: list[Report] = []
        self.adapter, self.config_overrides = adapter, config_overrides
        self.checks = list(checks) if checks is not None else None
        self.on_failure = check_on_failure(on_failure)
        self.report_dir = report_dir
        self.enabled = (os.environ.get(DISABLE_ENV, "0").lower() not in ("1", "true", "yes")
                        if enabled is None else enabled)
        self.stem = stem
        self.report: Report | None = None
        self._init_end: float | None = None

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.enabled:
            self._init_end = time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        if not self.enabled or self.report is not None or model is None:
            return
        setup_s = time.perf_counter() - self._init_end if self._init_end else None
        checkpoint, adapter, source = self._expected_for(model, args, state)
        held = wrapping(model)
        report, seconds = timed_verify(model, checkpoint=checkpoint, checks=self.checks,
                                       adapter=adapter, optimizer=kwargs.get("optimizer"),
                                       config_overrides=self.config_overrides,
                                       environment_extra={
                                           "integration": "transformers.Trainer",
                                           "strategy": f"trainer-{held['wrapper']}",
                                           **held, "checkpoint_source": source})
        report.environment.update(verify_s=round(seconds, 3), trainer_setup_s=(
            round(setup_s, 3) if setup_s is not None else None))
        self.report = report
        if rank() == 0:
            print(f"[smpcheck] verify: {seconds:.2f} s on the {held['wrapper']}-wrapped model"
                  f" ({'all checks passed' if report.ok else 'checks failed'})"
                  + (f"; Trainer setup before it: {setup_s:.2f} s" if setup_s else ""),
                  flush=True)
        report_dir = self.report_dir or Path(args.output_dir) / "smpcheck"
        conclude(report, report_dir=report_dir, stem=self.stem, on_failure=self.on_failure,
                 where="the model the Trainer is about to train")

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                **kwargs: Any) -> None:
        """With ``check_saves``: the checkpoint just written equals the live model, before
        training goes on (a partial or empty adapter file stops every rank, naming the tensor,
        the file and the step)."""
        if not self.enabled or not self.check_saves or model is None:
            return
        step = state.global_step
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{step}"
        report = verify_saved(model, folder, base_checkpoint=self.checkpoint,
                              environment_extra={"integration": "transformers.Trainer",
                                                 "step": step, **wrapping(model)})
        self.saves.append(report)
        conclude(report, report_dir=self.report_dir or Path(args.output_dir) / "smpcheck",
                 stem=f"{self.stem}-save-{step}", on_failure=self.on_failure,
                 where=f"the checkpoint the Trainer saved at step {step} ({folder})")

    def _expected_for(self, model: Any, args: Any, state: Any
                      ) -> tuple[str | None, str | None, str]:
        """The checkpoint and adapter directory to compare with, and where they came from
        (for the report). A resumed run is compared with the checkpoint it resumed from:
        its weights have moved on from the model's own ``name_or_path``."""
        if self.checkpoint is not None:
            return str(self.checkpoint), self.adapter, "given"
        if state.global_step == 0:
            path, source = checkpoint_of(model)
            return path, self.adapter, source
        folder = resumed_from(args.output_dir, state.global_step,
                              getattr(args, "resume_from_checkpoint", None))
        layout = saved_layout(folder) if folder is not None else None
        if layout is None:
            return None, self.adapter, (f"none: resumed at step {state.global_step}, and no "
                                        "readable Trainer checkpoint of that step was found")
        if layout == ADAPTER:  # trained adapters from the folder, the frozen base as loaded
            return (checkpoint_of(model)[0], str(folder),
                    f"resumed from {folder} (adapter-only save)")
        return str(folder), self.adapter, f"resumed from {folder} ({layout} save)"
