"""slora.train.memory and models.recompute: partial activation checkpointing, its planning and regional compilation.

Recomputing a layer replays the same kernels on the same inputs, so on the CPU the gradients of any recompute count
equal those of none bit for bit; the compiled layers' rounding differs from eager (fused elementwise ops), so they
are compared within each side's float64-oracle error (tests/support/bounds.py)."""
from __future__ import annotations

import pytest
import torch

from slora.models.lora import apply_lora, mark_only_lora_trainable
from slora.train import loop, memory
from tests.support.tiny import randomize_lora, tiny_bert, tiny_llama


def lora_llama(seed=0):
    m = tiny_llama(seed)
    names = [n for n, mod in m.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    apply_lora(m, {n: 2 for n in names}, alpha=4.0)
    mark_only_lora_trainable(m, extra=())
    return randomize_lora(m, seed=seed + 1, std=0.1).train()  # B = 0 would leave A without gradient


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("setting", [True, 1, 0, False])
def test_partial_recompute_gradients_bit_identical(setting):
    model = lora_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    ref = lora_grads(model, ids)
    assert loop.set_activation_checkpointing(model, setting) == 1
    got = lora_grads(model, ids)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_set_activation_checkpointing_rejects_other_values():
    with pytest.raises(ValueError, match="count of layers"):
        loop.set_activation_checkpointing(tiny_llama(), "auto")
    with pytest.raises(ValueError, match="count of layers"):
        loop.set_activation_checkpointing(tiny_llama(), -1)


def test_stack_layers_of_each_family():
    llama = tiny_llama()
    assert memory.stack_layers(llama.model) is llama.model.layers
    bert = tiny_bert()
    (stack,) = memory.layer_stacks(bert)
    assert memory.stack_layers(stack) is bert.encoder.layer


def test_saved_bytes_counts_one_layers_saved_activations():
    """The counter sees what the layer saves for its backward: at least its input, and more for a longer batch
    (the saved tensors grow with B·T), and nothing from the other layers."""
    model = lora_llama()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    layer = model.model.layers[-1]
    sizes = []
    for T in (8, 16):
        with memory.SavedBytes(layer) as kept:
            lora_grads(model, ids.repeat(1, T // 8))
        sizes.append(kept.bytes)
    D = model.config.hidden_size
    assert sizes[0] >= 2 * 8 * D * 4  # the layer's fp32 input (B, T, D) at least
    assert sizes[1] > sizes[0]
    assert not layer._forward_hooks and not layer._forward_pre_hooks  # the hooks are removed on exit


def test_plan_recompute_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        memory.plan_recompute(tiny_llama(), lambda: None, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_plan_recompute_fits_the_budget_on_cuda():
    """With a budget of the measured one-kept peak plus k layers' activations, k + 1 layers keep theirs; a budget
    below the peak recomputes every layer; a large one none. The step's gradients are thrown away."""
    device = torch.device("cuda")
    model = lora_llama().to(device)
    L = len(model.model.layers)
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device=device)
    step = lambda: lora_grads(model, ids)  # noqa: E731
    n, seen = memory.plan_recompute(model, step, device, budget_bytes=10 ** 12)
    assert n == 0 and model.model.activation_checkpointing == 0
    assert all(p.grad is None for p in model.parameters())
    n, seen = memory.plan_recompute(model, step, device, budget_bytes=1)
    assert n == L and model.model.activation_checkpointing == L
    per = seen["layer_activations_gb"] * 1e9
    budget = int(seen["peak_one_kept_gb"] * 1e9 + 0.5 * per)
    n, _ = memory.plan_recompute(model, step, device, budget_bytes=budget)
    assert n == L - 1


def test_compile_refuses_a_cpu_model():
    with pytest.raises(ValueError, match="CUDA"):
        memory.compile_layers(tiny_llama())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_layers_match_eager_within_rounding():
    """Compiled layers' LoRA gradients against eager fp32 on CUDA (TF32 off), each side within its error against a
    float64 oracle (the eager model in float64): |compiled - eager| <= err(compiled) + err(eager), the errors
    measured (bounds.oracles_bound). The bound only excuses rounding: a wrong fusion is off by far more."""
    from tests.support.bounds import oracles_bound
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager = lora_llama().cuda()
    ids = torch.randint(0, eager.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5)).cuda()
    oracle = lora_llama().double().cuda()
    compiled = lora_llama().cuda()
    assert memory.compile_layers(compiled) == len(compiled.model.layers)
    g64, ge, gc = lora_grads(oracle, ids), lora_grads(eager, ids), lora_grads(compiled, ids)
    for k in g64:
        assert not gc[k].isnan().any(), k
        bound = oracles_bound(ge[k], g64[k], gc[k], g64[k])
        assert (ge[k].double() - gc[k].double()).abs().max() <= bound, k
