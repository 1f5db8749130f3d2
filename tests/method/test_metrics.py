"""slora.method.metrics: Eqs. 8-14 against exact, looping oracles; the full-diag closed form; sensitivity.json."""
import json
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import tests.support.naive as naive
from tests.support.strategies import sensitivity_vectors
from slora.method import metrics
from slora.method.metrics import ModuleMetrics, SensitivityVector

EPS64 = torch.finfo(torch.float64).eps
K_FRACS = st.sampled_from([0.5, 1 / 3, 0.25, 0.8, 1.0])
ALPHAS = st.sampled_from([0.85, 0.8, 0.9, 0.95, 0.5, 1.0])
TENTHS = torch.tensor([0.1] * 20, dtype=torch.float64)  # α·Σ hits a prefix sum only up to rounding


# -----------------------------------------------------------------------------
# Eqs. 8-10 against exact loops

@given(sensitivity_vectors(), K_FRACS, ALPHAS)
@example(TENTHS, 0.5, 0.85)
@example(torch.tensor([4.0, 1.0], dtype=torch.float64), 0.5, 0.8)  # 4/5 = α exactly in decimal: ER = 1
@example(torch.tensor([1e300, 1e-300], dtype=torch.float64), 1.0, 1.0)
def test_metrics_match_exact_loops(s, k_frac, alpha):
    """Both sides compute the exact real metric and round once, so they agree bit for bit."""
    m = metrics.module_metrics(SensitivityVector(s), k_frac=k_frac, alpha=alpha)
    trace, topk, er = naive.metrics(s.tolist(), k_frac, alpha)
    assert (m.trace, m.topk, m.effective_rank, m.n) == (trace, topk, er, s.numel())


@given(sensitivity_vectors(max_n=10), st.integers(1, 9), K_FRACS, ALPHAS)
@example(TENTHS, 7, 0.5, 0.85)
def test_full_diag_closed_form_equals_the_materialised_diagonal(s, d_out, k_frac, alpha):
    """Source full-diag: diag(I_{d_out} ⊗ H) is diag(H) repeated d_out times; never built, same metrics."""
    vec = metrics.sensitivity_vector(s, source="full-diag", d_out=d_out)
    assert vec.repeat == d_out and torch.equal(vec.values, s)
    closed = metrics.module_metrics(vec, k_frac=k_frac, alpha=alpha)
    materialised = s.repeat(d_out)  # (d_out·d_in,)
    assert closed == metrics.module_metrics(SensitivityVector(materialised), k_frac=k_frac, alpha=alpha)
    assert (closed.trace, closed.topk, closed.effective_rank) == naive.metrics(materialised.tolist(), k_frac, alpha)


@given(sensitivity_vectors(), ALPHAS)
def test_effective_rank_bounds_and_alpha_one(s, alpha):
    er = metrics.effective_rank(s, alpha)
    assert 1 <= er <= s.numel()
    assert metrics.effective_rank(s, 1.0) == int((s > 0).sum())  # the whole trace needs every non-zero entry
    assert metrics.effective_rank(s, min(alpha, 0.5)) <= er  # monotone in α


@given(sensitivity_vectors(), st.integers(-30, 30))
def test_power_of_two_scaling_is_exact(s, k):
    """Scaling by 2^k is exact in floating point, so trace and top-k scale exactly and ER is unchanged."""
    a = metrics.module_metrics(SensitivityVector(s))
    b = metrics.module_metrics(SensitivityVector(s * 2.0 ** k))
    assert (b.trace, b.topk, b.effective_rank) == (a.trace * 2.0 ** k, a.topk * 2.0 ** k, a.effective_rank)


@given(sensitivity_vectors(), K_FRACS)
def test_topk_lies_between_mean_and_max(s, k_frac):
    t = metrics.topk_mean(s, k_frac)
    assert s.mean().item() * (1 - 4 * EPS64) <= t <= s.max().item() * (1 + 4 * EPS64)


def test_topk_k_is_floor_with_minimum_one():
    assert [metrics.topk_k(n) for n in (1, 2, 3, 7, 8)] == [1, 1, 1, 3, 4]
    assert metrics.topk_k(6, 1 / 3) == 2 and metrics.topk_k(9, 1 / 3) == 3  # floor(N/3) without 0.333… drift
    with pytest.raises(ValueError, match="k_frac"):
        metrics.topk_k(4, 0.0)


def test_invalid_vectors_are_errors_naming_the_module():
    for bad, why in [([1.0, math.nan], "NaN"), ([1.0, -2.0], "negative"), ([0.0, 0.0], "all zero")]:
        with pytest.raises(ValueError, match=f"layers.7.mlp.up_proj: .*{why}"):
            metrics.module_metrics(SensitivityVector(torch.tensor(bad)), name="layers.7.mlp.up_proj")
    with pytest.raises(ValueError, match="source"):
        metrics.sensitivity_vector(torch.ones(3), source="eigen")


# -----------------------------------------------------------------------------
# The OBS source

@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2 ** 16), st.booleans())
def test_obs_source_sums_saliency_over_rows(d_out, d_in, seed, with_dead):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g)
    inv = torch.rand(d_in, generator=g, dtype=torch.float64) + 0.1
    if with_dead:
        inv[0] = math.inf
    vec = metrics.sensitivity_vector(torch.ones(d_in), source="obs", inv_diag=inv, weight=w)
    loops = [0.0 if math.isinf(inv[j]) else sum(float(w[i, j]) ** 2 / float(inv[j]) for i in range(d_out))
             for j in range(d_in)]
    assert vec.repeat == 1
    # each value is a float64 sum of d_out positive terms w²/inv, two roundings each: (d_out + 2)·u relative per
    # order, so two orders differ by <= 2·(d_out + 2)·u <= 4·d_out·eps for d_out >= 1
    assert torch.allclose(vec.values, torch.tensor(loops, dtype=torch.float64), rtol=4 * d_out * EPS64, atol=0)


