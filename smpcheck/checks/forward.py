"""forward: the wrapped model runs one step on every rank and every rank computes the same.

Shards can be the right slices and values the checkpoint's, and the first forward still
crashes on a shape (a TP degree that splits a head), after the cluster allocation was spent.
So one tiny batch goes through the model as the training loop will call it (FSDP1, FSDP2,
TP, DDP: the forward is collective), shaped as the model's own forward takes it (token ids,
or one row per codebook, with decoder inputs for an encoder-decoder: each candidate is tried on
the model's meta skeleton first, so an input the unwrapped model would also reject is a skip
naming its error, never a failure), in eval mode (no dropout: every rank must agree) and
without gradients. It must run, give finite outputs of a shape the config explains, and agree
across ranks (every rank fed the same batch computes the same logits, whatever it holds).
With ``dense_model=``, or ``reference_outputs=`` taken from rank 0's model before wrapping
(:func:`reference_outputs`), a sample of the logits is compared with the reference too.

Memory: the pass costs what the first training forward under the same wrapping costs, and
leaves the model as it found it (:mod:`smpcheck.checks.unsharding`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from smpcheck.checks.base import CheckContext, LocalFindings, Skip, merge_findings, ranked, result
from smpcheck.checks.tp import TOLERANCES, forward_error
from smpcheck.checks.unsharding import training_forward_memory, unit_sizes
from smpcheck.expect.skeleton import skeleton
from smpcheck.report.model import CheckResult, Finding

SAMPLE = 512  # logits sent per rank: enough to see a divergence, small to gather
SEQUENCE = 16


@dataclass
class Prepared:
    batch: Batch
    device: torch.device


# Errors a forward on the meta device raises once the input's shapes were accepted: values it
# cannot compute (masks built with ``.item()``), not a wrong input.
_META_LIMITS = ("meta tensor", "meta device", "on meta", "Cannot copy out of meta", "Meta",
                "data-dependent", "Unsupported")


def _candidates(config: Any) -> list[dict[str, tuple[int, ...]]]:
    """Input shapes to try, by forward argument: token ids first, then one row per codebook
    for models whose config counts codebooks (batched as the model may expect)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out: list[dict[str, tuple[int, ...]]] = [{"input_ids": (1, SEQUENCE)}]
    codebooks = getattr(text, "num_codebooks", None) or getattr(config, "num_codebooks", None)
    if isinstance(codebooks, int) and codebooks > 1:
        out += [{"input_ids": shape} for shape in
                ((codebooks, SEQUENCE), (1, SEQUENCE, codebooks), (1, codebooks, SEQUENCE))]
    if getattr(config, "is_encoder_decoder", False):
        out = [{**shapes, "decoder_input_ids": shapes["input_ids"]} for shapes in out]
    return out


