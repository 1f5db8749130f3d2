"""Sensitivity metrics of Sensitivity-LoRA (arXiv 2509.09119 §3.2, Eqs. 8-14) as pure functions.

Each target weight matrix w gets a sensitivity vector s (the paper's diagonal elements λ^w of H^w), three
metrics of it (trace, Eq. 8; top-k mean, Eq. 9; effective rank, Eq. 10), and the σ/µ²-weighted combination
θ^w (Eqs. 11-14) that allocate.py turns into ranks (Eq. 15).

Exactness. Every metric is a function of the exact real values of s: trace and the top-k sum are the correctly
rounded exact sums (math.fsum semantics), and the effective rank is decided as in exact arithmetic. So the
result does not depend on summation order or device, and a vector given as `values` repeated `repeat` times
(the full-diag source) gives bit for bit what the materialised vector gives. The fractions k_frac and α are
read as the simple fractions they stand for (`rational`: 0.8 means 4/5, not the binary double above it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Mapping, NamedTuple

import torch

K_FRAC = 0.5  # k = floor(k_frac·N) for the top-k mean; App. A.2 uses N/2
ALPHA = 0.85  # effective-rank share threshold; App. A.2
SOURCES = ("diag", "full-diag", "obs")
VARIANTS = ("sensitivity", "global", "local", "half-mu")


# -----------------------------------------------------------------------------
# Sensitivity vectors

class SensitivityVector(NamedTuple):
    """`values` (n,) float64 on CPU, standing for the N = n·repeat diagonal entries of the paper's H^w."""
    values: torch.Tensor
    repeat: int = 1


def sensitivity_vector(diag: torch.Tensor, *, source: str = "diag", d_out: int | None = None,
                       inv_diag: torch.Tensor | None = None, weight: torch.Tensor | None = None
                       ) -> SensitivityVector:
    """The vector of "diagonal elements of H^w" that Eqs. 8-10 read, for one weight matrix W (d_out, d_in).

    - "diag": diag(H), N = d_in: the layer Hessian H = 2XXᵀ shared by all rows (App. E), read literally.
    - "full-diag": the diagonal of the Hessian of all d_out·d_in weights. That Hessian is I_{d_out} ⊗ H, so its
      diagonal is diag(H) repeated d_out times, N = d_out·d_in; it is represented, never materialised.
    - "obs": weight-aware OBS saliency w_ij²/[H⁻¹]_jj (the cost of zeroing w_ij, GPTQ/SparseGPT), summed over
      the d_out rows that share H: s_j = ‖W[:, j]‖² / [H⁻¹]_jj, N = d_in. Summing keeps Σ_j s_j equal to the
      total single-weight saliency of the matrix. Dead inputs ([H⁻¹]_jj = inf) get s_j = 0.
    """
    diag = diag.to("cpu", torch.float64)
    if source == "diag":
        return SensitivityVector(diag, 1)
    if source == "full-diag":
        if d_out is None or d_out < 1:
            raise ValueError(f"source 'full-diag' needs d_out >= 1, got {d_out}")
        return SensitivityVector(diag, int(d_out))
    if source == "obs":
        if inv_diag is None or weight is None:
            raise ValueError("source 'obs' needs inv_diag (mode 'full') and the weight matrix")
        col_sq = torch.linalg.vector_norm(weight.detach(), dim=0, dtype=torch.float64).square()  # (d_in,)
        inv = inv_diag.to("cpu", torch.float64)
        return SensitivityVector(torch.where(torch.isinf(inv), 0.0, col_sq.cpu() / inv), 1)
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


# -----------------------------------------------------------------------------
# The three metrics (Eqs. 8-10)

def rational(x: float) -> Fraction:
    """The exact number a float parameter stands for: a float within 4 ulps of a fraction with denominator
    <= 10⁶ is that fraction (0.85 -> 17/20, 1/3 -> 1/3, 0.8 -> 4/5, not the binary double beside it);
    anything else is its exact binary value."""
    exact = Fraction(float(x))
    simple = exact.limit_denominator(10 ** 6)
    return simple if abs(simple - exact) <= 4 * 2.0 ** -52 * abs(exact) else exact


