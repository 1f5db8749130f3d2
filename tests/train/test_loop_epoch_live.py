"""--epoch-sensitivity under --fsdp measures the live LoRA model, not a merged copy (train.EpochSensitivity): the
Hessian statistics collected with hooks on the LoRA layers equal those of lora.merged_copy on one process.

Tolerances (fp32). The two models compute each target's input X with the sums in another order
(x Wᵀ + s·(x Aᵀ) Bᵀ against x (W + s·B A)ᵀ), a few ulps per layer, which the tiny models' 2 layers carry to the mean
of squares. diag(H), diag((H + λI)⁻¹) (that rounding times the condition of H) and θ are compared within
tests.support.bounds.oracles_bound: each side's own fp32 error against the same side in float64 (the merged copy,
and the live LoRA model), measured here, added (the triangle inequality). Ranks exactly equal: θ moves by
about as much as diag(H), far from a rounding boundary of the allocation on these models (checked below: the
quotas are farther from a rounding boundary than θ's bound).
"""
from __future__ import annotations

import copy

import pytest
import torch

from slora.method import hessian
from slora.models.targets import find_linears
from slora.models.lora import LoRALinear, apply_lora, merged_copy
from slora.method.sensitivity import SensitivityConfig
from tests.support.bounds import assert_within, oracles_bound
from tests.support.tiny import compute_files
from tests.support.tiny import randomize_lora, tiny_bert, tiny_llama


def batches(vocab: int, seed: int = 0) -> list[dict]:
    """Two right-padded batches (B 3, T 9): the masked tokens must be dropped alike in both models."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in ((9, 5, 2), (7, 9, 4)):
        ids = torch.randint(3, vocab, (3, 9), generator=g)  # (B, T)
        mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def lora_model(kind: str, dropout: float):
    """A tiny model with LoRA on its attention targets (one of them at rank 0: left a plain nn.Linear), B non-zero,
    left in training mode as the loop leaves it between epochs."""
    if kind == "decoder":
        model, targets = tiny_llama(), "q_proj,k_proj,v_proj,o_proj"
    else:
        model, targets = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "query,value"
    names = list(find_linears(model, targets))
    ranks = {n: (0 if i == 1 else 1 + i % 3) for i, n in enumerate(names)}
    apply_lora(model, ranks, alpha=4.0, dropout=dropout, generator=torch.Generator().manual_seed(0))
    randomize_lora(model, seed=1, std=0.3)
    return model.train(), targets, ranks


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
@pytest.mark.parametrize("mode", ["diag", "full"])
def test_live_lora_model_statistics_equal_the_merged_copy(kind, mode):
    model, targets, ranks = lora_model(kind, dropout=0.3)
    vocab = model.config.vocab_size
    live = find_linears(model, targets)
    # the LoRA layers stand for the base linears, under the same names; their factors are no targets
    assert list(live) == list(ranks)
    assert {n for n, m in live.items() if isinstance(m, LoRALinear)} == {n for n, r in ranks.items() if r}
    merged = merged_copy(model).eval()
    want = hessian.collect(merged, batches(vocab), find_linears(merged, targets), mode=mode)
    flags = {n: m.training for n, m in model.named_modules()}
    got = hessian.collect(model, batches(vocab), live, mode=mode)
    assert {n: m.training for n, m in model.named_modules()} == flags  # dropout back on for the next epoch
    # each side in float64: the merged copy, and the live LoRA model (its dropout off, as collect turns it off)
    merged64, live64 = merged_copy(model).eval().double(), copy.deepcopy(model).double()
    want64, got64 = (hessian.collect(m, batches(vocab), find_linears(m, targets), mode=mode, dtype=torch.float64)
                     for m in (merged64, live64))
    assert got.keys() == want.keys()
    bounds = {}
    for n in want:
        assert got[n].tokens == want[n].tokens == 9 + 5 + 2 + 7 + 9 + 4
        bounds[n] = oracles_bound(got[n].diag, got64[n].diag, want[n].diag, want64[n].diag)
        assert_within(got[n].diag, want[n].diag, bounds[n], n)
        if mode == "full":
            # diag((H + λI)⁻¹), read only by the OBS source, which --fsdp refuses, and by the damping diagnostics
            assert_within(got[n].inv_diag, want[n].inv_diag,
                          oracles_bound(got[n].inv_diag, got64[n].inv_diag, want[n].inv_diag, want64[n].inv_diag), n)
    # not vacuous: LoRA moves the inputs of the later targets far beyond the bound
    plain = merged_copy_without_lora(model)
    base = hessian.collect(plain, batches(vocab), find_linears(plain, targets), mode=mode)
    assert max((base[n].diag - want[n].diag).abs().max().item() / bounds[n] for n in want) > 100


def merged_copy_without_lora(model):
    """The base model: a merged copy with every B set to 0."""
    m = merged_copy(model)
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(w[n])  # the LoRA layers' W is the base W: merged_copy keeps the names
    return m.eval()


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_live_lora_model_gives_the_merged_copy_ranks(kind):
    model, targets, _ = lora_model(kind, dropout=0.0)
    cfg = SensitivityConfig(r_avg=3)
    b = batches(model.config.vocab_size, seed=2)
    sens_m, ranks_m = compute_files(merged_copy(model).eval(), b, cfg, targets)
    sens_l, ranks_l = compute_files(model, b, cfg, targets)
    cfg64 = SensitivityConfig(r_avg=3, dtype="float64")
    sens_m64, _ = compute_files(merged_copy(model).eval().double(), b, cfg64, targets)
    sens_l64, _ = compute_files(copy.deepcopy(model).double(), b, cfg64, targets)
    assert ranks_l == ranks_m
    names = list(ranks_m)
    live, merged, live64, merged64 = ([s["modules"][n]["theta"] for n in names]
                                      for s in (sens_l, sens_m, sens_l64, sens_m64))
    assert_within(live, merged, oracles_bound(live, live64, merged, merged64), "θ")
