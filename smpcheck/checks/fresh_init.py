"""fresh init: tensors that no checkpoint holds by design are draws from the rule that
initialises them, not garbage.

A new task head, PEFT adapters, a re-initialised head of another size: their expected value is
a distribution, not a tensor. The rule is found by replaying the model's own init (its
``_init_weights``, PEFT's ``reset_lora_parameters``) on a meta twin
(:mod:`smpcheck.expect.fresh.init_replay`), and each rank judges the piece it holds against it
from a handful of moments (:mod:`smpcheck.expect.fresh.init_judge`): a tolerance that follows
from the piece's size, so a correct init never fails and uninitialised memory, constants, huge
values or another rule's distribution do. ``lora_B`` must start at zero (the adapter starts
at identity).
"""

from __future__ import annotations

from typing import Any

from smpcheck.checks.base import CheckContext, LocalFindings, Skip, judge_local
from smpcheck.expect.expected import FRESH
from smpcheck.expect.fresh.init_judge import judge
from smpcheck.expect.fresh.init_replay import fresh_init_rules
from smpcheck.expect.fresh.init_rules import InitRule
from smpcheck.expect.fresh.init_stats import shard_stats
from smpcheck.report.model import CheckResult, Finding
from smpcheck.shards.pieces import flat_full_shapes

HINT = ("this fresh tensor does not look like its init rule's draw: it was never initialised "
        "(to_empty/meta memory) or got another rule; initialise it on rank 0 before the "
        "broadcast (param_init_fn / DelayedParamIniter); if it was loaded from a trained "
        "adapter, name that directory so it is compared with the file instead (verify(adapter="
        "DIR), SmpcheckCallback(adapter=DIR), smpcheck run --peft DIR)")
UNKNOWN = InitRule("unknown", source="no init function found for it",
                   reason="no replayable init")


class FreshInit:
    name = "fresh_init"

    def summarize(self, ctx: CheckContext) -> LocalFindings | Skip:
        sources, _ = ctx.one_pass
        fresh = [(piece, source) for piece, source in sources
                 if source.kind == FRESH and not piece.data.is_meta]
        if not fresh:
            return Skip("no tensor is expected fresh: every one has a checkpoint, adapter or "
                        "config source")
        shapes = {name: shape for name, (shape, _) in flat_full_shapes(ctx.model).items()}
        rules = fresh_init_rules(ctx.model, shapes=shapes)
        findings = []
        for piece, source in fresh:
            rule = rules.get(piece.name, UNKNOWN)
            ok, sentence = judge(rule, shard_stats(piece.data))
            if not ok:
                findings.append(Finding(piece.name, [ctx.rank], f"{piece.where()} ({source.note})"
                                        f": {sentence}", rule.describe(), hint=HINT))
        return LocalFindings(findings, f"{len(fresh)} fresh pieces judged against the rule "
                             "that initialises them")

    def judge(self, ctx: CheckContext, summaries: list[Any]) -> CheckResult:
        return judge_local(self.name, summaries, "each a plausible draw")
