"""The life of a run folder (`--out`): lock, in-progress folder, completion, replacement, interruption.

Layout of OUT while and after `python -m slora.finetune --out OUT` runs (the protocol of slora.io.files):

    OUT/.slora-lock        while a run holds OUT: JSON {pid, host, started}; a second run on OUT refuses at once
    OUT/.slora-partial/    the run in progress: every file of the run is written here first, and the training
                           checkpoints of --save-every (checkpoint-STEP/ + checkpoint.json) live here too. It is
                           the resume point of `--resume OUT`; it is kept after a crash, kill or Ctrl-C only when
                           it holds a checkpoint, and removed otherwise.
    OUT/.slora-run.json    written when the run completes: the names of the files slora moved into OUT
    OUT/args.json, ...     the complete run (the files of .slora-partial/ less its checkpoints)

Rules (nothing a user owns is lost): slora deletes only files it wrote (the names listed in .slora-run.json, or
for a run folder from before that file existed, the full set of a run's fixed names); a name in OUT that a run
writes and no manifest lists is the user's, and the run refuses to start. Files a user added (NOTES.md, plots/)
survive a --replace. A complete run is refused unless --replace is given; the previous run's files stay until the
new run completes, then the two are swapped under a journal (slora.io.files.commit), so a process killed at any
moment leaves OUT as it was, complete, or finished by `--resume OUT`. A lock whose process is gone (killed) is
stale: it is taken over, and the takeover is said. SIGTERM is turned into KeyboardInterrupt, so it cleans up as
Ctrl-C does, and the error line says what was removed or kept. The files themselves are written by `write_json`
(strict JSON) and `Log` (log.jsonl and the progress lines); under torchrun rank 0 alone writes.
"""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from slora.dist import process_group
from slora.io.files import (LOCK, PARTIAL, Busy, OutputError, check_apart, commit, completing, deferred_signals,
                            discard, locked, read_manifest, recover, writing)
from slora.errors import sigterm_as_interrupt  # SIGTERM unwinds as Ctrl-C does (raised as Terminated)

MANIFEST = ".slora-run.json"
CHECKPOINT = "checkpoint.json"  # inside PARTIAL: names the newest complete training checkpoint (slora.train.resume)
# every name a run writes into OUT; a run folder from before MANIFEST existed is recognised by the ones every run
# writes (LEGACY_SET), and only then may --replace delete its files
LEGACY_FILES = ("args.json", "sensitivity.json", "ranks.json", "ranks.svg", "metrics.json", "log.jsonl", "adapter",
                "epoch_sensitivity.json")
LEGACY_SET = ("args.json", "sensitivity.json", "ranks.json", "ranks.svg", "metrics.json", "log.jsonl")
RunFolderError = OutputError  # the run folder is in a state the requested action may not touch


# -----------------------------------------------------------------------------
# What OUT holds

def partial_of(out: Path) -> Path:
    return Path(out) / PARTIAL


def resume_command(out) -> str:
    return f"python -m slora.finetune --resume {out}"


def interrupted(out: Path) -> bool:
    """OUT holds an interrupted run that `--resume` can continue (an in-progress folder with a checkpoint)."""
    return (partial_of(out) / CHECKPOINT).is_file() and (partial_of(out) / "args.json").is_file() and \
        completing(out) is None


def complete_files(out: Path) -> list[str] | None:
    """Names of the complete run's files in OUT (from the manifest, each checked to be a plain name, or a legacy
    run's full set of names), None if no run slora can prove it wrote is there."""
    out = Path(out)
    files = read_manifest(out, MANIFEST)
    if files is not None:
        return files
    if all((out / n).is_file() and not (out / n).is_symlink() for n in LEGACY_SET):
        return [n for n in LEGACY_FILES if os.path.lexists(out / n)]
    return None


def resolve_resume(path) -> Path:
    """OUT for `--resume PATH`, where PATH is OUT or the in-progress folder it printed; refused when there is no
    interrupted run. Looked at under OUT's lock, after `recover`: a completion that a killed process left half done
    is finished here, and OUT is returned holding the complete run (`interrupted(OUT)` is then False). Should
    another process hold the lock (under torchrun, another rank calling this at the same moment), it is that
    process's to finish anything, and OUT is looked at as it is."""
    path = Path(path)
    out = path.parent if path.name == PARTIAL else path
    if not out.is_dir():
        raise RunFolderError(out, "holds no interrupted slora run to resume")
    try:
        with locked(out / LOCK, out, "--out"):
            was_completing = completing(out) is not None
            recover(out)
            return _resume_point(out, finished=was_completing)
    except Busy:
        return _resume_point(out, finished=False)


