"""What a few seeds per row can carry: intervals over seeds, paired contrasts with a verdict, seeds a contrast needs.

Generic over *a per-seed score per row* (the FID today, a held-out loss tomorrow): every function takes
``{seed: score}`` maps of positive scores and works on ``ln(score)``, where a training seed's effect is roughly
multiplicative and a difference is a ratio.

- :func:`row_interval`: the mean of ln(score) over a row's seeds with a Student-t interval (``n - 1`` degrees of
  freedom); reported as the geometric mean and its interval.
- :func:`paired_contrast`: a pre-declared claim "row A scores lower than row B" tested on the seeds both rows share
  (paired: seed k of A against seed k of B), as the t-interval of the mean paired difference ``ln B - ln A``.
  "resolved" when the two-sided ``1 - alpha`` interval excludes 0 (then the sign says whether it agrees with the
  paper); under rows that do not differ this happens with probability ``alpha`` (5%), whatever the seed count.
- :func:`holm`: the contrasts that stay resolved with the whole table's family of contrasts held to ``alpha``.
- :func:`pooled_sd`: the per-seed noise, SD of ln(score) pooled over rows with >= 2 seeds.
- :func:`seeds_needed`: paired seeds a row for 80% power at a given effect, from the noncentral t.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

ALPHA = 0.05  # two-sided: the false-positive rate of a "resolved" verdict on rows that do not differ
POWER = 0.8
MAX_SEEDS = 10_000  # seeds_needed gives up beyond this (reported as "> 10000")


def _t(df: int, alpha: float = ALPHA) -> float:
    from scipy.stats import t

    return float(t.ppf(1 - alpha / 2, df))


@dataclass(frozen=True)
class RowInterval:
    """A row's scores over its seeds: mean and SD of ln(score) and the t-interval of the mean (None for one seed)."""

    seeds: tuple[int, ...]
    mean_log: float
    sd_log: float | None
    low_log: float | None
    high_log: float | None

    @property
    def geomean(self) -> float:
        return math.exp(self.mean_log)

    def interval(self) -> tuple[float, float] | None:
        """The ``1 - alpha`` interval of the geometric mean, in score units."""
        return None if self.low_log is None else (math.exp(self.low_log), math.exp(self.high_log))  # type: ignore[arg-type]


def _logs(scores: Mapping[int, float]) -> dict[int, float]:
    bad = {s: v for s, v in scores.items() if not (v > 0 and math.isfinite(v))}
    if bad:
        raise ValueError(f"scores must be positive and finite for ln(score); got {bad}")
    return {s: math.log(v) for s, v in sorted(scores.items())}


