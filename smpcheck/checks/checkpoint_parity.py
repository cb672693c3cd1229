"""checkpoint parity: what every rank holds equals the safetensors files on disk.

Each rank compares its own pieces (whole tensors, DTensor shards, FSDP1 flat ranges) with the
matching part of the checkpoint tensor, read lazily one tensor at a time. A model tensor the
checkpoint lacks is missing (unless the config ties it to one it has); a checkpoint tensor no
rank used is unexpected (a warning); a dtype cast between file and model is stated.
"""

from __future__ import annotations

import torch

from smpcheck.checkpoint import Checkpoint
from smpcheck.checks.base import CheckContext, describe_diff, present, result
from smpcheck.checks.skeleton import expected_tie_groups
from smpcheck.checks.tp import expected_slice
from smpcheck.report.model import CheckResult, Finding

HINT = (
    "this rank's value is not the checkpoint's: check that rank 0 loaded this checkpoint "
    "and that it reached every rank (sync_module_states / broadcast_from_rank0)"
)


def _tie_partners(ctx: CheckContext) -> dict[str, list[str]]:
    partners: dict[str, list[str]] = {}
    for group in expected_tie_groups(ctx.inner):
        for name in group:
            partners[name] = sorted(group - {name})
    return partners


class CheckpointParity:
    name = "checkpoint_parity"
    gathers = 1

    def run(self, ctx: CheckContext) -> CheckResult:
        if ctx.checkpoint is None:
            return result(self.name, [], "", skip="no checkpoint given (checkpoint=PATH)")
        ckpt, prefix = ctx.checkpoint_reader
        partners = _tie_partners(ctx)
        findings: list[Finding] = []
        used: set[str] = set()
        casts: set[str] = set()
        compared = 0
        for piece in ctx.pieces():
            if not piece.persistent:
                continue  # non-persistent buffers are in no checkpoint: see `initialised`
            tied_keys = [ckpt.key_for(p, prefix) for p in partners.get(piece.name, [])]
            used.update(k for k in tied_keys if k)
            key = ckpt.key_for(piece.name, prefix) or next((k for k in tied_keys if k), None)
            if key is None:
                findings.append(_not_in_checkpoint(ckpt, piece.name, ctx.rank))
                continue
            used.add(key)
            full = ckpt.read(key)
            if full.dtype != piece.data.dtype:
                casts.add(
                    f"{str(full.dtype).replace('torch.', '')} -> "
                    f"{str(piece.data.dtype).replace('torch.', '')}"
                )
                full = full.to(piece.data.dtype)
            expected = expected_slice(piece, full, ctx.config)
            compared += 1
            if (
                piece.data.is_meta
                or expected.shape != piece.data.shape
                or not torch.equal(piece.data, expected.to(piece.data.device))
            ):
                want, seen, detail = (
                    describe_diff(piece.data, expected)
                    if not (piece.data.is_meta)
                    else ("values", "meta", "on the meta device")
                )
                findings.append(
                    Finding(
                        piece.name,
                        [ctx.rank],
                        f"{piece.where()} differs from checkpoint key {key!r} ({detail})",
                        want,
                        seen,
                        HINT,
                    )
                )
        used_anywhere = set().union(*present(ctx.all_gather(used)))
        unexpected = sorted(set(ckpt.files) - used_anywhere - set(ckpt.fused_keys))
        if ctx.rank == 0:
            findings += [
                Finding(
                    k,
                    [0],
                    "in the checkpoint but used by no tensor of the model",
                    hint="a renamed or dropped weight: is it the right checkpoint?",
                    severity="warning",
                )
                for k in unexpected
            ]
        cast_words = f"; dtype cast before comparing: {', '.join(sorted(casts))}" if casts else ""
        words = f"{compared} pieces compared with {ckpt.path.name}{cast_words}"
        return result(
            self.name,
            findings,
            f"{words}: all equal",
            f"{words}: {sum(f.severity == 'error' for f in findings)} problems",
        )


def _not_in_checkpoint(ckpt: Checkpoint, name: str, rank: int) -> Finding:
    if ckpt.is_fused_target(name):
        return Finding(
            name,
            [rank],
            "built on load from several checkpoint tensors (fused); not compared one-to-one",
            severity="warning",
        )
    return Finding(
        name,
        [rank],
        "in the model but not in the checkpoint",
        hint="this tensor kept its initial value: it was never loaded",
    )
