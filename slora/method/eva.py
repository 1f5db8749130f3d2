"""EVA's rank allocation (Explained Variance Adaptation, arXiv 2410.07170 §3.2) on slora's statistics (pure).

EVA (PEFT `tuners/lora/eva.py`, `_get_rank_distribution`) decomposes the inputs of every target matrix, ranks the
explained-variance ratios of all matrices' components globally, and gives each matrix as many ranks as it has
components among the top `budget` of them, where budget = r_avg · (number of matrices) and no matrix may take more
than round(ρ·r_avg) components. ρ = 1 is uniform LoRA; PEFT's default is ρ = 2.

slora already holds what EVA decomposes: in mode "full", H = (2/N)·Σ_t x_t x_tᵀ over the calibration tokens and
their mean µ (hessian.HessianAccumulator). Both count every unmasked token once, as PEFT's default
prepare_layer_inputs_fn does. The ratios are the eigenvalues over the trace; constant factors (2/N, N/(N-1)) cancel.
- centring. PEFT's IncrementalPCA subtracts the running token mean, so its ratios are those of the covariance
  C = H/2 - µµᵀ; `ratios(h, mean=µ)` computes exactly those, and `--alloc eva` uses them by default
  (SensitivityConfig.eva_centred). Without the mean, H's first component also carries the mean direction: on
  SmolLM2 q,v that moves 54 of 480 ranks against PEFT (tests/comparisons/eva_compat.py), so it is kept only as an option.
- exactness. PEFT's incremental low-rank SVD stops once the needed components are stable to a cosine of τ = 0.99
  between batches, and may cycle the data loader; here the spectrum is the exact float64 eigh of H over one pass.

Matrices that share an input (q/k/v, gate/up) share one spectrum. As in PEFT each member keeps its own copy of the
spectrum in the global ranking, with a cap equal across the group (PEFT equalises max_components), so the members
get equal ranks except where the budget boundary cuts through their tied values. Ties are broken by
(ratio desc, name, component index), so the result is deterministic and permutation-equivariant (PEFT's argsort
is not stable; it then swaps ranks so the group's hook owner holds the largest, which changes no multiset).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

RHO = 2.0  # PEFT EvaConfig default: a matrix may take up to round(ρ·r) components


class CapsTooSmall(ValueError):
    """The caps round(ρ·r_avg) cannot hold the budget: ρ is too small for these matrices."""


def ratios(h: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Explained-variance ratios of one input, descending, float64 on CPU, shape (d_in,).

    h (d_in, d_in) is slora's H = (2/N)·Σ x xᵀ. Without `mean` the ratios are eig(H)/tr(H) (uncentred second
    moment). With the token mean µ (d_in,) they are eig(C)/tr(C) for C = Σ (x-µ)(x-µ)ᵀ/(N-1),
    the sample covariance PEFT's IncrementalPCA decomposes: C = N/(N-1)·(H/2 - µµᵀ).
    Eigenvalues below 0 (rounding of a PSD matrix) are set to 0.
    """
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"ratios: H must be square (d_in, d_in), got {tuple(h.shape)}")
    m = h.to("cpu", torch.float64) / 2
    if mean is not None:
        mu = mean.to("cpu", torch.float64).reshape(-1, 1)  # (d_in, 1)
        m = m - mu @ mu.T  # (d_in, d_in); the factor N/(N-1) cancels in the ratio
    if not torch.isfinite(m).all():
        raise ValueError("ratios: H has NaN or Inf entries")
    ev = torch.linalg.eigvalsh((m + m.T) / 2).flip(0).clamp_min(0.0)  # descending
    total = ev.sum()
    if not total > 0:
        raise ValueError("ratios: the (co)variance is zero (every calibration input was 0, or, centred, the same)")
    return ev / total


def caps(r_avg: float, rho: float, names: list[str], groups: Mapping[str, str], limit: Mapping[str, int]
         ) -> dict[str, int]:
    """Per-matrix component cap: round(ρ·r_avg) as PEFT (Python's round, halves to even), then at most
    `limit` (slora's r_max and min(d_in, d_out)), then the largest of its group (PEFT equalises a group)."""
    base = round(rho * r_avg)
    own = {n: min(base, int(limit[n])) for n in names}
    best: dict[str, int] = {}
    for n in names:
        best[groups[n]] = max(best.get(groups[n], 0), own[n])
    return {n: min(best[groups[n]], int(limit[n])) for n in names}


def allocate(spectra: Mapping[str, torch.Tensor], r_avg: float, *, rho: float = RHO,
             groups: Mapping[str, str] | None = None, limit: Mapping[str, int] | None = None,
             r_min: int = 0) -> dict[str, int]:
    """EVA ranks: dict name -> rank, in name order.

    spectra[name]: explained-variance ratios of the matrix's input, descending (`ratios`); members of one input
    group may share the tensor. groups[name]: the group's owner (default: each matrix its own group).
    limit[name]: largest useful rank (default: the spectrum length). Budget r_total = r_avg·n must be an integer.
    Every matrix first keeps its r_min leading components (slora's floor; r_min 0 is PEFT's rule), then the
    remaining budget goes to the largest remaining ratios below each cap. Guarantees: Σ ranks = r_total,
    r_min <= rank <= cap; raises ValueError if the caps cannot hold the budget (ρ < 1) or a ratio is invalid.
    """
    if rho <= 0 or not math.isfinite(rho):
        raise ValueError(f"eva: rho must be a positive number, got {rho}")
    names = sorted(spectra)
    if not names:
        raise ValueError("eva: no modules to allocate ranks to")
    groups = {n: n for n in names} if groups is None else groups
    limit = {n: spectra[n].numel() for n in names} if limit is None else limit
    exact = r_avg * len(names)
    if exact != int(exact) or exact < 0:
        raise ValueError(f"eva: budget r_avg·n = {exact} is not a non-negative integer (r_avg={r_avg})")
    target = int(exact)
    cap = caps(r_avg, rho, names, groups, {n: min(int(limit[n]), spectra[n].numel()) for n in names})
    floor = {n: min(r_min, cap[n]) for n in names}
    if sum(cap.values()) < target:
        raise CapsTooSmall(f"eva: the caps round(ρ·r_avg) = {round(rho * r_avg)} (and r_max, min(d_in, d_out)) "
                         f"hold {sum(cap.values())} ranks over {len(names)} matrices, less than the budget {target};"
                         f" raise rho (got {rho})")
    if sum(floor.values()) > target:
        raise ValueError(f"eva: r_min {r_min} on {len(names)} matrices exceeds the budget {target}")

    # every component beyond the floor and under the cap competes globally; keys give a total order
    pool = []
    for n in names:
        s = spectra[n]
        if not torch.isfinite(s).all() or (s < 0).any():
            raise ValueError(f"eva: {n}: explained-variance ratios must be finite and >= 0")
        vals = s.to("cpu", torch.float64).tolist()
        if any(a < b for a, b in zip(vals, vals[1:])):
            raise ValueError(f"eva: {n}: explained-variance ratios must be sorted descending")
        pool += [(-vals[i], n, i) for i in range(floor[n], cap[n])]
    pool.sort()
    ranks = dict(floor)
    for _, n, _ in pool[:target - sum(floor.values())]:
        ranks[n] += 1
    return {n: ranks[n] for n in names}