def row_interval(scores: Mapping[int, float], alpha: float = ALPHA) -> RowInterval:
    """``scores``: {seed: score} of one row (at least one seed)."""
    logs = _logs(scores)
    if not logs:
        raise ValueError("a row needs at least one seed")
    values = list(logs.values())
    mean = statistics.fmean(values)
    if len(values) < 2:
        return RowInterval(tuple(logs), mean, None, None, None)
    sd = statistics.stdev(values)
    half = _t(len(values) - 1, alpha) * sd / math.sqrt(len(values))
    return RowInterval(tuple(logs), mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Contrast:
    """The paired test of "``better`` scores lower than ``worse``" on their shared seeds. ``ratio``: the geometric
    mean of worse/better over the pairs (> 1: agrees with the claim), with its ``1 - alpha`` interval."""

    better: str
    worse: str
    seeds: tuple[int, ...]
    ratio: float | None
    low: float | None
    high: float | None
    alpha: float = ALPHA
    p_value: float | None = None  # two-sided paired t-test of "no difference"

    @property
    def resolved(self) -> bool:
        return self.low is not None and (self.low > 1 or self.high < 1)  # type: ignore[operator]

    @property
    def agrees(self) -> bool | None:
        """Whether the measured direction is the claim's (None without a pair)."""
        return None if self.ratio is None else self.ratio > 1

    def verdict(self) -> str:
        if len(self.seeds) < 2:
            return f"not resolved ({len(self.seeds)} paired seed{'s' * (len(self.seeds) != 1)}: needs >= 2)"
        if not self.resolved:
            return "not resolved"
        return "resolved: " + ("agrees" if self.agrees else "disagrees")

    def describe(self) -> str:
        level = f"{1 - self.alpha:.0%}"
        if self.ratio is None:
            return f"{self.worse} / {self.better}: no shared seeds; {self.verdict()}"
        interval = "" if self.low is None else f", {level} CI {self.low:.3f}-{self.high:.3f}"
        seeds = " ".join(map(str, self.seeds))
        return f"{self.worse} / {self.better} = {self.ratio:.3f}{interval} (paired seeds {seeds}): {self.verdict()}"


def paired_contrast(
    better: str, a: Mapping[int, float], worse: str, b: Mapping[int, float], alpha: float = ALPHA
) -> Contrast:
    """Claim "``better`` (scores ``a``) scores lower than ``worse`` (scores ``b``)", on the seeds in both."""
    la, lb = _logs(a), _logs(b)
    seeds = tuple(sorted(set(la) & set(lb)))
    if not seeds:
        return Contrast(better, worse, (), None, None, None, alpha)
    diffs = [lb[s] - la[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return Contrast(better, worse, seeds, math.exp(mean), None, None, alpha)
    from scipy.stats import t

    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    half = _t(len(diffs) - 1, alpha) * se
    p = 0.0 if se == 0 else float(2 * t.sf(abs(mean) / se, len(diffs) - 1))
    return Contrast(better, worse, seeds, math.exp(mean), math.exp(mean - half), math.exp(mean + half), alpha, p)


def holm(contrasts: list[Contrast], alpha: float = ALPHA) -> list[Contrast]:
    """The contrasts that stay resolved when the family of ``contrasts`` (those with a test) together may err at most
    ``alpha`` (Holm's step-down: the k-th smallest p-value against alpha / (m - k + 1))."""
    tested = sorted((c for c in contrasts if c.p_value is not None), key=lambda c: c.p_value)  # type: ignore[arg-type]
    kept = []
    for k, c in enumerate(tested):
        if c.p_value > alpha / (len(tested) - k):  # type: ignore[operator]
            break
        kept.append(c)
    return kept


def pooled_sd(rows: Mapping[str, Mapping[int, float]]) -> tuple[float | None, int]:
    """(SD of ln(score) pooled over the rows with >= 2 seeds, its degrees of freedom); (None, 0) without any."""
    ss, df = 0.0, 0
    for scores in rows.values():
        values = list(_logs(scores).values())
        if len(values) >= 2:
            ss += statistics.variance(values) * (len(values) - 1)
            df += len(values) - 1
    return (math.sqrt(ss / df), df) if df else (None, 0)


def seeds_needed(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER) -> int | None:
    """Paired seeds per row for a two-sided paired t-test at ``alpha`` to resolve an effect of ``effect`` (in ln
    units, e.g. ln(54.78 / 49.97)) with probability ``power``, when each row's ln(score) has per-seed SD ``sd`` and
    the rows' seed noises are independent (the paired difference has SD ``sqrt(2) sd``). None beyond ``MAX_SEEDS``
    or for no effect."""
    from scipy.stats import nct

    if effect == 0 or sd <= 0:
        return None
    d = abs(effect) / (math.sqrt(2) * sd)
    n = 2
    while n <= MAX_SEEDS:
        crit = _t(n - 1, alpha)
        nc = d * math.sqrt(n)
        if float(nct.sf(crit, n - 1, nc) + nct.cdf(-crit, n - 1, nc)) >= power:
            return n
        n = n + 1 if n < 200 else int(n * 1.05)
    return None
