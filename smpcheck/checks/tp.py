"""TP shards and TP numerics: each rank holds the right slice, whole heads, and the whole
computes what the dense model computes.

*tp_shards* judges every sharded piece against the slice its own placement names: DTensor's
placement is the layout in use, whoever applied it (our plan, transformers' ``tp_plan`` with
its ``packed_colwise`` blocks as ``_StridedShard``, a user's ``parallelize_module``), so no
layout is guessed from a weight's name. The slices come from ``dense_model`` when given, else
from the checkpoint comparisons already made by the one pass (no second read). A wrong shard
is explained: which slice it holds instead. Attention weights split by TP must also hold whole
heads (:mod:`smpcheck.expect.heads`).

*tp_numerics* runs one fixed batch through the model and ``dense_model`` and compares logits,
loss and (gathered) gradients within a tolerance derived from the dtype. A forward that raises
(a shape error from a split head) is a finding about the model, not an error of the check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from smpcheck.checks.base import CheckContext, LocalFindings, Skip, judge_local
from smpcheck.checks.unsharding import training_forward_memory
from smpcheck.expect.expected import diagnose_shard
from smpcheck.expect.heads import head_layout, head_split_dims, split_heads
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.tensors import describe_diff, named_tensors

# Absolute and relative tolerance by dtype for logits, loss and gradients.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
    torch.float64: (1e-8, 1e-8),
}
HEAD_HINT = ("each TP rank must hold whole attention heads: use a TP degree that divides the "
             "number of (KV) heads, or replicate the KV heads")
WRAP_HINT = ("FSDP refused the wrapping the forward met: follow its message (modules that "
             "share a parameter must be wrapped in one fully_shard call, or left to the root)")
FORWARD_HINT = ("a shard splits a dimension the forward reshapes (an attention head?): see "
                "tp_shards; use a TP degree that divides the heads")


def _head_findings(ctx: CheckContext, pieces: list[Any]) -> list[Finding]:
    if not any(piece.tp_splits for piece in pieces):
        return []  # FSDP alone: it gathers before computing, heads are whole then
    layout = head_layout(ctx.config)
    if layout is None:
        return []
    head_dims = head_split_dims(ctx.inner, layout)
    findings = []
    for piece in pieces:
        if piece.name in head_dims:
            dim, holds = head_dims[piece.name]
            problem = split_heads(piece, dim, holds, layout.head_dim)
            if problem:
                findings.append(Finding(piece.name, [ctx.rank], problem, hint=HEAD_HINT))
    return findings


class TPShards:
    name = "tp_shards"

    def summarize(self, ctx: CheckContext) -> LocalFindings | Skip:
        pieces = [p for p in ctx.pieces() if p.shard_coords]
        if not pieces:
            return Skip("no sharded (DTensor) parameters on this rank")
        findings = _head_findings(ctx, pieces)
        if ctx.dense_model is not None:
            source, findings = "dense model", findings + _against_dense(ctx, pieces)
            compared = len(pieces)
        elif ctx.checkpoint is not None:
            _, comparisons = ctx.one_pass
            sharded = [c for c in comparisons if c.sharded]
            source, compared = "checkpoint", len(sharded)
            findings += [Finding(c.name, [ctx.rank], f"{c.where} is not the slice it should "
                                 f"hold ({c.detail})", c.want, c.seen, c.diagnosis)
                         for c in sharded if not c.equal]
        else:
            return Skip("needs dense_model= or checkpoint= to know the full tensors")
        return LocalFindings(findings, f"{compared} sharded pieces compared with the {source}")

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        return judge_local(self.name, summaries, "every shard is the right slice")


def _against_dense(ctx: CheckContext, pieces: list[Any]) -> list[Finding]:
    dense = dict(named_tensors(ctx.dense_model))
    findings = []
    for piece in pieces:
        full = dense.get(piece.name)
        if full is None:
            continue
        full = full.detach().to(piece.data.device, piece.data.dtype)
        expected = piece.expected_from(full)
        if expected.shape != piece.data.shape or not torch.equal(expected, piece.data):
            want, seen, detail = describe_diff(piece.data, expected)
            findings.append(Finding(piece.name, [ctx.rank], f"{piece.where()} is not the slice "
                                    f"it should hold ({detail})", want, seen,
                                    diagnose_shard(piece, full)))
    return findings


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@dataclass
class Batch:
    """One fixed batch, and where each model takes it."""

    ids: torch.Tensor
    model_device: torch.device
    dense_device: torch.device
    dtype: torch.dtype


def _take_grads(*models: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The gradients the caller's parameters hold, taken off them so that the numerics
    backward starts from none (and gives them back after: the model is left as it was)."""
    kept = []
    for model in models:
        for param in model.parameters():
            if param.grad is not None:
                kept.append((param, param.grad))
                param.grad = None
    return kept


