"""The loss of one optimizer step, as the training loop (slora.train.loop) computes it.

Loss normalisation. Each optimizer step sums the per-token (LM) or per-example (classification, regression) losses
of all its micro-batches and divides by their total count, counted before the first backward pass. Then
`--batch-size b --grad-accum k` and `--batch-size b·k --grad-accum 1` give the same gradient (up to rounding), and
a step whose micro-batches hold uneven numbers of response tokens weighs every token equally. The count goes
through `step_denominator`, the one place data parallelism has to change (all-reduce the count). References:
torchtune `recipes/lora_finetune_single_device.py` and `training/_grad_scaler.py`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from slora.data import text
from slora.dist import process_group
from slora.dist import data_parallel
from slora.data import text


# positions per LM-head + loss chunk under --activation-checkpointing: torchtune's CEWithChunkedOutputLoss uses 8
# chunks, 256 positions at 2048; at LLaMA-3's vocabulary one chunk of 2 x 256 holds 0.26 GB of fp32 logits
LM_CHUNK = 256


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU batch tensor on `device`. To CUDA through pinned memory, without waiting: a copy from pageable memory
    first waits until the device has finished everything queued before it (CUDA's rule for pageable host-to-device
    copies), a host stall per tensor per micro-batch. The copied values are the same bits either way (the
    DataLoader's pin_memory pattern; torch's pinned-memory allocator keeps the source alive until the copy ends)."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def forward_inputs(batch: dict, device) -> dict:
    return {k: to_device(v, device) for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                                      "token_type_ids")}


def target_count(batch: dict, kind: str) -> int:
    """How many terms `loss_sum` adds up for `batch`: examples, or LM target tokens (labels not IGNORE_INDEX)."""
    if kind in ("classification", "regression"):
        return int(batch["labels"].shape[0])
    return int((batch["labels"][:, 1:] != text.IGNORE_INDEX).sum())


def loss_sum(model, batch: dict, kind: str, device, lm_chunk: int | None = None, target_rows: bool = False
             ) -> torch.Tensor:
    """Sum (not mean) of the per-example or per-token losses of one micro-batch, in fp32.

    Causal LM: the model's own forward computes the summed next-token loss from the labels (LlamaForCausalLM),
    `lm_chunk` positions of LM head and loss at a time when given, or with `target_rows` (--sparse-lm-head) only at
    the positions that carry a target. Through the forward, so that under torchrun the DDP wrapper and FSDP2's root
    unit see one forward call (and gather the head's shards) either way."""
    if kind not in ("classification", "regression"):  # causal LM: prompt and pad tokens carry label IGNORE_INDEX
        rows = None
        if target_rows:
            # found from the labels while they are still on the CPU, so the gather asks the device nothing
            r, c = (batch["labels"][:, 1:] != text.IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each
            rows = (to_device(r, device), to_device(c, device))
        # whether the batch has pad positions, read from its CPU copy: the model would otherwise ask the device
        # copy (attention_mask_4d), a host read that waits for the GPU's queue on every micro-batch
        padded = bool((batch["attention_mask"] == 0).any()) if "attention_mask" in batch else None
        return model(**forward_inputs(batch, device), labels=to_device(batch["labels"], device), loss_chunk=lm_chunk,
                     loss_rows=rows, padded=padded)
    out = model(**forward_inputs(batch, device))
    y = to_device(batch["labels"], device)
    if kind == "classification":
        return F.cross_entropy(out.float(), y, reduction="sum")
    return F.mse_loss(out.float().squeeze(-1), y, reduction="sum")


def global_loss(step_loss: torch.Tensor) -> float:
    """The optimizer step's loss on the host (one read): this rank's part, summed over ranks (backward_step)."""
    world = process_group.get().world
    return step_loss.item() if world == 1 else data_parallel.global_count(step_loss.item()) / world


def step_denominator(count: int) -> float:
    """The divisor of an optimizer step's summed loss: its target count. One process: the count itself. Under data
    parallelism, the count all-reduced over ranks divided by the world size (DDP averages the gradients), so N
    processes at micro-batch b follow one process at N·b (torchtune `training/_grad_scaler.py`)."""
    world = process_group.get().world
    return count if world == 1 else data_parallel.global_count(count) / world


def backward_step(fwd, group: list[tuple[dict, float]], kind: str, device, autocast, lm_chunk: int | None = None,
                  target_rows: bool = False) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches, given as (batch, weight) pairs (weight 0: a
    rank's stand-in row, data_parallel.local_rows). Gradients accumulate in the parameters, communicated over ranks on
    the last micro-batch only. Returns this rank's part of the step loss (sum over ranks / world = the loss)."""
    denom = step_denominator(sum(target_count(b, kind) * w for b, w in group))
    step_loss = None
    for i, (batch, weight) in enumerate(group):
        with data_parallel.grad_sync(fwd, last=i == len(group) - 1):
            with autocast:
                loss = loss_sum(fwd, batch, kind, device, lm_chunk, target_rows) * weight / denom
            loss.backward()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    return step_loss
