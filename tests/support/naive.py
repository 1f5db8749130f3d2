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
    """k_frac and α as the fractions they stand for (slora.method.metrics.rational's rule, written out)."""
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
    """σ/µ² with population σ, from the exact mean and variance of the floats (Fractions), rounded once at the
    end: equal values have σ = 0 exactly."""
    from fractions import Fraction
    exact = [Fraction(x) for x in xs]
    mu = sum(exact) / len(exact)
    var = sum((x - mu) ** 2 for x in exact) / len(exact)
    return 0.0 if var == 0 else math.sqrt(var) / float(mu) ** 2


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


# -----------------------------------------------------------------------------
# MPNet encoder, written independently of slora.models.mpnet

def mpnet_bucket(offset: int) -> int:
    """T5/MPNet relative-position bucket of key-minus-query `offset` (32 buckets, max distance 128), in integers.

    Distances 8 .. 127 share 8 log-spaced buckets: bucket 8 + k starts where d ≥ 8·16^(k/8) = 8·2^(k/2), i.e.
    d² ≥ 64·2^k, so the edges are found by comparing squares, with no logarithm; from 128 on, the last bucket."""
    d = abs(offset)
    side = 16 if offset > 0 else 0
    if d < 8:
        return side + d
    return side + 8 + sum(1 for k in range(1, 8) if d * d >= 64 * 2 ** k)


def mpnet_hidden(sd: dict, n_layers: int, n_heads: int, eps: float, ids: torch.Tensor,
                 mask: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """Last hidden states (B, T, D) of an MPNet encoder from its state dict, in float64, attention as loops over
    batch, head and query (one softmax over the real keys per query). Padded positions come out too (they attend
    to the real keys) but are not compared."""
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    B, T = ids.shape

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)

    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    out = []
    for b in range(B):
        pos, count = [], 0
        for t in range(T):  # fairseq make_positions: real tokens count from pad + 1, pads keep pad
            count += int(ids[b, t] != pad)
            pos.append(count + pad if ids[b, t] != pad else pad)
        x = ln(w["embeddings.word_embeddings.weight"][ids[b]] + w["embeddings.position_embeddings.weight"][pos],
               "embeddings.LayerNorm")
        keys = [j for j in range(T) if mask[b, j]]
        table = w["encoder.relative_attention_bias.weight"]  # (32, H), one for all layers
        buckets = [[mpnet_bucket(j - i) for j in keys] for i in range(T)]
        for i_layer in range(n_layers):
            p = f"encoder.layer.{i_layer}."
            q, k, v = (lin(x, p + f"attention.attn.{n}") for n in "qkv")
            hs = q.shape[-1] // n_heads
            ctx = torch.zeros_like(x)
            for h in range(n_heads):
                cols = slice(h * hs, (h + 1) * hs)
                for i in range(T):
                    logits = k[keys][:, cols] @ q[i, cols] / math.sqrt(hs) + table[buckets[i], h]  # (n_keys,)
                    ctx[i, cols] = torch.softmax(logits, 0) @ v[keys][:, cols]
            x = ln(x + lin(ctx, p + "attention.attn.o"), p + "attention.LayerNorm")
            f = torch.nn.functional.gelu(lin(x, p + "intermediate.dense"))
            x = ln(x + lin(f, p + "output.dense"), p + "output.LayerNorm")
        out.append(x)
    return torch.stack(out)
