"""LoRALinear and the model-level LoRA API: identity at init, merge exactness, trainable mask, alpha policies."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from slora.models.lora import (LoRALinear, apply_lora, lora_alphas, lora_modules, lora_parameters_count, lora_ranks, lora_state_dict, mark_only_lora_trainable, merge_lora, merged_copy, module_alphas, unmerge_lora)
from slora.models.bert import for_sequence_classification
from tests.support.bounds import EPS32, assert_within, oracles_bound
from tests.support.tiny import randomize_lora, tiny_bert, tiny_llama
# Unequal ranks on a 2-layer tiny LLaMA, with a rank-0 module (layer 1's k_proj) and an MLP module.
LLAMA_RANKS = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2,
               "model.layers.1.self_attn.q_proj": 1, "model.layers.1.self_attn.k_proj": 0,
               "model.layers.1.mlp.down_proj": 3}


def ids(B=2, T=6, vocab=53, seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def layer(d_in=24, d_out=20, r=3, alpha=6.0, rslora=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=g))
        base.bias.copy_(torch.randn(d_out, generator=g))
    m = LoRALinear(base, r, alpha, use_rslora=rslora)
    with torch.no_grad():
        m.lora_A.weight.copy_(torch.randn(r, d_in, generator=g))
        m.lora_B.weight.copy_(torch.randn(d_out, r, generator=g))
    return m.eval()


# -----------------------------------------------------------------------------
# The layer

def test_fresh_lora_gives_identical_outputs():
    """B = 0 at init, so every output is bit-identical to the base model's (y + 0·s is y exactly)."""
    m = tiny_llama(seed=3)
    x = ids(vocab=61)
    with torch.no_grad():
        before = m(x)
        apply_lora(m, LLAMA_RANKS, alpha=8)
        after = m(x)
    assert all(torch.count_nonzero(l.lora_B.weight) == 0 for l in lora_modules(m).values())
    assert torch.equal(before, after)


def test_init_is_kaiming_uniform_A_and_zero_B():
    d_in = 40
    m = LoRALinear(nn.Linear(d_in, 30), r=5, alpha=5, generator=torch.Generator().manual_seed(0))
    # kaiming_uniform_(a=√5) has bound √(6 / ((1 + 5)·fan_in)) = 1/√d_in, nn.Linear's own init.
    assert m.lora_A.weight.abs().max() <= 1 / math.sqrt(d_in)
    assert m.lora_A.weight.std() > 0.25 / math.sqrt(d_in)  # U(-b, b) has std b/√3; far from all-zero
    assert torch.count_nonzero(m.lora_B.weight) == 0
    again = LoRALinear(nn.Linear(d_in, 30), r=5, alpha=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.lora_A.weight, again.lora_A.weight)  # seeded init is reproducible


def test_layer_adopts_base_parameters_and_keys():
    base = nn.Linear(8, 6)
    m = LoRALinear(base, r=2, alpha=4)
    assert m.weight is base.weight and m.bias is base.bias  # no copy
    assert list(m.state_dict()) == ["weight", "bias", "lora_A.weight", "lora_B.weight"]
    assert m.lora_A.weight.shape == (2, 8) and m.lora_B.weight.shape == (6, 2)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_BA(rslora):
    m = layer(r=4, alpha=6.0, rslora=rslora)
    assert m.scaling == (6.0 / math.sqrt(4) if rslora else 6.0 / 4)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    W, b, A, B = (t.detach().double() for t in (m.weight, m.bias, m.lora_A.weight, m.lora_B.weight))
    want = x @ W.T + b + (x @ A.T @ B.T) * m.scaling  # fp64 oracle
    with torch.no_grad():
        got = m(x.float()).double()
    bound = (x.abs() @ W.abs().T + b.abs() + (x.abs() @ A.abs().T @ B.abs().T) * m.scaling)
    # x Wᵀ + b is a sum of d_in + 1 rounded terms (Higham's γ_{d_in+1}), h = s·(x Aᵀ) adds γ_{d_in} and one rounding,
    # y + h Bᵀ (addmm) γ_{r+1}, and x.float() rounds x once: at most γ_{d_in+r+4}·bound, and γ_n <= n·eps for n·u < 1/2
    assert (got - want).abs().le((24 + 4 + 4) * EPS32 * bound).all()


