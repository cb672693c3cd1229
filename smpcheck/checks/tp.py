"""TP shards and TP numerics: each rank holds the right slice, and the whole computes what the
dense model computes.

*tp_shards* compares every sharded DTensor piece with the slice of the full tensor it should
hold (from ``dense_model`` when given, else the checkpoint). The right slice is the
DTensor's own placement, except for weights whose rows pack several blocks
(``[q | k | v]`` in Phi-3's ``qkv_proj``, ``[gate | up]`` in ``gate_up_proj``): there each
rank needs its part of *every* block. GPT-NeoX's ``query_key_value`` is packed per head, so a
contiguous split is already right for it. When a shard is wrong, the check looks for the slice
it does hold (another rank's, or a blockwise/contiguous mix-up) and says so.

*tp_numerics* runs one fixed batch through the model and ``dense_model`` and compares logits,
loss and (gathered) gradients within a tolerance derived from the dtype.
"""

from __future__ import annotations

import re

import torch

from smpcheck.checks.base import CheckContext, describe_diff, result
from smpcheck.pieces import Piece, splits
from smpcheck.report.model import CheckResult, Finding
from smpcheck.tensors import named_tensors

# Weights whose rows pack blocks that must each be split: name pattern -> block sizes.
PACKED_LAYOUTS = {
    r"\.qkv_proj\.(weight|bias)$": lambda c: [
        c.num_attention_heads * _head_dim(c),
        *[_kv_heads(c) * _head_dim(c)] * 2,
    ],
    r"\.gate_up_proj\.(weight|bias)$": lambda c: [c.intermediate_size] * 2,
}
# Absolute and relative tolerance by dtype for logits, loss and gradients.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (5e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
    torch.float64: (1e-8, 1e-8),
}


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _kv_heads(config) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _tp_split(piece: Piece) -> tuple[int, int, int] | None:
    """(tensor dim, number of shards, this rank's index) of a 1-D-mesh sharded piece."""
    shards = [(i, p) for i, p in enumerate(piece.placements) if splits(p)]
    if len(shards) != 1 or piece.mesh.ndim != 1:
        return None
    mesh_dim, placement = shards[0]
    return placement.dim, piece.mesh.size(mesh_dim), piece.mesh.get_coordinate()[mesh_dim]


def _blocks(name: str, config, full: torch.Tensor) -> list[int] | None:
    for pattern, sizes in PACKED_LAYOUTS.items():
        if config is not None and re.search(pattern, name):
            blocks = sizes(config)
            return blocks if sum(blocks) == full.shape[0] else None
    return None


def _blockwise(full: torch.Tensor, blocks: list[int], parts: int, index: int) -> torch.Tensor:
    return torch.cat([b.chunk(parts, dim=0)[index] for b in full.split(blocks, dim=0)])


def expected_slice(piece: Piece, full: torch.Tensor, config) -> torch.Tensor:
    """The part of ``full`` that ``piece`` must hold, packed layouts included."""
    blocks = _blocks(piece.name, config, full) if piece.kind == "dtensor" else None
    split = _tp_split(piece) if blocks else None
    if blocks and split and split[0] == 0:
        return _blockwise(full, blocks, split[1], split[2])
    return piece.expected_from(full)


