"""python -m slora.bench, cases 3 and 4: a LoRA training step of slora against PEFT on transformers' LLaMA, at
LLaMA-3.2-1B shape (shared whole-logits loss, no checkpointing) and at LLaMA-3.1-8B shape (bf16 base, activation
checkpointing, each library's own training loss). Same random weights' shapes, ranks (PEFT gets them through
`rank_pattern`), batch and optimizer on both sides; transformers and peft are optional (their rows say so).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slora.train import loop, memory, objective
from slora.cli.bench import peak_gb, random_llama, reset_peak, timed, transformers_llama
from slora.models.lora import apply_lora, mark_only_lora_trainable
from slora.models.targets import find_linears
from slora.method.sensitivity import SensitivityConfig, compute


# -----------------------------------------------------------------------------
# The training step

def logits_loss(model, ids):
    """Mean next-token cross-entropy from the model's whole logits (either library's model)."""
    logits = model(ids)
    out = logits.logits if hasattr(logits, "logits") else logits
    return F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))


def train_steps(model, ids, params, device, steps: int, autocast, loss_of=logits_loss, first: list | None = None
                ) -> float:
    """Mean wall seconds of one AdamW step over the batch `ids` (B, T), after two warm-up steps; `first`, a list,
    receives the first warm-up step's seconds (where a compiled model compiles)."""
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with autocast:
            loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    t = timed(step, device)  # warm-up
    if first is not None:
        first.append(t)
    step()
    return timed(step, device, repeat=steps)


def slora_loss(model, ids):
    """slora's own training loss (what `python -m slora.finetune` runs): objective.loss_sum, chunked LM head under
    activation checkpointing, over the count of target tokens."""
    batch = {"input_ids": ids, "labels": ids}
    chunk = objective.LM_CHUNK if model.model.activation_checkpointing else None
    return objective.loss_sum(model, batch, "generation", ids.device, chunk) / objective.target_count(batch, "generation")


def peft_loss(model, ids):
    """transformers' own training loss (what its Trainer runs): labels passed in, shifted inside the model."""
    return model(input_ids=ids, labels=ids).loss


# The 8B case's further slora rows, after the plain one (all layers recomputed, eager): (name, checkpointing,
# compile). Compiling is permanent for a model, so the eager rows come first.
TRAIN8B_VARIANTS = (("compile", True, True), ("auto_compile", "auto", True))


