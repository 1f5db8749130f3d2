"""Inverse-Hessian diagonal for the OBS saliency (Sensitivity-LoRA App. E; GPTQ fasterquant): a blocked
Cholesky factorisation with damping and dead inputs, and the diagonal-dominance diagnostic of Eqs. 6-7.

Split out of hessian.py (which accumulates H) along the seam between collecting H and factorising it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# -----------------------------------------------------------------------------
# Block-wise Cholesky and the inverse diagonal (App. E; GPTQ fasterquant)

def block_cholesky(a: torch.Tensor, blocksize: int = 128) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor L of a symmetric (d, d) matrix, L·Lᵀ = a, computed one diagonal block at a time.

    Right-looking blocked algorithm: factor the (b, b) diagonal block, solve the panel below it, subtract its
    outer product from the trailing matrix. Returns (L, -1) on success or (partial L, i) where i is the first
    row whose pivot was not positive, so the caller can damp and retry. `a` is left untouched.
    """
    return _block_cholesky_(a.clone(), blocksize)


def _block_cholesky_(work: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """block_cholesky that overwrites `work` (one (d, d) matrix less at peak).

    The pivots' status is read once at the end, not after every block: a device-to-host sync per block would
    stall the GPU (112 of them for d = 14336). After a failed block the rest is garbage, which is harmless since
    the caller only uses the factor when every block succeeded.
    """
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    d = work.shape[0]
    status = []  # per block: LAPACK-style info (first bad pivot, 1-based; 0 = fine), finiteness of the factor
    for k0 in range(0, d, blocksize):
        k1 = min(k0 + blocksize, d)
        lkk, info = torch.linalg.cholesky_ex(work[k0:k1, k0:k1])  # (b, b)
        status.append(torch.stack([info.to(torch.int64), (~torch.isfinite(lkk).all()).to(torch.int64)]))
        work[k0:k1, k0:k1] = lkk
        if k1 < d:
            # panel L21 solves L21·Lkkᵀ = A21, then A22 -= L21·L21ᵀ (the Schur complement)
            panel = torch.linalg.solve_triangular(lkk.T, work[k1:, k0:k1], upper=True, left=False)  # (d-k1, b)
            work[k1:, k0:k1] = panel
            work[k1:, k1:].addmm_(panel, panel.T, alpha=-1.0)  # in place: no (d-k1)² temporary
    status = torch.stack(status).cpu()  # (n_blocks, 2): the one sync
    bad = (status[:, 0] > 0) | (status[:, 1] > 0)
    if not bad.any():
        return work.tril_(), -1
    b = int(bad.nonzero()[0])
    return work.tril_(), b * blocksize + max(int(status[b, 0]) - 1, 0)


@dataclass
class InverseFactor:
    """Result of `cholesky_inverse_factor` for one (d_in, d_in) Hessian."""
    upper: torch.Tensor  # (n_live, n_live) upper U with Uᵀ·U = (H_live + λI)⁻¹, as GPTQ's Hinv
    inv_diag: torch.Tensor  # (d_in,) diag((H_live + λI)⁻¹); +inf at dead inputs
    dead: torch.Tensor  # (d_in,) bool, inputs with H_jj = 0
    damping: float  # λ actually added to the live diagonal
    percdamp: float  # λ / mean(live diag H)
    retries: int  # how many times the damping was doubled


def cholesky_inverse_factor(h: torch.Tensor, percdamp: float = 0.01, blocksize: int = 128,
                            max_percdamp: float = 1.0, name: str = "H") -> InverseFactor:
    """diag(H⁻¹) and the upper Cholesky factor of H⁻¹ from one blocked Cholesky, with damping and dead inputs.

    Dead inputs (H_jj = 0: never active on the calibration set) have no curvature; they are removed before
    factorising and get [H⁻¹]_jj = +inf, so their OBS saliency w²/[H⁻¹]_jj is 0 (GPTQ instead sets H_jj = 1,
    which is not scale-equivariant). The live block is damped with λ = percdamp·mean(live diag H); if the
    factorisation fails, percdamp doubles (from 0.01 if it was 0) until it exceeds max_percdamp, then raises.
    The upper factor U of H⁻¹ (Uᵀ·U = H⁻¹) is read off the lower factor of the reversed matrix J·H·J: if
    J·H·J = L·Lᵀ then H = V·Vᵀ with V = J·L·J upper, so U = V⁻¹ = J·L⁻¹·J and diag(H⁻¹)_j = Σ_i U_ij².
    Peak memory: H plus three (d_in, d_in) matrices (the factor, an identity and the triangular inverse).
    """
    d = h.shape[0]
    dead = h.diagonal() == 0
    live = (~dead).nonzero().squeeze(1)
    inv_diag = torch.full((d,), math.inf, dtype=h.dtype, device=h.device)
    if live.numel() == 0:
        return InverseFactor(h.new_zeros(0, 0), inv_diag, dead, 0.0, percdamp, 0)
    mean_diag = h.diagonal()[live].mean().item()
    frac, retries = percdamp, 0
    while True:
        work = h[live][:, live] if dead.any() else h  # (n_live, n_live); a view when nothing is dead
        work = work.flip(0, 1)  # J·H·J, a fresh copy that the factorisation may overwrite
        work.diagonal().add_(frac * mean_diag)  # damping: J·(H + λI)·J = J·H·J + λI
        low, failed = _block_cholesky_(work, blocksize)
        if failed < 0:
            break
        del work, low
        frac, retries = (2 * frac if frac > 0 else 0.01), retries + 1
        if frac > max_percdamp:
            raise RuntimeError(f"{name}: Cholesky failed at every damping up to percdamp={max_percdamp} "
                               "(the Hessian has non-finite entries or is far from positive semi-definite)")
    eye = torch.eye(len(live), dtype=h.dtype, device=h.device)
    inv_low = torch.linalg.solve_triangular(low, eye, upper=False)  # L⁻¹
    del eye, low, work
    upper = inv_low.flip(0, 1)  # U = J·L⁻¹·J, upper triangular
    del inv_low
    inv_diag[live] = upper.square().sum(0)  # [H⁻¹]_jj = ‖U[:, j]‖²
    return InverseFactor(upper, inv_diag, dead, frac * mean_diag, frac, retries)


def dominance(h: torch.Tensor) -> tuple[float, float]:
    """Diagonal-dominance diagnostic for the assumption behind Eqs. 6-7 (the paper never checks it).

    Returns (off-diagonal share Σ_{i≠j}|h_ij| / Σ_ij |h_ij|, fraction of live rows with Σ_{j≠i}|h_ij| < |h_ii|).
    The row sums of |h| are one reduction in float64, so no second (d_in, d_in) matrix is allocated.
    """
    absrow = torch.linalg.vector_norm(h, 1, dim=1, dtype=torch.float64)  # (d,) Σ_j |h_ij|, no copy of h
    diag = h.diagonal().abs().to(torch.float64)  # (d,)
    row_off = absrow - diag
    total = absrow.sum().item()
    live = diag > 0
    dominant = int(((row_off < diag) & live).sum())
    n_live = int(live.sum())
    return ((row_off.sum().item() / total) if total > 0 else 0.0), (dominant / n_live if n_live else 0.0)
