"""One rank of tests/dist/test_sharded_load.py: `python tests/support/fsdp_load_worker.py OUT KIND:DTYPE:MODEL_DIR ...` under
tests/dist_launch.launch. Loads each model sharded (slora.dist.sharded_load, as `finetune --fsdp` does) while recording
every read of the safetensors files, then writes OUT.RANK.json: per model, the elements read per tensor, the
tensors read whole, and whether this rank's shards equal the rows of the same tensors loaded whole."""
from __future__ import annotations

import contextlib
import json
import sys

import torch

from slora.io import weights
from slora.dist import process_group, sharded_load
from slora.models.targets import find_linears
from slora.models.lora import apply_lora, mark_only_lora_trainable
from slora.models import for_sequence_classification
from slora.io.model_folder import load_model, meta_model
from slora.train.loop import set_activation_checkpointing

READS: dict[str, int] = {}  # tensor name -> elements read through get_slice
WHOLE: list[str] = []  # tensors read whole through get_tensor


class _Slice:
    def __init__(self, name, inner):
        self.name, self.inner = name, inner

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        t = self.inner[index]
        READS[self.name] = READS.get(self.name, 0) + t.numel()
        return t


class _File:
    """safe_open's handle, counting what is read (the only way tensor data leaves the file)."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        self.f = self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, name):
        return _Slice(name, self.f.get_slice(name))

    def get_tensor(self, name):
        WHOLE.append(name)
        return self.f.get_tensor(name)


@contextlib.contextmanager
def recording():
    """Every safetensors read inside the block goes through _File (weights.safe_open is the one opener)."""
    real_open = weights.safe_open
    weights.safe_open = lambda *a, **k: _File(real_open(*a, **k))
    try:
        yield
    finally:
        weights.safe_open = real_open


def load(kind: str, dtype: torch.dtype, model_dir: str) -> dict:
    READS.clear()
    WHOLE.clear()
    with recording():
        body = meta_model(model_dir, dtype)
        model = body if kind == "decoder" else for_sequence_classification(body, 3, seed=5)
        sharded_load.materialise(model, model_dir, process_group.get().device)
    read, whole = dict(READS), list(WHOLE)
    full = load_model(model_dir, dtype)  # the oracle, read whole (not recorded)
    full = full if kind == "decoder" else for_sequence_classification(full, 3, seed=5)
    d = process_group.get()
    same, local, total = {}, 0, 0
    for name, p in model.named_parameters():
        want = full.get_parameter(name).detach()
        rows = sharded_load.shard_rows(want.shape[0], d.rank, d.world)
        same[name] = bool(torch.equal(p.to_local(), want[rows.start:rows.stop])) and p.dtype == want.dtype
        local += p.to_local().numel()
        total += want.numel()
    with recording():
        lora = add_lora_like_finetune(model, full)
    return {"reads": read, "whole": whole, "same": same, "local": local, "total": total,
            "shapes": {n: list(s) for n, (_, s) in weights.tensor_shapes(model_dir).items()},
            "lora": lora, "reads_after": dict(READS), "whole_after": list(WHOLE)}


def add_lora_like_finetune(model, full) -> dict:
    """sharded_load.with_lora as train.finetune calls it (activation checkpointing set first, on the calibration
    model), against apply_lora on the whole model with the same generator: do the LoRA shards hold those rows, is
    every base shard taken over unchanged, is the checkpointing flag carried over?"""
    d = process_group.get()
    set_activation_checkpointing(model, True)
    ranks = {n: 1 + i % 3 for i, n in enumerate(find_linears(full, "all-linear"))}
    apply_lora(full, ranks, 4.0, generator=torch.Generator().manual_seed(11))

    def add_lora(m):
        apply_lora(m, ranks, 4.0, generator=torch.Generator().manual_seed(11))
        mark_only_lora_trainable(m, extra=() if not hasattr(m, "classifier") else ("classifier",))

    trained = sharded_load.with_lora(model, add_lora)
    same = {}
    for name, p in trained.named_parameters():
        want = full.get_parameter(name).detach()
        rows = sharded_load.shard_rows(want.shape[0], d.rank, d.world)
        same[name] = bool(torch.equal(p.to_local(), want[rows.start:rows.stop]))
    flags = [m.activation_checkpointing for m in trained.modules() if hasattr(type(m), "activation_checkpointing")]
    return {"same": same, "checkpointing": flags,
            "trainable": sorted(n for n, p in trained.named_parameters() if p.requires_grad)}


if __name__ == "__main__":
    out, *specs = sys.argv[1:]  # specs: KIND:DTYPE:MODEL_DIR (DTYPE float32 or bfloat16)
    d = process_group.init("cpu")
    with process_group.guard():
        res = {}
        for spec in specs:
            kind, dtype, model_dir = spec.split(":", 2)
            res[spec] = load(kind, getattr(torch, dtype), model_dir)
        with open(f"{out}.{d.rank}.json", "w") as f:
            json.dump(res, f)
    process_group.teardown()
