"""slora.method.hessian: target selection, calibration hooks, accumulation, block Cholesky, diagnostics, streaming."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import tests.support.naive as naive
from tests.support.strategies import SINGLE_TOKEN, TinyModel, calibration_sets, spd_matrices, token_batches
from slora.method import hessian
from slora.models.targets import find_linears

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
BLOCKSIZES = st.sampled_from([1, 2, 3, 7, 16, 128])


class Probe(nn.Module):
    """x (B, T, d) straight into one Linear; q/k/v-like siblings read the same tensor, `other` a copy of it."""

    def __init__(self, d: int, shared: bool = False):
        super().__init__()
        self.q = nn.Linear(d, 3, bias=False)
        if shared:
            self.k, self.v, self.other = nn.Linear(d, 2), nn.Linear(d, 5), nn.Linear(d, 2)

    def forward(self, x, attention_mask=None):
        out = self.q(x)
        if hasattr(self, "k"):
            out = out.sum() + self.k(x).sum() + self.v(x).sum() + self.other(x.clone()).sum()
        return out


def run(batches, mode="full", dtype=torch.float32, shared=False):
    d = batches[0][0].shape[-1]
    model = Probe(d, shared)
    mods = find_linears(model, "all-linear")
    feed = [{"x": x, "attention_mask": m} for x, m in batches]
    return hessian.accumulate(model, feed, mods, mode=mode, dtype=dtype)


def accumulation_tol(batches, diag64, eps):
    """Per-entry bound (N + 3·n_batches)·eps·sqrt(D_i·D_j): a length-t dot product errs by <= t·u·Σ|x_i x_j|,
    Cauchy-Schwarz bounds (2/N)·Σ|x_i x_j| by sqrt(D_i·D_j), and each running-mean update adds a few roundings."""
    n = sum(int(m.sum()) for _, m in batches)
    return (n + 3 * len(batches)) * eps * torch.sqrt(diag64[:, None] * diag64[None, :])


# -----------------------------------------------------------------------------
# Target selection

def test_find_linears_matches_whole_components_and_excludes_heads():
    model = TinyModel(n_layers=2)
    assert list(find_linears(model, "q_proj")) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    assert list(find_linears(model, "self_attn.v_proj, up_proj")) == [
        "layers.0.self_attn.v_proj", "layers.0.mlp.up_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj"]
    every = find_linears(model, "all-linear")
    assert len(every) == 14 and "lm_head" not in every
    assert "lm_head" in find_linears(model, "lm_head")  # asked for by name, a head is allowed
    with pytest.raises(ValueError, match="'proj'"):
        find_linears(model, "q_proj,proj")  # "proj" is not a whole component of "q_proj"
    with pytest.raises(ValueError, match="'mlp'"):
        find_linears(model, "mlp")  # matches a container, no nn.Linear


def test_hooks_are_removed_when_the_forward_raises():
    class Boom(Probe):
        def forward(self, x, attention_mask=None):
            super().forward(x)
            raise RuntimeError("boom")
    model = Boom(4)
    with pytest.raises(RuntimeError, match="boom"):
        hessian.accumulate(model, [{"x": torch.ones(1, 2, 4)}], find_linears(model, "q"))
    assert not model.q._forward_pre_hooks


def test_calibration_runs_in_eval_mode_and_restores_train_flags():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[2].eval()  # a mixed state must come back exactly as it was

    class Call(nn.Module):  # model(**batch) needs keyword inputs
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x)
    wrapped = Call()
    mods = find_linears(wrapped, "all-linear")
    batch = [{"x": torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))}]
    first, second = (hessian.accumulate(wrapped, batch, mods, mode="full")["net.2"].value for _ in range(2))
    assert torch.equal(first, second)  # dropout was off
    assert [m.training for m in model] == [True, True, False]


def test_unused_target_and_mismatched_mask_are_errors_naming_the_module():
    model = Probe(4, shared=True)
    unused = {"q": model.q, "lonely": nn.Linear(4, 4)}
    with pytest.raises(RuntimeError, match="lonely"):
        hessian.accumulate(model, [{"x": torch.ones(1, 2, 4)}], unused)
    with pytest.raises(ValueError, match="q"):
        hessian.accumulate(model, [{"x": torch.ones(1, 2, 4), "attention_mask": torch.ones(1, 3)}], {"q": model.q})


# -----------------------------------------------------------------------------
# Accumulation against the float64 oracle

@given(calibration_sets())
@example(batches=SINGLE_TOKEN)
def test_streaming_accumulation_equals_float64_oracle(batches):
    acc = run(batches)["q"]
    h64, n = naive.hessian(batches)
    assert acc.tokens == n
    err = (acc.value.to(torch.float64) - h64).abs()
    assert (err <= accumulation_tol(batches, h64.diagonal(), EPS32)).all()


@given(calibration_sets(), st.integers(1, 5))
def test_upper_block_triangle_accumulation_equals_oracle_and_is_symmetric(batches, tile):
    # Only the tile x tile blocks on and above the diagonal are computed; reading `value` mirrors the rest.
    acc = hessian.HessianAccumulator(batches[0][0].shape[-1], "full", torch.float32, tile=tile)
    for x, m in batches:
        acc.add_batch(x[m != 0])
    h64, _ = naive.hessian(batches)
    assert torch.equal(acc.value, acc.value.T)
    assert ((acc.value.double() - h64).abs() <= accumulation_tol(batches, h64.diagonal(), EPS32)).all()
    torch.testing.assert_close(acc.diag(), acc.value.diagonal(), rtol=0, atol=0)


@given(calibration_sets())
def test_float64_accumulator_equals_oracle_at_float64_precision(batches):
    acc = run(batches, dtype=torch.float64)["q"]
    h64, _ = naive.hessian(batches)
    assert acc.value.dtype == torch.float64
    assert ((acc.value - h64).abs() <= accumulation_tol(batches, h64.diagonal(), EPS64)).all()


@given(calibration_sets())
def test_masked_tokens_do_not_count(batches):
    poisoned = [(x.masked_fill((m == 0)[..., None], math.nan), m) for x, m in batches]
    clean, dirty = run(batches)["q"], run(poisoned)["q"]
    assert dirty.tokens == clean.tokens == sum(int(m.sum()) for _, m in batches)
    assert torch.equal(clean.value, dirty.value)  # NaN in every padded position never reaches H


@given(calibration_sets())
def test_diag_mode_equals_diagonal_of_full_mode(batches):
    full, diag = run(batches, "full")["q"], run(batches, "diag")["q"]
    h64, _ = naive.hessian(batches)
    assert diag.value.shape == (h64.shape[0],)
    tol = accumulation_tol(batches, h64.diagonal(), EPS32).diagonal()
    assert ((diag.value.double() - full.value.diagonal().double()).abs() <= 2 * tol).all()


@given(calibration_sets())
def test_shared_inputs_are_accumulated_once(batches):
    accs = run(batches, shared=True)
    assert accs["q"] is accs["k"] is accs["v"]  # same input tensor: one accumulator, counted once
    assert accs["other"] is not accs["q"]  # equal values in a distinct tensor are a distinct input
    h64, n = naive.hessian(batches)
    assert accs["q"].tokens == accs["other"].tokens == n
    assert ((accs["q"].value.double() - h64).abs() <= accumulation_tol(batches, h64.diagonal(), EPS32)).all()


def test_progress_callback_reports_every_batch():
    seen = []
    model = TinyModel()
    hessian.accumulate(model, token_batches(3), find_linears(model, "all-linear"),
                       progress=lambda *a: seen.append(a))
    assert seen == [("calibrate", 1, 3), ("calibrate", 2, 3), ("calibrate", 3, 3)]


# -----------------------------------------------------------------------------
# Block Cholesky, damping, dead inputs

@given(spd_matrices(), BLOCKSIZES, st.sampled_from([torch.float64, torch.float32]))
@settings(max_examples=40)
def test_block_cholesky_inverse_diagonal_equals_inv(hk, blocksize, dtype):
    """Forward error of a Cholesky-based inverse is O(n·κ·u): tolerance 8·n·κ·eps relative per entry."""
    h, cond = hk
    h = h.to(dtype)
    f = hessian.cholesky_inverse_factor(h, percdamp=0.0, blocksize=blocksize)
    inv64 = torch.linalg.inv(h.to(torch.float64))
    tol = 8 * h.shape[0] * cond * torch.finfo(dtype).eps
    ref = naive.inverse_diag(h)
    assert (((f.inv_diag.double() - ref).abs()) <= tol * ref).all()
    assert (((f.inv_diag.double() - inv64.diagonal()).abs()) <= tol * ref).all()
    u = f.upper.double()
    assert torch.equal(u, u.triu())
    scale = torch.sqrt(ref[:, None] * ref[None, :])
    assert ((u.T @ u - inv64).abs() <= tol * scale).all()  # Uᵀ·U = H⁻¹: the GPTQ factor
    assert f.retries == 0 and f.damping == 0.0


@given(spd_matrices(max_n=24), st.sampled_from([0.01, 0.1, 0.5]), BLOCKSIZES)
def test_damping_is_relative_to_mean_diagonal(hk, percdamp, blocksize):
    h, cond = hk
    f = hessian.cholesky_inverse_factor(h, percdamp, blocksize)
    lam = percdamp * h.diagonal().mean().item()
    # both are percdamp times a float64 mean of the n <= 24 positive diagonal entries: sums in another order differ
    # by <= n·eps relative (bounds.sum_bound), the division and the product add a rounding each
    assert math.isclose(f.damping, lam, rel_tol=(h.shape[0] + 2) * EPS64) and f.percdamp == percdamp
    ref = naive.inverse_diag(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
    assert ((f.inv_diag - ref).abs() <= 8 * h.shape[0] * cond * EPS64 * ref).all()


def test_damping_escalates_until_the_factorisation_succeeds_and_says_so():
    h = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.1], dtype=torch.float64))  # indefinite on purpose
    f = hessian.cholesky_inverse_factor(h, percdamp=0.01, blocksize=2)
    mean = h.diagonal().mean().item()
    fracs = [0.01 * 2 ** i for i in range(12)]
    expected = next(p for p in fracs if torch.linalg.eigvalsh(h + p * mean * torch.eye(4, dtype=h.dtype)).min() > 0)
    assert f.percdamp == expected and f.retries == fracs.index(expected) > 0
    assert math.isclose(f.damping, expected * mean, rel_tol=(4 + 2) * EPS64)  # as above, n = 4
    with pytest.raises(RuntimeError, match="layers.3.mlp.down_proj"):
        hessian.cholesky_inverse_factor(torch.full((3, 3), math.nan), name="layers.3.mlp.down_proj")


@given(spd_matrices(max_n=16, max_cond=100.0), st.data())
def test_dead_inputs_get_infinite_inverse_and_do_not_dilute_damping(hk, data):
    h, cond = hk
    n = h.shape[0] + 1
    dead = data.draw(st.integers(0, n - 1))
    live = [i for i in range(n) if i != dead]
    padded = torch.zeros(n, n, dtype=h.dtype)
    padded[torch.tensor(live)[:, None], torch.tensor(live)[None, :]] = h
    f = hessian.cholesky_inverse_factor(padded, 0.01, 4)
    assert f.dead.tolist() == [i == dead for i in range(n)] and math.isinf(f.inv_diag[dead])
    lam = 0.01 * h.diagonal().mean().item()
    ref = naive.inverse_diag(h + lam * torch.eye(n - 1, dtype=h.dtype))
    assert ((f.inv_diag[live] - ref).abs() <= 8 * n * cond * EPS64 * ref).all()


def test_all_dead_hessian_has_no_factor():
    f = hessian.cholesky_inverse_factor(torch.zeros(3, 3))
    assert f.dead.all() and torch.isinf(f.inv_diag).all() and f.upper.numel() == 0


@given(spd_matrices(max_n=20))
def test_dominance_diagnostic_matches_loops(hk):
    h, _ = hk
    share, rows = hessian.dominance(h)
    a = h.abs().tolist()
    n = len(a)
    off = [sum(a[i][j] for j in range(n) if j != i) for i in range(n)]
    # sums of n² non-negative terms in another order: n²·eps relative each (bounds.sum_bound), and one division
    assert math.isclose(share, sum(off) / sum(map(sum, a)), rel_tol=4 * n * n * EPS64, abs_tol=4 * n * EPS64)
    assert rows == sum(off[i] < a[i][i] for i in range(n)) / n
    if torch.equal(h, torch.diag(h.diagonal())):
        assert share == 0.0 and rows == 1.0


# -----------------------------------------------------------------------------
# One pass versus layer-by-layer streaming

@pytest.mark.parametrize("mode", ["diag", "full"])
def test_streaming_over_blocks_equals_the_one_pass_collection(mode):
    model = TinyModel(n_layers=3)
    batches = token_batches(3)
    modules = find_linears(model, "all-linear")
    spectrum = "centred" if mode == "full" else None
    one = hessian.collect(model, batches, modules, mode=mode, spectrum=spectrum)
    cached = hessian.capture_inputs(model, model.layers[0], batches)
    steps = []
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(model.layers)]
    streamed = hessian.collect_streaming(blocks, cached, modules, mode=mode, spectrum=spectrum,
                                         progress=lambda *a: steps.append(a))
    assert list(streamed) == list(one) and steps[-1] == ("stream", 3, 3)
    for name, s in streamed.items():
        o = one[name]
        assert (s.owner, s.tokens, s.dead) == (o.owner, o.tokens, o.dead)
        assert torch.equal(s.diag, o.diag)  # same ops on the same inputs in the same order
        if mode == "full":
            assert torch.equal(s.inv_diag, o.inv_diag) and torch.equal(s.spectrum, o.spectrum)
            assert (s.damping, s.offdiag_share, s.dominant_rows) == (o.damping, o.offdiag_share, o.dominant_rows)
    assert streamed["layers.1.self_attn.k_proj"] is streamed["layers.1.self_attn.q_proj"]
    assert streamed["layers.1.mlp.up_proj"].owner == "layers.1.mlp.gate_proj"
    with pytest.raises(ValueError, match="lm_head"):
        hessian.collect_streaming(blocks, cached, find_linears(model, "lm_head,q_proj"))


def test_collect_full_mode_reports_damping_and_dominance_per_distinct_input():
    model = TinyModel()
    stats = hessian.collect(model, token_batches(2), find_linears(model, "all-linear"), mode="full")
    for s in stats.values():
        assert s.damping > 0 and 0 <= s.offdiag_share <= 1 and 0 <= s.dominant_rows <= 1
        assert s.inv_diag.shape == s.diag.shape and s.diag.dtype == torch.float64
    assert len({id(s) for s in stats.values()}) == 2 * 4  # per layer: q/k/v, o, gate/up, down


def test_bf16_model_accumulates_in_fp32_against_float64_oracles():
    # calibration on a bf16 base (finetune --dtype bf16): the statistics are fp32 whatever the activations' dtype
    from tests.support.tiny import tiny_llama
    m16 = tiny_llama().to(torch.bfloat16)
    m64 = tiny_llama().to(torch.bfloat16).double()  # the same bf16-representable weights, computed in float64
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 61, (4, 16), generator=g)} for _ in range(3)]
    mods16 = find_linears(m16.model, "all-linear")
    seen = {}  # the bf16 inputs each module really saw, for the tight oracle
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, 32)))
             for n, m in mods16.items() if n.endswith(("q_proj", "o_proj", "gate_proj"))]
    try:
        a16 = hessian.accumulate(m16.model, batches, mods16, mode="diag")
    finally:
        for h in hooks:
            h.remove()
    a64 = hessian.accumulate(m64.model, batches, find_linears(m64.model, "all-linear"), mode="diag",
                             dtype=torch.float64)
    eps16 = torch.finfo(torch.bfloat16).eps
    for n in a16:
        d16, d64 = a16[n].diag(), a64[n].diag()
        assert d16.dtype == torch.float32, n
        # against the float64 model: only the bf16 rounding of the forward pass differs. A requirement on the bf16
        # path rather than a bound: Σx² within 8 bf16 ulps (eps16 = 2^-7) of the float64 model's, far below the
        # O(1) of a wrong input. bf16 kernels accumulate in fp32 on every SIMD path and round once to bf16, so the
        # bf16 roundings, the same on every machine up to a tie, dominate; the largest on this model is 2.3 eps16
        torch.testing.assert_close(d16.double(), d64, rtol=8 * eps16, atol=0, msg=n)
    for n, xs in seen.items():
        # against float64 sums of the very same bf16 activations: fp32 accumulation error only, (N + 3·batches)·eps32
        x = torch.cat(xs).double()  # (N, d_in)
        oracle = 2.0 / x.shape[0] * x.square().sum(0)
        tol = (x.shape[0] + 3 * len(batches)) * EPS32
        torch.testing.assert_close(a16[n].diag().double(), oracle, rtol=tol, atol=0, msg=n)