# -----------------------------------------------------------------------------
# Aggregation (Eqs. 11-14)

metric_tables = st.dictionaries(
    st.sampled_from([f"layers.{i}.{m}" for i in range(6) for m in ("q", "v")]),
    st.builds(ModuleMetrics, st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.integers(1, 50), st.just(50)),
    min_size=1, max_size=12)


@given(metric_tables)
@example({"layers.0.q": ModuleMetrics(1.0, 1.0, 1, 50), "layers.0.v": ModuleMetrics(1.0, 1.0, 2, 50)})  # σ = 0
def test_sigma_over_mu_squared_aggregation_matches_the_formulas(table):
    names = list(table)
    n = len(names)
    agg = metrics.aggregate(table)
    b1 = naive.cv([table[k].topk for k in names])
    b2 = naive.cv([float(table[k].effective_rank) for k in names])
    sl = [b1 * table[k].topk + b2 * table[k].effective_rank for k in names]
    g1, g2 = naive.cv([table[k].trace for k in names]), naive.cv(sl)
    tol = 8 * (n + 8) * EPS64  # relative: n-term means and variances, then a few products
    for got, want in zip(agg.weights.values(), (b1, b2, g1, g2)):
        assert math.isclose(got, want, rel_tol=tol, abs_tol=0)
    for k, l in zip(names, sl):
        assert math.isclose(agg.s_local[k], l, rel_tol=tol)
        assert math.isclose(agg.theta[k], g1 * table[k].trace + g2 * l, rel_tol=tol, abs_tol=tol * (g1 + g2))
    # [DERIVED] in the method notes §4: Σθ = n·(CV_g + CV_l), the CV-weighted sum of mean-normalised scores
    cv_g = g1 * sum(t.trace for t in table.values()) / n  # σ/µ = (σ/µ²)·µ
    cv_l = g2 * sum(sl) / n
    assert math.isclose(sum(agg.theta.values()), n * (cv_g + cv_l), rel_tol=tol, abs_tol=tol)


@given(metric_tables)
def test_variants(table):
    full = metrics.aggregate(table)
    glob, loc, half = (metrics.aggregate(table, v) for v in ("global", "local", "half-mu"))
    assert glob.theta == {k: m.trace for k, m in table.items()}  # Sg-LoRA
    assert loc.theta == full.s_local  # Sl-LoRA
    mu = {key: sum(vals) / len(vals) for key, vals in
          {"beta1": [m.topk for m in table.values()], "beta2": [m.effective_rank for m in table.values()],
           "gamma1": [m.trace for m in table.values()], "gamma2": list(half.s_local.values())}.items()}
    for key, w in half.weights.items():  # Table 7's 0.5/µ: a mean of n positive terms ((n + 1)·u), a division
        assert math.isclose(w, 0.5 / mu[key], rel_tol=8 * (len(table) + 2) * EPS64)  # (n + 2)·u per side, x4


def test_a_metric_that_does_not_vary_gets_weight_zero():
    table = {n: ModuleMetrics(float(i + 1), 2.0, 5, 10) for i, n in enumerate("abc")}
    agg = metrics.aggregate(table)
    assert agg.weights["beta1"] == agg.weights["beta2"] == 0.0  # σ = 0 for top-k and ER
    assert set(agg.s_local.values()) == {0.0} and agg.weights["gamma2"] == 0.0
    with pytest.raises(ValueError, match="variant"):
        metrics.aggregate(table, "eigen")


# -----------------------------------------------------------------------------
# sensitivity.json

def test_sensitivity_json_has_exactly_the_published_keys():
    from slora.method.hessian import HessianStats
    from slora.train.run_folder import sensitivity_json
    from slora.method.sensitivity import SensitivityConfig, from_stats
    mods = {"a.q": torch.nn.Linear(8, 8), "a.v": torch.nn.Linear(8, 4)}
    shared = HessianStats("a.q", 10, torch.arange(1.0, 9.0, dtype=torch.float64))
    out = sensitivity_json(from_stats(mods, {"a.q": shared, "a.v": shared}, SensitivityConfig(r_avg=2)), "a")
    assert set(out) == {"modules", "weights", "config"}
    assert list(out["modules"]) == ["a.q", "a.v"]
    assert set(out["modules"]["a.v"]) == {"d_in", "d_out", "tokens", "trace", "topk", "effective_rank",
                                          "s_global", "s_local", "theta"}
    assert set(out["weights"]) == {"beta1", "beta2", "gamma1", "gamma2"}
    assert out["modules"]["a.v"]["d_out"] == 4 and out["modules"]["a.q"]["s_global"] == 36.0
    assert out["config"]["targets"] == "a" and out["modules"]["a.v"]["tokens"] == 10
    assert json.loads(json.dumps(out)) == out


@given(st.floats(1e-6, 1e6, allow_nan=False), st.integers(1, 40))
def test_equal_values_have_weight_zero(x, n):
    """σ of n equal values is 0 exactly, though the rounded mean fsum([x]*n)/n may differ from x by an ulp."""
    assert metrics.cv_weight([x] * n) == 0.0


def test_three_equal_modules_fall_back_with_all_theta_zero():
    table = {f"m{i}": ModuleMetrics(0.7, 0.1, 3, 8) for i in range(3)}
    agg = metrics.aggregate(table)
    assert set(agg.theta.values()) == {0.0} and set(agg.weights.values()) == {0.0}
