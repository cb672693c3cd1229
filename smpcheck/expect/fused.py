"""Expected values of tensors that transformers 5 fuses on load from several checkpoint tensors.

Mixtral's per-expert ``w1``/``w3`` become one ``mlp.experts.gate_up_proj`` [E, 2I, H] and
Qwen2-MoE's ``experts.N.gate_proj/up_proj`` likewise: no checkpoint tensor equals the model's.
Here each such target is listed with its ordered sources and the model's own
``WeightConverter`` (:func:`fused_targets`), and the expected value of any box of it (what
one rank holds: an FSDP2 row block, a TP column block, the rows covering an FSDP1 flat range)
is rebuilt with transformers' own ``ConversionOps`` (:func:`build_expected`).

Only what the box needs is read: the box is carried backwards through the op chain
(``MergeModulelist``: which experts; ``Concatenate``: which part of which source; ``Chunk``
and ``Transpose``: the matching source range), each source is read as a slice, and the ops
then run on the slices. An op without such a rule makes the whole chain run on whole sources
and the result is sliced: slower, still exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Box = tuple[tuple[int, int], ...]
"""One ``(start, stop)`` range per dimension of a tensor's global shape."""
Reader = Callable[[str, "Box | None"], torch.Tensor]
"""``read(checkpoint_key, box)``: that slice of the stored tensor (None: all of it)."""
# A stage of the op chain, by pattern: a list of tensors' shapes, or one tensor's shape.
_Shapes = dict[str, "list[tuple[int, ...]] | tuple[int, ...]"]
# What a stage must provide: per list item a box (item index -> box), or one box.
_Need = dict[str, "dict[int, Box] | Box"]


