"""The statistics the claims rest on: McNemar's exact test for paired predictions, and a t interval for a mean."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (1-30); above 30 the normal's 1.96 is within 2%.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mcnemar(first_right: Sequence[bool], second_right: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test of two classifiers on the same images: b images only the first gets right, c only the
    second; under the null each discordant image is a fair coin, so p = P(min(b, c) or fewer heads of b + c), doubled."""
    if len(first_right) != len(second_right):
        raise ValueError(f"{len(first_right)} and {len(second_right)} predictions: the same images are needed")
    b = sum(1 for x, y in zip(first_right, second_right) if x and not y)
    c = sum(1 for x, y in zip(first_right, second_right) if y and not x)
    n, k = b + c, min(b, c)
    if n == 0:
        return {"only_first_right": 0, "only_second_right": 0, "p_value": 1.0}
    log_half_n = n * math.log(0.5)
    tail = sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n) for i in range(k + 1))
    return {"only_first_right": b, "only_second_right": c, "p_value": min(1.0, 2 * tail)}


def mean_interval(values: Sequence[float]) -> dict[str, float | int]:
    """Mean, sample sd and the 95% t interval of the mean of ``values`` (at least two)."""
    if len(values) < 2:
        raise ValueError(f"{len(values)} values: an interval needs at least two")
    mean, sd = statistics.fmean(values), statistics.stdev(values)
    t = _T975[len(values) - 2] if len(values) - 1 <= len(_T975) else 1.96
    half = t * sd / math.sqrt(len(values))
    return {"n": len(values), "mean": mean, "sd": sd, "ci95_low": mean - half, "ci95_high": mean + half}


def percentile_rank(value: float, draws: Sequence[float]) -> float:
    """The share of ``draws`` strictly below ``value`` plus half of those equal to it, in percent."""
    if not draws:
        raise ValueError("no draws: a percentile needs at least one")
    below = sum(1 for d in draws if d < value) + 0.5 * sum(1 for d in draws if d == value)
    return 100 * below / len(draws)
