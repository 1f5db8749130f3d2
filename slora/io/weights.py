"""Everything that touches `.safetensors` model files: read (single file or sharded), check, load, write.

Hugging Face folder layout: `config.json` plus either `model.safetensors` or `model.safetensors.index.json`
whose `weight_map` names the shard of every tensor. Weights are read only through safetensors (never unpickled).
Loading is strict (torchtune's rule): every missing, unexpected or mis-shaped tensor is named in the error.
Writing goes to a temporary folder that is renamed at the end, so a crash leaves nothing half written; a failed
write (disk full, no permission) is an error naming the file.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from slora.errors import SloraError
from slora.io.files import atomic_folder, read_json, writing

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model folder")
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise SloraError(path, f"config.json must hold a JSON object, not a {type(config).__name__}")
    return config


def shard_files(folder) -> list[Path]:
    """The safetensors files of a model folder, in index order."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        index = read_json(folder / INDEX, INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SloraError(folder / INDEX, "needs a non-empty \"weight_map\" object {tensor name: shard file}")
        for name, shard in weight_map.items():
            # a shard is a plain file name beside the index; a path could point anywhere on the disk
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise SloraError(folder / INDEX, f"weight_map[{name!r}] = {shard!r} is not a shard file name")
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    if (folder / SINGLE).is_file():
        return [folder / SINGLE]
    raise FileNotFoundError(f"{folder}: neither {SINGLE} nor {INDEX} found")


def nonfinite_count(t: torch.Tensor) -> int:
    """NaN and ±inf entries of a floating tensor (0 for others). A sum accumulated in fp32 screens first (9x faster
    than isfinite on SmolLM2's weights on one CPU core): it is finite unless an entry is not, or the sum overflows,
    which the exact count then tells apart."""
    if not t.is_floating_point():
        return 0
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if bool(torch.sum(t, dtype=acc).isfinite()):
        return 0
    return int((~torch.isfinite(t)).sum())


def read_tensors(folder, dtype: torch.dtype | None = None, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of the folder as {name: tensor}; floating tensors cast to `dtype` if given."""
    out: dict[str, torch.Tensor] = {}
    for path in shard_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                # cast each tensor as it is read: a bf16 load of an fp32 shard holds one fp32 tensor at a time,
                # never the whole shard (a bf16 load holds no fp32 copy of the base)
                part = {name: _cast(f.get_tensor(name), dtype) for name in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header or short file
            raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        for name, t in part.items():
            if name in out:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            # a NaN or inf weight poisons every output and every Hessian downstream: refuse it here, by name
            bad = nonfinite_count(t)
            if bad:
                raise SloraError(f"{path}: tensor {name!r}", f"{bad} of {t.numel()} values are NaN or inf; the "
                                 f"model folder is damaged or was saved from a diverged run")
            out[name] = t
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source) -> nn.Module:
    """Assign `sd` into a model built on the meta device; any key or shape mismatch is an error naming it."""
    check_state({k: tuple(v.shape) for k, v in model.state_dict().items()},
                {k: tuple(v.shape) for k, v in sd.items()}, source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model


def check_state(expected: dict[str, tuple], got: dict[str, tuple], source) -> None:
    """Error naming every missing, unexpected or mis-shaped tensor of a model folder ({key: shape} both)."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(f"{k}: files {got[k]} vs model {expected[k]}"
                    for k in set(expected) & set(got) if got[k] != expected[k])
    problems = []
    if missing:
        problems.append("missing tensor(s): " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensor(s): " + ", ".join(unexpected))
    if shapes:
        problems.append("mis-shaped tensor(s): " + "; ".join(shapes))
    if problems:
        raise ValueError(f"{source}: the model folder does not match the model: " + " | ".join(problems))


# -----------------------------------------------------------------------------
# Reading part of a tensor: a rank of a sharded load (slora.dist.sharded_load) reads only the rows it keeps

def tensor_shapes(folder) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """{tensor name: (its file, its shape)} from the safetensors headers alone; no tensor data is read."""
    out: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in shard_files(folder):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: shard listed in {INDEX} is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"{path}: cannot read safetensors file (truncated or corrupt?): {e}") from None
        for name, shape in shapes.items():
            if name in out:
                raise ValueError(f"{path}: tensor {name!r} appears in more than one shard")
            out[name] = (path, shape)
    return out


def read_rows(path, name: str, rows: range, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows `rows` (dim 0) of tensor `name` in safetensors file `path`, cast to `dtype` if floating, on the CPU.
    Only those rows are read (safetensors' get_slice: a byte range of the memory-mapped file); the same finite
    check as read_tensors, on the rows read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            t = _cast(f.get_slice(name)[rows.start:rows.stop], dtype)
    except Exception as e:  # noqa: BLE001  SafetensorError for a short file
        raise ValueError(f"{path}: cannot read rows {rows.start}:{rows.stop} of {name!r} (truncated or "
                         f"corrupt?): {e}") from None
    bad = nonfinite_count(t)
    if bad:
        raise SloraError(f"{path}: tensor {name!r}", f"{bad} values in rows {rows.start}:{rows.stop} are NaN or inf; "
                         f"the model folder is damaged or was saved from a diverged run")
    return t


# -----------------------------------------------------------------------------
# Atomic folders: written under a temporary name beside the target, renamed into place when complete


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
        _write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            _save(shards[0], tmp / SINGLE)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _save(shard, tmp / fname)
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            _write_text(tmp / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2, sort_keys=True) + "\n")
        for name, src in (extra_files or {}).items():
            with writing(tmp / name):
                shutil.copyfile(src, tmp / name)
    return Path(folder)


# a full disk, a folder without write permission or a file-size limit is an error naming the file being written
def _write_text(path: Path, text: str):
    with writing(path):
        path.write_text(text)


def _save(tensors: dict[str, torch.Tensor], path: Path):
    with writing(path):
        save_file(tensors, str(path), metadata={"format": "pt"})
