"""Everything that touches `.safetensors` model files: read (single file or sharded), check, load, write.

Hugging Face folder layout: `config.json` plus either `model.safetensors` or `model.safetensors.index.json`
whose `weight_map` names the shard of every tensor. Weights are read only through safetensors (never unpickled).
Loading is strict (torchtune's rule): every missing, unexpected or mis-shaped tensor is named in the error.
Writing goes to a temporary folder that is renamed at the end, so a crash leaves nothing half written.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def shard_files(folder) -> list[Path]:
    """The safetensors files of a model folder, in index order."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = json.loads((folder / INDEX).read_text())
        return [folder / f for f in dict.fromkeys(index["weight_map"].values())]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise FileNotFoundError(f"{folder}: neither {SINGLE} nor {INDEX} found")


def read_tensors(folder, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of the folder as {name: tensor}; floating tensors cast to `dtype` if given."""
    out: dict[str, torch.Tensor] = {}
    for path in shard_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                # cast each tensor as it is read: a bf16 load of an fp32 shard holds one fp32 tensor at a time,
                # never the whole shard (issue 10: no fp32 copy of the base)
                part = {name: _cast(f.get_tensor(name), dtype) for name in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header or short file
            raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        for name, t in part.items():
            if name in out:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            out[name] = t
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source) -> nn.Module:
    """Assign `sd` into a model built on the meta device; any key or shape mismatch is an error naming it."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                    for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append("missing tensor(s): " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensor(s): " + ", ".join(unexpected))
    if shapes:
        problems.append("mis-shaped tensor(s): " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{source}: checkpoint does not match the model: " + " | ".join(problems))
    model.load_state_dict(sd, strict=True, assign=True)
    return model


@contextmanager
def atomic_folder(folder) -> Iterator[Path]:
    """Yield a temporary folder beside `folder`; when the block succeeds it replaces `folder` (whatever was there),
    when it raises it is removed. Readers never see a half-written folder. Callers decide beforehand whether an
    existing `folder` may be replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_folder(folder, config: dict, sd: dict[str, torch.Tensor], max_shard_bytes: int | None = None,
                 extra_files: dict[str, Path] | None = None) -> Path:
    """Write config.json and the tensors (one file, or shards + index when over `max_shard_bytes`) atomically.

    `extra_files` maps a file name to a source path copied alongside (e.g. tokenizer.json).
    """
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    shards, cur, size = [], {}, 0
    for name in sorted(sd):
        nbytes = sd[name].numel() * sd[name].element_size()
        if cur and max_shard_bytes is not None and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = sd[name], size + nbytes
    shards.append(cur)
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return Path(folder)