def test_merged_forward_equals_unmerged_within_rounding():
    """y_merged = x (W + sBA)ᵀ vs y = x Wᵀ + s (x Aᵀ) Bᵀ: each is a sum of d_in + r + 2 rounded products, so they
    differ by at most γ·(|x||W|ᵀ + s|x||A|ᵀ|B|ᵀ + |b|) elementwise with γ = 2(d_in + r + 2)·eps (Higham's γ_n
    for each side)."""
    m = layer(d_in=24, d_out=20, r=3, alpha=6.0)
    x = torch.randn(4, 7, 24, generator=torch.Generator().manual_seed(2))
    W, b, A, B = (t.detach().clone() for t in (m.weight, m.bias, m.lora_A.weight, m.lora_B.weight))
    with torch.no_grad():
        y = m(x)
        m.merge()
        y_merged = m(x)
    bound = x.abs() @ W.abs().T + m.scaling * (x.abs() @ A.abs().T @ B.abs().T) + b.abs()
    gamma = 2 * (24 + 3 + 2) * EPS32
    assert (y_merged - y).abs().le(gamma * bound).all()
    assert not torch.equal(y, (x @ W.T + b))  # LoRA really changed the output


def test_merge_unmerge_round_trip_and_idempotent():
    m = layer()
    W0 = m.weight.detach().clone()
    D = m.delta_weight().detach()
    m.merge()
    W1 = m.weight.detach().clone()
    m.merge()  # idempotent: no second addition
    assert m.merged and torch.equal(m.weight, W1)
    m.unmerge()
    W2 = m.weight.detach().clone()
    m.unmerge()
    assert not m.merged and torch.equal(m.weight, W2)
    # fl(fl(W + D) − D) − W is at most u(|W + D| + |W|) elementwise, u = eps/2; eps·(|W| + |D|) bounds it.
    assert (W2 - W0).abs().le(EPS32 * (W0.abs() + D.abs())).all()
    assert not torch.equal(W1, W0)


def test_eval_and_train_never_merge():
    m = tiny_llama(seed=1)
    apply_lora(m, LLAMA_RANKS, alpha=8)
    randomize_lora(m)
    W = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    m.eval()
    m.train()
    assert not any(l.merged for l in lora_modules(m).values())
    assert all(torch.equal(v, W[k]) for k, v in m.state_dict().items())


def test_merged_layer_refuses_training_forward():
    m = layer().train()
    m.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        m(torch.randn(2, 24))


def test_model_merge_matches_unmerged_and_round_trips():
    m = tiny_llama(seed=2).eval()
    apply_lora(m, LLAMA_RANKS, alpha=8)
    randomize_lora(m, std=0.1)
    x = ids(vocab=61)
    W0 = {k: v.clone() for k, v in m.state_dict().items()}
    D = {f"{n}.weight": l.delta_weight().detach() for n, l in lora_modules(m).items()}
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        y, y64 = m(x), m64(x)
        merge_lora(m)
        merge_lora(m64)
        y_merged, y_merged64 = m(x), m64(x)
        unmerge_lora(m)
        y_again, y_again64 = m(x), copy.deepcopy(m).double()(x)
    # the same exact logits by a LoRA branch and by a merged W: each side's fp32 error against itself in float64
    assert_within(y_merged, y, oracles_bound(y_merged, y_merged64, y, y64), "merged")
    # after merge and unmerge W is back up to the round trip's rounding (below); that moves the exact logits by
    # |y_again64 - y64| (float64), on top of each side's own fp32 error
    again = oracles_bound(y_again, y_again64, y, y64) + (y_again64 - y64).abs().max().item()
    assert_within(y_again, y, again, "merged and unmerged")
    for k, v in m.state_dict().items():
        if k.endswith(".weight") and "lora_" not in k:
            # fl(fl(W + D) - D) - W is at most u·(|W + D| + |W|) <= eps·(|W| + |D|) elementwise (u = eps/2)
            slack = EPS32 * (W0[k].abs() + D[k].abs()) if k in D else 0
            assert (v - W0[k]).abs().le(slack).all(), k