def _words(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__


def _probe(fresh: torch.nn.Module | None, shapes: dict[str, tuple[int, ...]],
           kwargs: dict[str, Any]) -> str | None:
    """Why the model's own forward rejects inputs of these shapes (None: it takes them, as
    far as a forward on the meta skeleton can tell; no weight is touched)."""
    if fresh is None:
        return None
    inputs = {k: torch.zeros(v, dtype=torch.long, device="meta") for k, v in shapes.items()}
    try:
        with torch.no_grad(), eval_mode(fresh):
            fresh(**inputs, **kwargs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        words = _words(exc)
        return None if any(limit in words for limit in _META_LIMITS) else words
    except Exception:  # noqa: BLE001 - an op meta cannot run says nothing of the input
        return None
    return None


@dataclass
class Batch:
    """The smoke batch, and what the model's own forward (on its meta skeleton) said of it."""

    inputs: dict[str, torch.Tensor]  # by forward argument
    kwargs: dict[str, Any]
    rejection: str | None = None  # the meta forward's error when no candidate passed it


def smoke_batch(model: torch.nn.Module | None) -> Batch | str:
    """The fixed batch every rank feeds, or why none can be built.

    The shapes come from the model: each candidate is tried on the model's own forward on its
    meta skeleton, and the first it takes is used. When it takes none (the meta forward may
    also stop on what meta cannot compute), the first is used with its rejection kept: if the
    wrapped forward then raises the same error, the unwrapped model fails the same way, which
    is a skip naming its error, never a failure."""
    config = getattr(model, "config", None)
    if config is None:
        return "not a transformers model: no config to build an input from"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not vocab:
        return "the config names no vocabulary to draw input ids from"
    kwargs = {"use_cache": False} if hasattr(config, "use_cache") else {}
    fresh = skeleton(model)
    candidates = _candidates(config)
    verdicts = [(shapes, _probe(fresh, shapes, kwargs)) for shapes in candidates]
    shapes, why = next(((s, w) for s, w in verdicts if w is None), verdicts[0])
    generator = torch.Generator().manual_seed(0)
    return Batch({k: torch.randint(0, vocab, v, generator=generator)
                  for k, v in shapes.items()}, kwargs, why)


def _on(inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


@torch.no_grad()
def reference_outputs(model: torch.nn.Module) -> list[float] | None:
    """A sample of ``model``'s outputs for the smoke batch: taken from a trusted unwrapped
    copy (rank 0's model right after loading) and passed to ``verify(reference_outputs=)``,
    it lets the forward check compare the wrapped model with it. None when no batch fits."""
    batch = smoke_batch(model)
    if isinstance(batch, str):
        return None
    device = next(p.device for p in model.parameters())
    with eval_mode(model):
        try:
            return _sample(_logits(model(**_on(batch.inputs, device), **batch.kwargs)))
        except Exception:  # noqa: BLE001 - no reference: the forward check judges the model
            return None


@dataclass
class Outputs:
    shape: tuple[int, ...]
    non_finite: int
    sample: list[float]
    dense_sample: list[float] | None
    dtype: str


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode for the block (dropout off), each restored after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def _logits(output: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0] if isinstance(output, (tuple, list)) else output


def _sample(logits: torch.Tensor) -> list[float]:
    flat = logits.detach().float().reshape(-1)
    step = max(1, flat.numel() // SAMPLE)
    return flat[::step][:SAMPLE].cpu().tolist()


def _widths(config: Any) -> dict[int, str]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = {getattr(text, "hidden_size", -1): "hidden size"}
    if getattr(config, "num_labels", None):
        out[config.num_labels] = "num_labels"
    out[getattr(text, "vocab_size", -1)] = "vocabulary"
    return out


class ForwardSmoke:
    name = "forward"

    def prepare(self, ctx: CheckContext) -> Prepared | Skip:
        batch = smoke_batch(ctx.view.base)
        if isinstance(batch, str):
            return Skip(batch)
        device = next((p.device for p in ctx.model.parameters() if not p.is_meta), None)
        if device is None:
            return Skip("every parameter is on the meta device (see initialised)")
        return Prepared(batch, device)

    def collective(self, ctx: CheckContext, prepared: Prepared) -> Outputs | LocalFindings:
        batch = prepared.batch
        with torch.no_grad(), eval_mode(ctx.model), training_forward_memory(ctx.model):
            try:
                logits = _logits(ctx.model(**_on(batch.inputs, prepared.device),
                                           **batch.kwargs))
            except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                if batch.rejection == _words(exc):  # the unwrapped model fails the same way
                    return Skip("the model's own forward (unwrapped, on its meta skeleton) "
                                "rejects every smoke input built from its config, as the "
                                f"wrapped one does: {batch.rejection}")
                return forward_error(ctx, exc, "the wrapped model's forward")
            dense = ctx.options.get("reference_outputs")
            if ctx.dense_model is not None:
                device = next(ctx.dense_model.parameters()).device
                with eval_mode(ctx.dense_model):
                    dense = _sample(_logits(ctx.dense_model(**_on(batch.inputs, device),
                                                            **batch.kwargs)))
        if hasattr(logits, "full_tensor"):  # a DTensor output: what the training loop sees
            logits = logits.to_local()
        return Outputs(tuple(logits.shape), int((~torch.isfinite(logits)).sum()),
                       _sample(logits), dense, str(logits.dtype).removeprefix("torch."))

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        crashed = [s for _, s in present if isinstance(s, LocalFindings)]
        if crashed:
            return result(self.name, merge_findings([s.findings for s in crashed]), "",
                          "the forward pass raised")
        findings = []
        base_rank, base = present[0]
        widths = _widths(ctx.config)
        for rank, out in present:
            if out.non_finite:
                findings.append(Finding("(logits)", [rank], f"{out.non_finite} outputs are NaN or "
                                        "Inf", hint="a tensor holds garbage: see initialised"))
            if out.shape[-1] not in widths:
                findings.append(Finding("(logits)", [rank], f"outputs have shape {out.shape}, "
                                        "whose last dimension is neither the vocabulary, the "
                                        "labels nor the hidden size",
                                        f"last dim in {sorted(widths)}", str(out.shape[-1]),
                                        "a sharded head whose output is not gathered"))
        atol, rtol = TOLERANCES.get(getattr(torch, base.dtype, None), (1e-4, 1e-4))
        reference = torch.tensor(base.sample)
        differ = [rank for rank, out in present[1:]
                  if out.shape != base.shape or not torch.allclose(
                      torch.tensor(out.sample), reference, atol=atol, rtol=rtol, equal_nan=True)]
        if differ:
            findings.append(Finding("(logits)", differ, f"differ from rank {base_rank}'s for the "
                                    "same batch", hint="ranks hold different models: see "
                                    "rank_parity and checkpoint_parity"))
        dense = next((out.dense_sample for _, out in present if out.dense_sample), None)
        if dense is not None and (len(dense) != len(base.sample) or not torch.allclose(
                reference, torch.tensor(dense), atol=atol, rtol=rtol)):
            gap = (reference - torch.tensor(dense)).abs().max().item() if len(dense) == len(
                base.sample) else float("nan")
            findings.append(Finding("(logits)", [base_rank], f"differ from the dense model's by "
                                    f"up to {gap:.3g} (atol={atol:g})", hint="the wrapped model "
                                    "computes something else than the dense model"))
        words = (f"one batch of {SEQUENCE} positions on {len(summaries)} ranks: outputs "
                 f"{base.shape}, finite" + (", vs the dense model" if dense else ""))
        return result(self.name, findings, f"{words}, the same on every rank{_held(ctx)}",
                      f"{words}: {sum(f.severity == 'error' for f in findings)} problems")


def _held(ctx: CheckContext) -> str:
    """What the pass held unsharded, from the FSDP units' sizes."""
    units = unit_sizes(ctx.model)
    if units is None or units.count < 2:
        return ""
    return (f"; one unit unsharded at a time (largest {units.largest / 2**20:.1f} MiB) beside "
            f"the root unit ({units.root / 2**20:.1f} MiB), each resharded after")