@dataclass(frozen=True)
class FusedTarget:
    """A model tensor built on load from several checkpoint tensors (or cut from one).

    Attributes:
        name: the model's tensor name (as in ``model.state_dict()``).
        shape: its global shape.
        sources: ``(source pattern, checkpoint keys in load order)`` per pattern, in the
            converter's pattern order.
        converter: transformers' ``WeightConverter`` for it (its ``operations`` run in order).
        output: the key of the op chain's output that holds this tensor.
        stages: the shapes of each stage of the chain (before the first op, after each op).
    """

    name: str
    shape: tuple[int, ...]
    sources: tuple[tuple[str, tuple[str, ...]], ...]
    converter: Any = field(repr=False)
    output: str = ""
    stages: tuple[_Shapes, ...] = field(default=(), repr=False)
    context: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every source checkpoint key, in the order the ops consume them."""
        return tuple(key for _, keys in self.sources for key in keys)

    @property
    def operations(self) -> list[Any]:
        return list(self.converter.operations)


@dataclass(frozen=True)
class FusedMap:
    """The fused targets of one model and checkpoint, both ways round.

    Attributes:
        targets: model tensor name -> :class:`FusedTarget`.
        by_key: checkpoint key -> the model tensors built from it (for unused-key accounting).
        unsupported: model tensor name -> why its expected value cannot be built here.
    """

    targets: dict[str, FusedTarget] = field(default_factory=dict)
    by_key: dict[str, tuple[str, ...]] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)


def _pretrained(model: nn.Module) -> nn.Module | None:
    """The outermost ``PreTrainedModel`` in ``model`` (itself, or inside a wrapper)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def fused_targets(model: nn.Module, checkpoint: Mapping[str, Sequence[int]]) -> FusedMap:
    """List the tensors ``model`` builds from several checkpoint tensors on load.

    Keys are renamed and grouped exactly as ``from_pretrained`` does (transformers'
    ``rename_source_key`` over the model's conversion mapping, keys in its natural order).

    Args:
        model: a plain ``PreTrainedModel`` (meta parameters are fine: a skeleton of the
            model under test), not an FSDP1/DDP wrapper: its ``state_dict()`` names decide
            which renamed keys exist, as in ``from_pretrained``.
        checkpoint: every checkpoint key -> its stored shape (from the safetensors headers).

    Returns:
        The fused targets; empty on transformers 4.x or for a model without converters.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # transformers 4.x: nothing is fused on load
        return FusedMap()
    pretrained = _pretrained(model)
    if pretrained is None:
        return FusedMap()
    transforms = get_model_conversion_mapping(pretrained)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not converters:
        return FusedMap()
    names = dict.fromkeys(pretrained.state_dict(), True)
    prefix = pretrained.base_model_prefix
    owner = {p: c for c in converters for p in c.source_patterns}  # as from_pretrained
    groups: dict[str, dict[str, list[str]]] = {}
    for key in sorted(checkpoint, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if pattern is None or renamed not in names:
            continue  # a plain rename, or a fused target this model lacks (unexpected)
        groups.setdefault(renamed, {}).setdefault(pattern, []).append(key)
    out = FusedMap()
    for first, by_pattern in groups.items():
        converter = owner[next(iter(by_pattern))]
        sources = tuple((p, tuple(by_pattern[p])) for p in converter.source_patterns
                        if p in by_pattern)
        try:
            built = targets_of(converter, sources, checkpoint, layer_name=first,
                               model=pretrained, config=pretrained.config)
        except Exception as exc:  # noqa: BLE001 - an op that cannot run on shapes alone
            out.unsupported[first] = f"its conversion ops cannot be traced on meta: {exc}"
            names_built: tuple[str, ...] = (first,)
        else:
            names_built = tuple(n for n in built if n in names)
            out.targets.update((n, built[n]) for n in names_built)
        for key in (k for _, keys in sources for k in keys):
            out.by_key[key] = names_built
    return out


def targets_of(converter: Any, sources: Sequence[tuple[str, Sequence[str]]],
               checkpoint: Mapping[str, Sequence[int]], *, layer_name: str,
               model: nn.Module | None = None, config: Any = None) -> dict[str, FusedTarget]:
    """The tensors one converter builds from ``sources``, by full name.

    The ops run once on meta tensors: that gives each stage's shapes (what :func:`build_expected`
    plans with) and the outputs' names, formed as ``WeightConverter.convert`` forms them.

    Args:
        converter: a transformers ``WeightConverter``.
        sources: ``(source pattern, checkpoint keys in load order)`` per pattern.
        checkpoint: checkpoint key -> stored shape.
        layer_name: the first target's full name (what ``from_pretrained`` renames the
            sources to).
        model, config: passed to the ops, as ``from_pretrained`` passes them.
    """
    sources = tuple((p, tuple(keys)) for p, keys in sources)
    context = {"model": model, "config": config, "full_layer_name": layer_name}
    values: dict[str, Any] = {p: [torch.empty(tuple(checkpoint[k]), device="meta") for k in keys]
                              for p, keys in sources}
    stages = [_shapes_of(values)]
    for op in converter.operations:
        values = _convert(op, converter, values, context)
        stages.append(_shapes_of(values))
    full = layer_name.replace("*.", "0.")
    start, _, end = next(full.partition(k) for k in values if k in full)
    return {start + k + end: FusedTarget(start + k + end, stages[-1][k], sources, converter, k,
                                         tuple(stages), context) for k in values}


def _shapes_of(values: dict[str, Any]) -> _Shapes:
    return {k: [tuple(t.shape) for t in v] if isinstance(v, list) else tuple(v.shape)
            for k, v in values.items()}


def _convert(op: Any, converter: Any, values: dict[str, Any], context: dict[str, Any]
             ) -> dict[str, Any]:
    return op.convert(values, source_patterns=converter.source_patterns,
                      target_patterns=converter.target_patterns, missing_keys=None, **context)


def build_expected(target: FusedTarget, read: Reader, box: Box | None = None,
                   *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The value ``from_pretrained`` gives ``box`` of ``target``, rebuilt from its sources.

    Args:
        target: from :func:`fused_targets`.
        read: reads one checkpoint tensor, or a box of it.
        box: one ``(start, stop)`` per dimension of ``target.shape``; None: the whole tensor.
        dtype: cast the result (as ``from_pretrained`` casts each source: elementwise, so the
            same bits); None keeps the stored dtype.

    Returns:
        A tensor of the box's shape, bit-identical to that slice of the loaded model's tensor.
    """
    full = tuple((0, n) for n in target.shape)
    box = full if box is None else tuple((int(a), int(b)) for a, b in box)
    if len(box) != len(full) or any(not 0 <= a <= b <= n for (a, b), n in zip(box, target.shape)):
        raise ValueError(f"box {box} does not fit {target.name} of shape {target.shape}")
    extents = tuple(b - a for a, b in box)
    if 0 in extents:  # a rank holding nothing (uneven shards): one element gives the dtype
        if 0 in target.shape:
            raise ValueError(f"{target.name} of shape {target.shape} holds no elements")
        one = build_expected(target, read, tuple((0, 1) for _ in box))
        value = one.new_empty(extents)
    else:
        try:
            first, posts = _plan(target, box)
            value = _run(target, read, first, posts)
        except _NoPlan:
            value = _run(target, read, None, None)[_slices(box)]
    if tuple(value.shape) != extents:
        raise RuntimeError(f"built {tuple(value.shape)} for box {box} of {target.name}")
    return value if dtype is None else value.to(dtype)


class _NoPlan(Exception):
    """An op this module cannot carry a box through: run the chain on whole sources."""


def _plan(target: FusedTarget, box: Box) -> tuple[_Need, list[dict[str, Box]]]:
    """What to read of each source, and what to cut from each op's output, for ``box``."""
    need: _Need = {target.output: box}
    posts: list[dict[str, Box]] = []
    ops = target.operations
    for op, before in zip(reversed(ops), reversed(target.stages[:-1])):
        rule = _RULES.get(type(op))
        if rule is None:
            raise _NoPlan(type(op).__name__)
        try:
            need, post = rule(op, target.converter, before, need)
        except (KeyError, ValueError) as exc:
            raise _NoPlan(str(exc)) from exc
        posts.append(post)
    return need, posts[::-1]


