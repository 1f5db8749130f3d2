"""Properties of slora.method.eva (EVA's rank rule on eig(H)) against float64 oracles, plus the --alloc eva wiring.

Oracle for the allocation: a greedy that hands out one rank at a time to the matrix whose next component has the
largest ratio (ties: name, then component), which is the definition of a global top-k under caps written the other
way round. Oracle for the ratios: numpy's float64 eigvalsh of XᵀX (or of np.cov) from the raw tokens.
"""
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st

from slora.method import allocate, eva
from slora.method.sensitivity import SensitivityConfig, from_stats
from slora.method import hessian
from tests.support.bounds import sum_bound

EPS = torch.finfo(torch.float64).eps
NAMES = [f"layers.{i}.{m}" for i in range(6) for m in ("attn.q_proj", "attn.v_proj", "mlp.down_proj")]


@st.composite
def spectra_dicts(draw, min_size=1, max_size=10, max_d=12):
    """{name: descending ratios}; anchors: flat spectra (all ties), one dominant component, zero tails."""
    names = draw(st.lists(st.sampled_from(NAMES), min_size=min_size, max_size=max_size, unique=True))
    out = {}
    for n in names:
        d = draw(st.integers(1, max_d))
        kind = draw(st.sampled_from(["random", "flat", "dominant", "zero-tail"]))
        if kind == "flat":
            v = [1.0] * d
        elif kind == "dominant":
            v = [1.0] + [2.0 ** -20] * (d - 1)
        else:
            v = draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=d, max_size=d))
            if kind == "zero-tail":
                v = v[:max(1, d // 2)] + [0.0] * (d - max(1, d // 2))
        v = sorted(v, reverse=True)
        total = math.fsum(v) or 1.0
        out[n] = torch.tensor([x / total for x in v], dtype=torch.float64)
    return out


def greedy(spectra, r_avg, rho, r_min, limit=None):
    """One rank at a time to the largest next ratio under the caps, after the floors (independent oracle)."""
    names = sorted(spectra)
    cap = {n: min(round(rho * r_avg), spectra[n].numel(), (limit or {}).get(n, 10 ** 9)) for n in names}
    r = {n: min(r_min, cap[n]) for n in names}
    for _ in range(int(r_avg * len(names)) - sum(r.values())):
        best = min((n for n in names if r[n] < cap[n]), key=lambda n: (-float(spectra[n][r[n]]), n, r[n]))
        r[best] += 1
    return r


def feasible(spectra, r_avg, rho):
    return sum(min(round(rho * r_avg), s.numel()) for s in spectra.values()) >= r_avg * len(spectra)


FLAT = {"layers.0.attn.q_proj": torch.full((4,), 0.25, dtype=torch.float64),
        "layers.1.attn.q_proj": torch.full((4,), 0.25, dtype=torch.float64)}


@given(spectra_dicts(), st.integers(1, 4), st.sampled_from([1.0, 1.5, 2.0, 3.0]), st.integers(0, 2))
@example(FLAT, 2, 2.0, 0)
@example({"layers.0.mlp.down_proj": torch.tensor([0.5, 0.5], dtype=torch.float64)}, 1, 1.0, 2)  # floor capped
def test_budget_exact_caps_and_floor_respected_and_equal_to_the_greedy_oracle(spectra, r_avg, rho, r_min):
    floors = sum(min(r_min, round(rho * r_avg), s.numel()) for s in spectra.values())
    if not feasible(spectra, r_avg, rho) or floors > r_avg * len(spectra):
        with pytest.raises(ValueError):
            eva.allocate(spectra, r_avg, rho=rho, r_min=r_min)
        return
    ranks = eva.allocate(spectra, r_avg, rho=rho, r_min=r_min)
    assert sum(ranks.values()) == r_avg * len(spectra)
    for n, r in ranks.items():
        cap = min(round(rho * r_avg), spectra[n].numel())
        assert min(r_min, cap) <= r <= cap
    assert ranks == greedy(spectra, r_avg, rho, r_min)


@given(spectra_dicts(), st.integers(1, 6))
def test_rho_one_is_uniform(spectra, r_avg):
    spectra = {n: torch.cat([s, torch.zeros(r_avg)]) for n, s in spectra.items()}  # every input has d >= r_avg
    assert set(eva.allocate(spectra, r_avg, rho=1.0).values()) == {r_avg}


@given(spectra_dicts(min_size=2), st.integers(1, 4), st.randoms(use_true_random=False))
def test_permutation_equivariance(spectra, r_avg, rnd):
    if not feasible(spectra, r_avg, 2.0):
        return
    items = list(spectra.items())
    rnd.shuffle(items)
    assert eva.allocate(dict(items), r_avg) == eva.allocate(spectra, r_avg)
    # relabelling the matrices moves their ranks with them when no ties are decided by name
    vals = [v for s in spectra.values() for v in s.tolist()]
    if len(set(vals)) == len(vals):
        names = list(spectra)
        perm = names[:]
        rnd.shuffle(perm)
        renamed = {perm[i]: spectra[n] for i, n in enumerate(names)}
        got = eva.allocate(renamed, r_avg)
        want = eva.allocate(spectra, r_avg)
        assert all(got[perm[i]] == want[n] for i, n in enumerate(names))


@given(st.integers(1, 6), st.integers(2, 8), st.integers(1, 3), st.integers(0, 2 ** 16))
def test_a_group_sharing_one_spectrum_gets_ranks_within_one_of_each_other(n_groups, d, members, seed):
    """q/k/v share one input; with distinct ratios only the budget boundary can split a group, by one rank."""
    g = torch.Generator().manual_seed(seed)
    spectra, groups = {}, {}
    for i in range(n_groups):
        s = torch.sort(torch.rand(d, generator=g, dtype=torch.float64), descending=True).values
        for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj")[:members]:
            spectra[f"layers.{i}.{m}"] = s / s.sum()
            groups[f"layers.{i}.{m}"] = f"layers.{i}.attn.q_proj"
    ranks = eva.allocate(spectra, 2, rho=2.0, groups=groups)
    for i in range(n_groups):
        rs = [r for n, r in ranks.items() if n.startswith(f"layers.{i}.")]
        assert max(rs) - min(rs) <= 1


def test_group_cap_is_the_largest_of_the_group_as_in_peft():
    limit = {"a": 2, "b": 8}
    assert eva.caps(4, 2.0, ["a", "b"], {"a": "a", "b": "a"}, {"a": 8, "b": 8}) == {"a": 8, "b": 8}
    assert eva.caps(4, 2.0, ["a", "b"], {"a": "a", "b": "a"}, limit) == {"a": 2, "b": 8}
    assert eva.caps(5, 0.5, ["a"], {"a": "a"}, {"a": 9}) == {"a": 2}  # round(2.5) = 2: Python's round, as PEFT


@given(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2 ** 16), st.integers(-6, 6), st.booleans())
def test_ratios_match_float64_eigenvalues_of_the_raw_tokens(n, d, seed, log_scale, centred):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) + 1.5) * 2.0 ** log_scale
    acc = hessian.HessianAccumulator(d, "full", torch.float64)
    acc.add_batch(x)
    mean = x.mean(0) if centred else None
    if centred and n < 2:
        return
    xn = x.numpy()
    if centred:
        ev = np.linalg.eigvalsh(np.cov(xn, rowvar=False).reshape(d, d))
    else:
        ev = np.linalg.eigvalsh(xn.T @ xn)
    ev = np.clip(ev[::-1], 0, None)
    if ev.sum() <= 0:
        return
    got = eva.ratios(acc.value, mean=mean).numpy()
    # eigenvalues of a symmetric matrix are perturbed by at most ‖ΔH‖₂; ratios by that over the trace
    tol = 64 * d * EPS * (1 + (2.0 ** (2 * log_scale) * 16 * d * n) / max(ev.sum(), 1e-300) if centred else 1)
    np.testing.assert_allclose(got, ev / ev.sum(), rtol=0, atol=tol)


