"""How often the fresh-init judge fails a correct init, and how often it misses garbage.

Correct draws: a random rule (normal, uniform, truncated normal, constant; random scale and
mean; one in ten with a zeroed padding row), a random 2-D shape of 1 to --max-elements
elements, a random dtype (float32, bfloat16, float16; drawn in it or in float32 and cast), cut
into 1 to 64 pieces as FSDP2 rows, TP columns or FSDP1 flat ranges; every piece is judged, and
so is the merge of all pieces. Target: no failure at all.

Garbage draws: a random rule and a random kind of garbage (tests/init_garbage.py: tiny,
zeros, constant, huge, NaN, Inf, another law of the same variance, a x50 spread) in one piece
of 1 to --max-garbage elements; the miss rate is reported per kind and piece size, with the
smallest size from which every draw of that kind was caught.

    python benchmarks/init_rules_false_failures.py --out benchmarks/results/init_rules.json
    python benchmarks/init_rules_false_failures.py --device cuda    # CUDA's generators
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smpcheck.expect.fresh.init_judge import ALPHA, judge, resolvable  # noqa: E402
from smpcheck.expect.fresh.init_rules import InitRule  # noqa: E402
from smpcheck.expect.fresh.init_stats import merge_stats, shard_stats  # noqa: E402
from tests.init_garbage import (  # noqa: E402
    DTYPES,
    FAMILIES,
    LAYOUTS,
    correct,
    garbage,
    garbage_kinds,
    pieces,
    rule_from,
)

BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 63), (64, 1023), (1024, 16383), (16384, 1 << 30))
PIECE_COUNTS = (1, 2, 3, 4, 8, 16, 64)


def random_rule(rng: random.Random, narrow: bool) -> InitRule:
    """Scales 1e-3..1, mostly centred on 0; uniforms sometimes one-sided (``[-s, 0]``) or
    skewed; truncated normals cut at 100 stds (none), 2, or 1..3 stds, and with ``narrow``
    also at 0.1..1 std (near-uniform shapes, drawn by inverting the CDF)."""
    family = rng.choice(FAMILIES)
    scale = 10 ** rng.uniform(-3, 0)
    mean = rng.choice((0.0, 0.0, 0.0, 1.0, -0.5))
    cut = rng.choice((100.0, 2.0, rng.uniform(1.0, 3.0)) + ((rng.uniform(0.1, 1.0),) * narrow))
    skew = rng.choice((1.0, 1.0, 0.0, rng.random()))
    return rule_from(family, scale, mean if family != "constant" else rng.choice(
        (0.0, 1.0, scale)), cut, skew)


def log_uniform_int(rng: random.Random, top: int) -> int:
    return max(1, int(round(math.exp(rng.uniform(0, math.log(top))))))


def correct_draws(count: int, top: int, rng: random.Random, gen: torch.Generator) -> dict:
    judged = failed = failed_draws = 0
    examples = []
    for _ in range(count):
        rule, dtype = random_rule(rng, narrow=True), rng.choice(DTYPES)
        total = log_uniform_int(rng, top)
        if rule.kind != "constant" and rng.random() < 0.1:  # a padding row zeroed after
            rule = rule.with_(zeroed=rng.randint(1, max(1, total // 4)))
        rows = max(1, round(total ** rng.random()))
        full = correct(rule, (rows, math.ceil(total / rows)), dtype, gen,
                       via_float32=rng.random() < 0.3)
        parts = [p for p in pieces(full, rng.choice(LAYOUTS), rng.choice(PIECE_COUNTS))
                 if p.numel()]
        stats = [shard_stats(p) for p in parts]
        verdicts = [judge(rule, s) for s in [*stats, merge_stats(stats)]]
        bad = [sentence for ok, sentence in verdicts if not ok]
        judged += len(verdicts)
        failed += len(bad)
        failed_draws += bool(bad)
        examples += [f"{str(dtype)[6:]} {tuple(full.shape)}: {s}" for s in bad[:1]]
    return {"draws": count, "pieces_judged": judged, "pieces_failed": failed,
            "draws_failed": failed_draws, "rate_per_piece": failed / max(judged, 1),
            "rate_per_draw": failed_draws / max(count, 1), "examples": examples[:10]}


def garbage_draws(count: int, top: int, rng: random.Random, gen: torch.Generator) -> dict:
    """Misses per garbage kind and piece size, for rules the dtype resolves; rules whose
    spread is close to the rounding near their centre (``resolvable`` false) apart."""
    tally: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    coarse: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for _ in range(count):
        rule, dtype = random_rule(rng, narrow=False), rng.choice(DTYPES)
        kind, n = rng.choice(garbage_kinds(rule, dtype)), log_uniform_int(rng, top)
        values = garbage(rule, kind, n, dtype, gen)
        if rule.kind == "constant" and bool((values == rule.value).all()):
            continue  # rounded to exactly what the rule sets (tiny values in float16)
        ok, _ = judge(rule, shard_stats(values))
        lo, hi = next(b for b in BUCKETS if b[0] <= n <= b[1])
        cell = (tally[kind][f"{lo}-{hi}" if hi < 1 << 30 else f">={lo}"]
                if resolvable(rule, dtype) else coarse[kind])
        cell[0] += 1
        cell[1] += ok
    table = {}
    for kind, cells in sorted(tally.items()):
        ordered = sorted(cells.items(), key=lambda kv: int(kv[0].split("-")[0].lstrip(">=")))
        caught_from = None  # the smallest size from which no draw was missed
        for bucket, (_, missed) in reversed(ordered):
            if missed:
                break
            caught_from = bucket
        table[kind] = {"caught_from_size": caught_from,
                       "by_size": {b: {"draws": d, "missed": m, "miss_rate": round(m / d, 4)}
                                   for b, (d, m) in ordered}}
    return {"resolvable": table,
            "coarse": {k: {"draws": d, "missed": m} for k, (d, m) in sorted(coarse.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=10_000)
    parser.add_argument("--garbage-draws", type=int, default=10_000)
    parser.add_argument("--max-elements", type=int, default=1 << 20)
    parser.add_argument("--max-garbage", type=int, default=1 << 16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where tensors are drawn and judged")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    gen = torch.Generator(args.device).manual_seed(args.seed)
    start = time.perf_counter()
    correct_result = correct_draws(args.draws, args.max_elements, rng, gen)
    garbage_result = garbage_draws(args.garbage_draws, args.max_garbage, rng, gen)
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"alpha_per_test": ALPHA, "torch": torch.__version__},
        "correct": correct_result,
        "garbage": garbage_result,
        "seconds": round(time.perf_counter() - start, 1),
    }
    c = correct_result
    print(f"correct inits: {c['draws']} draws, {c['pieces_judged']} pieces judged, "
          f"{c['pieces_failed']} failed (rate {c['rate_per_piece']:.2e} per piece, "
          f"{c['rate_per_draw']:.2e} per draw)")
    for kind, row in garbage_result["resolvable"].items():
        misses = ", ".join(f"{b}: {v['missed']}/{v['draws']}" for b, v in row["by_size"].items())
        print(f"garbage {kind:10s} caught from size {row['caught_from_size']}; missed {misses}")
    coarse = ", ".join(f"{kind} {v['missed']}/{v['draws']}"
                       for kind, v in garbage_result["coarse"].items())
    print(f"garbage under rules the dtype cannot resolve, missed: {coarse}")
    print(f"{result['seconds']} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
