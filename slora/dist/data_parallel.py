"""Data-parallel LoRA training under torchrun: how the training loop (slora.train.loop) changes when
slora.dist.process_group has several ranks.

    wrap(model, fsdp)       DDP (default: only the trainable LoRA and head gradients are all-reduced), or FSDP2
                            `fully_shard` per transformer layer then the root (--fsdp), LoRA inside its layer's unit
    local_rows(batch)       this rank's contiguous rows of a global micro-batch of world·batch-size sequences
    grad_sync(fwd, last)    no gradient communication on accumulation micro-steps (DDP no_sync, FSDP2
                            set_requires_gradient_sync)
    eval_shard / gather     evaluation batches split over ranks and predictions gathered in order; under FSDP2
                            short shards padded with dummy batches, and generation runs every step on every rank
    full_trainable(model)   FSDP2: every trainable shard gathered into a full tensor on every rank, for saving

One process: every function is the identity. Sources: torchtune recipes/lora_finetune_distributed.py (FSDP2 per
layer then root; LoRA kept in its layer's unit, pytorch/torchtune#1517; adapter gathered with full_tensor() on all
ranks, rank 0 writes), torchtune training/_grad_scaler.py (loss over the global target count), litgpt
finetune/lora.py (same init seed on every rank).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from slora.dist import process_group


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: items of the ModuleList named `layers` (LLaMA) or `layer` (BERT encoder)."""
    lists = [m for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n.split(".")[-1] in
             ("layers", "layer")]
    if len(lists) != 1:
        raise ValueError(f"--fsdp: expected one ModuleList of transformer layers, found {len(lists)}")
    return list(lists[0])


def wrap(model: nn.Module, fsdp: bool) -> nn.Module:
    """The module to call in training forward passes. The returned DDP wrapper (or, with FSDP2, `model` itself,
    sharded in place) must be used for every forward that backpropagates; evaluation may call `model`.

    DDP broadcasts rank 0's parameters and buffers once, so a rank that drew another init would be overwritten;
    the LoRA init seed is the same on every rank anyway. LoRA shapes are compared across ranks first: a mismatch
    is an error naming the module, not a hang inside DDP's own shape check or an FSDP all-gather.
    """
    d = process_group.get()
    if d.world == 1:
        if fsdp:
            raise ValueError("--fsdp shards the model over torchrun ranks: launch with torchrun --nproc-per-node N")
        return model
    process_group.check_same({n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad},
                    "trainable parameter shapes (LoRA ranks, task head)")
    if not fsdp:
        ids = [d.device.index] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # gloo and a CPU mesh on CPU: fully_shard over gloo with a CUDA mesh can crash (pytorch/pytorch#132471)
    mesh = init_device_mesh(d.device.type, (d.world,))
    for layer in transformer_layers(model):
        fully_shard(layer, mesh=mesh)  # base weights, and the LoRA factors of that layer, in one unit
    fully_shard(model, mesh=mesh)  # embeddings, final norm, LM / task head
    return model


def local_rows(batch: dict) -> tuple[dict, float]:
    """(this rank's rows of a global micro-batch, weight). Rows are split contiguously (process_group.shard_range); a rank
    left without rows (the last, short batch of an epoch) runs the first row with weight 0, so it still joins the
    gradient all-reduce of this step (DDP and FSDP2 both communicate from inside backward)."""
    d = process_group.get()
    if d.world == 1:
        return batch, 1.0
    n = next(iter(batch.values())).shape[0]
    rows = process_group.shard_range(n, d.rank, d.world)
    if len(rows) == 0:
        return {k: v[:1] for k, v in batch.items()}, 0.0
    return {k: v[rows.start:rows.stop] for k, v in batch.items()}, 1.0


def global_count(count: float) -> float:
    """Sum of `count` over ranks (the step's target count for the loss normalisation)."""
    if process_group.get().world == 1:
        return count
    t = torch.tensor([float(count)], dtype=torch.float64, device=process_group.comm_device())
    return float(process_group.all_reduce_sum(t))


def grad_sync(fwd: nn.Module, last: bool):
    """Context for one micro-step's forward and backward: gradients are communicated on the step's last one."""
    if isinstance(fwd, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else fwd.no_sync()
    if hasattr(fwd, "set_requires_gradient_sync"):  # an FSDP2 module
        fwd.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def eval_shard(batches: list, fsdp: bool) -> list[tuple[dict, bool]]:
    """This rank's evaluation batches as (batch, real) pairs: a contiguous shard (process_group.shard), so the ranks split
    the work as in DDP. Under FSDP2 every forward is a collective (each unit all-gathers its parameters), so every
    rank must run as many forwards as the others: ranks with a shorter shard are padded with dummy batches (the
    first batch again, real False) whose outputs the caller drops; generation runs all its steps (early_stop False).
    One process: every batch, all real."""
    mine = [(b, True) for b in process_group.shard(batches)]
    if fsdp and batches:
        longest = len(process_group.shard_range(len(batches), 0, process_group.get().world))  # rank 0's shard is never shorter
        mine += [(batches[0], False)] * (longest - len(mine))
    return mine


def gather(preds: list) -> list:
    """Predictions of all ranks in batch order (the inverse of eval_shard's contiguous split)."""
    if process_group.get().world == 1:
        return preds
    return [p for part in process_group.all_gather_json(preds) for p in part]


@torch.no_grad()
def full_trainable(model: nn.Module) -> None:
    """FSDP2: replace every sharded trainable parameter (a DTensor) by its full tensor, on every rank, so the
    adapter can be read as from one process. Collective: all ranks call it, then rank 0 writes (torchtune's
    save order; calling full_tensor() under `if rank == 0` deadlocks). The model cannot train after this."""
    if process_group.get().world == 1:
        return
    reshard(model)
    for name, p in list(model.named_parameters()):
        if p.requires_grad and hasattr(p, "full_tensor"):
            owner, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            owner._parameters[attr] = nn.Parameter(p.full_tensor(), requires_grad=False)


def reshard(model: nn.Module) -> None:
    """FSDP2: reshard every unit. The root stays unsharded after a forward without backward (evaluation): its
    registered parameters are then plain tensors whose storage FSDP frees later; resharded, they are the DTensor
    shards again, the ones the optimizer steps and a checkpoint gathers. One process or DDP: nothing to do."""
    if process_group.get().world == 1:
        return
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