def test_merged_copy_is_a_plain_network_with_the_lora_output():
    m = tiny_llama(seed=3).eval()
    apply_lora(m, LLAMA_RANKS, alpha=8)
    randomize_lora(m, std=0.1)
    x = ids(vocab=61)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    plain = merged_copy(m)
    assert not lora_modules(plain) and lora_modules(m)  # the copy has none; the original keeps its LoRA layers
    assert set(plain.state_dict()) == {k for k in before if "lora_" not in k}  # the checkpoint's own keys
    with torch.no_grad():
        y, y_plain = m(x), plain(x)
        y64, y_plain64 = copy.deepcopy(m).double()(x), merged_copy(copy.deepcopy(m).double())(x)
    assert_within(y_plain, y, oracles_bound(y_plain, y_plain64, y, y64), "logits")  # rounding, as merge_lora
    for k, v in m.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    name = next(iter(LLAMA_RANKS))
    lora = m.get_submodule(name)
    torch.testing.assert_close(plain.get_submodule(name).weight, lora.weight + lora.delta_weight(), rtol=0, atol=0)
    # a merged layer is copied as it is (its W already holds the update), not merged twice
    merge_lora(m)
    torch.testing.assert_close(merged_copy(m).get_submodule(name).weight, lora.weight, rtol=0, atol=0)


def test_dropout_only_on_the_lora_branch_and_only_in_training():
    m = layer()
    d = LoRALinear(nn.Linear(24, 20), r=3, alpha=6.0, dropout=0.5)
    d.load_state_dict(m.state_dict())
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(d.eval()(x), m(x))  # eval: dropout is the identity
        d.train()
        torch.manual_seed(0)
        y = d(x)
        with_full_branch = m(x)
    assert not torch.allclose(y, with_full_branch)  # some LoRA inputs were dropped
    # the base path is never dropped: with B = 0 training output is the base output exactly
    with torch.no_grad():
        d.lora_B.weight.zero_()
        assert torch.equal(d(x), torch.nn.functional.linear(x, d.weight, d.bias))


def test_half_precision_base_keeps_fp32_factors_and_input_dtype():
    base = nn.Linear(16, 12).to(torch.bfloat16)
    m = LoRALinear(base, r=2, alpha=4)
    assert m.lora_A.weight.dtype == torch.float32 and m.lora_B.weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert m(x).dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# apply_lora and the model-level helpers

def test_rank_zero_module_is_untouched():
    m = tiny_llama(seed=4)
    k = m.model.layers[1].self_attn.k_proj
    w = k.weight.detach().clone()
    apply_lora(m, LLAMA_RANKS, alpha=8)
    assert m.model.layers[1].self_attn.k_proj is k and type(k) is nn.Linear
    assert torch.equal(k.weight, w)
    assert "model.layers.1.self_attn.k_proj" not in lora_ranks(m)
    assert lora_ranks(m) == {n: r for n, r in LLAMA_RANKS.items() if r > 0}


def test_state_dict_keeps_base_keys_and_adds_peft_named_factors():
    m = tiny_llama(seed=0)
    base_keys = set(m.state_dict())
    apply_lora(m, LLAMA_RANKS, alpha=8)
    keys = set(m.state_dict())
    lora_keys = {f"{n}.lora_{ab}.weight" for n, r in LLAMA_RANKS.items() if r for ab in "AB"}
    assert keys == base_keys | lora_keys
    assert set(lora_state_dict(m)) == lora_keys
    dims = {n: (mod.in_features, mod.out_features) for n, mod in lora_modules(m).items()}
    assert lora_parameters_count(m) == sum(r * sum(dims[n]) for n, r in LLAMA_RANKS.items() if r)


def test_only_lora_and_head_train():
    model = for_sequence_classification(tiny_bert(seed=0), num_labels=3, seed=0)
    ranks = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.value": 3,
             "bert.encoder.layer.1.attention.self.query": 0}
    apply_lora(model, ranks, alpha=4)
    randomize_lora(model)
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {f"{n}.lora_{ab}.weight" for n, r in ranks.items() if r for ab in "AB"} | \
           {"classifier.weight", "classifier.bias"}
    assert trainable == want
    # one optimizer step over all parameters moves exactly the trainable ones
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(ids()).logsumexp(-1).sum()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == want
    assert lora_state_dict(model, extra=("classifier",)).keys() == want


def test_mark_trainable_for_a_causal_lm():
    m = tiny_llama(seed=0)
    apply_lora(m, LLAMA_RANKS, alpha=8)
    with pytest.raises(KeyError, match="classifier"):
        mark_only_lora_trainable(m)  # the default head does not exist here: say so, do not skip it
    mark_only_lora_trainable(m, extra=())
    assert {n for n, p in m.named_parameters() if p.requires_grad} == set(lora_state_dict(m))


# -----------------------------------------------------------------------------
# Alpha policies

RANKS = {"a": 2, "b": 4, "c": 8, "d": 0}


