"""Hypothesis strategies named for slora's domain, each with simple anchor values (the astropy pattern).

Tensors are drawn as (shape, seed, scale) and generated with a seeded torch.Generator, so examples shrink
towards small shapes and scale 1 while staying cheap to draw. Every strategy includes anchors: all-equal
values, one dominant entry, dead (zero) features, exact ties.
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

MODULE_NAMES = [f"layers.{i}.{m}" for i in range(8) for m in ("attn.q_proj", "attn.v_proj", "mlp.up_proj")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -----------------------------------------------------------------------------
# Calibration data: per batch, inputs (B, T, d) and an attention mask (B, T)

@st.composite
def calibration_sets(draw, max_d: int = 8, max_batches: int = 4, max_b: int = 3, max_t: int = 6):
    """A list of (x (B, T, d) float32, mask (B, T) int64) batches with at least one unmasked token overall.

    Anchors: a single all-ones token; masks with fully padded sequences; a dead (all-zero) feature; scales
    from 2⁻⁶ to 2⁶ so that absolute tolerances would fail where relative ones must be used.
    """
    d = draw(st.integers(1, max_d))
    n_batches = draw(st.integers(1, max_batches))
    seed = draw(st.integers(0, 2 ** 16))
    scale = 2.0 ** draw(st.integers(-6, 6))
    dead = draw(st.one_of(st.none(), st.integers(0, d - 1)))
    g = _gen(seed)
    batches = []
    for _ in range(n_batches):
        b, t = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
        x = torch.randn(b, t, d, generator=g) * scale
        if dead is not None:
            x[..., dead] = 0.0
        mask_kind = draw(st.sampled_from(["ones", "random", "left-padded"]))
        if mask_kind == "ones":
            mask = torch.ones(b, t, dtype=torch.int64)
        elif mask_kind == "random":
            mask = (torch.rand(b, t, generator=g) < 0.6).to(torch.int64)
        else:  # real padding: each row keeps a suffix of random length (possibly empty)
            keep = torch.randint(0, t + 1, (b,), generator=g)
            mask = (torch.arange(t)[None, :] >= (t - keep)[:, None]).to(torch.int64)
        batches.append((x, mask))
    if sum(int(m.sum()) for _, m in batches) == 0:
        batches[0][1][0, 0] = 1
    return batches


# Anchor: one all-ones token (H = 2·1·1ᵀ exactly).
SINGLE_TOKEN = [(torch.ones(1, 1, 3), torch.ones(1, 1, dtype=torch.int64))]


# -----------------------------------------------------------------------------
# SPD matrices with controlled condition number (array-api-tests: generators whose conditioning is known)

@st.composite
def spd_matrices(draw, max_n: int = 40, max_cond: float = 1e3, dtype=torch.float64):
    """(H, κ): H = Q·diag(λ)·Qᵀ, λ log-spaced in [s, s·κ], Q orthogonal (QR of a seeded Gaussian in float64).

    Anchors: the identity (κ = 1), a diagonal matrix (Q = I), 1×1.
    """
    n = draw(st.integers(1, max_n))
    cond = draw(st.one_of(st.just(1.0), st.just(max_cond), st.floats(1.0, max_cond)))
    scale = 2.0 ** draw(st.integers(-10, 10))
    seed = draw(st.integers(0, 2 ** 16))
    diagonal = draw(st.booleans())
    lam = scale * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    lam = lam[torch.randperm(n, generator=_gen(seed))]
    if diagonal:
        h = torch.diag(lam)
    else:
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
        h = q @ torch.diag(lam) @ q.T
        h = (h + h.T) / 2
    return h.to(dtype), cond


# -----------------------------------------------------------------------------
# Sensitivity vectors (non-negative) and θ dictionaries

sensitivity_values = st.one_of(
    st.just(0.0), st.just(1.0), st.just(0.1),
    st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False),
    st.floats(1e-30, 1e-10))


@st.composite
def sensitivity_vectors(draw, max_n: int = 24):
    """A float64 tensor of >= 0 entries with at least one positive entry.

    Anchors: all equal (every metric at its boundary: ER = ceil(α·N)), one-hot, decimals like 0.1 whose
    prefix sums hit α·Σ only up to rounding, huge dynamic range.
    """
    kind = draw(st.sampled_from(["free", "equal", "one-hot", "tenths"]))
    n = draw(st.integers(1, max_n))
    if kind == "equal":
        v = [draw(st.sampled_from([1.0, 0.1, 3.0]))] * n
    elif kind == "one-hot":
        v = [0.0] * n
        v[draw(st.integers(0, n - 1))] = 1.0
    elif kind == "tenths":
        v = [0.1 * draw(st.integers(0, 10)) for _ in range(n)]
    else:
        v = draw(st.lists(sensitivity_values, min_size=n, max_size=n))
    if not any(x > 0 for x in v):
        v[0] = 1.0
    return torch.tensor(v, dtype=torch.float64)


positive_theta = st.one_of(st.just(1.0), st.floats(1e-6, 1e6), st.integers(1, 20).map(float))


@st.composite
def theta_dicts(draw, min_size: int = 1, max_size: int = 12, values=positive_theta):
    """{module name: θ > 0}. Anchors: equal θ everywhere, integer θ (exact remainder ties)."""
    names = draw(st.lists(st.sampled_from(MODULE_NAMES), min_size=min_size, max_size=max_size, unique=True))
    if draw(st.booleans()):
        return {n: draw(values) for n in names}
    value = draw(values)
    return {n: value for n in names}


@st.composite
def shapes_for(draw, names):
    """(d_in, d_out) per module, from a few LoRA-like widths so costs d_in + d_out repeat and differ."""
    dims = st.sampled_from([4, 16, 64, 96, 576, 1536])
    return {n: (draw(dims), draw(dims)) for n in names}


@st.composite
def rank_bounds(draw, n: int):
    """(r_min, r_max, r_avg budget) that is feasible: r_min·n <= budget <= r_max·n."""
    r_min = draw(st.sampled_from([0, 1, 2]))
    r_max = draw(st.one_of(st.none(), st.integers(r_min, r_min + 12)))
    top = (r_max if r_max is not None else r_min + 16) * n
    budget = draw(st.integers(r_min * n, top))
    return r_min, r_max, budget


# -----------------------------------------------------------------------------
# Tiny seeded models built from nn.Linear (nothing downloaded, nothing shared with slora.models)

class TinyBlock(torch.nn.Module):
    """A transformer-ish block whose q/k/v and gate/up read the same tensor, as in LLaMA (HF names)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.q_proj = torch.nn.Linear(d, d, bias=False)
        self.self_attn.k_proj = torch.nn.Linear(d, d, bias=False)
        self.self_attn.v_proj = torch.nn.Linear(d, d // 2, bias=False)
        self.self_attn.o_proj = torch.nn.Linear(d // 2, d, bias=False)
        self.mlp = torch.nn.Module()
        self.mlp.gate_proj = torch.nn.Linear(d, d_ff, bias=False)
        self.mlp.up_proj = torch.nn.Linear(d, d_ff, bias=False)
        self.mlp.down_proj = torch.nn.Linear(d_ff, d, bias=False)

    def forward(self, h, attention_mask=None):
        a = self.self_attn
        q, k, v = a.q_proj(h), a.k_proj(h), a.v_proj(h)  # (B, T, d), (B, T, d), (B, T, d/2)
        scores = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])  # (B, T, T)
        if attention_mask is not None:  # padded keys get a large negative score (no NaN on all-pad rows)
            scores = scores.masked_fill(attention_mask[:, None, :] == 0, -1e9)
        h = h + a.o_proj(scores.softmax(-1) @ v)
        m = self.mlp
        return (h + m.down_proj(torch.nn.functional.silu(m.gate_proj(h)) * m.up_proj(h)),)


