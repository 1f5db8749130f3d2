"""--fsdp under torchrun for models larger than one device: no rank ever holds the whole base.

    models.meta_model(path, dtype)   the skeleton: every base parameter on the meta device, nothing read
    materialise(model, path, device) FSDP2-shard it (data_parallel.wrap: per transformer layer, then the root) and read
                                     from the safetensors file(s) only the rows of each tensor this rank keeps
    with_lora(model, add_lora)       the training model: the same skeleton again, LoRA added by `add_lora` (whole,
                                     on the CPU, from the run's generator), sharded, and the base shards taken over
                                     from the calibration model `model` (same mesh, same placement: no copy, no read)

Why two models. FSDP2 fixes the parameters of a unit when `fully_shard` runs, and LoRA must sit inside its
layer's unit (pytorch/torchtune#1517), but its ranks are known only after calibration, which already needs the
sharded base. So calibration runs on a sharded model without LoRA, and training on a second skeleton with LoRA,
sharded the same way, whose base parameters become the first model's local shards.

Memory per rank, base weights: 1/world of every tensor (FSDP2 shards dim 0 as torch.chunk: ceil(n/world) rows per
rank, the last ranks fewer), read in the target dtype straight from the file, rows only, so no rank ever holds a
whole tensor of the base, let alone an fp32 copy of it; plus, during a forward, one layer's full parameters
(FSDP2's all-gather) and the root unit's (embeddings, final norm, LM head), which FSDP2 keeps unsharded after
the root's forward. LoRA factors and the task head are made whole on the CPU first (a few MB) so that their
values are the ones a full model draws from the same generator; FSDP2 then keeps each rank's chunk.

Buffers: none of slora's families (LLaMA/Qwen2/Mistral, BERT/RoBERTa, MPNet) registers a buffer (RoPE's inverse
frequencies and the position ids are computed in forward), so nothing needs re-initialising after the meta build;
`materialise` checks that, and that no parameter is left on the meta device. Sources: torchtune
recipes/lora_finetune_distributed.py (meta build, fully_shard, then load; the order of its _setup_model), FSDP2's
FSDPParam.reset_sharded_param (a parameter replaced by `assign` is re-registered at the first forward).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from slora.io import weights
from slora.dist import process_group, data_parallel
from slora.models import build_model, for_sequence_classification
from slora.io.model_folder import file_keys


def shard_rows(n: int, rank: int, world: int) -> range:
    """Rows of dim 0 that rank `rank` keeps under FSDP2 (torch.chunk into `world` parts: ceil(n/world) rows per
    part, so the last ranks may get fewer or none; FSDP2's _chunk_with_empty)."""
    per = -(-n // world)
    start = min(rank * per, n)
    return range(start, min(start + per, n))


def _occurrences(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str, str]]]]:
    """{id(param): (param, [(module, attribute, qualified name), ...])}: a tied parameter (LLaMA's lm_head and
    embedding) is one entry with two places to set."""
    out: dict[int, tuple[nn.Parameter, list]] = {}
    for mname, m in model.named_modules():
        for attr, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), (p, []))[1].append((m, attr, f"{mname}.{attr}" if mname else attr))
    return out


def _replace(places: list, target: nn.Parameter, local: torch.Tensor) -> None:
    """Put a DTensor parameter made of this rank's `local` shard in place of FSDP2's sharded parameter `target`
    (meta, or the skeleton's own head), with target's mesh, placement, global shape and trainable flag."""
    from torch.distributed.tensor import DTensor
    if tuple(local.shape) != tuple(target.to_local().shape):
        raise RuntimeError(f"{places[0][2]}: local shard {tuple(local.shape)} where FSDP2 expects "
                           f"{tuple(target.to_local().shape)}")
    new = nn.Parameter(DTensor.from_local(local, target.device_mesh, target.placements, run_check=False,
                                          shape=target.shape, stride=target.stride()),
                       requires_grad=target.requires_grad)
    for m, attr, _ in places:
        m._parameters[attr] = new  # FSDP2 re-registers it at the first forward (FSDPParam.reset_sharded_param)


def _body_prefix(model: nn.Module) -> str:
    """'' for a bare model, 'bert.' / 'roberta.' / 'mpnet.' for a task model (the model folder's body keys)."""
    return f"{model.config.model_type}." if hasattr(model, "classifier") else ""


def _check_complete(model: nn.Module) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"sharded load left parameters on the meta device: {left[:5]}")
    bufs = [n for n, _ in model.named_buffers()]
    if bufs:  # a buffer of a meta build would hold no values: a new model family must compute it in forward
        raise RuntimeError(f"sharded load: {type(model).__name__} registers buffers {bufs[:5]}, which a meta-device "
                           f"build leaves empty")


