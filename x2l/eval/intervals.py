"""Confidence intervals for accuracies, so that a handful of questions is never read as a result.

Wilson score interval (E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
JASA 22(158), 1927), the interval recommended over the normal approximation for proportions near 0 or 1 and small n
(Brown, Cai & DasGupta, "Interval Estimation for a Binomial Proportion", Statistical Science 16(2), 2001).
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95%: the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) bounds in [0, 1] of the Wilson score interval for `successes` out of `n` trials.

    centre = (p + z^2 / 2n) / (1 + z^2 / n), half width = z sqrt(p (1 - p) / n + z^2 / 4n^2) / (1 + z^2 / n),
    with p = successes / n. Raises ValueError for n < 1 or successes outside [0, n].
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"bad proportion: {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # contains p, float noise aside


def overlapping_pairs(intervals: dict[str, tuple[float, float]]) -> list[tuple[str, str]]:
    """Pairs of names (in the given order) whose intervals overlap: their difference is not shown by this data."""
    names = list(intervals)
    return [
        (a, b)
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        if intervals[a][0] <= intervals[b][1] and intervals[b][0] <= intervals[a][1]
    ]