def _diagnose(piece: Piece, full: torch.Tensor, blocks: list[int] | None) -> str:
    """Which slice the wrong shard actually holds, in words."""
    split = _tp_split(piece)
    if split is None:
        return ""
    dim, parts, index = split
    for j, chunk in enumerate(full.chunk(parts, dim=dim)):
        if chunk.shape == piece.data.shape and torch.equal(chunk, piece.data):
            if blocks:
                return (
                    f"it holds contiguous chunk {j} of {parts}: the packed weight was split "
                    "as one block; split each packed block (q, k, v / gate, up) separately"
                )
            return (
                f"it holds the slice of TP rank {j} (chunk {j} of {parts} along dim {dim}), "
                f"not rank {index}'s: a wrong shard offset"
            )
    if dim == 0 and full.shape[0] % parts == 0:
        for n_blocks in (2, 3):
            if full.shape[0] % (n_blocks * parts) == 0:
                even = [full.shape[0] // n_blocks] * n_blocks
                if torch.equal(_blockwise(full, even, parts, index), piece.data):
                    return (
                        f"it holds a per-block split ({n_blocks} packed blocks) of a weight "
                        "that is laid out per head: split it contiguously"
                    )
    return "it matches no slice of the full tensor (garbage, or another tensor's values)"


class TPShards:
    name = "tp_shards"
    gathers = 0

    def run(self, ctx: CheckContext) -> CheckResult:
        pieces = [p for p in ctx.pieces() if p.shard_coords]
        if not pieces:
            return result(
                self.name,
                [],
                "",
                skip="no tensor-parallel (sharded DTensor) parameters on this rank",
            )
        source, full_of = _full_tensors(ctx)
        if full_of is None:
            return result(
                self.name, [], "", skip="needs dense_model= or checkpoint= to know the full tensors"
            )
        findings = []
        for piece in pieces:
            full = full_of(piece.name)
            if full is None:
                continue
            full = full.to(piece.data.device, piece.data.dtype)
            blocks = _blocks(piece.name, ctx.config, full)
            expected = expected_slice(piece, full, ctx.config)
            if expected.shape != piece.data.shape or not torch.equal(expected, piece.data):
                want, seen, detail = describe_diff(piece.data, expected)
                findings.append(
                    Finding(
                        piece.name,
                        [ctx.rank],
                        f"{piece.where()} is not the slice it should hold ({detail})",
                        want,
                        seen,
                        _diagnose(piece, full, blocks),
                    )
                )
        words = f"{len(pieces)} sharded pieces compared with the {source}"
        return result(
            self.name,
            findings,
            f"{words}: every shard is the right slice",
            f"{words}: {len(findings)} wrong",
        )


def _full_tensors(ctx: CheckContext):
    if ctx.dense_model is not None:
        dense = dict(named_tensors(ctx.dense_model))
        return "dense model", lambda name: dense.get(name)
    if ctx.checkpoint is not None:
        ckpt, prefix = ctx.checkpoint_reader

        def read(name: str) -> torch.Tensor | None:
            key = ckpt.key_for(name, prefix)
            return ckpt.read(key) if key else None

        return "checkpoint", read
    return "", None


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


class TPNumerics:
    name = "tp_numerics"
    # Its forward/backward is collective in itself: a rank failing inside it leaves its peers
    # to the launcher's timeout, which prints every rank's stack.
    gathers = 0

    def run(self, ctx: CheckContext) -> CheckResult:
        if ctx.dense_model is None:
            return result(self.name, [], "", skip="needs dense_model= to compare against")
        config = ctx.config
        vocab = getattr(config, "vocab_size", 32)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 16), generator=gen)
        device = next(ctx.dense_model.parameters()).device
        dtype = _model_dtype(ctx.inner)
        atol, rtol = TOLERANCES.get(dtype, (1e-4, 1e-4))
        model_device = next((p.device for p in ctx.model.parameters() if not p.is_meta), device)
        out = ctx.model(input_ids=ids.to(model_device), labels=ids.to(model_device))
        ref = ctx.dense_model(input_ids=ids.to(device), labels=ids.to(device))
        out.loss.backward()
        ref.loss.backward()
        findings = []
        checks = [("logits", out.logits, ref.logits), ("loss", out.loss, ref.loss)]
        dense_params = dict(ctx.dense_model.named_parameters())
        graded = 0
        for name, param in named_tensors(ctx.model):
            if (
                isinstance(param, torch.nn.Parameter)
                and param.grad is not None
                and (name in dense_params and dense_params[name].grad is not None)
            ):
                grad = param.grad
                grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                if grad.shape == dense_params[name].grad.shape:
                    checks.append((f"{name}.grad", grad, dense_params[name].grad))
                    graded += 1
        for what, seen, want in checks:
            seen, want = seen.detach().float().cpu(), want.detach().float().cpu()
            if not torch.allclose(seen, want, atol=atol, rtol=rtol):
                diff = (seen - want).abs().max().item()
                findings.append(
                    Finding(
                        what,
                        [ctx.rank],
                        f"differs from the dense model by "
                        f"up to {diff:.3g} (tolerance atol={atol:g}, "
                        f"rtol={rtol:g} for {dtype})",
                        hint="a shard holds the wrong slice or a collective is "
                        "missing; see tp_shards",
                    )
                )
        ctx.model.zero_grad(set_to_none=True)
        ctx.dense_model.zero_grad(set_to_none=True)
        grads = (f"{graded} gradients" if graded else "no gradients (this wrapper keeps them "
                 "flat: FSDP1)")
        words = f"logits, loss and {grads} vs the dense model ({dtype}, atol={atol:g})"
        return result(
            self.name, findings, f"{words}: within tolerance", f"{words}: {len(findings)} differ"
        )
