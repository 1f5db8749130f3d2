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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from slora.data import text
from slora.dist import data_parallel, process_group


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


def _head_loss_sum(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (B, C, V) for one chunk of C positions
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=text.IGNORE_INDEX,
                           reduction="sum")


def lm_loss_sum(fwd, batch: dict, device, lm_chunk: int | None = None, target_rows: bool = False) -> torch.Tensor:
    """The summed (not mean) fp32 next-token cross-entropy Σ_t CE(logits[:, t], labels[:, t+1]) over the labels
    other than IGNORE_INDEX, as transformers' causal-LM loss computes it (there a mean).

    `fwd` (the model, or its DDP wrapper, or the FSDP2-sharded model) gives the final hidden states; the LM head
    runs here, on the model's own `lm_head`. Under FSDP2 the root unit (embeddings, final norm, LM head) stays
    unsharded from its forward until its backward (fully_shard's rule for the root), so the head is whole here.
    - `lm_chunk`: the head and the loss run over that many positions at a time, each chunk recomputed in the
      backward pass, so the (B, T, V) logits and their fp32 copy never exist whole (at LLaMA-3's V = 128,256 and
      2 x 2048 tokens: 1 GB bf16 + 2 GB fp32, plus as much again for the gradient). Same sum, in another order.
    - `target_rows` (--sparse-lm-head): the head and the loss run only at the positions t whose next token is a
      target. Response-only training leaves most positions without one (prompt and pad; 93 % of
      wiki-describe's), yet the whole head costs 2·D·V FLOPs per position forward and as many backward. The same
      terms, summed in another order and through a GEMM of another shape: equal up to rounding.
    """
    head = (fwd.module if isinstance(fwd, DistributedDataParallel) else fwd).lm_head
    labels = to_device(batch["labels"], device)  # (B, T)
    # whether the batch has pad positions, read from its CPU copy: the model would otherwise ask the device copy
    # (attention_mask_4d), a host read that waits for the GPU's queue on every micro-batch
    padded = bool((batch["attention_mask"] == 0).any()) if "attention_mask" in batch else None
    h = fwd(**forward_inputs(batch, device), padded=padded, hidden=True)  # (B, T, D)
    if target_rows:
        # found from the labels while they are still on the CPU, so the gather asks the device nothing
        r, c = (batch["labels"][:, 1:] != text.IGNORE_INDEX).nonzero(as_tuple=True)  # (N,) each
        rows, cols = to_device(r, device), to_device(c, device)
        logits = head(h[rows, cols]).float()  # (N, V): the positions that predict a target
        return F.cross_entropy(logits, labels[rows, cols + 1], reduction="sum")
    if not lm_chunk:
        logits = head(h)[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=text.IGNORE_INDEX, reduction="sum")
    h, y = h[:, :-1], labels[:, 1:]  # (B, T-1, D), (B, T-1)
    total = None
    for t0 in range(0, h.shape[1], lm_chunk):
        part = checkpoint(_head_loss_sum, head, h[:, t0:t0 + lm_chunk], y[:, t0:t0 + lm_chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def loss_sum(model, batch: dict, kind: str, device, lm_chunk: int | None = None, target_rows: bool = False
             ) -> torch.Tensor:
    """Sum (not mean) of the per-example or per-token losses of one micro-batch, in fp32: classification
    cross-entropy, regression squared error, or the causal LM's next-token loss (`lm_loss_sum`). `model` is what
    the forward runs through: the model, or under torchrun its DDP wrapper or the FSDP2-sharded model."""
    if kind not in ("classification", "regression"):  # causal LM: prompt and pad tokens carry label IGNORE_INDEX
        return lm_loss_sum(model, batch, device, lm_chunk, target_rows)
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