def test_alpha_policy_constant():
    assert module_alphas(RANKS, 16, "constant") == {"a": 16.0, "b": 16.0, "c": 16.0}


def test_alpha_policy_scale_gives_one_scaling():
    al = module_alphas(RANKS, 16, "scale")  # r_ref = mean(2, 4, 8, 0) = 3.5
    assert al == {"a": 16 * 2 / 3.5, "b": 16 * 4 / 3.5, "c": 16 * 8 / 3.5}
    assert {round(al[n] / RANKS[n], 12) for n in al} == {round(16 / 3.5, 12)}
    al = module_alphas(RANKS, 16, "scale", r_ref=4)
    assert al == {"a": 8.0, "b": 16.0, "c": 32.0}
    rs = module_alphas(RANKS, 16, "scale", use_rslora=True, r_ref=4)
    assert {round(rs[n] / math.sqrt(RANKS[n]), 12) for n in rs} == {8.0}  # α/√r_ref for every module


def test_alpha_policies_on_layers():
    ranks = {"model.layers.0.self_attn.q_proj": 2, "model.layers.0.self_attn.v_proj": 8}
    m = apply_lora(tiny_llama(), ranks, alpha=16, alpha_policy="rslora")
    assert {n: (l.alpha, l.scaling, l.use_rslora) for n, l in lora_modules(m).items()} == {
        "model.layers.0.self_attn.q_proj": (16.0, 16 / math.sqrt(2), True),
        "model.layers.0.self_attn.v_proj": (16.0, 16 / math.sqrt(8), True)}
    m = apply_lora(tiny_llama(), ranks, alpha=16, alpha_policy="constant")
    assert [l.scaling for l in lora_modules(m).values()] == [8.0, 2.0]
    m = apply_lora(tiny_llama(), ranks, alpha=16, alpha_policy="scale", r_ref=4)
    assert [l.scaling for l in lora_modules(m).values()] == [4.0, 4.0]
    assert lora_alphas(m) == {"model.layers.0.self_attn.q_proj": 8.0, "model.layers.0.self_attn.v_proj": 32.0}
    explicit = {"model.layers.0.self_attn.q_proj": 3.0, "model.layers.0.self_attn.v_proj": 5.5}
    m = apply_lora(tiny_llama(), ranks, alpha=explicit)
    assert lora_alphas(m) == explicit


# -----------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("ranks,err,match", [
    ({"model.layers.0.self_attn.nope": 2}, KeyError, "model.layers.0.self_attn.nope"),
    ({"model.layers.0.self_attn": 2}, TypeError, "LlamaAttention"),
    ({"model.layers.0.mlp.up_proj": -1}, ValueError, "model.layers.0.mlp.up_proj"),
    ({"model.layers.0.mlp.up_proj": 2.0}, ValueError, "int"),
    ({"model.layers.0.mlp.up_proj": True}, ValueError, "int"),
    ({"": 2}, KeyError, "no module"),
])
def test_bad_ranks_are_errors_naming_the_module(ranks, err, match):
    with pytest.raises(err, match=match):
        apply_lora(tiny_llama(), ranks, alpha=8)


def test_failed_apply_leaves_the_model_untouched():
    m = tiny_llama()
    with pytest.raises(KeyError, match="typo"):
        apply_lora(m, {"model.layers.0.self_attn.q_proj": 2, "typo": 1}, alpha=8)
    assert not lora_modules(m)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(alpha=8, alpha_policy="linear"), "alpha_policy"),
    (dict(alpha=8, alpha_policy="constant", r_ref=4), "r_ref"),
    (dict(alpha={"model.layers.0.self_attn.q_proj": 2.0}, alpha_policy="scale"), "per-module"),
    (dict(alpha={"model.layers.0.mlp.up_proj": 2.0}), "model.layers.0"),
    (dict(alpha=8, dropout=1.0), "dropout"),
])
def test_bad_alpha_and_options(kw, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(tiny_llama(), {"model.layers.0.self_attn.q_proj": 2}, **kw)


def test_lora_twice_is_an_error():
    m = apply_lora(tiny_llama(), {"model.layers.0.self_attn.q_proj": 2}, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, {"model.layers.0.self_attn.q_proj": 2}, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Embedding(4, 4), r=1, alpha=1)


def test_new_layers_keep_the_model_mode():
    m = apply_lora(tiny_llama().eval(), {"model.layers.0.self_attn.q_proj": 2}, alpha=8, dropout=0.5)
    assert not any(mod.training for mod in m.modules())