class TinyModel(torch.nn.Module):
    """Embedding, `n_layers` TinyBlocks and an lm_head; called as model(input_ids=..., attention_mask=...)."""

    def __init__(self, vocab: int = 32, d: int = 16, d_ff: int = 24, n_layers: int = 2, seed: int = 0):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList(TinyBlock(d, d_ff) for _ in range(n_layers))
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        g = _gen(seed)
        with torch.no_grad():  # fixed_init: every parameter from one seeded generator, in name order
            for i, (_, p) in enumerate(sorted(self.named_parameters())):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 + 0.25 * (i % 4)) / math.sqrt(p.shape[-1]))

    def forward(self, input_ids, attention_mask=None):
        h = self.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.layers:
            h = layer(h, attention_mask=attention_mask)[0]
        return self.lm_head(h)


def token_batches(n_batches: int, b: int = 4, t: int = 12, vocab: int = 32, seed: int = 0, zipf: float = 1.0):
    """Seeded calibration batches {input_ids, attention_mask} with right padding and Zipf-like token frequencies."""
    g = _gen(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** zipf
    out = []
    for _ in range(n_batches):
        ids = torch.multinomial(probs, b * t, replacement=True, generator=g).reshape(b, t)
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).to(torch.int64)
        out.append({"input_ids": ids, "attention_mask": mask})
    return out
