"""slora.method.sensitivity: the whole pre-training step on tiny seeded models; invariances; CPU versus CUDA."""
import copy
import dataclasses
import json
import logging
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.support.strategies import TinyModel, token_batches
from slora.method import hessian
from slora.models.targets import find_linears
from slora.models.bert import BertConfig, BertForSequenceClassification
from slora.models.llama import LlamaConfig, LlamaForCausalLM
from slora.method.sensitivity import SensitivityConfig, from_stats
from tests.support.tiny import as_files, compute_files

EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps
MODEL = TinyModel(n_layers=3, seed=1)
BATCHES = token_batches(6, seed=3)
MODULES = find_linears(MODEL, "all-linear")
EQ15 = SensitivityConfig(r_avg=2, r_min=0)  # no bound can bind: the ranks are Eq. 15 rounded
STATS = hessian.collect(MODEL, BATCHES, MODULES)


def scaled(stats, c):
    """Every H multiplied by c (shared statistics stay shared)."""
    out = {}
    for st_ in {id(s): s for s in stats.values()}.values():
        out[id(st_)] = dataclasses.replace(st_, diag=st_.diag * c)
    return {n: out[id(s)] for n, s in stats.items()}


def quotas(sens):
    """Eq. 15 quotas θ_w/Σθ·r_total, the continuous ranks before rounding."""
    theta = {n: m["theta"] for n, m in sens["modules"].items()}
    total = sens["config"]["budget"]["target"]
    return {n: t / math.fsum(theta.values()) * total for n, t in theta.items()}


def rounding_margin(q):
    """How far every quota may move before largest-remainder rounding can change: the distance of any quota
    to an integer, and half the smallest gap between distinct remainders. Equal quotas (modules sharing one
    H) move together and are ordered by name, so only distinct values count."""
    frac = sorted({x - math.floor(x) for x in q.values()})
    to_integer = min(min(f, 1 - f) for f in frac)
    gaps = [b - a for a, b in zip(frac, frac[1:])]
    return min([to_integer] + [g / 2 for g in gaps])


# -----------------------------------------------------------------------------
# End to end

def test_compute_writes_both_artifacts_in_model_order():
    sens, ranks = compute_files(MODEL, BATCHES, SensitivityConfig(r_avg=4))
    assert list(ranks) == list(MODULES) == list(sens["modules"])
    assert sum(ranks.values()) == 4 * len(ranks) == sens["config"]["budget"]["achieved"]
    assert json.loads(json.dumps(sens)) == sens and json.loads(json.dumps(ranks)) == ranks
    n_tokens = sum(int(b["attention_mask"].sum()) for b in BATCHES)
    assert {m["tokens"] for m in sens["modules"].values()} == {n_tokens}
    assert sens["config"]["hessian"]["layers.1.self_attn.v_proj"]["shared_with"] == "layers.1.self_attn.q_proj"
    assert sens["config"]["message"] is None and sens["config"]["targets"] == "all-linear"


@pytest.mark.parametrize("source", ["diag", "full-diag", "obs"])
def test_every_source_runs_in_full_mode_with_diagnostics(source):
    sens, ranks = compute_files(MODEL, BATCHES, SensitivityConfig(mode="full", source=source, unit="param"))
    assert sens["config"]["budget"]["target"] - max(m["d_in"] + m["d_out"] for m in sens["modules"].values()) \
        < sens["config"]["budget"]["achieved"] <= sens["config"]["budget"]["target"]
    diag = sens["config"]["hessian"]["layers.0.mlp.down_proj"]
    assert diag["damping"] > 0 and 0 <= diag["offdiag_share"] <= 1
    if source == "full-diag":  # q and v read the same H but have d_out 16 and 8: N and trace scale with d_out
        m = sens["modules"]
        assert m["layers.0.self_attn.q_proj"]["trace"] == 2 * m["layers.0.self_attn.v_proj"]["trace"]


def test_streaming_blocks_give_the_same_artifacts():
    cfg = SensitivityConfig(mode="full", source="obs", r_avg=3)
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(MODEL.layers)]
    assert compute_files(MODEL, BATCHES, cfg, blocks=blocks) == compute_files(MODEL, BATCHES, cfg)


def test_config_errors():
    with pytest.raises(ValueError, match="obs"):
        SensitivityConfig(source="obs")
    with pytest.raises(ValueError, match="variant"):
        SensitivityConfig(variant="eigen")


def test_a_single_module_falls_back_to_uniform_with_a_logged_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="slora.method.sensitivity"):
        sens, ranks = compute_files(MODEL, BATCHES, SensitivityConfig(r_avg=3), "layers.0.mlp.down_proj")
    assert ranks == {"layers.0.mlp.down_proj": 3}
    assert "σ = 0" in sens["config"]["message"] and "σ = 0" in caplog.text