def _resume_point(out: Path, finished: bool) -> Path:
    if finished and complete_files(out) is not None and not partial_of(out).exists():
        return out  # the run had finished; recover moved its files into OUT
    if interrupted(out):
        return out
    if complete_files(out) is not None:
        raise RunFolderError(out, "holds a complete run, nothing to resume")
    if partial_of(out).is_dir():
        raise RunFolderError(partial_of(out), "the run stopped before its first checkpoint (--save-every), "
                                              "nothing to resume; start it again with --replace")
    raise RunFolderError(out, "holds no interrupted slora run to resume")


# -----------------------------------------------------------------------------
# The run

@contextmanager
def run_folder(out, *, resume: bool = False, replace: bool = False, inputs: dict | None = None,
               keep_on_error=lambda e: True) -> Iterator[Path]:
    """Yield the in-progress folder of a run on OUT; on success move its files into OUT.

    resume: continue the interrupted run in OUT/.slora-partial (it must be one). replace: a complete or
    interrupted run already in OUT may go (its own files only). inputs: {what: path} the run reads (the model
    folder, the data files); OUT may not be, contain or lie inside one. On an exception the in-progress folder is
    kept when it holds a checkpoint and `keep_on_error(exc)` agrees (a resume point), and removed otherwise; the
    exception's note says which. An OUT that this call created and left empty is removed too.
    """
    out = Path(out)
    check_apart(out, inputs or {}, "--out")
    if out.exists() and not out.is_dir():
        raise RunFolderError(out, "exists and is not a folder; choose another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = partial_of(out)
    try:
        with locked(out / LOCK, out, "--out"), sigterm_as_interrupt():
            _open(out, resume, replace)
            print(f"in-progress folder: {partial}", flush=True)
            try:
                yield partial
            except BaseException as e:
                if interrupted(out) and keep_on_error(e):
                    e.add_note(f"the run is kept in {partial}: continue it with `{resume_command(out)}`")
                else:
                    with deferred_signals():
                        discard(partial)
                    e.add_note(f"temporary files were removed ({partial})")
                raise
            try:
                _complete(out)
            except KeyboardInterrupt as e:  # handled once the journaled moves were done: the run is complete
                if completing(out) is None and not partial.exists():
                    e.add_note(f"the run had completed: {out}")
                raise
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _open(out: Path, resume: bool, replace: bool):
    """With OUT's lock held: finish what a killed run left, check that this run may start, make its in-progress
    folder."""
    recover(out)
    if resume:
        _resume_point(out, finished=False)
        return
    owned = complete_files(out) or []  # a damaged manifest is an error here, before any work
    partial = partial_of(out)
    if not replace:
        if partial.exists():
            what = "an interrupted run" if interrupted(out) else "an unfinished run with no checkpoint"
            raise RunFolderError(out, f"holds {what} in {partial}; continue it with `{resume_command(out)}` or "
                                      f"start over with --replace")
        if complete_files(out) is not None:
            raise RunFolderError(out, "already holds a complete run; pass --replace to replace it (only slora's "
                                      "own files are removed) or choose another --out")
    clash = [n for n in LEGACY_FILES if os.path.lexists(out / n) and n not in owned]
    if clash:
        raise RunFolderError(out, f"holds {', '.join(clash)}, which a run would overwrite, and no slora run (no "
                                  f"{MANIFEST} lists them): they are not replaced, not even with --replace; move "
                                  f"them away or choose another --out")
    if os.path.lexists(partial):  # --replace of an interrupted run: the whole in-progress folder is slora's
        with deferred_signals():
            discard(partial)
        print(f"{partial}: the earlier unfinished run was removed (--replace)", flush=True)
    partial.mkdir()


def _complete(out: Path):
    """Move the run's files from the in-progress folder into OUT in place of the previous complete run's own
    files (replace), listing them in the manifest; journaled (slora.io.files.commit). Checkpoints are not part of
    a run, nor are hidden names (slora's bookkeeping, a temporary folder a killed write left)."""
    partial = partial_of(out)
    names = sorted(p.name for p in partial.iterdir()
                   if p.name != CHECKPOINT and not p.name.startswith(("checkpoint-", ".")))
    commit(out, names, partial, MANIFEST, complete_files(out) or [], f"run `{resume_command(out)}`")


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
        with writing(path):
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
            with writing(self.path), open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        if text:
            print(text, flush=True)
