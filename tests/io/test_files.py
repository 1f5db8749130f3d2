"""slora/io/files.py: the lock, outputs apart from inputs, manifests of plain names, the completion journal and its
recovery, deferred signals, and write errors that name the path. The protocol under kills: test_files_crash.py."""
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from slora.errors import SloraError, Terminated, sigterm_as_interrupt
from slora.io import files
from slora.io.files import (JOURNAL, LOCK, PARTIAL, TRASH, OutputError, check_apart, commit, deferred_signals,
                            locked, output_folder, plain_names, read_manifest, recover, writing)

ROOT = Path(__file__).resolve().parents[2]


# -----------------------------------------------------------------------------
# The lock

HOLD = """
import sys, time
from pathlib import Path
from slora.io.files import locked
with locked(Path(sys.argv[1]) / ".slora-lock", Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_live_holder_is_named_and_a_killed_one_is_taken_over(tmp_path, capsys):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=rf"{tmp_path}: in use by another slora run \(pid {p.pid}, host "):
            with locked(tmp_path / LOCK, tmp_path):
                pass
    finally:
        p.kill()  # SIGKILL: the kernel drops its flock, the file stays and names a dead process
        p.wait()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == p.pid
    with locked(tmp_path / LOCK, tmp_path):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    assert f"stale lock of process {p.pid}" in capsys.readouterr().out and not (tmp_path / LOCK).exists()


def test_lock_files_that_name_no_dead_process_are_refused(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text("")  # a process killed as it took the lock: nothing to name, taken over silently
    with locked(lock, tmp_path):
        pass
    for content, culprit in (("{", lock), ("[]", lock), (json.dumps({"pid": "7"}), lock),
                             (json.dumps({"pid": os.getpid(), "host": socket.gethostname()}), tmp_path),
                             (json.dumps({"pid": 1, "host": "elsewhere"}), tmp_path)):
        lock.write_text(content)
        with pytest.raises(OutputError) as e:
            with locked(lock, tmp_path):
                pass
        assert e.value.culprit == str(culprit) and lock.read_text() == content  # not ours to remove


def test_two_holders_in_one_process_conflict(tmp_path):
    # flock is per open file: a second writer in the same process (a thread) is refused too
    with locked(tmp_path / LOCK, tmp_path):
        with pytest.raises(OutputError, match="in use by another slora run"):
            with locked(tmp_path / LOCK, tmp_path):
                pass


# -----------------------------------------------------------------------------
# Outputs apart from inputs

def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    for out, how in ((base, "is"), (tmp_path / "models", "contains"), (base / "merged", "lies inside")):
        with pytest.raises(OutputError, match=rf"^{out}: {how} the base {base}, which this command reads"):
            check_apart(out, {"the base": base})
    (tmp_path / "link").symlink_to(base)
    with pytest.raises(OutputError, match="is the base"):
        check_apart(tmp_path / "link", {"the base": base})
    check_apart(tmp_path / "models" / "merged", {"the base": base, "missing": tmp_path / "none", "none": None})


# -----------------------------------------------------------------------------
# Manifests and the journal

@pytest.mark.parametrize("entry", ["../x", ".", "..", "", "a/b", "/etc", ".slora-partial", "a\\b", 7, None])
def test_manifest_entries_must_be_plain_names(tmp_path, entry):
    manifest = tmp_path / ".slora-run.json"
    manifest.write_text(json.dumps({"files": ["args.json", entry]}))
    with pytest.raises(OutputError, match=r"entry .* is not a plain file name") as e:
        read_manifest(tmp_path, ".slora-run.json")
    assert e.value.culprit == str(manifest)
    with pytest.raises(OutputError, match="lists a file twice"):
        plain_names(["a", "a"], manifest)


def journaled(out: Path, names: dict, old: dict, manifest=".slora-x.json"):
    """OUT with the previous output `old` (listed in its manifest) and a finished one `names` in the partial."""
    out.mkdir()
    for n, data in old.items():
        (out / n).write_bytes(data)
    (out / manifest).write_text(json.dumps({"files": sorted(old)}, indent=2) + "\n")
    (out / PARTIAL).mkdir()
    for n, data in names.items():
        (out / PARTIAL / n).write_bytes(data)
    return sorted(names), sorted(old)


def test_commit_replaces_only_the_previous_outputs_files(tmp_path):
    out = tmp_path / "out"
    names, old = journaled(out, {"a": b"new a", "c": b"new c"}, {"a": b"old a", "b": b"old b"})
    (out / "NOTES.md").write_text("mine")
    commit(out, names, out / PARTIAL, ".slora-x.json", old, "run `again`")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        "a": b"new a", "c": b"new c", "NOTES.md": b"mine",
        ".slora-x.json": json.dumps({"files": ["a", "c"]}, indent=2).encode() + b"\n"}


def test_a_user_file_in_the_way_stops_the_commit_before_any_change(tmp_path, capsys):
    out = tmp_path / "out"
    names, old = journaled(out, {"a": b"new a", "c": b"new c"}, {"a": b"old a"})
    (out / "c").write_text("the user's c")
    with pytest.raises(OutputError, match=r"holds c, not slora's, .* nothing was changed: move them away, then run "
                                          r"`again` to finish"):
        commit(out, names, out / PARTIAL, ".slora-x.json", old, "run `again`")
    assert (out / "a").read_bytes() == b"old a" and (out / "c").read_text() == "the user's c"
    (out / "c").rename(tmp_path / "c")
    assert len(recover(out)) == 1 and (out / "a").read_bytes() == b"new a" and not (out / PARTIAL).exists()
    assert "note: " in capsys.readouterr().err


def test_recover_finishes_a_journal_at_any_point_and_is_idempotent(tmp_path):
    # each prefix of the moves, as a kill after it leaves them; recover twice gives the same folder
    for done in range(4):
        out = tmp_path / f"out{done}"
        names, old = journaled(out, {"a": b"A", "adapter": b"", "z": b"Z"}, {"a": b"old", "b": b"old b"})
        (out / PARTIAL / "adapter").unlink()  # a folder, as a run's adapter/
        (out / PARTIAL / "adapter").mkdir()
        (out / PARTIAL / "adapter" / "w").write_bytes(b"W")
        journal = {"manifest": ".slora-x.json", "source": "", "files": names, "remove": old, "finish": "x"}
        (out / PARTIAL / JOURNAL).write_text(json.dumps(journal))
        for n in (["b"] + names)[:done]:  # the old file removed, then some of the new ones moved
            if n == "b":
                (out / "b").unlink()
            else:
                (out / n).unlink(missing_ok=True)
                os.replace(out / PARTIAL / n, out / n)
        recover(out)
        first = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        recover(out)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == first
        assert (out / "a").read_bytes() == b"A" and (out / "adapter" / "w").read_bytes() == b"W"
        assert not (out / "b").exists() and not (out / PARTIAL).exists() and not (out / TRASH).exists()
        assert json.loads((out / ".slora-x.json").read_text())["files"] == names


def test_a_damaged_journal_changes_nothing(tmp_path):
    out = tmp_path / "out"
    journaled(out, {"a": b"A"}, {"a": b"old"})
    (tmp_path / "x").write_text("outside OUT")
    for journal in ({"manifest": ".slora-x.json", "source": "", "files": ["a"], "remove": ["../x"], "finish": "f"},
                    {"manifest": "../x", "source": "", "files": ["a"], "remove": [], "finish": "f"},
                    {"files": ["a"]}):
        (out / PARTIAL / JOURNAL).write_text(json.dumps(journal))
        with pytest.raises(OutputError) as e:
            recover(out)
        assert e.value.culprit == str(out / PARTIAL / JOURNAL)
        assert (tmp_path / "x").read_text() == "outside OUT" and (out / "a").read_bytes() == b"old"


# -----------------------------------------------------------------------------
# output_folder: what it refuses, what it says it removed

def writes_a(name: str) -> bool:
    return name in ("a", "b")


def test_output_folder_refuses_a_file_of_the_users_with_a_name_it_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("mine")
    (out / "NOTES.md").write_text("mine too")
    with pytest.raises(OutputError, match=r"holds a, which this command writes, and no .slora-x.json lists them"):
        with output_folder(out, ".slora-x.json", writes_a, "run `again`"):
            raise AssertionError("no work may start")
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "a"]


def test_output_folder_says_what_it_removed(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError) as e:
        with output_folder(out, ".slora-x.json", writes_a, "run `again`") as f:
            f.mkdir()
            (f / "a").write_text("half")
            raise RuntimeError("failed midway")
    assert e.value.__notes__ == [f"temporary files were removed ({out / PARTIAL})"] and not out.exists()
    with output_folder(out, ".slora-x.json", writes_a, "run `again`") as f:
        f.mkdir()
        (f / "a").write_text("whole")
    assert sorted(p.name for p in out.iterdir()) == [".slora-x.json", "a"]


def test_sigterm_while_an_output_is_moved_in_waits_for_the_last_move(tmp_path, monkeypatch):
    out, real = tmp_path / "out", os.replace

    def replace(src, dst, *a, **kw):  # SIGTERM right after the first of the two moves
        real(src, dst, *a, **kw)
        if Path(dst) == out / "a":
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Terminated) as e:
        with output_folder(out, ".slora-x.json", writes_a, "run `again`") as f:
            f.mkdir()
            (f / "a").write_text("A")
            (f / "b").write_text("B")
    assert e.value.__notes__ == [f"the output had completed: {out}"]
    assert sorted(p.name for p in out.iterdir()) == [".slora-x.json", "a", "b"]


# -----------------------------------------------------------------------------
# Signals wait for a journaled sequence

def test_sigterm_inside_deferred_signals_is_handled_after_it(tmp_path):
    done = []
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                done.append("the block ran to its end")
            time.sleep(5)  # the handler raises before this ends
    assert done == ["the block ran to its end"]


# -----------------------------------------------------------------------------
# Write errors name the path

@contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE for this process: a write past `nbytes` fails with EFBIG (SIGXFSZ ignored meanwhile)."""
    old_limit, old_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_write_names_the_path(tmp_path):
    big = {"w": np.zeros(10_000, np.float32)}
    for path, write in ((tmp_path / "a.txt", lambda p: p.write_text("x" * 10_000)),
                        (tmp_path / "a.safetensors", lambda p: save_file(big, str(p)))):
        with file_size_limit(4096), pytest.raises(SloraError) as e:
            with writing(path):
                write(path)
        assert str(e.value) == (f"{path}: cannot write it: File too large; the file is larger than a file may be "
                                f"here (ulimit -f, or the filesystem's limit)")
    with pytest.raises(FileNotFoundError):  # an error about another file (a copy's source) passes unchanged
        with writing(tmp_path / "b"):
            shutil.copyfile(tmp_path / "none", tmp_path / "b")


PERMISSION = """
import sys, numpy as np
from pathlib import Path
from safetensors.numpy import save_file
from slora.io.files import writing
for name, write in (("a.safetensors", lambda p: save_file({"w": np.zeros(4, np.float32)}, str(p))),
                    ("a.txt", lambda p: p.write_text("x"))):
    try:
        with writing(Path(sys.argv[1]) / name):
            write(Path(sys.argv[1]) / name)
    except Exception as e:
        print(type(e).__name__, e)
"""


def test_a_write_without_permission_names_the_path(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    command = [sys.executable, "-c", PERMISSION, str(folder)]
    if os.geteuid() == 0:  # root writes anywhere: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search"] + command
    p = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    folder.chmod(0o755)
    hint = "cannot write it: Permission denied; choose a folder you may write to"
    assert p.stdout.splitlines() == [f"SloraError {folder / 'a.safetensors'}: {hint}",
                                     f"SloraError {folder / 'a.txt'}: {hint}"], p.stderr