def _exact_sum(xs: list[float]) -> Fraction:
    """Exact Σ xs: fsum returns the correctly rounded sum; subtracting it and summing again peels off the
    next 53 bits until nothing is left (a non-zero exact sum of doubles is never rounded to 0)."""
    xs, total = list(xs), Fraction(0)
    while (s := math.fsum(xs)) != 0:
        total += Fraction(s)
        xs.append(-s)
    return total


def _sorted(s: torch.Tensor) -> torch.Tensor:
    return torch.sort(s.to("cpu", torch.float64), descending=True).values  # λ_1 >= λ_2 >= ... (§3.2)


def trace(s: torch.Tensor, repeat: int = 1) -> float:
    """S_global = tr(H^w) = Σ_i h_ii (Eq. 8) over the N = len(s)·repeat entries; correctly rounded."""
    v = s.to("cpu", torch.float64).tolist()
    return math.fsum(v) if repeat == 1 else float(repeat * _exact_sum(v))


def topk_k(n: int, k_frac: float = K_FRAC) -> int:
    """k = floor(k_frac·N), at least 1 (App. A.2: "half of the total number of diagonal elements")."""
    if not 0 < k_frac <= 1:
        raise ValueError(f"k_frac must be in (0, 1], got {k_frac}")
    return max(1, math.floor(rational(k_frac) * n))


def topk_mean(s: torch.Tensor, k_frac: float = K_FRAC, repeat: int = 1) -> float:
    """S_Topk = (1/k)·Σ_{i<=k} λ_i (Eq. 9), λ sorted descending, k = topk_k(N); (rounded Σ)/k."""
    v = _sorted(s).tolist()
    k = topk_k(len(v) * repeat, k_frac)
    if repeat == 1:
        return math.fsum(v[:k]) / k
    q, r = divmod(k, repeat)  # the top k of the repeated vector: each of v[:q] repeat times, then r copies of v[q]
    return float(repeat * _exact_sum(v[:q]) + r * Fraction(v[q] if r else 0.0)) / k


def effective_rank(s: torch.Tensor, alpha: float = ALPHA, repeat: int = 1) -> int:
    """S_EffectiveRank = min{k : Σ_{i<=k} λ_i / Σ_i λ_i >= α} (Eq. 10), an integer in [1, N].

    Robust to rounding: float64 prefix sums decide every k whose prefix is farther from α·Σλ than its error
    bound (4·(n+2)·u·Σλ, u = 2⁻⁵³, which covers any summation order and the rounding of α·Σλ); the few k left
    undecided are settled with exact rational sums. For repeat m > 1 the answer lies in the m copies of the
    base vector's effective-rank element q: k = (q-1)·m + ceil(m·(α·C_n - C_{q-1}) / λ_q), C_j the prefix sums.
    """
    a = rational(alpha)
    if not 0 < a <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    v = _sorted(s)
    n, pre = v.numel(), torch.cumsum(v, 0)  # pre[j-1] ≈ C_j
    total = pre[-1].item()
    if not total > 0:
        raise ValueError("effective rank is undefined for an all-zero sensitivity vector")
    thr, tol = float(a) * total, 4.0 * (n + 2) * 2.0 ** -53 * total
    lo = min(int(torch.searchsorted(pre, torch.tensor(thr - tol, dtype=torch.float64))) + 1, n)
    hi = min(int(torch.searchsorted(pre, torch.tensor(thr + tol, dtype=torch.float64))) + 1, n)
    vals = v.tolist()
    q = lo
    if lo < hi:  # undecided by floats: walk the window with exact prefix sums
        target, prefix = a * _exact_sum(vals), _exact_sum(vals[:lo - 1])
        for q in range(lo, hi + 1):
            prefix += Fraction(vals[q - 1])
            if prefix >= target:
                break
    if repeat == 1:
        return q
    share = repeat * (a * _exact_sum(vals) - _exact_sum(vals[:q - 1])) / Fraction(vals[q - 1])
    return (q - 1) * repeat + math.ceil(share)


