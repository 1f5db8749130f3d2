"""Crash tests of the output-folder protocol (slora/io/files.py), in the style of SQLite's: each path that changes an
output folder (a run's completion, --replace of a complete and of an interrupted run, training checkpoints, merge into
a new folder and over an earlier merge) is killed with SIGKILL right after its k-th filesystem operation, for every k
(tests/support/crash.py counts them in an uninterrupted run first). Then the recovery the README documents is run, and
the folder must equal what the uninterrupted command writes, byte for byte; the user's files in it are checked after
every kill, and every message about what was removed is checked against the folder.

The recovery ("Run folders" and "Merging" in the README): run the same command again. It finishes or removes what the
killed process left, saying so, and then completes, or says OUT holds a complete run (the killed run had finished), or
names the one command that continues it (`--resume OUT`, which names `--replace` when there is no checkpoint to
continue from). A run killed while its files were moved into OUT is also finished by `--resume OUT`.

Byte for byte means the files of the run folder (or of the merged model) and the manifest, with one exception: a run
continued from a training checkpoint measures its own timings, so the time fields of log.jsonl and metrics.json are
left out of that comparison, as is the "resume" record the resumed run adds to log.jsonl (everything else in them is
compared exactly).
"""
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support.crash import Harness, diff, snapshot
from tests.support.tiny import sentiment_rows, tiny_model_dir, write_jsonl

pytestmark = pytest.mark.slow

# the windows in which operations are counted (tests/support/crash.py): "inside" the function, or from its start on
COMPLETION = [("slora.io.files", "commit", "after")]
REPLACE = [("slora.io.files", "acquire", "inside"), ("slora.train.run_folder", "_open", "inside"),
           ("slora.io.files", "commit", "after")]
CHECKPOINTS = [("slora.train.resume", "Checkpointer.save", "inside")]
MERGE = [("slora.cli.merge", "main", "after")]
USER = {"NOTES.md": b"the user's notes", "plots/a.txt": b"the user's plot"}
TIMES = {"log.jsonl": ("time", "tokens_per_s"), "metrics.json": ("times",)}
COUNTS = {}  # path -> (kill points, seconds), printed at the end of the module


@pytest.fixture(scope="module")
def crash(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash")
    rows = sentiment_rows(20)
    train, dev = write_jsonl(d / "train.jsonl", rows[:16]), write_jsonl(d / "dev.jsonl", rows[16:])
    model = tiny_model_dir(d / "m", "encoder")

    def argv(out, *extra):
        return ["--model", model, "--task", "jsonl", "--train-file", train, "--dev-file", dev, "--batch-size", "8",
                "--calib-n", "8", "--max-steps", "2", "--threads", "1", "--out", out, *extra]
    yield Harness(d / "logs"), argv, d
    for path, (n, seconds) in COUNTS.items():
        print(f"crash test {path}: {n} kill points, {seconds:.1f} s")


# -----------------------------------------------------------------------------
# Helpers

def restore(stash: Path | None, out: Path):
    shutil.rmtree(out, ignore_errors=True)
    if stash is not None:
        shutil.copytree(stash, out, symlinks=True)


def add_user_files(out: Path):
    for name, data in USER.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)


def user_files_intact(out: Path) -> bool:
    return all((out / n).is_file() and (out / n).read_bytes() == data for n, data in USER.items())


REMOVED = re.compile(r"(?:note: removed |temporary files were removed \()(/\S+?)(?::|\)|$)", re.M)
KEPT = re.compile(r"the run is kept in (/\S+?):")


def claims_hold(text: str):
    """Every path a message says was removed is gone, every path it says was kept is there."""
    for path in REMOVED.findall(text):
        assert not Path(path).exists(), f"said removed, but exists: {path}\n{text}"
    for path in KEPT.findall(text):
        assert Path(path).is_dir(), f"said kept, but missing: {path}\n{text}"


def run(h: Harness, command, argv, **kw):
    r = h.run(command, argv, **kw)
    claims_hold(r.out + r.err)
    return r


def follow(h: Harness, command: str, argv, out: Path, first=None) -> str:
    """The documented recovery: the command again (or `first`), then what its message names. Returns how it ended:
    'again' (it ran through), 'complete' (the killed run had finished), 'resumed' or 'replaced'."""
    r = run(h, command, first or argv)
    if r.code == 0:
        return "resumed" if first else "again"
    if command == "finetune" and "holds a complete run" in r.err:
        return "complete"
    if command == "finetune" and "--resume" in r.err and not first:
        r = run(h, command, ["--resume", out])
        if r.code == 0:
            return "resumed"
    if command == "finetune" and "--replace" in r.err and "--replace" not in argv:
        r = run(h, command, argv + ["--replace"])
        assert r.code == 0, r.err
        return "replaced"
    raise AssertionError(f"no recovery: {r.err}")


def untimed(snap: dict) -> dict:
    """The snapshot without the time fields of log.jsonl and metrics.json (a resumed run measures its own), and
    without the "resume" record that a resumed run adds to log.jsonl."""
    out = dict(snap)
    for name, keys in TIMES.items():
        if name in out:
            text = out[name].decode()
            rows = [json.loads(x) for x in text.splitlines()] if name.endswith(".jsonl") else [json.loads(text)]
            out[name] = [{k: v for k, v in r.items() if k not in keys} for r in rows if r.get("event") != "resume"]
    return out


def reference(h, command, argv, windows, out, before=None):
    restore(before, out)
    r = run(h, command, argv, windows=windows)
    assert r.code == 0, r.err
    return r.ops, snapshot(out)


