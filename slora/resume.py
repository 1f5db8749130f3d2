"""Training checkpoints (`--save-every N`) and `--resume`: everything the training loop needs to continue exactly
where it stopped, stored without pickle.

A checkpoint is a folder `checkpoint-STEP/` inside the run's in-progress folder (slora.runfolder), holding
    tensors.safetensors   the trainable parameters (LoRA factors, task head) under their model names, the AdamW
                          state (`opt.<param index>.<key>`), and the RNG states: torch's CPU generator (dropout),
                          every CUDA generator when CUDA is in use, the data-order generator at the start of the
                          epoch in progress
    state.json            step, epoch, micro-batch position, token count, the evaluation history, the optimizer's
                          param_groups (hyper-parameters), the LR schedule's state, the EpochSensitivity record,
                          and the byte length of log.jsonl at the checkpoint
It is written under a temporary name and renamed; then `checkpoint.json` (renamed into place too) points at it and
the older checkpoint folders are removed. A kill at any moment leaves the previous checkpoint or the new one
intact, never a mix. Resuming truncates log.jsonl to its length at the checkpoint, so the steps between the
checkpoint and the kill are logged once, by the resumed run, exactly as the uninterrupted run logs them.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slora.checkpoint import read_json
from slora.runfolder import CHECKPOINT
from slora.train import TrainState

LOG = "log.jsonl"


class Checkpointer:
    """Saves resume points every `every` optimizer steps into `folder` (0: never) and restores the newest one.

    `tracker` is the run's EpochSensitivity (or None), whose per-epoch record is part of the state."""

    def __init__(self, folder: Path, every: int, tracker=None):
        self.folder, self.every, self.tracker = Path(folder), every, tracker

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def exists(self) -> bool:
        return (self.folder / CHECKPOINT).is_file()

    # -------------------------------------------------------------------------
    def save(self, state: TrainState, model, opt, sched, device):
        name = f"checkpoint-{state.step}"
        tmp = self.folder / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters()
                   if p.requires_grad}
        osd = opt.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                if not torch.is_tensor(v):
                    raise TypeError(f"optimizer state {i}.{k} is not a tensor ({type(v).__name__}): not saved")
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            tensors["rng.cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (n_devices, state bytes)
        tensors["rng.data"] = state.data_rng
        save_file(tensors, str(tmp / "tensors.safetensors"))
        log = self.folder / LOG
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "tokens": state.tokens,
                "history": state.history, "param_groups": osd["param_groups"],
                "opt_state_keys": {str(i): sorted(st) for i, st in osd["state"].items()},
                "scheduler": sched.state_dict(), "log_bytes": log.stat().st_size if log.exists() else 0,
                "tracker": self.tracker.epochs if self.tracker else None}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")  # NaN scores round-trip
        os.replace(tmp, self.folder / name)
        pointer = self.folder / (CHECKPOINT + ".tmp")
        pointer.write_text(json.dumps({"checkpoint": name, "step": state.step}) + "\n")
        os.replace(pointer, self.folder / CHECKPOINT)
        for old in self.folder.glob("checkpoint-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    # -------------------------------------------------------------------------
    def path(self) -> Path:
        return self.folder / read_json(self.folder / CHECKPOINT)["checkpoint"]

    def truncate_log(self):
        """Cut log.jsonl back to its length at the checkpoint (call before the resumed run logs anything)."""
        meta = read_json(self.path() / "state.json")
        with open(self.folder / LOG, "r+b") as f:
            f.truncate(meta["log_bytes"])

    def restore(self, model, opt, sched, device) -> TrainState:
        """Load the newest checkpoint into the model's trainable parameters, the optimizer, the schedule, the RNGs
        and the tracker; return the loop's state. Any mismatch with the model is an error naming the tensor."""
        path = self.path()
        meta = read_json(path / "state.json")
        tensors = load_file(str(path / "tensors.safetensors"))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
        if saved != set(params):
            diff = sorted(saved ^ set(params))
            raise ValueError(f"{path}: checkpoint does not match the model's trainable parameters: {diff[:5]}")
        with torch.no_grad():
            for n, p in params.items():
                t = tensors[f"param.{n}"]
                if t.shape != p.shape:
                    raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                p.copy_(t)
        state = {int(i): {k: tensors[f"opt.{i}.{k}"] for k in keys} for i, keys in meta["opt_state_keys"].items()}
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        if device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
        if self.tracker is not None and meta["tracker"] is not None:
            self.tracker.epochs = meta["tracker"]
        return TrainState(step=meta["step"], epoch=meta["epoch"], batch=meta["batch"], tokens=meta["tokens"],
                          history=meta["history"], data_rng=tensors["rng.data"])
