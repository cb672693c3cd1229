"""Is one piece of a fresh tensor a draw from its init rule, or garbage?

Each test below bounds the probability that a *correct* draw of ``n`` values from the rule
looks at least as odd as the piece does, and the piece fails only when that bound is below
:data:`ALPHA` (1e-12): with a handful of tests per piece, a million correct pieces fail with a
probability of about 1e-5. The bounds are exact where the law allows (chi-square for a normal's
spread, the distribution of the extremes), and distribution-free elsewhere (Hoeffding), so the
tolerance follows from the piece's size: a small piece carries little evidence and is passed
with a sentence that says so, a large one is held tight. Values may have been rounded to the
piece's dtype or to bfloat16 on their way (generated in one dtype, stored in another); every
test gives the piece the benefit of that rounding.

Garbage fails because it is improbable under the rule, whatever it is: uninitialised memory
(tiny values, zeros), a constant fill, huge values, NaN/Inf, or another rule's distribution
(a uniform where a normal was due shows in its extremes and kurtosis, a std of 1 where 0.02 was
due in its spread, Kaiming bounds where zeros were due in not being constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from smpcheck.expect.fresh.init_rules import InitRule, fmt
from smpcheck.expect.fresh.init_stats import ShardStats

#: Per-test bound on the chance that a correct piece fails.
ALPHA = 1e-12
#: Where a law's shape is not trusted (a truncated normal in 32 bits or more), a spread this
#: many times the rule's still fails (CUDA's distortion measured at most 1.15x there; garbage
#: rescaled from 0.02 to 1 is 50x).
UNTRUSTED_SPREAD = 10.0
#: Per-element chance of a generator artefact no continuous law has (Box-Muller returns an
#: exact 0 when its uniform draw is 1, about 2**-24): the floor for "exactly zero".
GENERATOR_FLOOR = 2.0**-20
#: The extremes test trusts the law's tails only down to this mass (generators truncate them).
TAIL_TRUST = 1e-5
#: The kurtosis test (Anscombe-Glynn) runs from this many values, failing beyond this z.
KURTOSIS_MIN_COUNT = 10_000
KURTOSIS_Z = 10.0
#: How far a stored value may be from an ideal draw, whatever its dtype (values are often
#: drawn in bfloat16 or float16 and stored wider): torch rounds a uniform's bounds to the dtype
#: (half an ulp, 2**-8 relative in bfloat16), draws below the upper one and rounds the value
#: (up to a whole ulp, 2**-7): 2**-6 covers both with a margin. Values below float16's
#: smallest subnormal (6e-8) may round to 0.
_COARSEST_RELATIVE = 2.0**-6
_COARSEST_ABSOLUTE = 2.0**-25
#: torch draws a bfloat16 uniform from 8 random bits: its values sit on a grid of 1/256 of the
#: range (an exact `low` comes once in 256 draws), whatever dtype they are stored in later.
_UNIFORM_GRID = 2.0**-8


def _phi(z: float) -> float:
    return 0.0 if math.isinf(z) else math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


@dataclass(frozen=True)
class _Rounding:
    """How far a stored value may be from the value drawn: ``rel * |y| + abs``."""

    rel: float
    abs: float

    @classmethod
    def of(cls, dtype: torch.dtype) -> _Rounding:
        if not dtype.is_floating_point:
            return cls(0.0, 0.0)
        info = torch.finfo(dtype)
        rel = max(info.eps / 2, _COARSEST_RELATIVE)
        return cls(rel / (1 - rel), max(info.smallest_normal * info.eps / 2, _COARSEST_ABSOLUTE))

    def at(self, y: float) -> float:
        return self.rel * abs(y) + self.abs


@dataclass(frozen=True)
class _Law:
    """The distribution a rule draws from: moments, support, CDF, densest point. A normal is
    a truncated normal with infinite cut-offs; a uniform has its own CDF."""

    mean: float
    std: float
    lo: float
    hi: float
    density_max: float
    exact_normal: bool  # a normal (any truncation negligible): exact chi-square/z tests
    uniform: bool = False
    grid: float = 0.0  # spacing of the values a generator can draw (0: as fine as rounding)
    mu: float = 0.0  # the untruncated normal and its standardised cut-offs and kept mass
    sigma: float = 1.0
    z_lo: float = -math.inf
    z_hi: float = math.inf
    mass: float = 1.0

    @classmethod
    def of(cls, rule: InitRule) -> _Law:
        if rule.kind == "uniform":
            width = rule.high - rule.low
            return cls((rule.low + rule.high) / 2, width / math.sqrt(12), rule.low, rule.high,
                       1 / width, exact_normal=False, uniform=True,
                       grid=width * _UNIFORM_GRID)
        mu, sigma = rule.mean, rule.std
        lo, hi = (rule.low, rule.high) if rule.kind == "trunc_normal" else (-math.inf, math.inf)
        a, b = (lo - mu) / sigma, (hi - mu) / sigma
        mass = _norm_sf(a) - _norm_sf(b) if a > 0 else _norm_cdf(b) - _norm_cdf(a)
        pa, pb = _phi(a), _phi(b)
        shift = (pa - pb) / mass
        spread = 1 + ((a * pa if pa else 0.0) - (b * pb if pb else 0.0)) / mass - shift**2
        # torch draws a truncation keeping <= 30% of the mass by inverting the CDF of a
        # uniform draw: the uniform's grid, stretched where the density is thinnest
        thinnest = min(pa, pb)
        grid = (sigma * mass * _UNIFORM_GRID / thinnest if thinnest else math.inf
                ) if mass <= 0.3 else 0.0
        return cls(mu + sigma * shift, sigma * math.sqrt(max(spread, 0.0)), lo, hi,
                   _phi(min(max(0.0, a), b)) / (sigma * mass), mass > 1 - 1e-12,
                   grid=grid, mu=mu, sigma=sigma, z_lo=a, z_hi=b, mass=mass)

    def _z(self, x: float) -> float:
        return min(max((x - self.mu) / self.sigma, self.z_lo), self.z_hi)

    def cdf(self, x: float) -> float:
        """P(draw <= x)."""
        if self.uniform:
            return min(max((x - self.lo) / (self.hi - self.lo), 0.0), 1.0)
        return min(max((_norm_cdf(self._z(x)) - _norm_cdf(self.z_lo)) / self.mass, 0.0), 1.0)

    def sf(self, x: float) -> float:
        """P(draw > x), accurate far into the upper tail."""
        if self.uniform:
            return 1.0 - self.cdf(x)
        return min(max((_norm_sf(self._z(x)) - _norm_sf(self.z_hi)) / self.mass, 0.0), 1.0)


def expected_moments(rule: InitRule) -> tuple[float, float]:
    """``(mean, std)`` of the values ``rule`` draws (after truncation); a constant's spread
    is 0. Raises ValueError for an unknown rule."""
    if rule.kind == "constant":
        return rule.value, 0.0
    if not rule.judgeable:
        raise ValueError(f"{rule.describe()} has no moments")
    law = _Law.of(rule)
    return law.mean, law.std


@dataclass(frozen=True)
class _Failure:
    p: float
    seen: str
    expected: str
    hint: str = ""


def _drop_zeros(stats: ShardStats, j: int) -> ShardStats:
    """``stats`` without ``j`` of its exact zeros (those a rule's partial write set)."""
    n = stats.finite
    rest = n - j
    if rest == 0:
        return ShardStats(stats.count - j, stats.nonfinite, stats.zeros - j, math.nan, 0.0,
                          0.0, 0.0, math.inf, -math.inf, stats.dtype)
    mean = stats.mean * n / rest
    h = stats.mean - mean
    central = [n, 0.0, stats.m2, stats.m3, stats.m4]
    about = [sum(math.comb(k, p) * central[p] * h ** (k - p) for p in range(k + 1)) - j *
             (-mean) ** k for k in (2, 3, 4)]
    return ShardStats(stats.count - j, stats.nonfinite, stats.zeros - j, mean,
                      max(about[0], 0.0), about[1], max(about[2], 0.0), stats.min, stats.max,
                      stats.dtype)


def _log_p_cluster(n: int, density: float, width: float) -> float:
    """log of a bound on P(all ``n`` draws fall within ``width`` of each other)."""
    if n < 2 or density * width >= 1:
        return 0.0
    if width <= 0:
        return -math.inf
    return math.log(n) + (n - 1) * math.log(density * width)


def _chi2(tail, n: int, x: float) -> float:
    """A tail of the chi-square law with ``n`` degrees of freedom at ``x`` (regularised
    incomplete gamma, float64; accurate for n up to 1e9 and more)."""
    args = torch.tensor([n / 2, x / 2], dtype=torch.float64)
    return tail(args[0], args[1]).item()


def _kurtosis_z(n: int, b2: float) -> float:
    """Anscombe and Glynn's normalised kurtosis: about N(0, 1) for a normal sample."""
    e = 3.0 * (n - 1) / (n + 1)
    var = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) ** 2 * (n + 3) * (n + 5))
    x = (b2 - e) / math.sqrt(var)
    root_b1 = (6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9))
               * math.sqrt(6.0 * (n + 3) * (n + 5) / (n * (n - 2) * (n - 3))))
    a = 6.0 + 8.0 / root_b1 * (2.0 / root_b1 + math.sqrt(1 + 4.0 / root_b1**2))
    denom = 1 + x * math.sqrt(2 / (a - 4.0))
    term = math.copysign(abs((1 - 2.0 / a) / denom) ** (1 / 3), denom)
    return (1 - 2 / (9.0 * a) - term) / math.sqrt(2 / (9.0 * a))