def test_wired_to_slora_llama_with_streaming_over_its_decoder_layers():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    batches = token_batches(3, vocab=50, seed=4)
    sc = SensitivityConfig(mode="full", source="obs", r_avg=4)
    blocks = [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    sens, ranks = compute_files(model, batches, sc)
    assert compute_files(model, batches, sc, blocks=blocks) == (sens, ranks)
    assert len(ranks) == 14 and "lm_head" not in ranks and sum(ranks.values()) == 4 * 14
    shared = sens["config"]["hessian"]
    assert shared["model.layers.1.self_attn.v_proj"]["shared_with"] == "model.layers.1.self_attn.q_proj"
    assert shared["model.layers.1.mlp.up_proj"]["shared_with"] == "model.layers.1.mlp.gate_proj"


def test_wired_to_slora_bert_with_padding_and_heads_left_out():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=48, vocab_size=32), 3)
    model.train()  # calibration must switch dropout off by itself, and give the train flag back
    batches = token_batches(3, seed=5)
    every = find_linears(model, "all-linear")
    assert not [n for n in every if "pooler" in n or "classifier" in n] and len(every) == 12
    sens, ranks = compute_files(model, batches, SensitivityConfig(r_avg=4), "query,value")
    assert compute_files(model, batches, SensitivityConfig(r_avg=4), "query,value") == (sens, ranks)
    assert model.training and list(ranks) == [f"bert.encoder.layer.{i}.attention.self.{m}"
                                              for i in range(2) for m in ("query", "value")]
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert {m["tokens"] for m in sens["modules"].values()} == {n_tokens}


# -----------------------------------------------------------------------------
# Invariances: H is a per-token mean, and every weight in Eqs. 11-14 is scale-free

@given(st.integers(-40, 40))
def test_scaling_every_hessian_by_a_power_of_two_changes_nothing(k):
    """2^k·H is exact in floating point, so θ and the ranks are identical bit for bit."""
    base, ranks = as_files(from_stats(MODULES, STATS, EQ15))
    other, ranks2 = as_files(from_stats(MODULES, scaled(STATS, 2.0 ** k), EQ15))
    assert ranks2 == ranks
    assert [m["theta"] for m in other["modules"].values()] == [m["theta"] for m in base["modules"].values()]


@given(st.floats(1e-3, 1e3))
@settings(max_examples=30)
def test_scaling_every_hessian_by_any_c_keeps_the_ranks(c):
    base, ranks = as_files(from_stats(MODULES, STATS, EQ15))
    other, ranks2 = as_files(from_stats(MODULES, scaled(STATS, c), EQ15))
    same_er = all(base["modules"][n]["effective_rank"] == m["effective_rank"] for n, m in other["modules"].items())
    q, q2 = quotas(base), quotas(other)
    moved = max(abs(q[n] - q2[n]) for n in q)
    if same_er:  # rounding c·s moves each metric by a few eps, θ by at most a few times more
        assert moved <= 64 * len(q) * EPS64 * max(q.values())
    assume(moved < rounding_margin(q))
    assert ranks2 == ranks


@pytest.mark.parametrize("copies", [2, 3])
def test_repeating_the_calibration_set_keeps_h_and_the_ranks(copies):
    once = hessian.collect(MODEL, BATCHES, MODULES)
    again = hessian.collect(MODEL, BATCHES * copies, MODULES)
    n_tok, n_batches = next(iter(once.values())).tokens, len(BATCHES) * copies
    for name in MODULES:
        assert again[name].tokens == copies * once[name].tokens
        tol = (copies * n_tok + 3 * n_batches) * EPS32 * once[name].diag  # accumulation bound, test_hessian
        assert ((again[name].diag - once[name].diag).abs() <= tol).all()
    base, ranks = as_files(from_stats(MODULES, once, EQ15))
    other, ranks2 = as_files(from_stats(MODULES, again, EQ15))
    q, q2 = quotas(base), quotas(other)
    assert max(abs(q[n] - q2[n]) for n in q) < rounding_margin(q)  # the tiny model's quotas are far from ties
    assert ranks2 == ranks


# -----------------------------------------------------------------------------
# gpu tier

@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [SensitivityConfig(r_avg=4),
                                 SensitivityConfig(r_avg=4, mode="full", source="obs", unit="param")])
def test_cpu_and_cuda_give_the_same_ranks(cfg):
    cpu_sens, cpu_ranks = compute_files(MODEL, BATCHES, cfg)
    cuda_batches = [{k: v.cuda() for k, v in b.items()} for b in BATCHES]
    cuda_sens, cuda_ranks = compute_files(copy.deepcopy(MODEL).cuda(), cuda_batches, cfg)
    assert cuda_ranks == cpu_ranks
    n_tok = cpu_sens["modules"]["layers.0.self_attn.q_proj"]["tokens"]
    for name, m in cpu_sens["modules"].items():  # float32 forward and accumulation differ per kernel only
        assert math.isclose(cuda_sens["modules"][name]["trace"], m["trace"], rel_tol=(n_tok + 64) * EPS32 * 8)
