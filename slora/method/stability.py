"""Agreement between two allocations: Kendall's τ-b over θ orderings and over rank vectors.

The paper (arXiv 2509.09119 §4.7, Tables 4-6) reports Kendall's τ between "rank orderings of the weight matrices"
from different calibration sets, fractions and epochs without saying whether θ or the allocated ranks are
ordered, or which τ. slora reports both orderings with τ-b, which corrects for ties: rank vectors are full of
ties (many modules share a rank), where τ-a would be biased towards 0.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence


def _tie_pairs(sorted_values: Sequence) -> int:
    """Σ t(t-1)/2 over runs of equal consecutive values."""
    pairs, run = 0, 1
    for prev, cur in zip(sorted_values, sorted_values[1:]):
        if cur == prev:
            run += 1
        else:
            pairs, run = pairs + run * (run - 1) // 2, 1
    return pairs + run * (run - 1) // 2


def _inversions(values: list) -> int:
    """Pairs i < j with values[i] > values[j], by bottom-up merge sort: O(n log n)."""
    a, n, count, width = list(values), len(values), 0, 1
    while width < n:
        merged = []
        for lo in range(0, n, 2 * width):
            left, right = a[lo:lo + width], a[lo + width:lo + 2 * width]
            i = j = 0
            while i < len(left) and j < len(right):
                if right[j] < left[i]:  # right[j] jumps ahead of every left element not yet merged
                    merged.append(right[j])
                    count += len(left) - i
                    j += 1
                else:
                    merged.append(left[i])
                    i += 1
            merged += left[i:] + right[j:]
        a, width = merged, 2 * width
    return count


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b = (n_c - n_d) / sqrt((n0 - n1)(n0 - n2)) in O(n log n) (Knight 1966).

    n0 = n(n-1)/2 pairs, n1 / n2 pairs tied in x / y, n_c / n_d concordant / discordant pairs (a pair tied in
    x or y is neither). Sorting by (x, y) makes every discordant pair an inversion of y, counted by merge sort;
    then n_c = n0 - n1 - n2 + n3 - n_d with n3 the pairs tied in both. Returns NaN when τ-b is undefined
    (fewer than two items, or all of x or all of y tied), as scipy.stats.kendalltau does.
    """
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b: lengths differ ({len(x)} vs {len(y)})")
    n = len(x)
    if n < 2:
        return math.nan
    pairs = sorted(zip(x, y))
    n0 = n * (n - 1) // 2
    n1 = _tie_pairs([p[0] for p in pairs])
    n3 = _tie_pairs(pairs)
    n2 = _tie_pairs(sorted(y))
    n_d = _inversions([p[1] for p in pairs])
    n_c = n0 - n1 - n2 + n3 - n_d
    if n1 == n0 or n2 == n0:
        return math.nan
    return (n_c - n_d) / math.sqrt((n0 - n1) * (n0 - n2))


def stability(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]]) -> dict:
    """τ-b between two allocations of the same modules, each {"theta": {name: θ}, "ranks": {name: r}}
    (θ from sensitivity.json's modules, ranks from ranks.json).

    Returns {"modules": n, "tau_theta": τ-b of the θ values, "tau_ranks": τ-b of the rank vectors}; a τ is
    NaN where undefined (e.g. a uniform allocation). Raises ValueError naming modules present on one side only.
    """
    for key in ("theta", "ranks"):
        if set(a[key]) != set(b[key]) or set(a[key]) != set(a["theta"]):
            only = sorted(set(a[key]) ^ set(b[key])) or sorted(set(a[key]) ^ set(a["theta"]))
            raise ValueError(f"stability: {key} covers different modules; on one side only: {only[:5]}")
    names = sorted(a["theta"])
    return {"modules": len(names),
            "tau_theta": kendall_tau_b([a["theta"][n] for n in names], [b["theta"][n] for n in names]),
            "tau_ranks": kendall_tau_b([a["ranks"][n] for n in names], [b["ranks"][n] for n in names])}
