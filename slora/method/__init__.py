"""The paper (Sensitivity-LoRA, arXiv 2509.09119): from calibration batches to a rank per weight matrix.

It imports torch, numpy and itself, nothing else of slora. Which modules to analyse and how several processes
combine their statistics come in from the caller.

    reference.py    the default path in one file, the executable spec: start reading here
    hessian.py      H = (2/N)·Σ x xᵀ per layer input: accumulation, hooks, layer-by-layer streaming (§4.6, App. E)
    cholesky.py     diag(H⁻¹) by blocked Cholesky with damping; the diagonal-dominance diagnostic (Eqs. 6-7)
    metrics.py      sensitivity vectors, trace / top-k mean / effective rank, σ/µ² weights (Eqs. 8-14)
    allocate.py     SRA (Eq. 15), PRA (§4.4) and uniform ranks under an exact budget; the concentration check
    eva.py          EVA's explained-variance rank rule on eig(H) (a peer method, arXiv 2410.07170)
    stability.py    Kendall's τ-b between two allocations (§4.7)
    sensitivity.py  compute: model, batches, target modules -> Sensitivity (metrics, θ, ranks, diagnostics)
"""