def _run(target: FusedTarget, read: Reader, need: _Need | None,
         posts: list[dict[str, Box]] | None) -> torch.Tensor:
    """Read the sources (whole when ``need`` is None), run the ops, cut as planned."""
    values: dict[str, Any] = {}
    for (pattern, keys), shapes in zip(target.sources, target.stages[0].values()):
        if need is None:
            values[pattern] = [read(key, None) for key in keys]
            continue
        values[pattern] = [read(keys[i], None if _covers(b, shapes[i]) else b)
                           for i, b in need[pattern].items()]
    for i, op in enumerate(target.operations):
        values = _convert(op, target.converter, values, target.context)
        for key, cut in (posts[i] if posts else {}).items():
            values[key] = values[key][_slices(cut)]
    return values[target.output]


def _covers(box: Box, shape: tuple[int, ...]) -> bool:
    return all(a == 0 and b == n for (a, b), n in zip(box, shape))


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


def _with(box: Box, dim: int, span: tuple[int, int]) -> Box:
    return (*box[:dim], span, *box[dim + 1:])


def _single(before: _Shapes, need: _Need) -> tuple[str, Any, Box]:
    """The one input (pattern, shapes) and the one needed output box of a 1 -> 1 op."""
    if len(before) != 1 or len(need) != 1:
        raise ValueError("not a one-to-one step")
    (pattern, shapes), (box,) = next(iter(before.items())), need.values()
    return pattern, shapes, box


def _as_input(shapes: Any, box: Box) -> dict[int, Box] | Box:
    """An op that takes one tensor reads the first of a list: need just that one."""
    return {0: box} if isinstance(shapes, list) else box


def _merge_rule(op: Any, converter: Any, before: _Shapes, need: _Need):
    """``MergeModulelist``: stacked along ``dim``; the box's range there picks the items."""
    out: _Need = {}
    for pattern, shapes in before.items():
        box = need[op.get_target_pattern(len(before), pattern, converter.target_patterns)]
        dim = op.dim % len(box)
        if isinstance(shapes, list):
            inner = (*box[:dim], *box[dim + 1:])
            out[pattern] = {i: inner for i in range(*box[dim])}
        else:
            out[pattern] = box
    return out, {}


def _concat_rule(op: Any, converter: Any, before: _Shapes, need: _Need):
    """``Concatenate``: each part (a list's items in turn) gets the box's overlap with it,
    re-based; a part outside the box is read as an empty slice, so the ops still see it."""
    box = need[op.get_target_pattern(converter.target_patterns)]
    dim = op.dim % len(box)
    lo, hi = box[dim]
    out: _Need = {}
    offset = 0
    for pattern in converter.source_patterns:
        if pattern not in before:
            continue
        shapes = before[pattern]
        parts: dict[int, Box] = {}
        for i, shape in enumerate(shapes if isinstance(shapes, list) else [shapes]):
            start, stop = max(lo, offset) - offset, min(hi, offset + shape[dim]) - offset
            parts[i] = _with(box, dim, (start, stop) if start < stop else (0, 0))
            offset += shape[dim]
        out[pattern] = parts if isinstance(shapes, list) else parts[0]
    return out, {}


def _chunk_rule(op: Any, converter: Any, before: _Shapes, need: _Need):
    """``Chunk``: the source is read whole along ``dim`` (the op cuts it into equal parts),
    sliced elsewhere; this output's range along ``dim`` is cut after the op."""
    pattern, shapes, box = _single(before, need)
    shape = shapes[0] if isinstance(shapes, list) else shapes
    dim = op.dim % len(box)
    post = _with(tuple((0, b - a) for a, b in box), dim, box[dim])
    return {pattern: _as_input(shapes, _with(box, dim, (0, shape[dim])))}, {
        next(iter(need)): post}


def _transpose_rule(op: Any, converter: Any, before: _Shapes, need: _Need):
    """``Transpose``: the box with its two dimensions swapped (not ``check_dims``, which
    decides from the model's parameter whether to transpose at all)."""
    if op.check_dims:
        raise ValueError("Transpose(check_dims=True) depends on the model's parameter")
    pattern, shapes, box = _single(before, need)
    dims = [op.dim0 % len(box), op.dim1 % len(box)]
    swapped = list(box)
    swapped[dims[0]], swapped[dims[1]] = box[dims[1]], box[dims[0]]
    return {pattern: _as_input(shapes, tuple(swapped))}, {}


def _rules() -> dict[type, Callable[..., tuple[_Need, dict[str, Box]]]]:
    try:
        from transformers.core_model_loading import (
            Chunk,
            Concatenate,
            MergeModulelist,
            Transpose,
        )
    except ImportError:
        return {}
    return {MergeModulelist: _merge_rule, Concatenate: _concat_rule, Chunk: _chunk_rule,
            Transpose: _transpose_rule}


_RULES = _rules()

