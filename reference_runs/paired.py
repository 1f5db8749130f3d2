"""Paired statistics for method comparisons: is a method's gain over uniform LoRA larger than the noise?

Every method of one (task, seed) pair sees the same data split, calibration sample, head init and batch order
(grid.py), so methods are compared pairwise: d_i = score(method) - score(uniform) over the pairs i. Two summaries:

- the mean paired difference with a 95 % percentile bootstrap interval (resampling the pairs with replacement,
  B = 10,000 resamples from a fixed seed, so a table regenerates identically);
- a two-sided exact sign test over the pairs: wins against losses under Binomial(n, 1/2), ties dropped
  (the classical convention; with every pair tied there is no evidence either way and p = 1).

Neither assumes normal differences, which matters at 9-15 pairs. Pure functions on lists of floats.
"""
from __future__ import annotations

import math
import random
import statistics

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def paired_differences(method: dict, baseline: dict) -> list[float]:
    """d = method[k] - baseline[k] over the keys (e.g. (task, seed)) both have, in sorted key order.

    A pair where either score is NaN (undefined, e.g. the correlation of a constant prediction) is dropped."""
    keys = sorted(set(method) & set(baseline))
    return [method[k] - baseline[k] for k in keys if method[k] == method[k] and baseline[k] == baseline[k]]


def bootstrap_ci(diffs: list[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `diffs` (Efron & Tibshirani, ch. 13).

    Each resample draws len(diffs) pairs with replacement; the interval is the (1-level)/2 and (1+level)/2
    empirical quantiles of the resampled means (lower/upper order statistics, no interpolation)."""
    if not diffs:
        raise ValueError("bootstrap_ci: no paired differences")
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(math.fsum(rng.choices(diffs, k=n)) / n for _ in range(resamples))
    lo = means[math.floor((1 - level) / 2 * (resamples - 1))]
    hi = means[math.ceil((1 + level) / 2 * (resamples - 1))]
    return lo, hi


def sign_test(diffs: list[float]) -> tuple[int, int, float]:
    """(wins, losses, two-sided p) of the exact sign test; ties (d == 0) are dropped.

    p = min(1, 2 · P[X <= min(wins, losses)]) with X ~ Binomial(wins + losses, 1/2)."""
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    n = wins + losses
    if n == 0:
        return 0, 0, 1.0
    tail = math.fsum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return wins, losses, min(1.0, 2 * tail)


def summary(diffs: list[float]) -> dict:
    """Everything one table row reports about a method's paired differences against the baseline."""
    wins, losses, p = sign_test(diffs)
    lo, hi = bootstrap_ci(diffs)
    return {"n": len(diffs), "mean": statistics.fmean(diffs), "ci95": (lo, hi), "wins": wins, "losses": losses,
            "ties": len(diffs) - wins - losses, "sign_p": p}
