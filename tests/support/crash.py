"""Crash tests in the style of SQLite's (tests/io/test_files_crash.py): a slora command is killed with SIGKILL right
after its k-th filesystem operation, for every k, then the recovery the README documents is run and the output
folder is compared with what the uninterrupted command writes.

Operations, counted in the child as they return, and only inside the windows a scenario names:
    os.replace, os.rename, os.unlink, os.remove, os.rmdir, os.mkdir, os.open with O_CREAT (a lock file),
    a file opened for writing (counted when opened: the file then exists, empty or cut) and when closed (written),
    safetensors' save_file
shutil.rmtree, shutil.copyfile and tempfile.mkdtemp are made of these, so each file they remove, copy or create is a
kill point of its own.

Every command runs in a child forked from a forkserver that imported torch and slora once (a fresh interpreter would
cost seconds per kill point). The children share a deterministic clock, time.time() advancing 0.25 s per call, so
two runs of one command from the same start write the same bytes, the timings in log.jsonl and metrics.json too.
"""
from __future__ import annotations

import builtins
import importlib
import io
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.numpy
import safetensors.torch
import torch
import torch._dynamo  # noqa: F401  (torch imports it lazily at the first model built: 2.5 s in every child otherwise)

import slora.cli.finetune  # noqa: F401  (imported once by the forkserver, so every child starts with it loaded)
import slora.cli.merge  # noqa: F401
from slora.cli.runner import run_cli

COMMANDS = {"finetune": "slora.cli.finetune", "merge": "slora.cli.merge"}


# -----------------------------------------------------------------------------
# In the child: count the operations, kill after the k-th

class Counter:
    def __init__(self, kill_after: int | None):
        self.n, self.kill_after, self.inside, self.after = 0, kill_after, 0, False

    def op(self):
        if self.inside or self.after:
            self.n += 1
            if self.n == self.kill_after:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)


class Written:
    """A file opened for writing; closing it is an operation."""

    def __init__(self, f, counter: Counter):
        self._f, self._counter, self._closed = f, counter, False

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        self._f.close()
        if not self._closed:
            self._closed = True
            self._counter.op()


def _counted(fn, counter: Counter, counts=lambda *a, **k: True):
    def wrapper(*a, **k):
        out = fn(*a, **k)
        if counts(*a, **k):
            counter.op()
        return out
    return wrapper


def _rebind(old, new):
    """Point every slora module's name for `old` (its own, or one imported with `from ... import`) at `new`."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("slora") and mod is not None:
            for attr, value in list(vars(mod).items()):
                if value is old:
                    setattr(mod, attr, new)


def instrument(counter: Counter, windows):
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "mkdir"):
        setattr(os, name, _counted(getattr(os, name), counter))
    os.open = _counted(os.open, counter, lambda path, flags, *a, **k: bool(flags & os.O_CREAT))
    real_open = io.open

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax+"):
            counter.op()
            return Written(f, counter)
        return f
    io.open = builtins.open = open_
    for save in (safetensors.torch.save_file, safetensors.numpy.save_file):
        _rebind(save, _counted(save, counter))
    for module, qualname, mode in windows:  # ("slora.io.files", "commit", "after") or (..., "inside")
        owner = importlib.import_module(module)
        *path, attr = qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        fn = getattr(owner, attr)

        def window(*a, _fn=fn, _mode=mode, **k):
            if _mode == "after":
                counter.after = True
                return _fn(*a, **k)
            counter.inside += 1
            try:
                return _fn(*a, **k)
            finally:
                counter.inside -= 1
        setattr(owner, attr, window)
        _rebind(fn, window)


def install_clock():
    ticks = iter(range(1, 1 << 62))
    time.time = lambda: 1.7e9 + 0.25 * next(ticks)


def child(job: dict):
    """Run one command as the forked child: output to files, clock and counters installed, exit with its status."""
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = os.open(job["log"] + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), line_buffering=True)
    torch.set_num_threads(1)
    install_clock()
    counter = Counter(job["kill_after"])
    if job.get("kill_at_step") is not None:  # SIGKILL when the loop asks whether this step is due for a checkpoint
        from slora.train import resume
        due = resume.Checkpointer.due
        resume.Checkpointer.due = lambda self, s: (os.kill(os.getpid(), signal.SIGKILL) if s == job["kill_at_step"]
                                                   else due(self, s))
    instrument(counter, job["windows"])
    main = importlib.import_module(COMMANDS[job["command"]]).main
    code = run_cli(main, job["argv"])
    Path(job["log"] + ".ops").write_text(str(counter.n))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# -----------------------------------------------------------------------------
# In the test: start the children, read what they said

@dataclass
class Result:
    code: int        # exit status; -9 when killed
    out: str
    err: str
    ops: int | None  # operations counted (None when killed)


class Harness:
    def __init__(self, logs: Path):
        self.logs, self.n = Path(logs), 0
        self.logs.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # read when the forkserver imports torch
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([__name__])

    def run(self, command: str, argv, windows=(), kill_after: int | None = None, kill_at_step: int | None = None,
            timeout: float = 300) -> Result:
        self.n += 1
        log = str(self.logs / f"child-{self.n}")
        job = {"command": command, "argv": [str(a) for a in argv], "windows": list(windows),
               "kill_after": kill_after, "kill_at_step": kill_at_step, "log": log}
        p = self.ctx.Process(target=child, args=(job,))
        p.start()
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
            raise TimeoutError(f"{command} {job['argv']} ran longer than {timeout} s")
        ops = Path(log + ".ops")
        return Result(p.exitcode, Path(log + ".out").read_text(), Path(log + ".err").read_text(),
                      int(ops.read_text()) if ops.exists() else None)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes, or 'dir'} of everything under `folder`, hidden entries included."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() else "dir"
    return out


def diff(got: dict, want: dict) -> str:
    """What differs between two snapshots, for a failure message."""
    lines = [f"missing {k}" for k in sorted(set(want) - set(got))]
    lines += [f"extra {k}" for k in sorted(set(got) - set(want))]
    lines += [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return "; ".join(lines)