def _values(n: int) -> str:
    return "1 value" if n == 1 else f"{n} values"


def _scale_hint(seen: float, expected: float, stats: ShardStats) -> str:
    if stats.abs_max == 0:
        return "all zeros: never initialised, or zeroed?"
    if seen < 1e-3 * expected:
        return "uninitialised memory?"
    if seen > 1e3 * expected:
        return "far too large: garbage?"
    return "another rule's scale?"


def _imprecise(law: _Law, dtype: torch.dtype) -> bool:
    """torch inverts the CDF of a narrow truncation in the tensor's own dtype, and its erfinv
    of values near 1 strays: past about 2.5 stds in 16 bits (piling values onto a far cut-off),
    5 in float32 (values at 30 stds for a cut at 100)."""
    reach = 2.5 if dtype in (torch.bfloat16, torch.float16) else 5.0
    return law.mass <= 0.3 and max(abs(law.z_lo), abs(law.z_hi)) > reach


def _shape_trusted(rule: InitRule, dtype: torch.dtype) -> bool:
    """False for a truncated normal: torch draws it by inverting the CDF of a uniform draw in
    the tensor's own dtype, and CUDA's erfinv of values near 1 inflates the spread and pulls
    in the tails (measured on an H200: float32 pieces cut at 100 stds up to 1.15x the spread;
    bf16/fp16 ones up to 50x, anywhere inside the bounds). Its bounds and a spread far too
    small (uninitialised memory, a constant) are judged there, and in 32 bits or more also a
    spread grossly too large (x UNTRUSTED_SPREAD)."""
    return rule.kind != "trunc_normal"


