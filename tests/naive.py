"""Slow, obviously correct references for differential tests: float64 or exact rational arithmetic, loops."""
from __future__ import annotations

import math
from fractions import Fraction

import torch


def hessian(batches) -> tuple[torch.Tensor, int]:
    """H = (2/N)·X·Xᵀ over the concatenated unmasked tokens, float64; batches = [(x (B, T, d), mask (B, T))]."""
    tokens = torch.cat([x.to(torch.float64)[m != 0] for x, m in batches])  # (N, d)
    n = tokens.shape[0]
    return 2.0 * tokens.T @ tokens / n, n


def inverse_diag(h: torch.Tensor) -> torch.Tensor:
    """diag(H⁻¹) through the eigendecomposition (no Cholesky): Σ_k V_jk² / λ_k."""
    lam, v = torch.linalg.eigh(h.to(torch.float64))
    return (v.square() / lam).sum(1)


def _frac(x: float) -> Fraction:
    """k_frac and α as the fractions they stand for (slora.metrics.rational's rule, written out)."""
    near = Fraction(x).limit_denominator(10 ** 6)
    return near if abs(near - Fraction(x)) <= 4 * 2.0 ** -52 * abs(Fraction(x)) else Fraction(x)


def metrics(values: list[float], k_frac: float, alpha: float) -> tuple[float, float, int]:
    """(trace, top-k mean, effective rank) by sorting and looping in exact rational arithmetic."""
    v = sorted(values, reverse=True)
    exact = [Fraction(x) for x in v]
    total = sum(exact)
    k = max(1, math.floor(_frac(k_frac) * len(v)))
    topk = float(sum(exact[:k])) / k
    prefix, er = Fraction(0), None
    for i, x in enumerate(exact, start=1):
        prefix += x
        if prefix >= _frac(alpha) * total:
            er = i
            break
    return float(total), topk, er


def cv(xs: list[float]) -> float:
    """σ/µ² with population σ, in float64 via torch."""
    t = torch.tensor(xs, dtype=torch.float64)
    sigma = t.std(correction=0).item()
    return 0.0 if sigma == 0 else sigma / t.mean().item() ** 2


def kendall_tau_b(x, y) -> float:
    """τ-b by looking at every pair."""
    n = len(x)
    nc = nd = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                nc += 1
            else:
                nd += 1
    denom = math.sqrt((nc + nd + tx) * (nc + nd + ty))
    return math.nan if denom == 0 else (nc - nd) / denom
