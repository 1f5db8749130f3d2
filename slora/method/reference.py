"""Sensitivity-LoRA's default path in one file: the executable spec (arXiv 2509.09119 §3-4, Eqs. 8-15).

A reimplementer starts reading here. From top to bottom, as the paper goes: the layer Hessians of the target
matrices from one calibration pass, three metrics of each, their σ/µ²-weighted sum θ, and ranks in proportion to θ.
It is plain torch, with no options, no distributed code and no exactness machinery beyond what the exact rank
budget needs. tests/method/test_reference.py holds it equal to the full implementation (slora.method.sensitivity.compute
with its defaults): the ranks exactly, θ within a bound on float64 rounding.

    calibration batches --pre-hooks on target inputs--> diag(H) (d_in,) per module   (§4.6, App. E)
    --> trace, top-k mean, effective rank (Eqs. 8-10) --> θ (Eqs. 11-14) --> ranks (Eq. 15)

Shape legend: B batch, T sequence, d_in the Linear's input features, n real tokens.
"""
import math

import torch
from torch import nn

K_FRAC = 0.5  # top-k mean over k = floor(N/2) entries (App. A.2)
ALPHA = 0.85  # effective rank: share of the trace to reach (App. A.2)
R_MIN = 1  # every target gets a LoRA of rank >= 1


# -----------------------------------------------------------------------------
# Calibration: diag(H) of every target's input (§4.6, App. E)

def hessian_diags(model: nn.Module, batches, modules: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """diag(H) (d_in,) float64 per module, H = (2/N)·Σ_t x_t x_tᵀ the GPTQ layer Hessian shared by the rows of W.

    One forward pass per batch (`model(**batch)`, eval mode, no grad) with a pre-hook on each target. Tokens where
    batch["attention_mask"] is 0 are padding and do not count; N is the number of real tokens. A 2-D input
    (B, d_in), such as a classifier head's, has one row per sequence and every row counts.
    """
    sq = dict.fromkeys(modules, 0)  # Σ_t x_t² (d_in,) in fp32, GPTQ's accumulator dtype
    tokens = dict.fromkeys(modules, 0)  # N
    mask = None

    def hook(name):
        def pre(module, args):
            x = args[0]  # (B, T, d_in) or (B, d_in)
            if x.dim() == 3 and mask is not None:
                x = x[mask != 0]  # (n, d_in): real tokens only
            x = x.reshape(-1, x.shape[-1])  # (n, d_in)
            # Σ_t x_t² per feature, as a squared column norm (the full implementation's reduction, so that
            # both read bit for bit the same diag(H))
            sq[name] = sq[name] + torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).square()
            tokens[name] += x.shape[0]
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    training = model.training
    try:
        model.eval()  # dropout off: calibration is deterministic
        with torch.no_grad():
            for batch in batches:
                mask = batch.get("attention_mask")  # (B, T)
                model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {n: (sq[n] * (2.0 / tokens[n])).to("cpu", torch.float64) for n in modules}


# -----------------------------------------------------------------------------
# The three metrics of one matrix (§3.2, Eqs. 8-10). Plain float64 sums throughout (the full implementation
# rounds its sums correctly and decides Eq. 10 exactly; the difference is rounding, bounded in the test).

def metrics(d: torch.Tensor) -> tuple[float, float, int]:
    """(S_global, S_Topk, S_EffectiveRank) of diag(H) d (N,), N = d_in."""
    lam = torch.sort(d, descending=True).values  # λ_1 >= ... >= λ_N: sorted diagonal entries, not eigenvalues
    n = lam.numel()
    trace = lam.sum().item()  # Eq. 8: S_global = tr(H) = Σ_i h_ii
    k = max(1, math.floor(K_FRAC * n))
    topk = lam[:k].mean().item()  # Eq. 9: mean of the k largest entries
    c = torch.cumsum(lam, 0)  # c[j-1] = λ_1 + ... + λ_j
    erank = int((c < ALPHA * c[-1]).sum()) + 1  # Eq. 10: smallest k whose prefix reaches α·Σλ
    return trace, topk, erank


# -----------------------------------------------------------------------------
# Aggregation over all target matrices jointly (§3.2.2-3.3, Eqs. 11-14)