def kill_each(h, command, argv, windows, out, before, n, check_killed=None):
    """Yield k after running the command killed after its k-th operation, for k = 1..n."""
    for k in range(1, n + 1):
        restore(before, out)
        r = h.run(command, argv, windows=windows, kill_after=k)
        assert r.code == -9, f"k={k}: not killed ({r.code}): {r.err}"
        if check_killed:
            check_killed(k)
        yield k


# -----------------------------------------------------------------------------
# python -m slora.finetune

def test_completion(crash):
    h, argv, d = crash
    out, t0 = d / "completion" / "run", time.time()
    cmd = argv(out)
    n, want = reference(h, "finetune", cmd, COMPLETION, out)
    _, want_replaced = reference(h, "finetune", cmd + ["--replace"], (), out)
    seen = Counter()
    for k in kill_each(h, "finetune", cmd, COMPLETION, out, None, n):
        killed = d / "completion" / "killed"
        restore(out, killed)
        for first in (None, ["--resume", out]):  # the command again, or --resume OUT
            restore(killed, out)
            how = follow(h, "finetune", cmd, out, first)
            seen[how] += 1
            got = snapshot(out)
            assert got == (want_replaced if how == "replaced" else want), f"k={k} {how}: {diff(got, want)}"
    # killed before the journal was in place, the run is one stopped before a checkpoint: --replace runs it again
    assert seen["complete"] + seen["resumed"] > seen["replaced"] > 0 and n >= 7 + 6, (n, seen)
    COUNTS["completion"] = (n, time.time() - t0)


@pytest.mark.parametrize("before", ["complete", "interrupted"])
def test_replace(crash, before):
    h, argv, d = crash
    out, t0 = d / f"replace-{before}" / "run", time.time()
    stash = d / f"replace-{before}" / "before"
    if before == "complete":
        r = run(h, "finetune", argv(out))
    else:  # killed by SIGKILL after its first checkpoint: a resume point with a stale lock
        r = run(h, "finetune", argv(out, "--save-every", "1"), kill_at_step=2)
        assert (out / ".slora-partial" / "checkpoint.json").is_file()
    assert r.code in (0, -9), r.err
    add_user_files(out)
    restore(out, stash)
    cmd = argv(out, "--seed", "1", "--replace")
    n, want = reference(h, "finetune", cmd, REPLACE, out, stash)
    assert user_files_intact(out) and json.loads((out / "args.json").read_text())["seed"] == 1
    seen = Counter()
    for k in kill_each(h, "finetune", cmd, REPLACE, out, stash, n,
                       check_killed=lambda k: user_files_intact(out) or pytest.fail(f"k={k}: user files changed")):
        how = follow(h, "finetune", cmd, out)
        seen[how] += 1
        got = snapshot(out)
        assert got == want, f"k={k} {how}: {diff(got, want)}"
    assert seen["again"] == n, seen
    COUNTS[f"--replace of {'a complete' if before == 'complete' else 'an interrupted'} run"] = (n, time.time() - t0)


def test_checkpoint_writes(crash):
    h, argv, d = crash
    out, t0 = d / "checkpoints" / "run", time.time()
    # three optimizer steps: checkpoints after steps 1 and 2 (the second replacing the first), none after the last
    cmd = argv(out, "--save-every", "1", "--max-steps", "3", "--epochs", "2")
    n, want = reference(h, "finetune", cmd, CHECKPOINTS, out)
    _, want_replaced = reference(h, "finetune", cmd + ["--replace"], (), out)
    seen = Counter()
    for k in kill_each(h, "finetune", cmd, CHECKPOINTS, out, None, n):
        how = follow(h, "finetune", cmd, out)
        seen[how] += 1
        got = snapshot(out)
        if how == "resumed":
            assert untimed(got) == untimed(want), f"k={k} {how}: {diff(untimed(got), untimed(want))}"
        else:
            assert got == (want_replaced if how == "replaced" else want), f"k={k} {how}: {diff(got, want)}"
    assert seen["resumed"] > 0 and seen["replaced"] > 0, seen  # kills before and after the first checkpoint
    COUNTS["checkpoint writes"] = (n, time.time() - t0)


# -----------------------------------------------------------------------------
# python -m slora.merge

@pytest.mark.parametrize("before", ["new", "earlier-merge"])
def test_merge(crash, before):
    h, argv, d = crash
    t0 = time.time()
    run_dir, out, stash = d / f"merge-{before}" / "run", d / f"merge-{before}" / "merged", None
    assert run(h, "finetune", argv(run_dir)).code == 0
    cmd = [run_dir, out, "--max-shard-size", "20KB"]  # several shards: a kill point per shard
    if before == "earlier-merge":  # an earlier merge in one bf16 file, and the user's notes beside it
        assert run(h, "merge", [run_dir, out, "--dtype", "bf16"]).code == 0
        add_user_files(out)
        stash = d / f"merge-{before}" / "before"
        restore(out, stash)
    n, want = reference(h, "merge", cmd, MERGE, out, stash)
    assert len([p for p in want if p.endswith(".safetensors")]) >= 3
    check = (lambda k: user_files_intact(out) or pytest.fail(f"k={k}: user files changed")) if stash else None
    for k in kill_each(h, "merge", cmd, MERGE, out, stash, n, check_killed=check):
        assert follow(h, "merge", cmd, out) == "again"
        got = snapshot(out)
        assert got == want, f"k={k}: {diff(got, want)}"
    COUNTS["merge into " + ("a new folder" if before == "new" else "an earlier merge")] = (n, time.time() - t0)
