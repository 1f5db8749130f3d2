"""slora/method/reference.py, the executable spec, held equal to the full implementation.

The full implementation is slora.method.sensitivity.compute with its defaults (diag(H), Eq. 14's θ, SRA with exact
rounding, r_min 1, r_max min(d_in, d_out)). On tiny seeded BERT/RoBERTa, MPNet and LLaMA models, with or without a
sequence-classification head, random target lists, padded calibration batches and budgets, the two must give the same
ranks exactly and θ within `theta_bound`, a bound on float64 rounding derived below (not tuned).
"""
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from slora.models.targets import find_linears
from slora.method import reference
from slora.models import for_sequence_classification
from slora.method.sensitivity import SensitivityConfig, compute
from tests.support.tiny import tiny_bert, tiny_llama, tiny_mpnet

U = torch.finfo(torch.float64).eps / 2  # unit roundoff: |fl(a ∘ b) - a ∘ b| <= U·|a ∘ b|

# Target suffixes that each family's forward pass calls. The bare encoders' pooler is never called, so no pattern
# here matches it there ("dense" would); the task models call their heads with 2-D inputs (B, D).
BODY = {"bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        "mpnet": ["q", "k", "v", "o", "attn.o", "intermediate.dense", "output.dense"],
        "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}
BODY["roberta"] = BODY["bert"]
HEAD = {"bert": ["dense", "pooler.dense", "classifier"], "roberta": ["dense", "classifier.dense", "out_proj"],
        "mpnet": ["dense", "classifier.dense", "out_proj"]}
PAD = {"bert": 0, "roberta": 1, "mpnet": 1, "llama": 0}


# -----------------------------------------------------------------------------
# Cases: plain parameters, built into a model, batches and a budget inside the test

@dataclass(frozen=True)
class Case:
    family: str  # "bert", "roberta", "mpnet" or "llama"
    heads: int  # attention heads (LLaMA: key/value heads times `group`)
    head_size: int  # hs; hidden size = heads·hs
    layers: int
    inter: int  # intermediate (MLP) size
    seed: int  # model weights and calibration tokens
    labels: int  # 0: the bare encoder or causal LM; else its sequence-classification model with that many labels
    targets: str
    shapes: tuple  # (B, T) of each calibration batch
    padding: str  # "none", "right" or "left": every sequence keeps at least one real token
    r_avg: int | None  # an integer average rank (lowered to Σcap // n where the caps do not allow it), or
    level: float = 0.0  # with r_avg None: r_total = n + round(level·(Σcap - n)), r_avg = r_total / n
    group: int = 1  # LLaMA: query heads per key/value head


def build(case: Case):
    """(model, calibration batches, target modules, r_avg) of a case."""
    hidden = case.heads * case.head_size
    kw = dict(hidden_size=hidden, num_hidden_layers=case.layers, intermediate_size=case.inter)
    if case.family == "llama":
        model = tiny_llama(case.seed, num_attention_heads=case.heads, num_key_value_heads=case.heads // case.group,
                           **kw)
    elif case.family == "mpnet":
        model = tiny_mpnet(case.seed, num_attention_heads=case.heads, **kw)
    else:
        model = tiny_bert(case.seed, model_type=case.family, pad_token_id=PAD[case.family],
                          num_attention_heads=case.heads, **kw)
    if case.labels:
        model = for_sequence_classification(model, case.labels, seed=case.seed + 1).eval()
    g = torch.Generator().manual_seed(case.seed)
    batches = []
    for b, t in case.shapes:
        ids = torch.randint(PAD[case.family] + 1, model.config.vocab_size, (b, t), generator=g)  # (B, T)
        real = torch.randint(1, t + 1, (b,), generator=g) if case.padding != "none" else torch.full((b,), t)
        pos = torch.arange(t)[None, :]  # (1, T)
        mask = pos < real[:, None] if case.padding != "left" else pos >= t - real[:, None]  # (B, T)
        batches.append({"input_ids": ids.masked_fill(~mask, PAD[case.family]), "attention_mask": mask.long()})
    modules = find_linears(model, case.targets)
    n, caps = len(modules), sum(min(m.in_features, m.out_features) for m in modules.values())
    r_avg = min(case.r_avg, caps // n) if case.r_avg is not None else (n + round(case.level * (caps - n))) / n
    return model, batches, modules, r_avg


@st.composite
def cases(draw, family: str, labels: bool):
    """Shapes within what each config allows (hs even for LLaMA's RoPE), targets valid for the family."""
    heads = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0])) if family == "llama" else 1
    n_labels = draw(st.integers(1, 3)) if labels else 0
    pool = BODY[family] + (HEAD[family] if n_labels else [])
    targets = draw(st.one_of(st.just("all-linear"),
                             st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True).map(",".join)))
    return Case(
        family=family, heads=heads, group=group,
        head_size=draw(st.sampled_from([2, 4, 8])), layers=draw(st.integers(1, 3)), inter=draw(st.integers(4, 48)),
        seed=draw(st.integers(0, 2 ** 16)), labels=n_labels, targets=targets,
        shapes=tuple(draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 8)), min_size=1, max_size=3))),
        padding=draw(st.sampled_from(["none", "right", "left"])),
        r_avg=draw(st.one_of(st.none(), st.sampled_from([1, 2, 4, 8]))),
        level=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1))))