def cv_weight(xs: list[float]) -> float:
    """σ/µ² of one metric over all modules, population σ; 0 when σ = 0 (the metric tells no module apart)."""
    mu = sum(xs) / len(xs)
    sigma = math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))
    return sigma / mu ** 2 if sigma > 0 else 0.0


def thetas(table: dict[str, tuple[float, float, int]]) -> dict[str, float]:
    """θ per module from {name: (S_global, S_Topk, S_EffectiveRank)}."""
    sg, st, se = ([row[i] for row in table.values()] for i in range(3))
    beta1, beta2 = cv_weight(st), cv_weight(se)  # Eq. 11
    sl = [beta1 * t + beta2 * e for t, e in zip(st, se)]  # Eq. 12: S_local
    gamma1, gamma2 = cv_weight(sg), cv_weight(sl)  # Eq. 13
    return {n: gamma1 * g + gamma2 * l for n, g, l in zip(table, sg, sl)}  # Eq. 14


# -----------------------------------------------------------------------------
# Scaled Rank Allocation (§3.3, Eq. 15), budget met exactly

def allocate(theta: dict[str, float], caps: dict[str, int], r_avg: float) -> dict[str, int]:
    """Integer ranks r_w in [R_MIN, caps[w]] with Σ r_w = r_avg·n, in proportion to θ where no bound binds.

    Eq. 15, r_w = θ_w/Σθ · r_total, leaves rounding and bounds open. Continuous quotas q_w = clip(θ_w·x, R_MIN,
    cap_w) with Σ q_w = r_total come from water-filling (Eq. 15 on the modules not held at a bound); then each
    quota is floored and the ranks still missing go +1 in order of (remainder desc, θ desc, name asc).
    """
    names = sorted(theta)
    budget = round(r_avg * len(names))  # r_total = r_avg·n, an integer
    if len(set(theta.values())) == 1:  # all θ equal (all 0 when σ = 0 for every metric): uniform ranks
        theta = dict.fromkeys(names, 1.0)
    # Water-filling. With the modules in `held` at their bounds, x spreads the rest of the budget over the others
    # (Eq. 15). If the quotas above a cap outweigh those below R_MIN, the true x is larger than this one, so those
    # modules stay at their cap; otherwise it is smaller and the modules below R_MIN stay there.
    held: dict[str, int] = {}
    while free := [n for n in names if n not in held]:
        x = (budget - sum(held.values())) / sum(theta[n] for n in free)
        over = {n: theta[n] * x - caps[n] for n in free if theta[n] * x > caps[n]}
        under = {n: R_MIN - theta[n] * x for n in free if theta[n] * x < R_MIN}
        if not over and not under:
            break
        if sum(over.values()) >= sum(under.values()):
            held |= {n: caps[n] for n in over}
        else:
            held |= dict.fromkeys(under, R_MIN)
    q = {n: held[n] if n in held else theta[n] * x for n in names}
    # largest remainder: the floors leave `left` ranks, one each to the largest remainders below their cap
    ranks = {n: math.floor(q[n]) for n in names}
    left = budget - sum(ranks.values())
    order = sorted((n for n in names if ranks[n] < caps[n]), key=lambda n: (ranks[n] - q[n], -theta[n], n))
    for n in order[:left]:
        ranks[n] += 1
    return ranks


# -----------------------------------------------------------------------------
# The whole pre-training step (Fig. 1)

def sensitivity_ranks(model: nn.Module, batches, modules: dict[str, nn.Linear], r_avg: float
                      ) -> tuple[dict[str, float], dict[str, int]]:
    """(θ, rank) per target module (qualified name -> nn.Linear) of `model`, calibrated on `batches` (dicts of model
    inputs with an attention_mask), budget r_avg·len(modules); a rank above min(d_in, d_out) adds nothing."""
    diags = hessian_diags(model, batches, modules)
    theta = thetas({n: metrics(d) for n, d in diags.items()})
    caps = {n: min(m.in_features, m.out_features) for n, m in modules.items()}
    ranks = allocate(theta, caps, r_avg)
    return theta, {n: ranks[n] for n in modules}