@dataclass(frozen=True)
class ModuleMetrics:
    trace: float  # S_global, Eq. 8
    topk: float  # S_Topk, Eq. 9
    effective_rank: int  # S_EffectiveRank, Eq. 10
    n: int  # N, the number of diagonal entries


def module_metrics(vec: SensitivityVector, *, k_frac: float = K_FRAC, alpha: float = ALPHA,
                   name: str = "module") -> ModuleMetrics:
    """Eqs. 8-10 for one module; raises ValueError naming the module for NaN/Inf, negative or all-zero s."""
    s, repeat = vec
    if s.numel() == 0 or repeat < 1:
        raise ValueError(f"{name}: empty sensitivity vector")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name}: sensitivity vector has NaN or Inf entries")
    if (s < 0).any():
        raise ValueError(f"{name}: sensitivity vector has negative entries (a Hessian diagonal is >= 0)")
    if not (s > 0).any():
        raise ValueError(f"{name}: sensitivity vector is all zero (every input was 0 on the calibration set)")
    s = _sorted(s)  # sorted once here; the sorts inside topk_mean and effective_rank then see sorted input
    return ModuleMetrics(trace(s, repeat), topk_mean(s, k_frac, repeat), effective_rank(s, alpha, repeat),
                         s.numel() * repeat)


# -----------------------------------------------------------------------------
# Aggregation (Eqs. 11-14)

def cv_weight(xs: list[float]) -> float:
    """σ/µ² over all modules (Eqs. 11, 13), population σ; 0 when σ = 0 (the metric tells modules apart not at all)."""
    if not xs:
        raise ValueError("cv_weight of an empty list")
    if min(xs) == max(xs):  # σ = 0 exactly; the rounded mean of equal values need not equal them (fsum(3·[x])/3)
        return 0.0
    mu = math.fsum(xs) / len(xs)
    sigma = math.sqrt(math.fsum((x - mu) ** 2 for x in xs) / len(xs))
    return 0.0 if sigma == 0 else sigma / mu ** 2


def _half_mu(xs: list[float], what: str) -> float:
    mu = math.fsum(xs) / len(xs)
    if mu == 0:
        raise ValueError(f"variant 'half-mu': the mean of {what} is 0")
    return 0.5 / mu


class Aggregate(NamedTuple):
    s_local: dict[str, float]
    theta: dict[str, float]
    weights: dict[str, float]  # beta1, beta2, gamma1, gamma2


def aggregate(metrics: Mapping[str, ModuleMetrics], variant: str = "sensitivity") -> Aggregate:
    """θ^w per module from the metric table (statistics over all modules jointly).

    S_local = β1·S_Topk + β2·S_EffectiveRank (Eq. 12) with β = σ/µ² of each metric (Eq. 11);
    θ = γ1·S_global + γ2·S_local (Eq. 14) with γ = σ/µ² (Eq. 13). Variants: "global" (Sg-LoRA, θ = S_global),
    "local" (Sl-LoRA, θ = S_local), "half-mu" (Table 7: β and γ = 0.5/µ of their metric).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not metrics:
        raise ValueError("no modules to aggregate")
    names = list(metrics)
    sg = [metrics[n].trace for n in names]
    st = [metrics[n].topk for n in names]
    se = [float(metrics[n].effective_rank) for n in names]
    weigh = cv_weight if variant != "half-mu" else None
    b1 = weigh(st) if weigh else _half_mu(st, "S_Topk")
    b2 = weigh(se) if weigh else _half_mu(se, "S_EffectiveRank")
    sl = [b1 * t + b2 * e for t, e in zip(st, se)]  # Eq. 12
    if variant == "global":
        g1, g2 = 1.0, 0.0
    elif variant == "local":
        g1, g2 = 0.0, 1.0
    else:
        g1 = weigh(sg) if weigh else _half_mu(sg, "S_global")
        g2 = weigh(sl) if weigh else _half_mu(sl, "S_local")
    theta = [g1 * g + g2 * l for g, l in zip(sg, sl)]  # Eq. 14
    return Aggregate(dict(zip(names, sl)), dict(zip(names, theta)),
                     {"beta1": b1, "beta2": b2, "gamma1": g1, "gamma2": g2})
