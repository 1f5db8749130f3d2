"""The life of a run folder (`--out`): lock, in-progress folder, completion, replacement, interruption.

Layout of OUT while and after `python -m slora.finetune --out OUT` runs:

    OUT/.slora-lock        while a run holds OUT: JSON {pid, host, started}; a second run on OUT refuses at once
    OUT/.slora-partial/    the run in progress: every file of the run is written here first, and the training
                           checkpoints of --save-every (checkpoint-STEP/ + checkpoint.json) live here too. It is
                           the resume point of `--resume OUT`; it is kept after a crash, kill or Ctrl-C only when
                           it holds a checkpoint, and removed otherwise.
    OUT/.slora-run.json    written last when the run completes: the names of the files slora moved into OUT
    OUT/args.json, ...     the complete run (the files of .slora-partial/ less its checkpoints)

Rules (nothing a user owns is lost): slora deletes only files it wrote (the names listed in
.slora-run.json, or for a run folder from before that file existed, the fixed names of a run); files a user added
(NOTES.md, plots/) survive a --replace. A complete run is refused unless --replace is given. A lock whose process is
gone (killed) is stale: it is taken over, and the takeover is said. SIGTERM is turned into KeyboardInterrupt, so it
cleans up as Ctrl-C does. The files themselves are written by `write_json` (strict JSON) and `Log` (log.jsonl and
the progress lines); under torchrun rank 0 alone writes.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slora.dist import process_group
from slora.io.files import process_alive, read_json
from slora.errors import sigterm_as_interrupt  # SIGTERM unwinds as Ctrl-C does (raised as Terminated)

LOCK = ".slora-lock"
PARTIAL = ".slora-partial"
MANIFEST = ".slora-run.json"
CHECKPOINT = "checkpoint.json"  # inside PARTIAL: names the newest complete training checkpoint (slora.train.resume)
# the files of a run written before MANIFEST existed: what --replace may delete in such a folder
LEGACY_FILES = ("args.json", "sensitivity.json", "ranks.json", "ranks.svg", "metrics.json", "log.jsonl", "adapter",
                "epoch_sensitivity.json")


class RunFolderError(Exception):
    """The run folder is in a state that the requested action may not touch; the message says what to do."""


# -----------------------------------------------------------------------------
# What OUT holds

def partial_of(out: Path) -> Path:
    return Path(out) / PARTIAL


def interrupted(out: Path) -> bool:
    """OUT holds an interrupted run that `--resume` can continue (an in-progress folder with a checkpoint)."""
    return (partial_of(out) / CHECKPOINT).is_file() and (partial_of(out) / "args.json").is_file()


def complete_files(out: Path) -> list[str] | None:
    """Names of the complete run's files in OUT (from the manifest, or the legacy names), None if none is there."""
    out = Path(out)
    if (out / MANIFEST).is_file():
        return read_json(out / MANIFEST)["files"]
    if (out / "args.json").is_file() and (out / "metrics.json").is_file():
        return [n for n in LEGACY_FILES if (out / n).exists()]
    return None


def resolve_resume(path) -> Path:
    """OUT for `--resume PATH`, where PATH is OUT or the in-progress folder it printed; refused when there is no
    interrupted run."""
    path = Path(path)
    out = path.parent if path.name == PARTIAL else path
    if interrupted(out):
        return out
    if complete_files(out) is not None:
        raise RunFolderError(f"{out}: holds a complete run, nothing to resume")
    if partial_of(out).is_dir():
        raise RunFolderError(f"{partial_of(out)}: the run stopped before its first checkpoint (--save-every), "
                             f"nothing to resume; start it again with --replace")
    raise RunFolderError(f"{out}: holds no interrupted slora run to resume")


# -----------------------------------------------------------------------------
# The lock

