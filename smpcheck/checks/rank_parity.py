"""rank parity: every replica of a tensor holds the same value.

Replicas are pieces with the same ``replica_key``: a replicated tensor on every rank, a TP
shard on every data-parallel replica with the same TP coordinate, an HSDP shard across
replica groups. Each rank digests its pieces where they live (xxhash on the host, torch ops on
the GPU); only digests travel: O(number of tensors), never weights. One flipped bit changes a
digest. When replicas disagree, the replica compared with the checkpoint (or else the
majority) says which ranks are wrong, so the fault is charged to the rank that holds it, even
when that is rank 0.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from smpcheck.checks.base import CheckContext, ranked, result
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.digest import digest

HINT = (
    "ranks diverged: broadcast rank 0's weights (FSDP1 sync_module_states=True, FSDP2 "
    "set_model_state_dict(broadcast_from_rank0=True)) or seed every rank identically"
)


Entry = tuple[tuple, str, str, bool | None]  # replica key, where, digest, equals the file?


class RankParity:
    name = "rank_parity"

    def summarize(self, ctx: CheckContext) -> list[Entry]:
        """Each piece's digest, and for the pieces this rank compared with the checkpoint (one
        replica per group does, see :mod:`smpcheck.expect.expected`) whether it equalled it: that
        verdict says which side of a disagreement is right."""
        files: dict[tuple[str, str], bool] = {}
        if ctx.checkpoint is not None and "checkpoint_parity" in ctx.checks:
            try:
                _, comparisons = ctx.one_pass
                files = {(c.name, c.where): c.equal for c in comparisons}
            except Exception:  # noqa: BLE001 - files this rank cannot read are
                pass  # checkpoint_parity's to report; the digests are still judged here
        return [(p.replica_key, p.where(), digest(p.data), files.get((p.name, p.where())))
                for p in ctx.pieces()]

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        groups: dict[tuple, list[tuple[int, str, str, bool | None]]] = defaultdict(list)
        for rank, entries in ranked(summaries):
            for key, where, value, equals_file in entries:
                groups[key].append((rank, where, value, equals_file))
        findings, compared = [], 0
        for key, members in groups.items():
            if len(members) < 2:
                continue
            compared += 1
            if len({value for _, _, value, _ in members}) > 1:
                findings.append(disagreement(key[0], members))
        unique = len(groups) - compared
        if compared == 0:
            return result(self.name, [], "", skip=f"no tensor is replicated across ranks "
                          f"({unique} unique shards): nothing to compare")
        words = (f"{compared} replicated pieces compared across {len(summaries)} ranks "
                 f"({unique} pieces have no replica: judged by checkpoint parity)")
        return result(self.name, findings, words, f"{words}: {len(findings)} differ")


def disagreement(tensor: str, members: list[tuple[int, str, str, bool | None]]) -> Finding:
    """The ranks to blame when the replicas of ``tensor`` disagree, and why those.

    A replica that was compared with the checkpoint settles it: the ranks that differ from
    one that equals the file are wrong, and so are those that hold what one unequal to the
    file holds. Without a file verdict the majority decides; with no majority (two replicas,
    say) nothing tells which side is right, and every rank of the group is named."""
    where = members[0][1]
    right = next(((r, v) for r, _, v, eq in members if eq is True), None)
    if right is not None:
        bad = [r for r, _, v, _ in members if v != right[1]]
        return Finding(tensor, bad, f"{where} differs from rank {right[0]}'s, which equals the "
                       "checkpoint", f"rank {right[0]}'s digest", "a different digest", HINT)
    wrong = next(((r, v) for r, _, v, eq in members if eq is False), None)
    if wrong is not None:
        bad = [r for r, _, v, _ in members if v == wrong[1]]
        return Finding(tensor, bad, f"{where} holds the value of rank {wrong[0]}'s replica, "
                       "which differs from the checkpoint, while other replicas differ from it",
                       "the checkpoint's value", "a different digest", HINT)
    counts = Counter(v for _, _, v, _ in members)
    value, count = counts.most_common(1)[0]
    if count * 2 > len(members):
        first = min(r for r, _, v, _ in members if v == value)
        bad = [r for r, _, v, _ in members if v != value]
        return Finding(tensor, bad, f"{where} differs from the {count} of {len(members)} "
                       f"replicas that agree (rank {first}'s)", f"rank {first}'s digest",
                       "a different digest", HINT)
    return Finding(tensor, sorted(r for r, _, _, _ in members), f"{where}: the "
                   f"{len(members)} replicas hold {len(counts)} different values and nothing "
                   "tells which is right (pass checkpoint= to settle it)", "one value",
                   f"{len(counts)} different digests", HINT)
