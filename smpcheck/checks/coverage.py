"""coverage: the pieces all ranks hold of each stored tensor tile its stored shape exactly.

Checkpoint parity compares each rank's slice with the same slice of the file, which proves the
slice right but not that the slices add up: a tensor-parallel model whose sharded weight lost a
row (global shape one short of the stored one) compares equal slice by slice. So every rank
sends, per tensor with a file behind it, only shapes and placements (never data): the global
shape its model holds, the stored shape, and which part it holds (the per-dimension runs of its
DTensor shard, and an FSDP1 flat range of that). The judge then proves, with no reads, that the
global shape is the stored one and that the distinct parts are disjoint and cover every
element; replicas hold equal parts and count once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from smpcheck.checks.base import CheckContext, Skip, ranked, result
from smpcheck.expect.expected import ADAPTER, CHECKPOINT, FUSED, Source
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.pieces import Piece
from smpcheck.shards.selection import Box, Run, Selection, dtensor_runs

SHAPE_HINT = ("the model's tensor is not the stored tensor's shape: a sharding or resize step "
              "dropped or added elements; fix the shard sizes (or declare the resize with "
              "resize_token_embeddings) so every stored element has a place")
TILE_HINT = ("the ranks' shards do not add up to the tensor: a shard offset or size is wrong, "
             "or a rank lost its part; every element must be held by exactly one shard")

Runs = tuple[tuple[Run, ...], ...]


@dataclass(frozen=True)
class Part:
    """Which part of a tensor one rank holds: DTensor runs per dimension, and an FSDP1 flat
    range of the elements those runs give (None: all of them)."""

    runs: Runs
    flat: Run | None = None


@dataclass(frozen=True)
class Held:
    """One rank's piece of one tensor with a file behind it, as shapes only."""

    name: str
    source: str  # the source in words, for the finding
    stored: tuple[int, ...] | None  # None: a resized vocabulary (rows judged elsewhere)
    shape: tuple[int, ...]  # the global shape the model holds
    part: Part


def part_of(piece: Piece) -> Part:
    """The part of its tensor ``piece`` holds, before any FSDP1 flattening."""
    shape = piece.full_shape
    runs = (dtensor_runs(shape, piece.mesh, piece.placements) if piece.placements
            else Selection.whole(shape).runs)
    return Part(runs, piece.flat_range)


def _stored_shape(ctx: CheckContext, piece: Piece, source: Source) -> tuple[int, ...] | None:
    expectations = ctx.expectations
    if source.rows is not None:
        return None
    if source.kind == FUSED:
        return tuple(expectations.fused.targets[ctx.view.base_name(piece.name)[0]].shape)
    reader = expectations.checkpoint if source.kind == CHECKPOINT else expectations.adapter
    return tuple(reader.shape(source.keys[0]))


def _volume(box: Box) -> int:
    return math.prod(b - a for a, b in box)


def _overlap(one: Box, other: Box) -> bool:
    return all(max(a, c) < min(b, d) for (a, b), (c, d) in zip(one, other))


def _intervals_tile(intervals: Iterable[Run], size: int) -> tuple[int, bool]:
    """(elements of [0, size) the intervals cover, whether two distinct ones overlap)."""
    covered, end, overlap = 0, 0, False
    for a, b in sorted(set(intervals)):
        overlap = overlap or a < end
        lo, hi = max(a, end, 0), min(b, size)
        covered += max(0, hi - lo)
        end = max(end, b)
    return covered, overlap


def tiling_problems(shape: tuple[int, ...], parts: Iterable[Part]) -> list[str]:
    """Why the distinct ``parts`` do not tile a tensor of ``shape`` exactly ([]: they do).

    A part's runs give a set of boxes of the tensor; FSDP1 flat ranges then cut the elements
    of one set of runs. Equal parts (replicas) count once; distinct ones must not overlap, and
    together they must hold every element.
    """
    numel = math.prod(shape)
    by_runs: dict[Runs, list[Run | None]] = {}
    for part in set(parts):
        by_runs.setdefault(part.runs, []).append(part.flat)
    problems: list[str] = []
    boxes: list[Box] = []
    held = 0
    for runs, flats in by_runs.items():
        runs_boxes = list(itertools.product(*runs))
        local = sum(_volume(b) for b in runs_boxes)
        if None in flats:
            covered = local
        else:
            covered, overlap = _intervals_tile(flats, local)
            if overlap:
                problems.append("two ranks' FSDP1 flat ranges of the same shard overlap")
        boxes += runs_boxes
        held += covered
    for one, other in itertools.combinations(set(boxes), 2):
        if _overlap(one, other):
            problems.append(f"two ranks hold overlapping but different parts ({one} and "
                            f"{other})")
            break
    if not problems and held != numel:
        problems.append(f"{numel - held} of {numel} elements are held by no rank" if held <
                        numel else f"the ranks hold {held} elements of a {numel}-element tensor")
    return problems


class Coverage:
    name = "coverage"

    def summarize(self, ctx: CheckContext) -> list[Held] | Skip:
        if ctx.checkpoint is None and ctx.adapter is None:
            return Skip("no checkpoint given (checkpoint=PATH)")
        expectations = ctx.expectations
        out = []
        for piece in ctx.pieces():
            source = expectations.source(piece)
            if source.kind not in (CHECKPOINT, ADAPTER, FUSED) or not source.keys:
                continue
            out.append(Held(piece.name, source.words(), _stored_shape(ctx, piece, source),
                            piece.full_shape, part_of(piece)))
        return out

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        present = ranked(summaries)
        tensors: dict[str, list[tuple[int, Held]]] = {}
        for rank, held in present:
            for one in held:
                tensors.setdefault(one.name, []).append((rank, one))
        findings = []
        for name, entries in tensors.items():
            ranks = sorted({rank for rank, _ in entries})
            first = entries[0][1]
            wrong = sorted({rank for rank, h in entries
                            if h.stored is not None and h.shape != h.stored})
            if wrong:
                findings.append(Finding(name, wrong, f"holds a tensor of global shape "
                                        f"{first.shape}, but {first.source} stores "
                                        f"{first.stored}", str(first.stored), str(first.shape),
                                        SHAPE_HINT))
                continue
            for problem in tiling_problems(first.shape, (h.part for _, h in entries)):
                findings.append(Finding(name, ranks, problem, hint=TILE_HINT))
        words = f"{len(tensors)} stored tensors' shards tiled across {len(summaries)} ranks"
        return result(self.name, findings, f"{words}: every element held, shapes as stored",
                      f"{words}: {len(findings)} problems")