def test_infeasible_rho_and_bad_spectra_are_errors_naming_the_culprit():
    s = {"a": torch.tensor([0.6, 0.4], dtype=torch.float64), "b": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    with pytest.raises(eva.CapsTooSmall, match="raise rho"):
        eva.allocate(s, 2, rho=0.5)
    with pytest.raises(ValueError, match="b: .*descending"):
        eva.allocate(s | {"b": torch.tensor([0.0, 1.0], dtype=torch.float64)}, 1)
    with pytest.raises(ValueError, match="zero"):
        eva.ratios(torch.zeros(3, 3))


def test_concentration_flags_a_handful_taking_most_of_the_budget():
    skewed = {f"m{i}": 1 for i in range(40)} | {"big": 100}
    c = allocate.concentration(skewed)
    assert c["k"] == 3 and c["warn"] and c["share"] == pytest.approx(102 / 140)
    flat = allocate.concentration({f"m{i}": 8 for i in range(40)})
    assert not flat["warn"] and flat["share"] == pytest.approx(2 / 40)


def test_from_stats_eva_groups_shared_inputs_and_records_concentration():
    """Two layers, q and v share one H each; EVA's ranks follow eig(H) and the shared pair gets equal ranks."""
    torch.manual_seed(0)
    mods = {f"l{i}.{m}": torch.nn.Linear(6, 6) for i in range(2) for m in ("q", "v")}
    stats = {}
    for i, spread in enumerate((torch.tensor([16.0, 1, 1, 1, 1, 1]), torch.ones(6))):
        x = torch.randn(200, 6, generator=torch.Generator().manual_seed(i)) * spread.sqrt()
        acc = hessian.HessianAccumulator(6, "full", torch.float64)
        acc.add_batch(x)
        st_ = hessian.reduce(acc, f"l{i}.q", spectrum="centred")
        stats[f"l{i}.q"] = stats[f"l{i}.v"] = st_
    cfg = SensitivityConfig(mode="full", method="eva", r_avg=2, r_min=0)
    s = from_stats(mods, stats, cfg)
    sens, ranks = s.config, s.ranks
    assert sum(ranks.values()) == 8 and ranks["l0.q"] == ranks["l0.v"] and ranks["l1.q"] == ranks["l1.v"]
    assert ranks["l1.q"] > ranks["l0.q"]  # the flat spectrum spreads its variance over more components
    assert sens["concentration"]["k"] == 1
    with pytest.raises(ValueError, match="mode 'full'"):
        SensitivityConfig(mode="diag", method="eva")


def test_rank_order_of_draws_is_reproducible():
    rnd = random.Random(0)
    s = {n: torch.tensor(sorted([rnd.random() for _ in range(5)], reverse=True), dtype=torch.float64)
         for n in NAMES[:6]}
    assert eva.allocate(s, 3) == eva.allocate(dict(reversed(list(s.items()))), 3)


def test_finetune_alloc_eva_end_to_end_on_tiny_models(tmp_path):
    """--alloc eva through python -m slora.finetune: the encoder (one pass) and the decoder (streamed full H);
    --eva-rho 1 gives uniform ranks; the budget is exact and the concentration record is in sensitivity.json."""
    import json

    from slora.errors import UsageError
    from tests.cli.test_finetune import run, write_jsonl
    from tests.support.tiny import WORDS, tiny_model_dir
    rows = [{"text": f"the movie was {WORDS[i % 8]} and {WORDS[(3 * i) % 8]}", "label": i % 2} for i in range(24)]
    cls = write_jsonl(tmp_path / "train.jsonl", rows[:20]), write_jsonl(tmp_path / "dev.jsonl", rows[20:])
    gen = (write_jsonl(tmp_path / "gtrain.jsonl", [{"prompt": f"say {w}", "response": w} for w in WORDS[:10]]),
           write_jsonl(tmp_path / "gdev.jsonl", [{"prompt": "say a", "response": "a"}] * 2))
    enc, dec = tiny_model_dir(tmp_path / "e", "encoder"), tiny_model_dir(tmp_path / "d", "decoder")
    for model, data, kind, name in ((enc, cls, "classification", "enc"), (dec, gen, "instructions", "dec")):
        common = ("--allocate-only", "--alloc", "eva", "--targets", "all-linear", "--r-avg", "4")
        out = run(tmp_path, model, data, *common, kind=kind, out=name)
        ranks = json.loads((out / "ranks.json").read_text())
        sens = json.loads((out / "sensitivity.json").read_text())
        assert sum(ranks.values()) == 4 * len(ranks) and max(ranks.values()) <= 8
        assert sens["config"]["mode"] == "full" and "concentration" in sens["config"]
        uni = run(tmp_path, model, data, *common, "--eva-rho", "1", kind=kind, out=name + "-rho1")
        assert set(json.loads((uni / "ranks.json").read_text()).values()) == {4}
    # caps round(0.5·4) = 2 cannot hold a budget of 4 per matrix: the command names its flag
    with pytest.raises(UsageError, match="raise rho") as e:
        run(tmp_path, enc, cls, *common, "--eva-rho", "0.5", out="rho-half")
    assert e.value.culprit == "--eva-rho"


@given(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2 ** 16), st.integers(1, 4))
def test_full_mode_accumulator_keeps_the_token_mean_over_any_batch_split(n, d, seed, parts):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1
    acc = hessian.HessianAccumulator(d, "full", torch.float64)
    for chunk in torch.tensor_split(x, parts):
        acc.add_batch(chunk)
    # µ = fl(Σx)/N: a sum of n terms in any chunking errs by <= γ_{n-1}·Σ|x| and the division adds u·|µ|, so both
    # computations lie within n·eps·max|x| of each other (tests.support.bounds.sum_bound)
    np.testing.assert_allclose(acc.mean.numpy(), x.numpy().mean(0), rtol=0,
                               atol=sum_bound(n, x.abs().max().item(), EPS))
