"""masters: the optimizer's fp32 master weights equal the parameters they master.

Mixed-precision optimizers keep a full-precision copy of each parameter and write the training
dtype's values back after every step. When the parameters are loaded or resumed after the
masters were built (weights loaded into the model behind the optimizer's back, a resume that
restored the model but not the optimizer), the two disagree silently: the first step writes the
stale masters back and the loaded weights are gone, the loss jumping from the step after.

Read from DeepSpeed's own optimizer state, partition by partition (no gather): ZeRO-1/2 keep
each group's flat fp32 partition beside the bit16 partitions (``single_partition_of_fp32_groups``,
``parallel_partitioned_bit16_groups``); ZeRO-3 its flat fp32 partition beside the flat bit16 one
(``fp32_partitioned_groups_flat``, ``fp16_partitioned_groups_flat``). Each master cast to the
parameter's dtype must equal it bit for bit, as the optimizer's own write-back makes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from smpcheck.checks.base import CheckContext, LocalFindings, Skip, judge_local
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.tensors import clean_name, describe_diff

HINT = ("the optimizer's master copy is not the loaded weights: the weights were loaded or "
        "resumed after the optimizer was built; load them before deepspeed.initialize, or "
        "resume with the engine's load_checkpoint (optimizer states included), or rebuild the "
        "optimizer")

# (this rank's flat master, its flat bit16 partition, [(parameter, its run of the flat)])
Pair = tuple[torch.Tensor, torch.Tensor, list[tuple[Any, int, int]]]


def _runs(params: list[Any], sizes: list[int], start: int) -> list[tuple[Any, int, int]]:
    """Each parameter's [start, stop) in a flat buffer that lays ``sizes`` end to end, shifted
    so that ``start`` is index 0 (this rank's partition)."""
    out, offset = [], -start
    for param, size in zip(params, sizes):
        out.append((param, offset, offset + size))
        offset += size
    return out


def _zero12(optimizer: Any) -> Iterator[Pair]:
    for i, fp32 in enumerate(optimizer.single_partition_of_fp32_groups):
        group = optimizer.real_dp_process_group[i]
        partitions = optimizer.parallel_partitioned_bit16_groups[i]
        index = dist.get_rank(group=group) if dist.is_initialized() else 0
        start = sum(p.numel() for p in partitions[:index])
        params = optimizer.bit16_groups[i]
        yield fp32, partitions[index], _runs(params, [p.numel() for p in params], start)


def _zero3(optimizer: Any) -> Iterator[Pair]:
    for i, fp32 in enumerate(optimizer.fp32_partitioned_groups_flat):
        params = optimizer.fp16_groups[i]
        yield (fp32, optimizer.fp16_partitioned_groups_flat[i],
               _runs(params, [p.ds_tensor.numel() for p in params], 0))


def master_pairs(optimizer: Any) -> Iterator[Pair] | None:
    """This rank's (master, partition, layout) per parameter group; None when the optimizer
    keeps no master copy smpcheck can read."""
    if hasattr(optimizer, "single_partition_of_fp32_groups"):
        return _zero12(optimizer)
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return _zero3(optimizer)
    return None


class Masters:
    name = "masters"

    def summarize(self, ctx: CheckContext) -> LocalFindings | Skip:
        optimizer = ctx.options.get("optimizer")
        if optimizer is None:
            return Skip("no optimizer given (verify(optimizer=...); the Trainer callback "
                        "passes its own)")
        pairs = master_pairs(optimizer)
        if pairs is None:
            return Skip(f"{type(optimizer).__name__} keeps no master copy of the weights")
        names = {id(p): clean_name(n) for n, p in ctx.model.named_parameters()}
        findings, groups = [], 0
        for master, partition, layout in pairs:
            groups += 1
            cast = master.detach().to(partition.dtype)
            for param, start, stop in layout:
                lo, hi = max(start, 0), min(stop, partition.numel())
                if lo >= hi or torch.equal(cast[lo:hi], partition[lo:hi]):
                    continue
                want, seen, detail = describe_diff(cast[lo:hi], partition[lo:hi])
                findings.append(Finding(names.get(id(param), "(unnamed parameter)"),
                                        [ctx.rank], "the optimizer's master weights differ "
                                        f"from the parameter they master ({detail})", want,
                                        seen, HINT))
        return LocalFindings(findings, f"{groups} parameter groups' master partitions "
                             "compared with the parameters")

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        return judge_local(self.name, summaries, "equal")