# -----------------------------------------------------------------------------
# The tolerance on θ

def _cv_gap(x: list[float], d: list[float], w: float) -> float:
    """Bound on |w_spec - w_full| for w = σ/µ² of n values x (Eqs. 11, 13), when the two sides' values differ
    by at most d (per value) and each side evaluates σ/µ² in float64.

    Exact function: σ(x) = ‖P x‖/√n with P the centring projection, so |σ(x') - σ(x)| <= rms(d);
    |µ(x') - µ(x)| <= mean(d); hence |Δw| <= rms(d)/µ² + 2w·mean(d)/µ to first order.
    Rounding on one side (the two-pass formula; the full side's fsum is tighter): µ̂ is off by <= n·U·µ, which
    moves σ by at most that; the squares, their n-term sum, /n and sqrt add (n+5)/2·U·σ; then µ̂² and the
    division add (2n+2)·U·w. With µ, σ <= R = rms(x): |ŵ - w| <= (3.5n + 4.5)·U·R/µ² <= 4(n+2)·U·R/µ², twice
    for two sides.
    """
    n = len(x)
    mu, r = sum(x) / n, math.sqrt(sum(v * v for v in x) / n)
    assert mu > 0, "σ/µ² of values that are all 0"
    rms_d, mean_d = math.sqrt(sum(e * e for e in d) / n), sum(d) / n
    return rms_d / mu ** 2 + 2 * w * mean_d / mu + 8 * (n + 2) * U * r / mu ** 2


