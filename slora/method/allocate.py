"""Rank allocation of Sensitivity-LoRA (arXiv 2509.09119 §3.3 Eq. 15, §4.4) as pure functions on dicts.

θ (dict name -> sensitivity, from metrics.aggregate) and a budget -> ranks (dict name -> int).

- SRA, Eq. 15: r_w = θ_w / Σθ · r_total. The paper leaves rounding and bounds open; slora's default hits the
  budget exactly: continuous quotas by water-filling (Eq. 15 on the modules not held at r_min / r_max),
  then largest-remainder rounding. `rounding="paper"` keeps the paper's apparent rule instead (§5.1 of the
  method notes: independent rounding, clamp at >= 1, sum not enforced) and reports target and achieved.
- PRA (§4.4): sort by θ, C equal groups, group c gets r_avg + (C-1)/2 - c; the budget is kept exact.
- uniform: plain LoRA.

Units. "rank": cost 1 per rank, budget r_total = r_avg·n. "param": a rank of module w costs d_in + d_out
parameters (one row of A plus one column of B), budget P = r_avg·Σ_w (d_in + d_out)_w, the uniform-LoRA count.
Guarantee (exact rounding), with every r_w in [r_min, r_max]:
- rank units: Σ_w r_w = r_total exactly;
- param units: P - max_w (d_in + d_out)_w < Σ_w r_w·(d_in + d_out)_w <= P. The budget is never exceeded and the
  shortfall is less than one rank of the widest module: the +1 steps stop at the first module that no longer
  fits rather than skipping it for a cheaper one, which would break monotonicity in θ.

Every function orders modules by name before computing, so results are permutation-equivariant and
deterministic; remainder ties go to the larger θ, then to the smaller name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from slora.method.metrics import rational

METHODS = ("sra", "pra", "uniform")
UNITS = ("rank", "param")
Bound = int | Mapping[str, int] | None  # one bound for all modules, or one per module name


@dataclass(frozen=True)
class Allocation:
    ranks: dict[str, int]  # name -> rank, in name order
    unit: str  # "rank" or "param"
    target: int  # the budget, in `unit`
    achieved: int  # Σ r_w·cost_w, in `unit`
    message: str | None = None  # why the allocation fell back to uniform, if it did


# -----------------------------------------------------------------------------
# Budget and validation

def costs(shapes: Mapping[str, tuple[int, int]] | None, names: list[str], unit: str) -> np.ndarray:
    """Cost of one rank per module: 1 in rank units, d_in + d_out in parameter units (shapes[name] = (d_in, d_out))."""
    if unit == "rank":
        return np.ones(len(names), dtype=np.int64)
    if unit == "param":
        if shapes is None:
            raise ValueError("unit 'param' needs the module shapes")
        return np.array([int(shapes[n][0]) + int(shapes[n][1]) for n in names], dtype=np.int64)
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")


def budget(r_avg: float, cost: np.ndarray) -> int:
    """r_total = r_avg·n (rank units) or P = r_avg·Σ(d_in + d_out) (param units); must be an integer."""
    exact = rational(r_avg) * int(cost.sum())
    if exact.denominator != 1 or exact < 0:
        raise ValueError(f"budget r_avg·Σcost = {float(exact)} is not a non-negative integer (r_avg={r_avg})")
    return int(exact)


def _bounds(b, names: list[str], default: float) -> np.ndarray:
    if b is None:
        return np.full(len(names), default)
    if isinstance(b, Mapping):
        return np.array([float(b[n]) for n in names])
    return np.full(len(names), float(b))


def _check(theta: Mapping[str, float], names, cost, target, lo, hi) -> None:
    for n in names:
        t = theta[n]
        if not math.isfinite(t):
            raise ValueError(f"{n}: θ = {t} is not finite")
        if t < 0:
            raise ValueError(f"{n}: θ = {t} is negative")
    for n, a, b in zip(names, lo, hi):
        if a < 0 or a != int(a) or b < a or (b != math.inf and b != int(b)):
            raise ValueError(f"{n}: bounds r_min={a}, r_max={b} must be integers with 0 <= r_min <= r_max")
    if not names:
        raise ValueError("no modules to allocate ranks to")
    low, high = float(cost @ lo), (float(cost @ hi) if np.isfinite(hi).all() else math.inf)
    if not low <= target <= high:
        which = "r_min" if target < low else "r_max"
        lim = lo if target < low else hi
        shown = ", ".join(f"{n} ({which}={int(x)})" for n, x in list(zip(names, lim))[:5])
        raise ValueError(f"budget {target} is outside [{low:.0f}, {high:.0f}] given by Σ {which}·cost over "
                         f"{len(names)} modules: {shown}{', ...' if len(names) > 5 else ''}")


def _uniform_reason(theta: Mapping[str, float], names: list[str]) -> str | None:
    values = {theta[n] for n in names}
    if len(values) > 1:
        return None
    if values == {0.0}:
        return (f"all {len(names)} θ are 0 (σ = 0 for every metric: nothing tells the modules apart); "
                "the allocation is uniform")
    return f"all {len(names)} θ are equal (σ(θ) = 0); the allocation is uniform"


# -----------------------------------------------------------------------------
# Water-filling and rounding

def _sorted_sum(terms: np.ndarray) -> np.ndarray:
    """Σ over the last axis in sorted order: the float result does not depend on the order of the modules."""
    return np.sort(terms, axis=-1).sum(axis=-1)


def _fit(a: np.ndarray, b: np.ndarray, cost: np.ndarray, target: int, lo: np.ndarray, hi: np.ndarray
         ) -> np.ndarray:
    """Quotas q_w = clip(a_w·x + b_w, lo_w, hi_w) with Σ cost_w·q_w = target (a_w >= 0).

    f(x) = Σ cost·q(x) is piecewise linear and non-decreasing, so x is found exactly between the sorted
    breakpoints where a module reaches a bound. SRA uses a = θ, b = 0 (Eq. 15 scaled); PRA a = 1, b = offset.
    """
    c = cost.astype(np.float64)
    moving = a > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        points = np.concatenate([((lo - b) / a)[moving], ((hi - b) / a)[moving & np.isfinite(hi)]])
    xs = np.unique(points)

    # f at every breakpoint, each sum taken over sorted terms so that the order of modules cannot move x
    fx = _sorted_sum(c * np.clip(a * xs[:, None] + b, lo, hi))  # (n_points,)
    i = int(np.searchsorted(fx, target, side="left"))
    if i == 0:
        x = xs[0]
    elif i < len(xs):
        x = xs[i - 1] + (target - fx[i - 1]) * (xs[i] - xs[i - 1]) / (fx[i] - fx[i - 1])
    else:  # past the last breakpoint only modules without an upper bound still grow
        slope = float(_sorted_sum(c * np.where(moving & np.isinf(hi), a, 0.0)))
        if slope == 0:
            raise ValueError(f"budget {target} cannot be reached: every module with θ > 0 is at r_max "
                             "and the modules with θ = 0 stay at r_min")
        x = xs[-1] + (target - fx[-1]) / slope
    return np.clip(a * x + b, lo, hi)


def _round(q: np.ndarray, theta: np.ndarray, names: list[str], cost: np.ndarray, target: int, hi: np.ndarray
           ) -> np.ndarray:
    """Largest remainder: floor every quota, then +1 in order of (remainder desc, θ desc, name) while the next
    module's cost fits in what is left. Stopping at the first misfit (instead of skipping it) keeps the ranks
    monotone in θ; in rank units every cost is 1 so the sum lands exactly on the target."""
    r = np.floor(q).astype(np.int64)
    left = target - int(cost @ r)
    order = sorted((i for i in range(len(names)) if r[i] < hi[i]),
                   key=lambda i: (-(q[i] - r[i]), -theta[i], names[i]))
    for i in order:
        if left < cost[i]:
            break
        r[i] += 1
        left -= int(cost[i])
    if left < 0 or (left >= cost.max() and order):
        raise RuntimeError(f"rounding missed the budget by {left} (a bug: please report it)")
    return r


def _result(names, r, cost, target, unit, message=None) -> Allocation:
    return Allocation({n: int(x) for n, x in zip(names, r)}, unit, int(target), int(cost @ r), message)


# -----------------------------------------------------------------------------
# Allocation methods

def uniform(names: list[str], target: int, *, cost: np.ndarray | None = None, r_min: Bound = 1,
            r_max: Bound = None, unit: str = "rank", message: str | None = None) -> Allocation:
    """Plain LoRA: the same rank everywhere (r_avg when it is an integer), remainders by name."""
    names = sorted(names)
    cost = np.ones(len(names), dtype=np.int64) if cost is None else cost
    lo, hi = _bounds(r_min, names, 1), _bounds(r_max, names, math.inf)
    _check({n: 1.0 for n in names}, names, cost, target, lo, hi)
    ones = np.ones(len(names))
    q = _fit(ones, np.zeros(len(names)), cost, target, lo, hi)
    return _result(names, _round(q, ones, names, cost, target, hi), cost, target, unit, message)


def sra(theta: Mapping[str, float], target: int, *, cost: np.ndarray | None = None, r_min: Bound = 1,
        r_max: Bound = None, unit: str = "rank", rounding: str = "exact") -> Allocation:
    """Scaled Rank Allocation, Eq. 15: r_w = θ_w/Σθ · r_total (rank units), r_w ∝ θ_w with Σ r_w·cost_w = P
    (param units). `cost` is aligned with sorted(theta). rounding "exact" (see module docstring) or "paper":
    r_w = clip(floor(θ_w·x + 1/2), r_min, r_max) with x from Eq. 15 and no correction of the sum."""
    names = sorted(theta)
    cost = np.ones(len(names), dtype=np.int64) if cost is None else cost
    lo, hi = _bounds(r_min, names, 1), _bounds(r_max, names, math.inf)
    _check(theta, names, cost, target, lo, hi)
    if (why := _uniform_reason(theta, names)) is not None:
        return uniform(names, target, cost=cost, r_min=r_min, r_max=r_max, unit=unit, message=why)
    t = np.array([float(theta[n]) for n in names])
    if rounding == "paper":
        x = target / float(_sorted_sum(cost * t))  # Eq. 15 as written: no bound enters the scale
        r = np.clip(np.floor(t * x + 0.5), lo, hi).astype(np.int64)
        return _result(names, r, cost, target, unit)
    if rounding != "exact":
        raise ValueError(f"rounding must be 'exact' or 'paper', got {rounding!r}")
    q = _fit(t, np.zeros(len(names)), cost, target, lo, hi)
    return _result(names, _round(q, t, names, cost, target, hi), cost, target, unit)


def pra(theta: Mapping[str, float], target: int, *, categories: int = 3, cost: np.ndarray | None = None,
        r_min: Bound = 1, r_max: Bound = None, unit: str = "rank") -> Allocation:
    """Progressive Rank Allocation (§4.4): sort by θ descending (ties by name), split into C = min(categories, n)
    groups whose sizes differ by at most one (the larger groups first, as numpy.array_split), give group c the
    offset (C-1)/2 - c. Unequal groups or half-integer offsets (even C) make Σ offsets ≠ 0, so every quota is
    shifted by one common amount x with Σ cost·clip(offset + x, r_min, r_max) = budget, then rounded by largest
    remainder. With equal groups and odd C nothing moves: 6 modules, r_avg 5, C = 3 -> 6, 6, 5, 5, 4, 4."""
    if categories < 1:
        raise ValueError(f"categories must be >= 1, got {categories}")
    names = sorted(theta)
    cost = np.ones(len(names), dtype=np.int64) if cost is None else cost
    lo, hi = _bounds(r_min, names, 1), _bounds(r_max, names, math.inf)
    _check(theta, names, cost, target, lo, hi)
    if (why := _uniform_reason(theta, names)) is not None:
        return uniform(names, target, cost=cost, r_min=r_min, r_max=r_max, unit=unit, message=why)
    t = np.array([float(theta[n]) for n in names])
    by_theta = sorted(range(len(names)), key=lambda i: (-t[i], names[i]))
    c_eff = min(categories, len(names))
    offset = np.zeros(len(names))
    for c, group in enumerate(np.array_split(np.array(by_theta), c_eff)):
        offset[group] = (c_eff - 1) / 2 - c
    q = _fit(np.ones(len(names)), offset, cost, target, lo, hi)
    return _result(names, _round(q, t, names, cost, target, hi), cost, target, unit)


def allocate(theta: Mapping[str, float], r_avg: float, *, method: str = "sra", unit: str = "rank",
             shapes: Mapping[str, tuple[int, int]] | None = None, rounding: str = "exact", categories: int = 3,
             r_min: Bound = 1, r_max: Bound = None) -> Allocation:
    """Ranks for every module of θ with the budget of uniform LoRA at rank r_avg, in `unit`s."""
    names = sorted(theta)
    cost = costs(shapes, names, unit)
    target = budget(r_avg, cost)
    if rounding == "paper" and method != "sra":
        raise ValueError(f"rounding 'paper' exists only for method 'sra' (Eq. 15), not {method!r}")
    if method == "sra":
        return sra(theta, target, cost=cost, r_min=r_min, r_max=r_max, unit=unit, rounding=rounding)
    if method == "pra":
        return pra(theta, target, categories=categories, cost=cost, r_min=r_min, r_max=r_max, unit=unit)
    if method == "uniform":
        _check(theta, names, cost, target, _bounds(r_min, names, 1), _bounds(r_max, names, math.inf))
        return uniform(names, target, cost=cost, r_min=r_min, r_max=r_max, unit=unit)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# -----------------------------------------------------------------------------
# Concentration warning

TOP_FRAC = 0.05  # the "handful": the top 5 % of matrices by rank (at least one)
TOP_SHARE = 0.5  # warn when they hold more than half of Σ r


def concentration(ranks: Mapping[str, int], top_frac: float = TOP_FRAC, top_share: float = TOP_SHARE) -> dict:
    """How much of the budget the largest ranks take: the top k = max(1, ceil(top_frac·n)) matrices by rank
    hold `share` = Σ top-k r / Σ r. `warn` is share > top_share. SmolLM2 all-linear at r_avg 8 under SRA gave
    3 of 210 matrices 1,385 of 1,680 ranks (reference_runs/figure3), which this flags; uniform ranks give share = k/n."""
    if not 0 < top_frac <= 1 or not 0 < top_share < 1:
        raise ValueError(f"top_frac must be in (0, 1] and top_share in (0, 1), got {top_frac}, {top_share}")
    total = sum(ranks.values())
    k = max(1, math.ceil(top_frac * len(ranks)))
    top = sorted(ranks.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    share = sum(r for _, r in top) / total if total else 0.0
    return {"top_frac": top_frac, "top_share": top_share, "k": k, "n": len(ranks), "share": share,
            "warn": share > top_share, "top": {n: r for n, r in top}}