@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold OUT/.slora-lock for the block. A live holder makes this refuse at once, naming it; a holder on this
    host whose process is gone left a stale lock, which is taken over (and said)."""
    path = Path(out) / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                held = {}  # being written this instant, or damaged: treated as held
            pid, host = held.get("pid"), held.get("host")
            if not isinstance(pid, int):
                raise RunFolderError(f"{path}: lock file without a process id (being written this instant, or "
                                     f"damaged); if no slora run is using {out}, remove it") from None
            if host == me["host"] and isinstance(pid, int) and not process_alive(pid):
                print(f"{path}: stale lock of process {pid} (started {held.get('started')}, no longer running): "
                      f"taken over", flush=True)
                path.unlink(missing_ok=True)
                continue
            hint = "" if host == me["host"] else f" (if that run is gone, delete {path})"
            raise RunFolderError(f"{out}: in use by another slora run (pid {pid}, host {host}, started "
                                 f"{held.get('started')}); wait for it or choose another --out{hint}") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        break
    else:
        raise RunFolderError(f"{path}: could not take the lock; another run is starting on {out}")
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


# -----------------------------------------------------------------------------
# The run

@contextmanager
def run_folder(out, *, resume: bool = False, replace: bool = False, keep_on_error=lambda e: True
               ) -> Iterator[Path]:
    """Yield the in-progress folder of a run on OUT; on success move its files into OUT.

    resume: continue the interrupted run in OUT/.slora-partial (it must be one). replace: a complete or
    interrupted run already in OUT may go (its own files only). On an exception the in-progress folder is kept
    when it holds a checkpoint and `keep_on_error(exc)` agrees (a resume point), and removed otherwise; an OUT
    that this call created and left empty is removed too.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{out}: exists and is not a folder; choose another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = partial_of(out)
    try:
        with locked(out), sigterm_as_interrupt():
            if resume:
                resolve_resume(out)
            else:
                _check_new_run(out, replace)
                if partial.exists():
                    shutil.rmtree(partial)  # --replace of an interrupted run: the whole folder is slora's
                partial.mkdir()
            print(f"in-progress folder: {partial}", flush=True)
            try:
                yield partial
            except BaseException as e:
                if interrupted(out) and keep_on_error(e):
                    print(f"interrupted; the run can be continued with: python -m slora.finetune --resume {out}",
                          flush=True)
                else:
                    shutil.rmtree(partial, ignore_errors=True)
                raise
            _complete(out, partial, replace)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _check_new_run(out: Path, replace: bool):
    if replace:
        return
    if partial_of(out).exists():
        what = "an interrupted run" if interrupted(out) else "an unfinished run with no checkpoint"
        raise RunFolderError(f"{out}: holds {what} in {partial_of(out)}; continue it with `python -m "
                             f"slora.finetune --resume {out}` or start over with --replace")
    if complete_files(out) is not None:
        raise RunFolderError(f"{out}: already holds a complete run; pass --replace to replace it (only slora's "
                             f"own files are removed) or choose another --out")
    clash = [n for n in LEGACY_FILES if (out / n).exists()]
    if clash:
        raise RunFolderError(f"{out}: holds {', '.join(clash)}, which a run would overwrite, and no slora run; "
                             f"choose another --out")


def _complete(out: Path, partial: Path, replace: bool):
    """Move the run's files from the in-progress folder into OUT, then write the manifest (last: it marks the run
    complete). The previous complete run's own files go first (replace); checkpoints are not part of a run."""
    names = sorted(p.name for p in partial.iterdir() if p.name != CHECKPOINT and not p.name.startswith("checkpoint-"))
    old = complete_files(out) or []
    clash = [n for n in names if (out / n).exists() and n not in old]
    if clash:  # a user file of that name is never overwritten
        raise RunFolderError(f"{out}: holds {', '.join(clash)}, not slora's; the finished run stays in {partial}")
    for name in old:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for name in names:
        os.replace(partial / name, out / name)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": names}, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    shutil.rmtree(partial)


# -----------------------------------------------------------------------------
# Writers of the run folder's files (torchrun: rank 0 alone writes)

def write_json(path: Path, obj):
    """Strict JSON: an undefined score (NaN, e.g. the correlation of a constant prediction) is written as null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    if process_group.get().is_main:  # torchrun: rank 0 alone writes the run folder
        path.write_text(json.dumps(clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def sensitivity_json(s, targets: str) -> dict:
    """sensitivity.json: `{"modules": {name: {d_in, d_out, tokens, trace, topk, effective_rank, s_global, s_local,
    theta}}, "weights": {beta1, beta2, gamma1, gamma2}, "config": {targets, ...}}` from a sensitivity.Sensitivity;
    `targets` is the run's module selection (--targets), recorded with the method's configuration."""
    return {"modules": s.modules, "weights": s.weights, "config": {"targets": targets} | s.config}


class Log:
    """Progress lines on stdout and the same records, as JSON, in log.jsonl (one line written per record)."""

    def __init__(self, path: Path, muted: bool = False):
        self.path = path
        self.muted = muted  # print only: a resumed run does not record its set-up stages a second time

    def __call__(self, event: str, text: str = "", **fields):
        if not process_group.get().is_main:  # torchrun: rank 0 alone logs and prints
            return
        if not self.muted:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        if text:
            print(text, flush=True)
