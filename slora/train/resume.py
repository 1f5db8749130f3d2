"""Training checkpoints (`--save-every N`) and `--resume`: everything the training loop needs to continue exactly
where it stopped, stored without pickle.

A checkpoint is a folder `checkpoint-STEP/` inside the run's in-progress folder (slora.train.run_folder), holding
    tensors.safetensors   the trainable parameters (LoRA factors, task head) under their model names, the AdamW
                          state (`opt.<param index>.<key>`), and the RNG states: torch's CPU generator (dropout),
                          every CUDA generator when CUDA is in use, the data-order generator at the start of the
                          epoch in progress; under torchrun also every other rank's generators
                          (`rng.rank<R>.torch`, `rng.rank<R>.cuda`: dropout draws from seed + rank)
    state.json            step, epoch, micro-batch position, token count, the evaluation history, the optimizer's
                          param_groups (hyper-parameters), the LR schedule's state, the EpochSensitivity record,
                          the byte length of log.jsonl at the checkpoint, and the run's record ("run"): its
                          arguments, its model folder and a hash of each data split as read (`Checkpointer.record`)
It is written under a temporary name and renamed; then `checkpoint.json` (renamed into place too) points at it and
the older checkpoint folder is removed. A kill at any moment leaves the previous checkpoint or the new one
intact, never a mix: `checkpoint.json` names a complete folder, and the next save first removes every other
checkpoint-* folder (a .tmp, or one renamed into place but never pointed at, which the resumed run writes again).
Resuming truncates log.jsonl to its length at the checkpoint, so the steps between the checkpoint and the kill are
logged once, by the resumed run, exactly as the uninterrupted run logs them.

Under torchrun the checkpoint holds whole tensors, under DDP and FSDP2 alike (one format, nothing pickled). With DDP
the LoRA factors, head, optimizer state, schedule and data order are the same on every rank, so rank 0's copy is the
checkpoint. With FSDP2 each rank holds a shard (a DTensor) of every trainable parameter and of its AdamW exp_avg and
exp_avg_sq: saving gathers each one whole on every rank (`full_tensor()`, a collective all ranks call in the same
order; torchtune's adapter save), then rank 0 alone writes. Only the RNG states differ per rank: saving gathers them
to every rank as JSON (slora.dist.process_group.all_gather_json). Resuming, every rank reads the same checkpoint files itself:
torchrun's processes share the filesystem on one host (several nodes need the run folder on a shared filesystem),
and each rank reading an adapter-sized file is simpler than broadcasting every tensor; an FSDP2 rank then keeps its
own shard of each whole tensor (`distribute_tensor(..., src_data_rank=None)`: local slicing, no communication).
A resume continues exactly the run that was started: it takes the arguments of args.json, and refuses, naming the keys,
when they differ from the run's record (args.json edited: a new batch size would train the rest on another schedule
with the old optimizer state), when the data read now hashes otherwise (a data file changed), or when the recorded
model folder is gone. Paths are recorded absolute, so the run resumes from any directory.

A checkpoint resumes only at the world size that wrote it (the data split per rank depends on it). Since the format
is the same, a DDP checkpoint would load under FSDP2 at the same world size and the reverse; `--resume` takes the
run's own flags, so in practice a run resumes as it started (state.json records "fsdp").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slora.dist import process_group, data_parallel, sharded_load
from slora.errors import SloraError
from slora.io.files import read_json, write_atomic, writing
from slora.train.run_folder import CHECKPOINT
from slora.train.loop import TrainState

LOG = "log.jsonl"
# Arguments that say where the run lives or how it is started, not what it computes: left out of the run's record
NOT_RECORDED = ("out", "resume", "replace")


class Checkpointer:
    """Saves resume points every `every` optimizer steps into `folder` (0: never) and restores the newest one.

    `tracker` is the run's EpochSensitivity (or None), whose per-epoch record is part of the state."""

    def __init__(self, folder: Path, every: int, tracker=None):
        self.folder, self.every, self.tracker = Path(folder), every, tracker
        # what the run is, saved with every checkpoint and checked on resume (`check`, `recorded_model`): {"args": the
        # arguments less NOT_RECORDED, "model_path": the model folder, "data": {split: sha256 of its examples}}
        self.record = {}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def exists(self) -> bool:
        return (self.folder / CHECKPOINT).is_file()

    # -------------------------------------------------------------------------
    def save(self, state: TrainState, model, opt, sched, device):
        # every rank takes part in the gathers (collectives: FSDP2 shards, RNG states); then rank 0 alone writes
        data_parallel.reshard(model)
        tensors = {f"param.{n}": whole(p) for n, p in model.named_parameters() if p.requires_grad}
        osd = opt.state_dict()
        for i, st in osd["state"].items():
            for k, v in st.items():
                if not torch.is_tensor(v):
                    raise TypeError(f"optimizer state {i}.{k} is not a tensor ({type(v).__name__}): not saved")
                tensors[f"opt.{i}.{k}"] = whole(v)
        others = rank_rng_states(device)
        if not process_group.get().is_main:
            return
        name = f"checkpoint-{state.step}"
        current = read_json(self.folder / CHECKPOINT)["checkpoint"] if self.exists() else None
        for left in self.folder.glob("checkpoint-*"):  # a save cut short left it (a .tmp, or one never pointed at)
            if left.name != current:
                shutil.rmtree(left)
        tmp = self.folder / f"{name}.tmp"
        tmp.mkdir()
        tensors["rng.torch"] = torch.get_rng_state()
        if device.type == "cuda":
            # (n_devices, state bytes); torchrun: (1, state bytes) of this rank's own device (rank_rng_states)
            tensors["rng.cuda"] = (torch.stack(torch.cuda.get_rng_state_all()) if process_group.get().world == 1
                                   else torch.cuda.get_rng_state(device)[None])
        tensors["rng.data"] = state.data_rng
        for key, t in others.items():
            tensors[key] = t
        with writing(tmp / "tensors.safetensors"):
            save_file(tensors, str(tmp / "tensors.safetensors"))
        log = self.folder / LOG
        meta = {"step": state.step, "epoch": state.epoch, "batch": state.batch, "tokens": state.tokens,
                "history": state.history, "param_groups": osd["param_groups"],
                "opt_state_keys": {str(i): sorted(st) for i, st in osd["state"].items()},
                "scheduler": sched.state_dict(), "log_bytes": log.stat().st_size if log.exists() else 0,
                "tracker": self.tracker.epochs if self.tracker else None, "world": process_group.get().world,
                "fsdp": sharded_load.is_sharded(model), "run": self.record}
        with writing(tmp / "state.json"):
            (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")  # NaN scores round-trip
        os.replace(tmp, self.folder / name)
        write_atomic(self.folder / CHECKPOINT, json.dumps({"checkpoint": name, "step": state.step}) + "\n")
        if current is not None and current != name:
            shutil.rmtree(self.folder / current)

    # -------------------------------------------------------------------------
    # The run's record: kept by a new run, checked against the checkpoint's by a resumed one

    def recorded(self) -> dict:
        """The record of the run that wrote the newest checkpoint ({} for a checkpoint older than records)."""
        return read_json(self.path() / "state.json").get("run") or {}

    def check(self, part: str, value, defaults: dict | None = None, sources: dict | None = None):
        """Resuming: refuse, naming the keys, a `value` of `part` ("args" or "data") that differs from the record of
        the newest checkpoint; the resumed run must be the run that was started. `defaults` (for "args"): the value
        of each argument the record lacks (it predates the option, so the run used its default). `sources` (for
        "data"): {split: the file or task it was read from}, named in the error. A checkpoint written before records
        were kept resumes unchecked."""
        was = self.recorded().get(part)
        if was is None:
            return
        was = (defaults or {}) | was
        keys = sorted(k for k in was.keys() | value.keys() if was.get(k) != value.get(k))
        if not keys:
            return
        where = self.folder / "args.json"
        if part == "args":
            changes = "; ".join(f"{k} {was.get(k)!r} -> {value.get(k)!r}" for k in keys[:6])
            raise SloraError(where, f"{', '.join(keys)} changed since the run started ({changes}): a resume "
                                    f"continues the run as it started; restore args.json, or start a new run "
                                    f"with --replace")
        source = (sources or {}).get(keys[0]) or where
        raise SloraError(source, f"the examples of split(s) {', '.join(keys)} changed since the run started (another "
                                 f"sha256 of the examples as read): a resume continues the run on its own data; "
                                 f"restore the data, or start a new run with --replace")

    def recorded_model(self) -> Path | None:
        """Resuming: the model folder the run started on (a Hugging Face cache name is not looked up again: its
        branch may point elsewhere by now); None for a checkpoint older than records."""
        was = self.recorded().get("model_path")
        if was is None:
            return None
        if not Path(was).is_dir():
            raise SloraError(was, "the model folder the run started on is gone: a resume continues the run on its "
                                  "own model; put it back, or start a new run with --replace")
        return Path(was)

    def path(self) -> Path:
        return self.folder / read_json(self.folder / CHECKPOINT)["checkpoint"]

    def truncate_log(self):
        """Cut log.jsonl back to its length at the checkpoint (call before the resumed run logs anything). Rank 0
        alone: it owns the run folder."""
        if not process_group.get().is_main:
            return
        meta = read_json(self.path() / "state.json")
        with open(self.folder / LOG, "r+b") as f:
            f.truncate(meta["log_bytes"])

    def restore(self, model, opt, sched, device) -> TrainState:
        """Load the newest checkpoint into the model's trainable parameters, the optimizer, the schedule, the RNGs
        and the tracker, then cut log.jsonl back to the checkpoint (`truncate_log`); return the loop's state. Any
        mismatch with the model, or a damaged file, is an error naming it."""
        path = self.path()
        meta = read_json(path / "state.json")
        world, rank = process_group.get().world, process_group.get().rank
        if meta.get("world", 1) != world:  # checkpoints before torchrun support were written by one process
            raise ValueError(f"{path}: written by {meta.get('world', 1)} process(es), resumed by {world}: resume "
                             f"with the same torchrun --nproc-per-node (the data each rank trains on depends on it)")
        try:
            tensors = load_file(str(path / "tensors.safetensors"))
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header or short file
            raise SloraError(path / "tensors.safetensors", f"cannot read safetensors file: {e}; the checkpoint is "
                                                           f"damaged: start the run again with --replace") from None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = {k[len("param."):] for k in tensors if k.startswith("param.")}
        if saved != set(params):
            diff = sorted(saved ^ set(params))
            raise ValueError(f"{path}: checkpoint does not match the model's trainable parameters: {diff[:5]}")
        data_parallel.reshard(model)
        with torch.no_grad():
            for n, p in params.items():
                t = tensors[f"param.{n}"]
                if t.shape != p.shape:  # a DTensor's shape is the whole tensor's
                    raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, the model {tuple(p.shape)}")
                p.copy_(shard_like(t, p))
        order = [p for p in model.parameters() if p.requires_grad]  # the optimizer's param indices
        state = {int(i): {k: shard_like(tensors[f"opt.{i}.{k}"], order[int(i)]) if k != "step"
                          else tensors[f"opt.{i}.{k}"] for k in keys} for i, keys in meta["opt_state_keys"].items()}
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        sched.load_state_dict(meta["scheduler"])
        if rank == 0:
            torch.set_rng_state(tensors["rng.torch"])
            if device.type == "cuda" and "rng.cuda" in tensors:
                if world == 1:
                    torch.cuda.set_rng_state_all(list(tensors["rng.cuda"]))
                else:  # torchrun: this rank's own device only (see rank_rng_states)
                    torch.cuda.set_rng_state(tensors["rng.cuda"][0], device)
        else:
            key = f"rng.rank{rank}.torch"
            if key not in tensors:
                raise ValueError(f"{path}: holds no RNG state for rank {rank} ({key})")
            torch.set_rng_state(tensors[key])
            if device.type == "cuda" and f"rng.rank{rank}.cuda" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.rank{rank}.cuda"][0], device)
        if self.tracker is not None and meta["tracker"] is not None:
            self.tracker.epochs = meta["tracker"]
        self.truncate_log()  # last: a checkpoint refused above leaves the in-progress folder as it was
        return TrainState(step=meta["step"], epoch=meta["epoch"], batch=meta["batch"], tokens=meta["tokens"],
                          history=meta["history"], data_rng=tensors["rng.data"])


def data_digest(splits: dict) -> dict[str, str]:
    """{split: sha256 of its examples as read (uid, text, text pair, label, in order)}: the data part of a run's
    record. A changed file, another seeded split or another holdout changes the hash of its split."""
    out = {}
    for name, examples in splits.items():
        rows = [[e.uid, e.text, e.text_pair, e.label] for e in examples]
        out[name] = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    return out


def rank_rng_states(device) -> dict[str, torch.Tensor]:
    """Under torchrun: the RNG states of ranks 1..N-1 as checkpoint tensors `rng.rank<R>.torch` (CPU generator)
    and `rng.rank<R>.cuda` ((1, state bytes): that rank's own device), on every rank; rank 0's own are saved as
    rng.torch / rng.cuda like one process's. One process: {} (no collective). Each state crosses ranks as a JSON
    list of its bytes (slora.dist.process_group never pickles)."""
    d = process_group.get()
    if d.world == 1:
        return {}
    mine = {"torch": torch.get_rng_state().tolist()}
    if device.type == "cuda":  # this rank's device only: get_rng_state_all would open a context on every GPU
        mine["cuda"] = torch.cuda.get_rng_state(device).tolist()
    states = process_group.all_gather_json(mine)
    out = {}
    for r, st in enumerate(states[1:], start=1):
        for kind, values in st.items():
            t = torch.tensor(values, dtype=torch.uint8)
            out[f"rng.rank{r}.{kind}"] = t if kind == "torch" else t[None]  # (1, state bytes), as rng.cuda
    return out


# -----------------------------------------------------------------------------
# FSDP2: whole tensors in the checkpoint, shards in the model (one process and DDP: plain tensors pass through)

def whole(t: torch.Tensor) -> torch.Tensor:
    """`t` as a whole CPU tensor: a DTensor is gathered from every rank (a collective: every rank calls it)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def shard_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor `t` placed as `like`: for a DTensor, this rank's shard of it, cut locally (every rank holds
    the same `t`, so no communication: src_data_rank=None); otherwise `t` on like's device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(t.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return t.to(like.device)