def theta_bound(rows: dict, weights: dict) -> dict[str, float]:
    """Bound on |θ_spec - θ_full| per module, from the full implementation's per-module metrics and weights
    (Sensitivity.modules and .weights).

    Both sides read the same diag(H) bits (the same fp32 reduction; Σx² summed another way moves θ by ~10⁻⁸,
    which this bound catches 10⁵ times over). From there, with U = eps/2, first order in U (the terms left out
    are smaller by a factor (N + n)·U < 10⁻¹²), N = d_in, k = max(1, floor(N/2)), n modules:
    - trace (Eq. 8): the spec's float64 sum of N terms >= 0 errs by <= (N-1)·U·T, the full side's correctly
      rounded one by U·T, so dT = N·U·T; top-k mean (Eq. 9): (k-1)·U + U for the spec's sum and division, 2U
      for the full side's: dK = (k+2)·U·K; the effective rank (Eq. 10) is an integer that must agree exactly,
      so dE = 0;
    - β1, β2, γ1, γ2 (Eqs. 11, 13): `_cv_gap`;
    - S_local = β1·K + β2·E (Eq. 12): dSl = dβ1·K + β1·dK + dβ2·E + 4U·Sl (two roundings per side);
    - θ = γ1·T + γ2·Sl (Eq. 14): dθ = dγ1·T + γ1·dT + dγ2·Sl + γ2·dSl + 4U·θ.
    When every module has the same metrics (every target reads one input) each weight is 0 in exact arithmetic
    and rounding noise below 4(n+2)·U/x on either side (R = µ = x above), so each side's θ lies in [0, 8(n+2)·U].
    """
    m, wt = rows, weights
    names, n = list(m), len(m)
    if len({(v["trace"], v["topk"], v["effective_rank"]) for v in m.values()}) == 1:
        return dict.fromkeys(names, 8 * (n + 2) * U)
    T, K, E, Sl = ([m[w][key] for w in names] for key in ("trace", "topk", "effective_rank", "s_local"))
    dT = [m[w]["d_in"] * U * t for w, t in zip(names, T)]
    dK = [(max(1, m[w]["d_in"] // 2) + 2) * U * k for w, k in zip(names, K)]
    db1, db2 = _cv_gap(K, dK, wt["beta1"]), _cv_gap(E, [0.0] * n, wt["beta2"])
    dSl = [db1 * k + wt["beta1"] * dk + db2 * e + 4 * U * s for k, dk, e, s in zip(K, dK, E, Sl)]
    dg1, dg2 = _cv_gap(T, dT, wt["gamma1"]), _cv_gap(Sl, dSl, wt["gamma2"])
    return {w: dg1 * t + wt["gamma1"] * dt + dg2 * s + wt["gamma2"] * ds + 4 * U * m[w]["theta"]
            for w, t, dt, s, ds in zip(names, T, dT, Sl, dSl)}


# -----------------------------------------------------------------------------
# The property

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models' ops are too small to split, and on a busy 2-core machine handing
    them to a second thread costs milliseconds per op (under load here the file took 45 s with two, 5 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check(case: Case) -> None:
    model, batches, modules, r_avg = build(case)
    theta, ranks = reference.sensitivity_ranks(model, batches, modules, r_avg)
    full_side = compute(model, batches, modules, SensitivityConfig(r_avg=r_avg))
    assert ranks == full_side.ranks
    bound = theta_bound(full_side.modules, full_side.weights)
    for name in modules:
        full = full_side.modules[name]["theta"]
        assert abs(theta[name] - full) <= bound[name], (name, theta[name], full, bound[name])


# Anchors: one input shared by every target (all metrics equal: θ is rounding noise, the ranks uniform); the budget
# at its floor (every rank 1) and at its ceiling (every rank at min(d_in, d_out)); task heads whose caps bind
# (out_proj: min(D, labels)); single-token sequences; GQA.
ONE_INPUT = Case("llama", 2, 4, 1, 8, 0, 0, "q_proj,k_proj,v_proj", ((2, 5),), "right", 4)


@given(cases("bert", labels=False) | cases("roberta", labels=True) | cases("bert", labels=True))
@example(Case("bert", 2, 4, 1, 16, 3, 0, "query,key,value", ((3, 4),), "none", 4))  # one shared input
@example(Case("bert", 4, 2, 2, 12, 1, 2, "classifier,pooler.dense", ((4, 1), (2, 3)), "right", 2))  # T = 1
@example(Case("roberta", 2, 8, 2, 48, 5, 2, "dense,out_proj", ((3, 6),), "left", None, 1.0))  # every rank at cap
@settings(max_examples=80)
def test_spec_equals_full_bert(case):
    check(case)


@given(cases("mpnet", labels=False) | cases("mpnet", labels=True))
@example(Case("mpnet", 4, 4, 3, 32, 2, 0, "all-linear", ((2, 8), (1, 3)), "right", None, 0.0))  # every rank 1
@example(Case("mpnet", 1, 8, 1, 4, 9, 3, "out_proj,o", ((1, 1),), "none", 8))  # one token
@settings(max_examples=65)
def test_spec_equals_full_mpnet(case):
    check(case)


@given(cases("llama", labels=False))
@example(ONE_INPUT)
@example(Case("llama", 4, 2, 2, 24, 7, 0, "all-linear", ((4, 8), (4, 8)), "left", 8, group=4))  # GQA, caps bind
@example(Case("llama", 2, 8, 3, 40, 11, 0, "lm_head,down_proj", ((3, 7),), "right", None, 0.37))
@settings(max_examples=65)
def test_spec_equals_full_llama(case):
    check(case)


def test_one_shared_input_gives_uniform_ranks():
    """With every target on one input, σ = 0 for every metric and the ranks are r_avg everywhere."""
    model, batches, modules, r_avg = build(ONE_INPUT)
    assert set(reference.sensitivity_ranks(model, batches, modules, r_avg)[1].values()) == {4}