def bench_training(cfg, B, T, device, dtype, steps: int, with_peft: bool, checkpointing: bool = False,
                   prefix: str = "train", own_loss: bool = False, variants=()) -> dict:
    """One LoRA training step of slora and of PEFT on transformers' LLaMA: same shape, random weights, ranks
    (from a diag calibration on one B x T/2 batch, r_avg 8, all linear targets; PEFT gets them through
    rank_pattern), batch and optimizer. checkpointing: slora's per-layer non-reentrant checkpointing and
    transformers' gradient checkpointing (non-reentrant too). own_loss: each library computes its own training
    loss (slora's chunked LM head, transformers' `labels=`), otherwise one shared whole-logits loss.
    Keys: {prefix}_step_s_*, {prefix}_tokens_per_s_*, peak_mem_gb_{prefix}_*, {prefix}_lora_params, ..."""
    model = random_llama(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device, generator=g)
    calib = [{"input_ids": ids[:, : T // 2]}]
    ranks = compute(model, calib, find_linears(model, "all-linear"), SensitivityConfig(r_avg=8, mode="diag")).ranks
    ranks = {k: v for k, v in ranks.items() if v > 0}
    apply_lora(model, ranks, alpha=16.0, alpha_policy="scale")
    mark_only_lora_trainable(model, extra=())
    loop.set_activation_checkpointing(model, checkpointing)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    res = {f"{prefix}_shape": f"{B}x{T}", f"{prefix}_lora_params": sum(p.numel() for p in params),
           f"{prefix}_base_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
           f"{prefix}_rank_sum": sum(ranks.values()), f"{prefix}_checkpointing": checkpointing}
    loss_of = slora_loss if own_loss else logits_loss
    reset_peak(device)
    s = train_steps(model, ids, params, device, steps, autocast, loss_of)
    res.update({f"{prefix}_step_s_slora": s, f"{prefix}_tokens_per_s_slora": B * T / s,
                f"peak_mem_gb_{prefix}_slora": peak_gb(device)})
    for name, ckpt, compiled in variants:  # slora.train.memory: --activation-checkpointing auto, --compile
        key = f"{prefix}_{name}"
        try:
            if ckpt == "auto":
                loop.set_activation_checkpointing(model, True)  # the LM head and loss chunked, as the loop does
                def probe():
                    with autocast:
                        loss_of(model, ids).backward()
                res[f"{key}_plan"] = memory.plan_recompute(model, probe, device)[1]
            else:
                loop.set_activation_checkpointing(model, ckpt)
            if compiled and not res.get(f"{prefix}_compiled"):
                res[f"{prefix}_compiled"] = memory.compile_layers(model)
            reset_peak(device)
            first = []
            s = train_steps(model, ids, params, device, steps, autocast, loss_of, first)
            res.update({f"{key}_step_s_slora": s, f"{key}_tokens_per_s_slora": B * T / s,
                        f"peak_mem_gb_{key}_slora": peak_gb(device), f"{key}_first_step_s": first[0],
                        f"{key}_checkpointing": model.model.activation_checkpointing})
        except Exception as e:  # reported in the table rather than losing PEFT's row
            res[f"{key}_error"] = f"{e!r}"[:300]
    if variants:  # compiled code holds the model: without this, PEFT's peak would count slora's weights too
        torch._dynamo.reset()
    if not with_peft:
        return res
    try:
        import peft
        import transformers
    except ImportError:
        res.update({f"{prefix}_step_s_peft": None, "peft": "not installed"})
        return res
    from slora.io.adapter import adapter_config
    lcfg = adapter_config(model, "random", "CAUSAL_LM")
    del model, params
    reset_peak(device)  # frees slora's model before transformers' is built
    hf = transformers_llama(transformers.LlamaForCausalLM, cfg, device, dtype)
    if checkpointing:  # transformers >= 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
        enable = getattr(hf, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    keep = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "use_rslora",
            "bias", "task_type"}
    try:
        pm = peft.get_peft_model(hf, peft.LoraConfig(**{k: v for k, v in lcfg.items() if k in keep}))
    except Exception as e:
        res.update({f"{prefix}_step_s_peft": None, "peft": f"failed: {e!r}"[:300]})
        return res
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    res[f"{prefix}_lora_params_peft"] = sum(p.numel() for p in params)
    reset_peak(device)
    s = train_steps(pm, ids, params, device, steps, autocast, peft_loss if own_loss else logits_loss)
    res.update({f"{prefix}_step_s_peft": s, f"{prefix}_tokens_per_s_peft": B * T / s,
                f"peak_mem_gb_{prefix}_peft": peak_gb(device), "peft": peft.__version__})
    del pm, hf, params
    reset_peak(device)
    return res


# -----------------------------------------------------------------------------
# Report

def report_training(r: dict) -> list[str]:
    s, lines = r["train_step_s_slora"], []
    if s is None:
        return [f"LoRA training step: failed ({r.get('train_error')})"]
    lines.append(f"LoRA train step ({r['train_model']}, {r['train_shape']}, Σr {r['train_rank_sum']}): "
                 f"slora {s:.4f} s")
    if r.get("train_step_s_peft"):
        p = r["train_step_s_peft"]
        lines.append(f"                      PEFT {p:.4f} s   slora throughput / PEFT = {p / s:.3f}  "
                     f"(target >= 1.10)")
    else:
        lines.append(f"                      PEFT skipped ({r.get('peft')})")
    return lines


# bf16 dense tensor-core peak of the cards the bench has run on (NVIDIA's datasheets, SXM), for the share of peak
BF16_PEAK = {"H100": 989e12, "H200": 989e12}


def peak_share(r: dict, tokens_per_s: float) -> str:
    """tokens/s as a share of the card's bf16 peak, at 6 FLOPs per parameter and token (forward 2, backward 4; the
    recomputed forward is not counted as work), "" when the card's peak is not in BF16_PEAK."""
    peak = next((v for k, v in BF16_PEAK.items() if k in str(r.get("device", ""))), None)
    n = r.get("train8b_base_params")
    return f"  {6 * n * tokens_per_s / peak:.1%} of bf16 peak" if peak and n else ""


def report_train8b(r: dict) -> list[str]:
    s = r["train8b_tokens_per_s_slora"]
    if s is None:
        return [f"8B LoRA training: failed ({r.get('train8b_error')})"]
    def gb(x):
        return "n/a (CPU)" if x is None else f"{x:.2f} GB"
    p = r.get("train8b_tokens_per_s_peft")
    def vs(v):
        return f"   slora / PEFT = {v / p:.3f}" if p else ""
    lines = [f"LoRA training at {r['train8b_model']} shape ({r['train8b_shape']} tokens per step, Σr "
             f"{r['train8b_rank_sum']}, each library's own loss; targets: >= 1.5x PEFT, >= 45% of bf16 peak, "
             f"<= 18.5 GB):",
             f"  slora {s:10,.0f} tok/s   peak {gb(r['peak_mem_gb_train8b_slora'])}   eager, every layer "
             f"recomputes{vs(s)}{peak_share(r, s)}"]
    for name, _, _ in TRAIN8B_VARIANTS:
        key = f"train8b_{name}"
        if f"{key}_error" in r:
            lines.append(f"  slora, {name}: failed ({r[key + '_error']})")
        elif f"{key}_tokens_per_s_slora" in r:
            v, rec = r[f"{key}_tokens_per_s_slora"], r[f"{key}_checkpointing"]
            plan = r.get(f"{key}_plan")
            how = "every layer recomputes" if rec is True else \
                f"auto: {rec} of {plan['layers']} layers recompute" if plan else f"{rec} layers recompute"
            lines.append(f"  slora {v:10,.0f} tok/s   peak {gb(r['peak_mem_gb_' + key + '_slora'])}   compiled "
                         f"layers (first step {r[key + '_first_step_s']:.1f} s), {how}{vs(v)}{peak_share(r, v)}")
    if p:
        lines.append(f"  PEFT  {p:10,.0f} tok/s   peak {gb(r['peak_mem_gb_train8b_peft'])}   gradient "
                     f"checkpointing{peak_share(r, p)}")
        if r.get("peak_mem_gb_train8b_peft_note"):  # a recorded caveat on that peak
            lines.append(f"        (PEFT's peak: {r['peak_mem_gb_train8b_peft_note']})")
    else:
        lines.append(f"  PEFT  skipped ({r.get('peft')})")
    return lines
