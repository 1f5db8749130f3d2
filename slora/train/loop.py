"""The LoRA training loop of `python -m slora.finetune`, written flat as nanoGPT's train.py: AdamW, linear warmup
and decay, gradient accumulation, clipping, evaluation after every epoch, and resume points.

slora.cli.finetune owns the CLI, the run folder and the order of the stages; this module owns what happens between
"ranks allocated" and "final scores", and takes its settings as a TrainConfig, never the command line. References: Hu et al. 2021 (LoRA, the schedule), torchtune
`recipes/lora_finetune_single_device.py` and `training/_grad_scaler.py` (loss normalised by the number of target
tokens of the whole optimizer step), nanoGPT `train.py` (the shape of the loop).

Loss normalisation: slora.train.objective (the loss of a step over its target count).

Data order. Optimizer steps never span an epoch: the last step of an epoch takes the micro-batches that are left
(fewer than --grad-accum when they do not divide evenly), and the count normalisation weighs it correctly. With
--grad-accum 1 this is the same schedule as before. Each epoch's order comes from a generator of its own, seeded
from --seed alone (`data_order_seed`), not from the LoRA-init stream: two allocations of one seed see the same
batches in the same order. --group-by-length draws its batches of similar length from that generator
(text.grouped_order), so resume and torchrun's contiguous rows work unchanged.

Host reads. On a GPU, every read of a device value by the host (`.item()`, `bool(t)`, a copy from pageable memory)
waits until the device has finished its queue, and a small model's step is short enough for those waits to
matter. Batches go to the device through pinned memory (`to_device`, same bits). `--check-finite log` keeps the
per-step non-finite check on the device (DeviceFiniteCheck) and `--fused-optim` takes one fused AdamW kernel;
both are off by default, so the default run reads the loss and gradient norm after every step, as before.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from slora.data import text
from slora.dist import process_group, data_parallel, sharded_load
from slora.train import memory
from slora.train.divergence import DeviceFiniteCheck, check_finite, skip_flag
from slora.models.lora import apply_lora, lora_parameters_count, mark_only_lora_trainable, merged_copy
from slora.method.stability import stability
from slora.train.evaluation import evaluate
from slora.train.objective import LM_CHUNK, backward_step, global_loss


# -----------------------------------------------------------------------------
# Loss and evaluation


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then linear decay to 0 at `total` (LoRA paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class EpochSensitivity:
    """θ and ranks re-measured on the fine-tuned weights after each epoch, against epoch 0 (paper Table 6).

    `measure(model)` is the run's own calibration + metrics + allocation. The Hessians must see the fine-tuned
    layer inputs X. One process and DDP: `measure` gets a merged copy (LoRA folded into W, lora.merged_copy), as
    the recorded runs did. --fsdp (shardload): FSDP2 refuses a deepcopy, and a whole copy is what --fsdp avoids,
    so `measure` gets the live sharded model, which calibration puts in eval mode (LoRA dropout off) under
    no_grad; its forwards go through FSDP2's units and the hooks sit on the LoRA layers (hessian.find_linears names
    them as the base linears). Their input equals the merged model's up to rounding: x Wᵀ + s·(x Aᵀ) Bᵀ against
    x (W + s·B A)ᵀ differ only in the order of the sums (tests/train/test_loop_epoch_live.py). Nothing else of the copy was
    used: the statistics read X alone, and the one metric source that reads W (obs) is refused under --fsdp. No
    RNG is drawn either way (dropout is off in eval mode)."""

    def __init__(self, measure, sens: dict, ranks: dict):
        self.measure = measure
        self.epochs = [self._entry(0, sens, ranks)]

    @staticmethod
    def _entry(epoch: int, sens: dict, ranks: dict) -> dict:
        return {"epoch": epoch, "theta": {k: v["theta"] for k, v in sens["modules"].items()}, "ranks": dict(ranks)}

    def __call__(self, model, epoch: int) -> dict:
        """Measure after `epoch`; return {"tau_theta", "tau_ranks"} against epoch 0 (Kendall's τ-b)."""
        t0 = time.time()
        sens, ranks = self.measure(model if sharded_load.is_sharded(model) else merged_copy(model).eval())
        self.epochs.append(self._entry(epoch, sens, ranks) | {"seconds": time.time() - t0})
        tau = stability(self.epochs[0], self.epochs[-1])
        return {"tau_theta": tau["tau_theta"], "tau_ranks": tau["tau_ranks"]}


def set_activation_checkpointing(model, on: bool | int = True) -> int:
    """Switch per-layer activation checkpointing on every layer stack of `model` that offers it (the
    `activation_checkpointing` setting of LlamaModel, BertEncoder and MPNetEncoder): True every layer, False none,
    an int the first n (models.recompute); returns how many stacks were switched."""
    if not isinstance(on, (bool, int)) or on < 0:
        raise ValueError(f"activation checkpointing is True, False or a count of layers >= 0, got {on!r}")
    stacks = memory.layer_stacks(model)
    if on and not stacks:
        raise ValueError(f"{type(model).__name__} has no layer stack that supports activation checkpointing")
    for m in stacks:
        m.activation_checkpointing = on
    return len(stacks)


# -----------------------------------------------------------------------------
# Settings

DATA_ORDER_STREAM = 1  # the second entropy word of the data-order seed (data_order_seed)

@dataclass
class TrainConfig:
    """Everything the loop and the evaluation read; slora.cli.finetune fills it from the flags of the same names."""
    # LoRA (Hu et al. 2021)
    lora_alpha: float = 8.0  # α: scaling α/r at r_avg (--lora-alpha; the command's default is 2·r_avg)
    alpha_policy: str = "scale"  # α for unequal ranks: scale (α·r/r_avg), constant, rslora (models.lora)
    lora_dropout: float = 0.1  # dropout probability on the LoRA input
    # optimisation: AdamW, linear warmup then linear decay, clipping
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup: float = 0.06  # warmup steps as a fraction of all steps
    grad_clip: float = 1.0  # max global L2 norm of the gradient (0: off)
    fused_optim: bool = False  # one fused AdamW kernel; skips a non-finite step on the device
    epochs: float = 1.0  # passes over the training set (may be fractional)
    max_steps: int | None = None  # stop after this many optimizer steps
    batch_size: int = 32  # sequences per micro-batch (per rank under torchrun)
    grad_accum: int = 1  # micro-batches per optimizer step
    group_by_length: bool = False  # batches of similar length (text.grouped_order), evaluation sorted by length
    seed: int = 0  # LoRA init and data order; dropout (seed + rank under torchrun)
    # memory and host reads
    activation_checkpointing: bool | int | str = False  # True, a count of layers or "auto" (train.memory); with
    # any of them the LM head and loss also run in chunks of LM_CHUNK
    compile: bool = False  # torch.compile each transformer layer (train.memory.compile_layers)
    sparse_lm_head: bool = False  # causal LM: LM head and loss only at target positions (objective.lm_loss_sum)
    check_finite: str = "step"  # when the host checks loss and norm: "step" (every step) or "log" (at log steps)
    # evaluation
    max_len: int = 128  # tokens per sequence
    eval_batch_size: int | None = None  # sequences per evaluation batch (default batch_size)
    gen_tokens: int = 24  # max new tokens per generated answer
    fast_generate: bool = False  # generation with adapters merged, a preallocated cache and CUDA graphs (models.decode)
    # torchrun and bookkeeping
    fsdp: bool = False  # the model is sharded with FSDP2 (evaluation then keeps every rank's forwards in step)
    log_every: int = 10  # a progress line every this many steps


# -----------------------------------------------------------------------------
# The loop

@dataclass
class TrainState:
    """Where the loop stands between optimizer steps: everything a resume point holds besides tensors."""
    step: int = 0            # optimizer steps done
    epoch: int = 0           # epoch in progress (0-based)
    batch: int = 0           # micro-batches of that epoch already used
    tokens: int = 0          # non-pad input tokens seen (for tokens/s)
    history: list = field(default_factory=list)  # per-epoch eval records, as logged
    data_rng: torch.Tensor | None = None  # the data-order generator's state at the start of `epoch`


def data_order_seed(seed: int) -> int:
    """The seed of the data-order stream: a 64-bit value mixed from `seed` alone (numpy's SeedSequence), independent
    of the LoRA-init stream that `seed` itself seeds."""
    return int(np.random.SeedSequence([seed, DATA_ORDER_STREAM]).generate_state(1, dtype=np.uint64)[0])


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; with --fused-optim the fused implementation: one kernel for all parameters, where the default
    (foreach on CUDA, a loop over tensors on CPU) launches several per parameter group, which matters for LoRA's
    many small tensors (two per adapted matrix). A different summation order: results differ in the last bits."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **({"fused": True} if cfg.fused_optim else {}))


def finetune(model, tok, spec, train, evals, cfg: TrainConfig, pad_id, device, autocast, log, ranks, tracker=None,
             checkpoint=None) -> tuple[dict, torch.nn.Module]:
    """Apply LoRA with the allocated ranks, train with AdamW, evaluate every epoch (and re-measure the sensitivity
    with `tracker`, an EpochSensitivity). Returns (metrics.json content, the trained model): `model` itself, or
    under a sharded load (slora.dist.sharded_load) the new sharded model that holds the LoRA factors.

    `checkpoint` (a slora.train.resume.Checkpointer, or None) writes a resume point at the steps it is due and,
    when it holds one, restores the loop from it before the first step."""
    g = torch.Generator().manual_seed(cfg.seed)  # LoRA init
    # the data order of every epoch: a stream of its own, derived from the seed alone, so that every allocation
    # (whose LoRA init draws a different number of values from g) sees the same batches for a seed
    order = torch.Generator().manual_seed(data_order_seed(cfg.seed))

    def add_lora(m):
        apply_lora(m, ranks, cfg.lora_alpha, alpha_policy=cfg.alpha_policy, dropout=cfg.lora_dropout,
                   generator=g)
        mark_only_lora_trainable(m, extra=("classifier",) if spec.kind != "generation" else ())

    if sharded_load.is_sharded(model):  # --fsdp under torchrun: a new sharded model with LoRA in its layers' units
        model = fwd = sharded_load.with_lora(model, add_lora)
    else:
        add_lora(model)
        # DDP, FSDP2 or the model itself; before `params`: fully_shard replaces parameters by sharded ones
        fwd = data_parallel.wrap(model, cfg.fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_lora = lora_parameters_count(model)

    if spec.kind == "generation":
        feats = text.encode_lm(tok, train, cfg.max_len, eos_id=model.config.eos_token_id)
    else:
        feats = text.encode_encoder(tok, train, cfg.max_len)
    if not feats:
        raise ValueError("no training examples: the training split is empty")
    world = process_group.get().world
    # torchrun: a global micro-batch holds world·batch-size sequences in the order of one process, and each rank
    # trains on its contiguous rows of it (data_parallel.local_rows): N ranks at b follow one process at N·b
    global_batch = cfg.batch_size * world
    per_epoch = math.ceil(len(feats) / global_batch)  # micro-batches per epoch
    steps_per_epoch = math.ceil(per_epoch / cfg.grad_accum)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    warmup = max(1, round(cfg.warmup * total))
    opt = make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup))
    if world > 1:  # dropout differs per rank (torchtune training/seed.py); the LoRA init above did not
        torch.manual_seed(cfg.seed + process_group.get().rank)
    # with activation checkpointing the LM head and loss run in chunks too (their logits are the largest tensors),
    # inside the model's forward: under torchrun too
    lm_chunk = LM_CHUNK if cfg.activation_checkpointing else None
    if cfg.activation_checkpointing == "auto":  # measured on the longest micro-batch, before compiling
        longest = sorted(feats, key=lambda f: len(f.input_ids), reverse=True)[:cfg.batch_size]
        probe = text.collate(longest, pad_id)
        recompute, seen = memory.plan_recompute(
            model, lambda: backward_step(fwd, [(probe, 1.0)], spec.kind, device, autocast, lm_chunk,
                                         cfg.sparse_lm_head), device)
        log("memory", f"activation checkpointing auto: {recompute} of {seen['layers']} layers recompute (one layer "
            f"keeps {seen['layer_activations_gb']:.2f} GB; a step with one kept peaks at "
            f"{seen['peak_one_kept_gb']:.2f} GB of a {seen['budget_gb']:.1f} GB budget)", **seen)
    if cfg.compile:
        memory.compile_layers(model)
    state = TrainState()
    lazy = DeviceFiniteCheck() if cfg.check_finite == "log" else None
    if checkpoint is not None and checkpoint.exists():
        state = checkpoint.restore(model, opt, sched, device)
        log("resume", f"resumed at step {state.step}/{total} (epoch {state.epoch + 1}, micro-batch {state.batch})",
            step=state.step, epoch=state.epoch, batch=state.batch)
    else:
        log("train", f"training {n_train:,} parameters ({n_lora:,} LoRA) for {total} steps"
            + (f" on {world} ranks ({'FSDP2' if cfg.fsdp else 'DDP'})" if world > 1 else ""), trainable=n_train,
            lora=n_lora, steps=total, world_size=world, global_batch=global_batch * cfg.grad_accum)

    t_start, t_eval = time.time(), 0.0
    tokens0 = data_parallel.global_count(state.tokens)  # the whole job's tokens before this process's run (a resume)
    while state.step < total:
        model.train()
        if state.batch == 0:
            state.data_rng = order.get_state()  # the epoch's order is drawn next, from here
        else:
            order.set_state(state.data_rng)  # resumed mid-epoch: draw the same order again, skip what was used
        batches = map(data_parallel.local_rows, text.iterate_batches(feats, global_batch, pad_id, generator=order,
                                                                group_by_length=cfg.group_by_length))
        for _ in islice(batches, state.batch):
            pass
        while state.batch < per_epoch and state.step < total:
            group = list(islice(batches, cfg.grad_accum))
            step_loss = backward_step(fwd, group, spec.kind, device, autocast, lm_chunk, cfg.sparse_lm_head)
            state.tokens += sum(int(b["attention_mask"].sum()) for b, w in group if w)
            state.batch += len(group)
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if hasattr(norm, "full_tensor") and (lazy is not None or cfg.fused_optim):
                norm = norm.full_tensor()  # FSDP2 gives a DTensor; the device-side checks need a plain tensor
            if lazy is None:
                step_loss = global_loss(step_loss)
                check_finite(state.step + 1, step_loss, norm.item(), cfg)
            else:
                lazy.record(state.step + 1, step_loss, norm)
            if cfg.fused_optim:
                opt.found_inf = skip_flag(norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            if state.step % cfg.log_every == 0 or state.step == total:
                if lazy is not None:  # the host reads the loss here anyway: check every step since the last one
                    lazy.raise_if_bad(cfg)
                    step_loss = global_loss(step_loss)
                el = time.time() - t_start - t_eval
                seen = data_parallel.global_count(state.tokens)  # all ranks: the whole job's non-pad input tokens
                done = seen - tokens0  # those of this process's own run (tokens/s)
                log("step", f"step {state.step}/{total} loss {step_loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                    f"{done / el:,.0f} tok/s ETA {el / state.step * (total - state.step):.0f}s", step=state.step,
                    loss=step_loss, lr=sched.get_last_lr()[0], tokens_per_s=done / el, tokens=seen)
            if checkpoint is not None and checkpoint.due(state.step) and state.step < total:
                if lazy is not None:  # a resume point is never written from a diverged state
                    lazy.raise_if_bad(cfg)
                checkpoint.save(state, model, opt, sched, device)
        if lazy is not None:  # nor is a diverged model evaluated
            lazy.raise_if_bad(cfg)
        t0 = time.time()
        scores = {k: evaluate(model, tok, spec, v, cfg, pad_id, device, autocast) for k, v in evals.items()
                  if k.startswith("dev")}
        if tracker:
            scores["sensitivity"] = tracker(model, state.epoch + 1)
        t_eval += time.time() - t0
        state.history.append({"epoch": state.epoch + 1, "step": state.step, **scores})
        log("eval", f"epoch {state.epoch + 1}: " + json.dumps(scores), **state.history[-1])
        state.epoch, state.batch = state.epoch + 1, 0
    train_s = time.time() - t_start - t_eval
    t0 = time.time()
    # final scores: the last epoch's dev scores and, once, the held-out splits (never used for selection)
    final = {k: v for k, v in state.history[-1].items() if k.startswith("dev")}
    final |= {k: evaluate(model, tok, spec, v, cfg, pad_id, device, autocast) for k, v in evals.items()
              if not k.startswith("dev")}
    log("final", "final: " + json.dumps(final), **final)
    return {"epochs": state.history, "final": final, "main_metric": spec.main_score, "trainable_params": n_train,
            "lora_params": n_lora, "steps": state.step,
            "times": {"train_s": train_s, "eval_s": t_eval + time.time() - t0}}, model
