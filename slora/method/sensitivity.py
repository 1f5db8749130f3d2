"""Sensitivity-LoRA's whole pre-training step (arXiv 2509.09119 Fig. 1): model + calibration batches -> ranks.

    target modules (the caller's) -> hessian.collect (or collect_streaming) -> metrics (Eqs. 8-14)
    -> allocate (Eq. 15) -> Sensitivity (per-module metrics and θ, the weights, the configuration, the ranks)

Works for any nn.Module built from nn.Linear whose forward takes `model(**batch)`. Several processes (torchrun)
come in as a `group` (hessian.Group); the result is then the same on every process.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from slora.method import allocate as alloc
from slora.method import eva, hessian, metrics

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class SensitivityConfig:
    mode: str = "diag"  # Hessian kept: "diag" (Σx², O(d_in)) or "full" (d_in², for "obs" and diagnostics)
    source: str = "diag"  # sensitivity vector: "diag" (N = d_in), "full-diag" (N = d_out·d_in), "obs"
    variant: str = "sensitivity"  # θ: "sensitivity" (Eq. 14), "global" (Sg), "local" (Sl), "half-mu" (Table 7)
    k_frac: float = metrics.K_FRAC  # top-k fraction of N (Eq. 9)
    alpha: float = metrics.ALPHA  # effective-rank share (Eq. 10)
    r_avg: float = 8  # average rank; the budget is that of uniform LoRA at r_avg (App. A.2: 4 NLU, 8 NLG)
    method: str = "sra"  # "sra" (Eq. 15), "pra" (§4.4), "uniform" or "eva" (EVA's rule on eig(H), needs mode "full")
    eva_rho: float = eva.RHO  # EVA: a matrix takes at most round(eva_rho·r_avg) ranks; 1 is uniform
    eva_centred: bool = True  # EVA on the covariance H/2 - µµᵀ as PEFT (True) or on slora's uncentred H (False)
    categories: int = 3  # PRA groups
    unit: str = "rank"  # budget unit: "rank" or "param" (d_in + d_out per rank)
    r_min: int = 1  # smallest rank; 0 allowed (no adapter)
    r_max: int | None = None  # largest rank; always capped at min(d_in, d_out) of each module
    rounding: str = "exact"  # "exact" (largest remainder, budget met) or "paper" (independent rounding)
    percdamp: float = 0.01  # damping λ = percdamp·mean(diag H) for H⁻¹ (mode "full")
    blocksize: int = 128  # Cholesky block size (mode "full")
    dtype: str = "float32"  # accumulator dtype: "float32" or "float64"

    def __post_init__(self):
        choices = {"mode": ("diag", "full"), "source": metrics.SOURCES, "variant": metrics.VARIANTS,
                   "method": alloc.METHODS + ("eva",), "unit": alloc.UNITS, "rounding": ("exact", "paper"),
                   "dtype": tuple(DTYPES)}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.source == "obs" and self.mode != "full":
            raise ValueError("source 'obs' needs diag(H⁻¹), i.e. mode 'full'")
        if self.method == "eva" and (self.mode != "full" or self.unit != "rank"):
            raise ValueError("method 'eva' needs the eigenvalues of H (mode 'full') and counts ranks (unit 'rank')")


@dataclass
class Sensitivity:
    """The result of the pre-training step, as plain data (ints, floats, strings, dicts), in model order."""
    modules: dict  # name -> {d_in, d_out, tokens, trace, topk, effective_rank, s_global, s_local, theta}
    weights: dict  # β1, β2, γ1, γ2 of Eqs. 11 and 13: {beta1, beta2, gamma1, gamma2}
    config: dict  # the SensitivityConfig, and the budget, concentration, fallback message, Hessian facts
    ranks: dict  # name -> rank


def compute(model: nn.Module, batches: Iterable[dict], modules: dict[str, nn.Linear], cfg: SensitivityConfig, *,
            blocks: Sequence[tuple[str, nn.Module]] | None = None, group: hessian.Group | None = None,
            progress: hessian.Progress | None = None) -> Sensitivity:
    """Run calibration, metrics and allocation over `modules` (qualified name -> nn.Linear of `model`).

    With `blocks` (qualified name, module) in forward order, the Hessians are collected block by block over
    cached block inputs (hessian.collect_streaming), the memory strategy for mode "full" on large models.
    A fallback to uniform ranks is logged as a warning and recorded in config["message"].
    With a `group`, `batches` is this process's shard; the result is the same on every process of the group.
    """
    dtype = DTYPES[cfg.dtype]
    spectrum = None if cfg.method != "eva" else "centred" if cfg.eva_centred else "uncentred"
    kw = dict(mode=cfg.mode, dtype=dtype, percdamp=cfg.percdamp, blocksize=cfg.blocksize, progress=progress,
              spectrum=spectrum, group=group)  # EVA's ratios of eig(H), on the process that holds H
    if blocks is None:
        stats = hessian.collect(model, batches, modules, **kw)
    else:
        cached = hessian.capture_inputs(model, blocks[0][1], batches)
        stats = hessian.collect_streaming(blocks, cached, modules, **kw)
    if group is None:
        return from_stats(modules, stats, cfg)
    # each process passed its own shard of `batches`; the statistics were summed over the group, the
    # allocation is computed once on the main process and broadcast, so every process builds the same LoRA shapes
    stats = group.gather_stats(stats, modules)
    return Sensitivity(**group.on_main(lambda: asdict(from_stats(modules, stats, cfg))))


def from_stats(modules: dict[str, nn.Linear], stats: dict[str, hessian.HessianStats], cfg: SensitivityConfig
               ) -> Sensitivity:
    """Metrics (Eqs. 8-14) and ranks (Eq. 15 / PRA / uniform) from Hessian statistics keyed like `modules`."""
    shapes = {n: (m.in_features, m.out_features) for n, m in modules.items()}
    table, seen = {}, {}
    for name, m in modules.items():
        st = stats[name]
        # Without W in the vector (sources diag, full-diag), modules sharing one H (q/k/v, gate/up) and d_out
        # have identical metrics: compute them once per (H, d_out).
        key = None if cfg.source == "obs" else (id(st), m.out_features if cfg.source == "full-diag" else 0)
        if key is not None and key in seen:
            table[name] = seen[key]
            continue
        vec = metrics.sensitivity_vector(st.diag, source=cfg.source, d_out=m.out_features,
                                         inv_diag=st.inv_diag, weight=m.weight)
        table[name] = seen[key] = metrics.module_metrics(vec, k_frac=cfg.k_frac, alpha=cfg.alpha, name=name)
    agg = metrics.aggregate(table, cfg.variant)

    # a rank above min(d_in, d_out) adds nothing to a LoRA update, so that caps r_max per module
    cap = {n: min(d_in, d_out) if cfg.r_max is None else min(d_in, d_out, cfg.r_max)
           for n, (d_in, d_out) in shapes.items()}
    if cfg.method == "eva":
        result = _eva(modules, stats, cfg, cap)
    else:
        result = alloc.allocate(agg.theta, cfg.r_avg, method=cfg.method, unit=cfg.unit, shapes=shapes,
                                rounding=cfg.rounding, categories=cfg.categories, r_min=cfg.r_min, r_max=cap)
    if result.message:
        log.warning("rank allocation: %s", result.message)
    conc = alloc.concentration(result.ranks)
    if conc["warn"]:
        log.warning("rank allocation: %d of %d matrices (top %.0f %%) take %.0f %% of the budget (%s); a lower "
                    "r_max or EVA's rule spreads it", conc["k"], conc["n"], 100 * conc["top_frac"],
                    100 * conc["share"], ", ".join(f"{n}: {r}" for n, r in conc["top"].items()))

    config = asdict(cfg) | {
        "budget": {"unit": result.unit, "target": result.target, "achieved": result.achieved},
        "concentration": conc,
        "message": result.message,
        "hessian": {n: _diagnostics(stats[n]) for n in modules}}
    tokens = {n: stats[n].tokens for n in modules}
    rows = {}
    for name, m in table.items():
        d_in, d_out = shapes[name]
        rows[name] = {"d_in": int(d_in), "d_out": int(d_out), "tokens": int(tokens[name]), "trace": m.trace,
                      "topk": m.topk, "effective_rank": int(m.effective_rank), "s_global": m.trace,
                      "s_local": agg.s_local[name], "theta": agg.theta[name]}
    return Sensitivity(rows, {k: float(v) for k, v in agg.weights.items()}, dict(config),
                       {n: result.ranks[n] for n in modules})


def _eva(modules: dict[str, nn.Linear], stats: dict[str, hessian.HessianStats], cfg: SensitivityConfig,
         cap: dict[str, int]) -> alloc.Allocation:
    """EVA's rule (slora.method.eva) on the eigenvalues of each distinct H; modules sharing an input share a spectrum."""
    for name in modules:
        if stats[name].spectrum is None:
            raise ValueError(f"{name}: method 'eva' needs the spectrum of H, which was not computed")
    ranks = eva.allocate({n: stats[n].spectrum for n in modules}, cfg.r_avg, rho=cfg.eva_rho,
                         groups={n: stats[n].owner for n in modules}, limit=cap, r_min=cfg.r_min)
    total = sum(ranks.values())
    return alloc.Allocation(ranks, "rank", total, total)


def _diagnostics(st: hessian.HessianStats) -> dict:
    """Per-module Hessian facts worth keeping next to the metrics: sharing, dead inputs, damping, dominance."""
    out = {"shared_with": st.owner, "dead_inputs": st.dead}
    if st.damping is not None:
        out |= {"damping": st.damping, "percdamp": st.percdamp, "offdiag_share": st.offdiag_share,
                "dominant_rows": st.dominant_rows}
    return out