def _spread_ceiling(rule: InitRule, dtype: torch.dtype) -> float:
    """How many times the rule's spread a piece whose shape is not trusted may show."""
    return math.inf if dtype in (torch.bfloat16, torch.float16) else UNTRUSTED_SPREAD


def _failures(law: _Law, st: ShardStats, rd: _Rounding, zeroed: bool, bounds_only: bool,
              shape_trusted: bool = True, ceiling: float = math.inf):
    """Yield each test's verdict, most telling first (the first failure is reported)."""
    n, lo_y, hi_y = st.finite, st.min, st.max
    spread = f"values in [{fmt(lo_y)}, {fmt(hi_y)}]"
    # a bounded draw is low + u * (high - low), rounded at the scale of the width too (CUDA's
    # bf16 uniform_ lands a few ulps of the value past a bound; measured on an H200)
    edge = rd.at(law.hi - law.lo) if law.uniform else 0.0
    if not (zeroed and lo_y == 0) and lo_y + max(rd.at(lo_y), edge) < law.lo:
        yield _Failure(0.0, f"value {fmt(lo_y)}", f"none below {fmt(law.lo)}")
    if not (zeroed and hi_y == 0) and hi_y - max(rd.at(hi_y), edge) > law.hi:
        yield _Failure(0.0, f"value {fmt(hi_y)}", f"none above {fmt(law.hi)}",
                       "far too large: garbage?" if abs(hi_y) > 1e3 * law.hi else "")
    if bounds_only:
        return
    width = hi_y - lo_y + rd.at(hi_y) + rd.at(lo_y) + 2 * law.grid
    p_cluster = math.exp(_log_p_cluster(n, law.density_max, width))
    if lo_y == hi_y:
        yield _Failure(p_cluster, f"all {n} values equal {fmt(lo_y)}", "a random spread",
                       _scale_hint(0.0, law.std, st) if abs(lo_y) < 1e-3 * law.std
                       else "a constant fill, not a random init?")
    # spread about the law's mean: the most direct sign of tiny, huge or rescaled values
    sq = math.sqrt(st.m2 + n * (st.mean - law.mean) ** 2)
    slack = (rd.rel * st.rms + rd.abs) * math.sqrt(n)
    small, large = sq + slack, max(sq - slack, 0.0)
    seen_std = sq / math.sqrt(n)
    if law.exact_normal:
        p_small = _chi2(torch.special.gammainc, n, small**2 / law.std**2)
        p_large = _chi2(torch.special.gammaincc, n, large**2 / law.std**2)
    else:  # Hoeffding on the mean of (x - mean)^2, each in [0, reach^2]
        reach2 = max(law.hi - law.mean, law.mean - law.lo) ** 2
        gap_small = law.std**2 - small**2 / n
        gap_large = large**2 / n - law.std**2
        p_small = math.exp(-2 * n * gap_small**2 / reach2**2) if gap_small > 0 else 1.0
        p_large = math.exp(-2 * n * gap_large**2 / reach2**2) if gap_large > 0 else 1.0
    for p in (p_small, p_large) if shape_trusted else (p_small,):
        yield _Failure(p, f"std {fmt(seen_std)}", fmt(law.std),
                       _scale_hint(seen_std, law.std, st))
    if not shape_trusted:
        yield _Failure(0.0 if seen_std > ceiling * law.std else 1.0,
                       f"std {fmt(seen_std)}", f"{fmt(law.std)} (at most {ceiling:g}x)",
                       _scale_hint(seen_std, law.std, st))
        yield _Failure(p_cluster, f"all {n} values within {fmt(hi_y - lo_y)} of each other",
                       "a random spread", "uninitialised memory?" if width < 1e-3 * law.std
                       else "")
        return
    # single values too far out for n draws (union bound)
    if not (zeroed and hi_y == 0) and hi_y > law.mean:
        yield _Failure(n * law.sf(hi_y - max(rd.at(hi_y), edge)), f"value {fmt(hi_y)}",
                       f"within the {fmt(law.std)}-std spread of {n} draws",
                       "far outside the rule's spread: garbage?")
    if not (zeroed and lo_y == 0) and lo_y < law.mean:
        yield _Failure(n * law.cdf(lo_y + max(rd.at(lo_y), edge)), f"value {fmt(lo_y)}",
                       f"within the {fmt(law.std)}-std spread of {n} draws",
                       "far outside the rule's spread: garbage?")
    yield _Failure(p_cluster, f"all {n} values within {fmt(hi_y - lo_y)} of each other",
                   "a random spread", "uninitialised memory?" if width < 1e-3 * law.std else "")
    # extremes that stay too close in: another law of the same spread (uniform for normal)
    outside = law.sf(hi_y + rd.at(hi_y) + law.grid) + law.cdf(lo_y - rd.at(lo_y) - law.grid)
    if outside >= TAIL_TRUST:
        yield _Failure(math.exp(n * math.log1p(-min(outside, 1.0))), spread,
                       f"the tails of {n} draws to reach further",
                       "a uniform init where a normal was due?" if law.exact_normal
                       else "not spread over the rule's bounds")
    if law.exact_normal and n >= KURTOSIS_MIN_COUNT and st.m2 > 0 and (
            rd.at(law.mean) < 1e-3 * law.std):  # rounding to a few levels changes the shape
        z = _kurtosis_z(n, n * st.m4 / st.m2**2)
        yield _Failure(math.erfc(abs(z) / math.sqrt(2)) if abs(z) > KURTOSIS_Z else 1.0,
                       f"kurtosis {fmt(st.kurtosis)}", "0, a normal's",
                       "a uniform init?" if z < 0 else "a heavy-tailed mixture: garbage?")
    near_zero = rd.abs + law.grid
    expected_zeros = n * max(law.cdf(near_zero) - law.cdf(-near_zero), GENERATOR_FLOOR)
    k = st.zeros
    if k > expected_zeros:
        log_p = k * math.log(expected_zeros) - math.lgamma(k + 1)
        yield _Failure(math.exp(log_p), f"{k} of {n} values exactly 0",
                       f"about {fmt(expected_zeros)}", "uninitialised or zeroed memory?")
    off = max(abs(st.mean - law.mean) - (rd.rel * st.rms + rd.abs), 0.0)
    if law.exact_normal:
        p = math.erfc(off * math.sqrt(n) / law.std / math.sqrt(2))
    else:
        p = math.exp(-2 * n * off**2 / (law.hi - law.lo) ** 2)
    yield _Failure(p, f"mean {fmt(st.mean)}", f"{fmt(law.mean)} within "
                   f"{fmt(law.std / math.sqrt(n))} (std of the mean of {n})")