def forward_error(ctx: CheckContext, exc: Exception, what: str) -> LocalFindings:
    """A forward that raised, as a finding about the model (not an error of the check)."""
    line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    hint = WRAP_HINT if "FSDP" in line else FORWARD_HINT
    return LocalFindings([Finding("(forward pass)", [ctx.rank], f"{what} raised {line}: the "
                                  "model cannot run one step", hint=hint)],
                         "the forward pass")


class TPNumerics:
    name = "tp_numerics"

    def prepare(self, ctx: CheckContext) -> Batch | Skip:
        if ctx.dense_model is None:
            return Skip("needs dense_model= to compare against")
        vocab = getattr(ctx.config, "vocab_size", 32)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        dense_device = next(ctx.dense_model.parameters()).device
        model_device = next((p.device for p in ctx.model.parameters() if not p.is_meta),
                            dense_device)
        return Batch(ids, model_device, dense_device, _model_dtype(ctx.inner))

    def collective(self, ctx: CheckContext, batch: Batch) -> LocalFindings:

        kept = _take_grads(ctx.model, ctx.dense_model)  # the caller's, given back after
        try:
            with training_forward_memory(ctx.model):
                return self._compare(ctx, batch)
        finally:
            ctx.model.zero_grad(set_to_none=True)
            ctx.dense_model.zero_grad(set_to_none=True)
            for param, grad in kept:
                param.grad = grad

    def _compare(self, ctx: CheckContext, batch: Batch) -> LocalFindings:
        ids = batch.ids
        try:
            out = ctx.model(input_ids=ids.to(batch.model_device),
                            labels=ids.to(batch.model_device))
            out.loss.backward()
        except RuntimeError as exc:
            return forward_error(ctx, exc, "the sharded model's forward/backward")
        ref = ctx.dense_model(input_ids=ids.to(batch.dense_device),
                              labels=ids.to(batch.dense_device))
        ref.loss.backward()
        atol, rtol = TOLERANCES.get(batch.dtype, (1e-4, 1e-4))
        findings: list[Finding] = []

        def compare(what: str, seen: torch.Tensor, want: torch.Tensor) -> None:
            seen, want = seen.detach().float().cpu(), want.detach().float().cpu()
            if not torch.allclose(seen, want, atol=atol, rtol=rtol):
                diff = (seen - want).abs().max().item()
                findings.append(Finding(what, [ctx.rank], f"differs from the dense model by up "
                                        f"to {diff:.3g} (tolerance atol={atol:g}, rtol={rtol:g} "
                                        f"for {batch.dtype})", hint="the sharding plan computes "
                                        "something else than the dense model: a shard holds "
                                        "the wrong slice or a collective is missing; see "
                                        "tp_shards"))

        compare("logits", out.logits, ref.logits)
        compare("loss", out.loss, ref.loss)
        del out, ref
        dense_params = dict(ctx.dense_model.named_parameters())
        graded = 0
        for name, param in named_tensors(ctx.model):  # one gathered gradient at a time
            want = dense_params.get(name)
            if (isinstance(param, torch.nn.Parameter) and param.grad is not None
                    and want is not None and want.grad is not None):
                grad = param.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                if grad.shape == want.grad.shape:
                    compare(f"{name}.grad", grad, want.grad)
                    graded += 1
                del grad
        grads = (f"{graded} gradients" if graded else "no gradients (this wrapper keeps them "
                 "flat: FSDP1)")
        return LocalFindings(findings, f"logits, loss and {grads} vs the dense model "
                             f"({batch.dtype}, atol={atol:g})")

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        return judge_local(self.name, summaries, "within tolerance")
