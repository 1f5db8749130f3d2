"""python -m slora.bench_overhead: the host-side cost of one SmolLM2 LoRA training step and one greedy decoding
step, where the compute is negligible (the NLG path on a GPU is host-bound).

On the H200 the NLG path trains at ~310 ms per optimizer step and decodes at ~120 ms per token for a 135M model:
numbers set by the host (Python, dispatcher, small ops, host reads), not by the GPU. Those costs do not depend on
the width of the model, so they are measured here on the CPU with SmolLM2-135M's structure (30 layers, 9 query
heads over 3 key/value heads, tied embeddings, LoRA on q,k,v,o) at a tiny width and tiny inputs:
  - aten ops per optimizer step (forward, backward, clipping, AdamW) and per decoding step, counted with
    torch.profiler (every aten:: event, nested ones included, as the profiler's key_averages counts them);
  - ops per call of each block (LoRA linear, attention, RMSNorm, MLP, rotary tables, the 4-D mask);
  - host milliseconds per step (median of repeats; on 2 shared cores this is noisy, the op counts are not).
The training step goes through slora.train's own backward_step (objective), clipping and optimizer; decoding through
LlamaForCausalLM.generate (ops per step = the difference between two generation lengths, over the extra tokens).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from slora.train import divergence, loop, objective
from slora.data import text
from slora.models.lora import apply_lora, mark_only_lora_trainable, merged_copy
from slora.models.llama import LlamaConfig, LlamaForCausalLM, attention_mask_4d, rope_cos_sin

# SmolLM2-135M's structure (~/.cache/slora/models/smollm2-135m/config.json) at a width where compute is negligible:
# 30 layers, H 9, Hkv 3, tied embeddings; D 36 (hs 4), F 64, V 256 instead of 576, 1536, 49152
SMOL_TINY = dict(hidden_size=36, intermediate_size=64, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=4, vocab_size=256, rope_theta=100000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(seed: int = 0, dropout: float = 0.1) -> LlamaForCausalLM:
    """The tiny SmolLM2-shaped model with LoRA r 2 on q,k,v,o (finetune's default dropout 0.1), only LoRA trainable."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOL_TINY))
    model.tie_weights()
    names = [n for n, _ in model.named_modules() if n.endswith(TARGETS)]
    apply_lora(model, {n: 2 for n in names}, 16, dropout=dropout, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B != 0, so the LoRA branch is not a sum of zeros
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return mark_only_lora_trainable(model, extra=())


def lm_batch(B: int = 2, T: int = 8, pad: int = 2) -> dict:
    """A right-padded LM batch on the CPU: row 0 full, the others `pad` positions shorter; targets on the 2nd half."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SMOL_TINY["vocab_size"], (B, T), generator=g)  # (B, T)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1:, T - pad:] = 0
    labels = ids.masked_fill(mask == 0, text.IGNORE_INDEX)
    labels[:, : T // 2] = text.IGNORE_INDEX  # prompt positions carry no target
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_step_fn(model, batch: dict, sparse: bool = True):
    """One optimizer step of the new NLG path (fused AdamW, device-side finite check, sparse LM head) as slora.train
    runs it: backward_step, clip_grad_norm_, DeviceFiniteCheck.record, opt.step, zero_grad."""
    cfg = loop.TrainConfig(lr=1e-3, fused_optim=True)  # the new NLG path's --fused-optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_optimizer(params, cfg)
    lazy = divergence.DeviceFiniteCheck()
    autocast = torch.autocast("cpu", enabled=False)

    def step():
        model.train()
        loss = objective.backward_step(model, [(batch, 1.0)], "generation", "cpu", autocast, None, sparse)
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        lazy.record(1, loss, norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def aten_ops(fn, reps: int = 1) -> Counter:
    """Counter of aten:: op names called by fn() (nested calls included), summed over `reps` calls."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    return Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})


def host_ms(fn, reps: int = 20, warm: int = 3) -> float:
    """Median wall milliseconds of fn() on the CPU (the compute at these sizes is a small part of it)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def block_ops(model) -> dict:
    """aten ops per forward call of each block of layer 0, in training mode (dropout and autograd on) and in eval
    mode (no autograd), at B 2 x T 8."""
    layer = model.model.layers[0]
    x = torch.randn(2, 8, SMOL_TINY["hidden_size"])  # (B, T, D)
    pos = torch.arange(8).expand(2, 8)
    cos, sin = rope_cos_sin(model.config, pos, x.dtype)
    amask = torch.ones(2, 8, dtype=torch.long)
    amask[1, 6:] = 0
    mask = attention_mask_4d(amask, 8, 8, "cpu")
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        # training: autograd on and an input that needs a gradient, as every layer's but the first has
        x.requires_grad_(mode == "train")
        with torch.set_grad_enabled(mode == "train"):
            calls = {"lora_linear": lambda: layer.self_attn.q_proj(x),
                     "attention_padded": lambda: layer.self_attn(x, cos, sin, mask),
                     "attention_causal": lambda: layer.self_attn(x, cos, sin, None),
                     "rmsnorm": lambda: layer.input_layernorm(x), "mlp": lambda: layer.mlp(x)}
            out |= {f"{k}_{mode}": sum(aten_ops(f).values()) for k, f in calls.items()}
    out["rope_tables"] = sum(aten_ops(lambda: rope_cos_sin(model.config, pos, x.dtype)).values())
    out["mask_4d_padded"] = sum(aten_ops(lambda: attention_mask_4d(amask, 8, 8, "cpu")).values())
    out["mask_4d_decode"] = sum(aten_ops(lambda: attention_mask_4d(torch.ones(2, 20, dtype=torch.long), 1, 20,
                                                                   "cpu")).values())
    return out


def train_phase_ops(model, batch: dict) -> dict:
    """aten ops of one training step by phase: forward (loss), backward, clipping, fused AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = loop.make_optimizer(params, loop.TrainConfig(lr=1e-3, fused_optim=True))
    held = {}

    def fwd():
        held["loss"] = objective.loss_sum(model, batch, "generation", "cpu", None, True)
    model.train()
    fwd(), held["loss"].backward(), opt.step()  # optimizer state exists from here on
    out = {"forward": aten_ops(fwd), "backward": aten_ops(lambda: held["loss"].backward()),
           "clip": aten_ops(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)), "adamw": aten_ops(opt.step)}
    opt.zero_grad(set_to_none=True)
    return {k: sum(v.values()) for k, v in out.items()}


def decode_step_ops(model, ids, mask, new: tuple[int, int]) -> tuple[float, list]:
    """aten ops per decoding step: the difference of two generation lengths over the extra tokens."""
    gens = [lambda n=n: model.generate(ids, mask, max_new_tokens=n, eos_token_id=-1) for n in new]
    ops = [aten_ops(f) for f in gens]
    return (sum(ops[1].values()) - sum(ops[0].values())) / (new[1] - new[0]), ops


def measure(reps: int = 20, gen_batch: int = 4, prompt: int = 8, new: tuple[int, int] = (8, 24)) -> dict:
    """The report: ops and host ms per training step and per decoding step, ops per block call, top ops."""
    model = build()
    step = train_step_fn(model, lm_batch())
    step()  # the optimizer's state exists from here on: every later step is the same
    train_ops = aten_ops(step)
    res = {"train_step_aten_ops": sum(train_ops.values()), "train_step_host_ms": host_ms(step, reps),
           "train_step_phase_ops": train_phase_ops(build(), lm_batch())}
    model.eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, SMOL_TINY["vocab_size"], (gen_batch, prompt), generator=g)  # (B, T)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # left padding on every row but the first, as evaluation batches have
    gens = [lambda n=n: model.generate(ids, mask, max_new_tokens=n, eos_token_id=-1) for n in new]
    per = new[1] - new[0]
    res["decode_step_aten_ops"], ops = decode_step_ops(model, ids, mask, new)
    # for comparison only: the same decoding with the adapters merged into W (lora.merged_copy), a plain model;
    # not what evaluation runs (merging rounds W + s·B A differently from the unmerged sum)
    res["decode_step_aten_ops_if_merged"] = decode_step_ops(merged_copy(model).eval(), ids, mask, new)[0]
    ms = [host_ms(f, max(3, reps // 4)) for f in gens]
    res["decode_step_host_ms"] = (ms[1] - ms[0]) / per
    res["prefill_plus_8_tokens_host_ms"] = ms[0]
    res["per_block_ops"] = block_ops(model)
    res["train_step_top_ops"] = dict(train_ops.most_common(12))
    res["decode_step_top_ops"] = {k: (ops[1][k] - ops[0][k]) / per for k, _ in (ops[1] - ops[0]).most_common(12)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20, help="timed repeats per measurement (median reported)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = measure(args.reps)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res