def _single_value(rule: InitRule) -> float | None:
    """The one value a rule draws: a constant's, or a degenerate law's (std 0, empty range)."""
    if rule.kind == "constant":
        return rule.value
    if rule.kind in ("uniform", "trunc_normal") and rule.low >= rule.high:
        return rule.low
    if rule.kind in ("normal", "trunc_normal") and rule.std == 0:
        return rule.mean
    return None


def _judge_constant(rule: InitRule, st: ShardStats) -> tuple[bool, str]:
    allowed = {rule.value} | {torch.tensor(rule.value, dtype=d).item() for d in
                              (st.torch_dtype, torch.float32, torch.bfloat16, torch.float16)
                              if d.is_floating_point}
    if st.min == st.max and st.min in allowed:
        return True, f"{_values(st.count)}: all {fmt(st.min)}, as {rule.describe()} sets"
    seen = (f"all values {fmt(st.min)}" if st.min == st.max
            else f"values in [{fmt(st.min)}, {fmt(st.max)}]")
    return False, (f"{seen}, expected all {fmt(rule.value)} ({rule.describe()}): "
                   "another init ran, or the values were changed since?")


def resolvable(rule: InitRule, dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` resolve ``rule``'s spread: the rounding allowed near its
    centre is under a tenth of its std. Where it is not (normal(1, 0.002) in bfloat16), a
    constant fill or a similar law looks like a correct draw and only gross garbage fails."""
    if not rule.judgeable or rule.kind == "constant":
        return True
    mean, std = expected_moments(rule)
    return _Rounding.of(dtype).at(mean) < 0.1 * std


def judge(rule: InitRule, stats: ShardStats, alpha: float = ALPHA) -> tuple[bool, str]:
    """Whether the piece summarised by ``stats`` is a plausible draw from ``rule``.

    Args:
        rule: the tensor's init rule (from :mod:`smpcheck.expect.fresh.init_replay`).
        stats: :func:`smpcheck.expect.fresh.init_stats.shard_stats` of the piece a rank holds
            (a row or column shard, an FSDP1 flat range, or the whole tensor; or several merged).
        alpha: the per-test chance a correct piece may fail.

    Returns:
        ``(ok, sentence)``: the sentence says what was expected and what was seen, e.g.
        ``"std 1.3e-18, expected 0.02 (normal(0, 0.02) from ..._init_weights): uninitialised
        memory?"``, or on a pass how much evidence the piece carried.
    """
    if stats.count == 0:
        return True, "empty piece: nothing to judge"
    if stats.nonfinite:
        return False, (f"{stats.nonfinite} of {stats.count} values are NaN or Inf, expected "
                       f"{rule.describe()}")
    if not rule.judgeable:
        return True, f"finite; not judged further: {rule.describe()}"
    single = _single_value(rule)
    if single is not None:
        return _judge_constant(rule.with_(kind="constant", value=single), stats)
    dropped = min(stats.zeros, rule.zeroed)
    st = _drop_zeros(stats, dropped) if dropped else stats
    if st.finite == 0:
        return True, f"only the {dropped} zeros that {rule.describe()} sets"
    law, rd = _Law.of(rule), _Rounding.of(stats.torch_dtype)
    bounds_only = _imprecise(law, stats.torch_dtype)
    shape_trusted = _shape_trusted(rule, stats.torch_dtype)
    for failure in _failures(law, st, rd, zeroed=dropped > 0, bounds_only=bounds_only,
                             shape_trusted=shape_trusted,
                             ceiling=_spread_ceiling(rule, stats.torch_dtype)):
        if failure.p < alpha:
            hint = f": {failure.hint}" if failure.hint else ""
            return False, (f"{failure.seen}, expected {failure.expected} "
                           f"({rule.describe()}){hint}")
    n = st.finite
    if bounds_only:
        return True, (f"{_values(n)} within the bounds of {rule.describe()}; torch draws this "
                      f"truncation imprecisely in {stats.dtype}, so only its bounds are judged")
    if not shape_trusted:
        return True, (f"{_values(n)} within {rule.describe()} and not spread far too little; "
                      "torch's CUDA draw of a truncated normal distorts its shape (in 16 bits "
                      "its spread too), so no finer test applies")
    if not resolvable(rule, stats.torch_dtype):
        return True, (f"{_values(n)} within {rule.describe()}; its spread is close to the "
                      f"rounding allowed near its centre (+-{fmt(rd.at(law.mean))}), so only "
                      "gross garbage would fail")
    evidence = math.exp(_log_p_cluster(n, law.density_max, 2 * (rd.at(law.mean) + law.grid)))
    if evidence >= alpha:
        return True, (f"{_values(n)} within {rule.describe()}; too few to tell a constant "
                      "from it, so only gross garbage would fail")
    return True, f"{_values(n)} consistent with {rule.describe()}"
