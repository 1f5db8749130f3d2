"""The host-overhead cuts of the NLG path (fewer dispatched ops per step) give the same bits on the CPU as the code before them, and
remove what they claim to remove (slora/cli/bench_overhead.py measures how much).

The code before is frozen here (copied from commit a3834e6): LoRALinear.forward, LlamaRMSNorm.forward,
rotate_half / apply_rope and LlamaModel.forward. Each comparison runs the same seeded model twice, once with the
current code and once with the frozen functions patched in, and asks for torch.equal: the cuts only leave out
dispatched ops that did nothing (same-dtype casts, eval-mode dropout, chunk's extra views) or reshape where
F.linear reshaped inside, so no tolerance is stated because none is needed.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from slora.cli import bench_overhead
from slora.data import text
from slora.train import objective
from slora.models.lora import LoRALinear, apply_lora, mark_only_lora_trainable
from slora.models import llama
from tests.support.tiny import tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# -----------------------------------------------------------------------------
# The code before the cuts (a3834e6), frozen

def old_lora_forward(self, x):
    y = F.linear(x, self.weight, self.bias)  # (B, T, d_out)
    if self.merged:
        if self.training:
            raise RuntimeError("merged")
        return y
    A = self.lora_A.weight.to(x.dtype)  # (r, d_in)
    B = self.lora_B.weight.to(x.dtype)  # (d_out, r)
    h = F.linear(self.lora_dropout(x), A) * self.scaling  # (B, T, r)
    return torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), B.T).view(y.shape)


def old_rmsnorm_forward(self, x):
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x.to(dtype)


def old_rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def old_apply_rope(x, cos, sin):
    return x * cos[:, None] + old_rotate_half(x) * sin[:, None]


def old_model_forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, padded=None):
    # `padded` is accepted and ignored: the old model always asked the mask itself
    past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
    x, cos, sin, mask = self.prepare(input_ids, attention_mask, position_ids, past)
    cos, sin = cos[:, 0], sin[:, 0]  # (B, T, hs), as the old prepare returned them (the new one adds the head axis)
    for i, layer in enumerate(self.layers):
        x = layer(x, cos, sin, mask, None if cache is None else cache[i])
    return self.norm(x)


def use_old_code(monkeypatch):
    monkeypatch.setattr(LoRALinear, "forward", old_lora_forward)
    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", old_rmsnorm_forward)
    monkeypatch.setattr(llama, "apply_rope", old_apply_rope)
    monkeypatch.setattr(llama, "rotate_half", old_rotate_half)
    monkeypatch.setattr(llama.LlamaModel, "forward", old_model_forward)


# -----------------------------------------------------------------------------
# Same bits

def lora_llama(dtype=torch.float32, dropout=0.1, **kw):
    """A tiny LLaMA (GQA, 2 layers) with LoRA on every linear layer, nonzero B; a bf16 base keeps fp32 factors."""
    model = tiny_llama(seed=3, **kw).to(dtype)
    names = [n for n, _ in model.named_modules() if n.endswith(TARGETS)]
    apply_lora(model, {n: 2 for n in names}, 8.0, dropout=dropout, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return mark_only_lora_trainable(model, extra=())


def padded_batch(B=3, T=10, vocab=61):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, text.IGNORE_INDEX)
    labels[:, :3] = text.IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_and_generate(dtype, sparse, batch):
    """Loss and LoRA gradients of two training steps (dropout on, reseeded), then eval logits and greedy tokens."""
    model = lora_llama(dtype)
    out = []
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(2):
        model.train()
        torch.manual_seed(10 + step)  # the dropout masks
        loss = objective.loss_sum(model, batch, "generation", "cpu", target_rows=sparse)
        loss.backward()
        out += [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        out.append(model(batch["input_ids"], batch["attention_mask"]))  # (B, T, V), padded mask path
        out.append(model(batch["input_ids"]))  # causal path
        prompt = batch["input_ids"].flip(1)  # left padding from the right-padded mask
        out.append(model.generate(prompt, batch["attention_mask"].flip(1), max_new_tokens=9, eos_token_id=-1))
    return out


@pytest.mark.parametrize("dtype,sparse", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
@pytest.mark.parametrize("full", [False, True], ids=["padded", "unpadded"])
def test_training_and_generation_are_bit_identical_to_the_old_code(dtype, sparse, full, monkeypatch):
    batch = padded_batch()
    if full:
        batch["attention_mask"].fill_(1)
    new = train_and_generate(dtype, sparse, batch)
    use_old_code(monkeypatch)
    old = train_and_generate(dtype, sparse, batch)
    assert len(new) == len(old) > 10
    for i, (a, b) in enumerate(zip(new, old)):
        assert a.dtype == b.dtype and torch.equal(a, b), f"output {i} differs"
    assert new[-1].shape[1] == 10 + 9


def test_lora_linear_with_bias_and_merged_is_bit_identical_to_the_old_code(monkeypatch):
    def run():  # a fresh layer each time: merge + unmerge leaves W changed in the last bits
        g = torch.Generator().manual_seed(5)
        base = nn.Linear(12, 7)
        nn.init.normal_(base.weight, generator=g)
        nn.init.normal_(base.bias, generator=g)
        layer = LoRALinear(base, 3, 6.0, dropout=0.2, generator=g)
        nn.init.normal_(layer.lora_B.weight, generator=g)
        x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
        res = []
        for mode in (True, False):
            layer.train(mode)
            torch.manual_seed(0)
            y = layer(x)
            y.square().sum().backward()
            res += [y.detach(), x.grad.clone(), layer.lora_A.weight.grad.clone()]
            x.grad, layer.lora_A.weight.grad = None, None
        layer.eval()
        with torch.no_grad():
            res.append(layer(x))  # no autograd: the 2-D branch
            res.append(layer.merge()(x))
        layer.unmerge()
        return res
    new = run()
    monkeypatch.setattr(LoRALinear, "forward", old_lora_forward)
    old = run()
    for i, (a, b) in enumerate(zip(new, old)):
        assert torch.equal(a, b), f"output {i} differs"


def test_apply_rope_takes_three_and_four_dimensional_tables():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 8, generator=g)  # (B, H, T, hs)
    cos, sin = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)  # (B, T, hs)
    want = old_apply_rope(x, cos, sin)
    assert torch.equal(llama.apply_rope(x, cos, sin), want)
    assert torch.equal(llama.apply_rope(x, cos[:, None], sin[:, None]), want)


# -----------------------------------------------------------------------------
# What was removed is gone

def ops_of(fn):
    return bench_overhead.aten_ops(fn)


def test_eval_mode_lora_calls_no_dropout_and_no_cast():
    layer = LoRALinear(nn.Linear(8, 8), 2, 4.0, dropout=0.1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        layer.train()
        train_ops = ops_of(lambda: layer(x))
        layer.eval()
        eval_ops = ops_of(lambda: layer(x))
        old_ops = ops_of(lambda: old_lora_forward(layer, x))
    assert train_ops["aten::dropout"] == 1 and old_ops["aten::dropout"] == 1  # the check can see a dropout call
    assert eval_ops["aten::dropout"] == 0
    assert old_ops["aten::to"] - eval_ops["aten::to"] == 2  # A and B are no longer "cast" to their own dtype
    assert sum(eval_ops.values()) < sum(old_ops.values())


def host_reads(fn):
    """Host reads of a tensor value (bool(t), .item()): each is an aten::_local_scalar_dense call."""
    return ops_of(fn)["aten::_local_scalar_dense"]


def test_padded_hint_removes_the_host_read_of_the_mask():
    model = tiny_llama(seed=0)
    batch = padded_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        assert host_reads(lambda: model(ids, mask)) >= 1  # asked of the mask itself
        assert host_reads(lambda: model(ids, mask, padded=True)) == 0
        assert torch.equal(model(ids, mask, padded=True), model(ids, mask))
        full = torch.ones_like(mask)
        assert host_reads(lambda: model(ids, full, padded=False)) == 0
        assert torch.equal(model(ids, full, padded=False), model(ids))  # SDPA's causal path, as before


@pytest.mark.parametrize("full", [False, True])
def test_loss_sum_tells_the_model_whether_the_batch_is_padded(full, monkeypatch):
    model = tiny_llama(seed=0)
    batch = padded_batch()
    if full:
        batch["attention_mask"].fill_(1)
    seen = []
    real = llama.LlamaForCausalLM.forward
    monkeypatch.setattr(llama.LlamaForCausalLM, "forward",
                        lambda self, *a, **kw: seen.append(kw.get("padded")) or real(self, *a, **kw))
    objective.loss_sum(model, batch, "generation", "cpu")
    assert seen == [not full]


def test_bench_overhead_counts_a_training_step():
    model = bench_overhead.build()
    step = bench_overhead.train_step_fn(model, bench_overhead.lm_batch())
    step()
    ops = ops_of(step)
    # 30 layers: every layer's four LoRA calls each run two GEMMs and an addmm forward
    assert ops["aten::addmm"] >= 30 * 4 and sum(ops.values()) > 1000
