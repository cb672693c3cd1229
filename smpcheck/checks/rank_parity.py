"""rank parity: every replica of a tensor equals the lowest rank's (rank 0's when it holds one).

Replicas are pieces with the same ``replica_key``: a replicated tensor on every rank, a TP
shard on every data-parallel replica with the same TP coordinate, an HSDP shard across
replica groups. Each rank digests its pieces where they live (xxhash on the host, torch ops on
the GPU); only digests travel: O(number of tensors), never weights. One flipped bit changes a
digest.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from smpcheck.checks.base import CheckContext, ranked, result
from smpcheck.digest import digest
from smpcheck.report.model import CheckResult, Finding

HINT = (
    "ranks diverged: broadcast rank 0's weights (FSDP1 sync_module_states=True, FSDP2 "
    "set_model_state_dict(broadcast_from_rank0=True)) or seed every rank identically"
)


class RankParity:
    name = "rank_parity"

    def summarize(self, ctx: CheckContext) -> list[tuple[tuple, str, str]]:
        return [(p.replica_key, p.where(), digest(p.data)) for p in ctx.pieces()]

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        groups: dict[tuple, list[tuple[int, str, str]]] = defaultdict(list)
        for rank, entries in ranked(summaries):
            for key, where, value in entries:
                groups[key].append((rank, where, value))
        findings, compared = [], 0
        for key, members in groups.items():
            if len(members) < 2:
                continue
            compared += 1
            ref_rank, where, ref = members[0]
            differ = [rank for rank, _, value in members[1:] if value != ref]
            if differ:
                findings.append(Finding(key[0], differ, f"{where} differs from rank "
                                        f"{ref_rank}'s", f"rank {ref_rank}'s digest",
                                        "a different digest", HINT))
        unique = len(groups) - compared
        if compared == 0:
            return result(self.name, [], "", skip=f"no tensor is replicated across ranks "
                          f"({unique} unique shards): nothing to compare")
        words = (f"{compared} replicated pieces compared across {len(summaries)} ranks "
                 f"({unique} pieces have no replica: judged by checkpoint parity)")
        return result(self.name, findings, words, f"{words}: {len(findings)} differ")