@torch.no_grad()
def materialise(model: nn.Module, path, device: torch.device) -> nn.Module:
    """Shard `model` (meta base from models.meta_model, with its task head if any) with FSDP2 and fill this rank's shards
    of the base from the model folder `path`, reading only their rows; returns the frozen, eval-mode model.

    The model folder is checked against the model first, as load_model does: every missing, unexpected or
    mis-shaped tensor is named."""
    path = Path(path)
    files = weights.tensor_shapes(path)
    keys = file_keys(model.config, files)  # {body key: name in the model folder's files}
    prefix = _body_prefix(model)
    body = model.get_submodule(prefix[:-1]) if prefix else model
    if prefix and getattr(body, "pooler", None) is None:  # a RoBERTa / MPNet task model drops the pooler on purpose
        keys = {k: v for k, v in keys.items() if not k.startswith("pooler.")}
    weights.check_state({k: tuple(v.shape) for k, v in body.state_dict().items()},
                           {k: files[name][1] for k, name in keys.items()}, path)
    model.requires_grad_(False)
    data_parallel.wrap(model, fsdp=True)  # fully_shard per layer, then the root: meta parameters become meta DTensors
    d = process_group.get()
    for p, places in _occurrences(model).values():
        if not p.is_meta:
            continue  # the task head: made whole on the CPU, already sharded by FSDP2
        name = places[0][2]
        if not name.startswith(prefix):
            raise RuntimeError(f"{name}: a meta parameter outside the model body {prefix[:-1]!r}")
        file, shape = files[keys[name[len(prefix):]]]
        rows = shard_rows(shape[0], d.rank, d.world)
        local = weights.read_rows(file, keys[name[len(prefix):]], rows, p.dtype)  # (len(rows), *shape[1:])
        _replace(places, p, local.to(device))
    _check_complete(model)
    return model.eval()


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is already FSDP2-sharded (materialise's result), so LoRA goes in through with_lora."""
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def calibration_shard(batches: list[dict], sharded: bool) -> list[dict]:
    """This rank's calibration batches (process_group.shard: contiguous, never repeated). Sharded, every forward is a
    collective (FSDP2 all-gathers each layer), so a rank with fewer batches than rank 0 (which has the most) adds
    stand-ins until the counts agree: one token with attention mask 0, which the Hessian hooks drop
    (hessian._tokens keeps unmasked tokens only), so the statistics are those of its real batches."""
    mine = process_group.shard(batches)
    if not sharded or not batches:
        return mine
    most = len(process_group.shard_range(len(batches), 0, process_group.get().world))
    blank = {k: torch.zeros_like(v[:1, :1]) for k, v in batches[0].items()}  # (1, 1) each: id 0, mask 0
    return mine + [blank] * (most - len(mine))


@torch.no_grad()
def with_lora(model: nn.Module, add_lora: Callable[[nn.Module], object]) -> nn.Module:
    """The training model for sharded calibration model `model`: a new meta skeleton of the same architecture,
    `add_lora(skeleton)` (apply_lora and the trainable mask: the factors come out whole on the CPU with the values
    the run's generator gives a full model), activation checkpointing as set on `model`, FSDP2-sharded
    (data_parallel.wrap, which first compares the LoRA shapes across ranks), and every base and head parameter taken
    over from `model`'s local shard. `model` must not be used afterwards."""
    data_parallel.reshard(model)  # FSDP2 leaves the root gathered after calibration's forwards: back to DTensor shards
    dtype = next(p.dtype for n, p in model.named_parameters() if "classifier" not in n)
    with torch.device("meta"):
        body = build_model(model.config).to(dtype)
    if hasattr(model, "classifier"):  # the head is taken over below; its seed here does not matter
        skeleton = for_sequence_classification(body, model.num_labels)
    else:
        skeleton = body
        skeleton.tie_weights()
    add_lora(skeleton)
    for name, m in model.named_modules():
        if "activation_checkpointing" in vars(m):  # set on the instance by train.set_activation_checkpointing
            skeleton.get_submodule(name).activation_checkpointing = m.activation_checkpointing
    data_parallel.wrap(skeleton, fsdp=True)
    old = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    for p, places in _occurrences(skeleton).values():
        name = places[0][2]
        if name in old:  # base weights and task head; the LoRA factors are new
            _replace(places, p, old[name].to_local())
        elif p.is_meta:
            raise RuntimeError(f"{name}: neither in the calibration model nor made by add_lora")
    _check_complete(skeleton)
    return skeleton
