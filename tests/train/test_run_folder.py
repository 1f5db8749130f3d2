"""slora/train/run_folder.py and slora/train/resume.py through `python -m slora.finetune`: the lock, --replace keeps
user files and removes only what a manifest of plain names lists, OUT apart from the inputs, the in-progress folder,
a kill or SIGTERM while the files are moved in, error lines that say truly what was removed or kept, --resume
bit-identical to an uninterrupted run (in process, and after kill -9). Every kill point:
tests/io/test_files_crash.py."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from slora.cli import finetune
from slora.train import resume, run_folder
from slora.cli.runner import run_cli
from slora.train.run_folder import RunFolderError
from tests.io.test_files import file_size_limit
from tests.support.tiny import sentiment_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rf")
    return d, sentiment_task(d)


def argv(setup, out, *extra):
    d, model = setup
    # 30 examples / batch 4 = 8 micro-batches per epoch, accumulation 3: steps of 3, 3, 2 micro-batches; two epochs,
    # so checkpoints fall mid-epoch and at an epoch's end; LoRA dropout 0.1 draws from the saved RNG
    return ["--model", str(model), "--task", "jsonl", "--train-file", str(d / "train.jsonl"), "--dev-file",
            str(d / "dev.jsonl"), "--batch-size", "4", "--grad-accum", "3", "--epochs", "2", "--calib-n", "8",
            "--log-every", "1", "--save-every", "2", "--threads", "1", "--out", str(out), *extra]


def step_losses(out: Path) -> list:
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["event"] == "step"]


def evals(out: Path) -> list:
    return json.loads((out / "metrics.json").read_text())["epochs"]


def adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run."""
    return finetune.main(argv(setup, tmp_path_factory.mktemp("ref") / "run"))


# The efficient GPU path (the full-size NLG comparison's flags): length-grouped batches, length-sorted evaluation of another
# batch size, the non-finite check on the device (read every 3 steps here, so checkpoints fall between reads), fused
# AdamW. Resume must stay bit-identical with it.
FAST = ("--group-by-length", "--eval-batch-size", "3", "--check-finite", "log", "--log-every", "3", "--fused-optim")


@pytest.fixture(scope="module")
def reference_fast(setup, tmp_path_factory):
    """The uninterrupted run with the FAST flags."""
    return finetune.main(argv(setup, tmp_path_factory.mktemp("ref-fast") / "run", *FAST))


def interrupt_at(monkeypatch, step: int, exc=KeyboardInterrupt):
    """Raise `exc` when the loop asks whether step `step` is due for a checkpoint (after it was logged)."""
    due = resume.Checkpointer.due

    def hook(self, s):
        if s == step:
            raise exc("interrupted by the test")
        return due(self, s)
    monkeypatch.setattr(resume.Checkpointer, "due", hook)


# -----------------------------------------------------------------------------
# Resume

@pytest.mark.parametrize("stop", [3, 5])  # 3: mid-epoch (checkpoint 2); 5: checkpoint 4 is mid-epoch 2 too
def test_interrupted_then_resumed_equals_uninterrupted(setup, reference, tmp_path, monkeypatch, stop):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv(setup, out))
    assert run_folder.interrupted(out) and not (out / ".slora-lock").exists()
    assert step_losses(out / ".slora-partial")[-1][0] == stop  # logged beyond the checkpoint: cut on resume
    finetune.main(["--resume", str(out / ".slora-partial")])  # the printed folder works as well as --out
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert step_losses(out) == step_losses(reference)
    assert evals(out) == evals(reference)
    assert not (out / ".slora-partial").exists()


@pytest.mark.parametrize("stop", [3, 5])
def test_resume_with_grouped_batches_and_device_checks_is_bit_identical(setup, reference, reference_fast, tmp_path,
                                                                        monkeypatch, stop):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv(setup, out, *FAST))
    finetune.main(["--resume", str(out)])
    assert adapter_bytes(out) == adapter_bytes(reference_fast)
    assert step_losses(out) == step_losses(reference_fast) and len(step_losses(out)) == 2  # steps 3 and 6 of 6
    assert evals(out) == evals(reference_fast)
    assert adapter_bytes(reference_fast) != adapter_bytes(reference)  # another batch order: another adapter


def test_resume_of_a_run_recorded_before_an_option_existed(setup, reference, tmp_path, monkeypatch):
    # args.json without a key: the run used that option's default, and so does its resumption
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv(setup, out))
    path = out / ".slora-partial" / "args.json"
    recorded = json.loads(path.read_text())
    del recorded["activation_checkpointing"], recorded["dtype"]
    path.write_text(json.dumps(recorded))
    finetune.main(["--resume", str(out)])
    assert adapter_bytes(out) == adapter_bytes(reference)


@pytest.mark.slow
@pytest.mark.parametrize("fast", [False, True], ids=["default", "fast-path"])
def test_kill_9_after_a_checkpoint_then_resume_is_bit_identical(setup, request, tmp_path, fast):
    # a real subprocess killed with SIGKILL right after step 5 (checkpoint 4 written), then resumed
    reference = request.getfixturevalue("reference_fast" if fast else "reference")
    out = tmp_path / "run"
    code = ("import os, signal, sys; from slora.cli import finetune; from slora.train import resume\n"
            "due = resume.Checkpointer.due\n"
            "def hook(self, s):\n"
            "    if s == 5: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return due(self, s)\n"
            "resume.Checkpointer.due = hook\n"
            "finetune.main(sys.argv[1:])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", code, *argv(setup, out, *(FAST if fast else ()))], cwd=ROOT, env=env,
                       capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]
    assert (out / ".slora-lock").exists()  # left by the killed process: stale
    p = subprocess.run([sys.executable, "-m", "slora.finetune", "--resume", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stale lock" in p.stdout
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert step_losses(out) == step_losses(reference)
    assert evals(out) == evals(reference)


def test_resume_refuses_what_is_not_an_interrupted_run(setup, reference, tmp_path):
    with pytest.raises(RunFolderError, match="holds a complete run, nothing to resume"):
        finetune.main(["--resume", str(reference)])
    with pytest.raises(RunFolderError, match="holds no interrupted slora run"):
        finetune.main(["--resume", str(tmp_path / "never")])
    assert run_cli(finetune.main, ["--resume", str(reference), "--lr", "1"]) == 2  # an argument error
    assert run_cli(finetune.main, argv(setup, tmp_path / "x", "--save-every", "-1")) == 2
    assert not (tmp_path / "x").exists()


def test_run_stopped_before_its_first_checkpoint_leaves_nothing(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupt_at(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(argv(setup, out))
    assert not out.exists()


def test_sigterm_cleans_up_like_ctrl_c(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    (out / "keep").mkdir(parents=True)  # a user's folder inside --out
    due = resume.Checkpointer.due
    monkeypatch.setattr(resume.Checkpointer, "due",
                        lambda self, s: os.kill(os.getpid(), signal.SIGTERM) if s == 1 else due(self, s))
    with pytest.raises(KeyboardInterrupt, match="signal 15"):
        finetune.main(argv(setup, out))
    assert [p.name for p in out.iterdir()] == ["keep"]  # no lock, no in-progress folder (no checkpoint yet)
    assert signal.getsignal(signal.SIGTERM) is not None


def test_new_run_on_an_interrupted_one_names_it(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv(setup, out))
    with pytest.raises(RunFolderError, match=r"interrupted run in .*\.slora-partial.*--resume .*--replace"):
        finetune.main(argv(setup, out))
    finetune.main(argv(setup, out, "--max-steps", "1", "--replace"))
    assert not (out / ".slora-partial").exists() and (out / "adapter").is_dir()


# -----------------------------------------------------------------------------
# Complete runs, user files, locks

def test_replace_keeps_user_files(setup, tmp_path):
    out = tmp_path / "run"
    finetune.main(argv(setup, out, "--max-steps", "1"))
    (out / "NOTES.md").write_text("mine")
    (out / "plots").mkdir()
    (out / "plots" / "a.txt").write_text("mine too")
    with pytest.raises(RunFolderError, match="already holds a complete run; pass --replace"):
        finetune.main(argv(setup, out, "--max-steps", "1"))
    finetune.main(argv(setup, out, "--max-steps", "2", "--replace"))
    assert (out / "NOTES.md").read_text() == "mine" and (out / "plots" / "a.txt").read_text() == "mine too"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert {p.name for p in out.iterdir()} == {"NOTES.md", "plots", ".slora-run.json", *json.loads(
        (out / ".slora-run.json").read_text())["files"]}


def test_a_user_file_with_a_run_file_name_is_never_overwritten(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    with pytest.raises(RunFolderError, match="holds metrics.json, which a run would overwrite"):
        finetune.main(argv(setup, out, "--max-steps", "1"))
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


def test_live_lock_refuses_at_once_naming_the_holder(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-12-01 10:00:00"}
    (out / ".slora-lock").write_text(json.dumps(holder))
    with pytest.raises(RunFolderError, match=rf"in use by another slora run \(pid {os.getpid()}, host .*, started "
                                             r"2026-12-01 10:00:00\)"):
        finetune.main(argv(setup, out, "--max-steps", "1"))
    assert json.loads((out / ".slora-lock").read_text()) == holder  # not ours to remove


def test_stale_lock_is_taken_over_and_said(setup, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".slora-lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    finetune.main(argv(setup, out, "--max-steps", "1"))
    assert f"stale lock of process {dead.pid}" in capsys.readouterr().out
    assert not (out / ".slora-lock").exists() and (out / "adapter").is_dir()


# -----------------------------------------------------------------------------
# Only what slora can prove it wrote is replaced

def test_user_files_that_look_like_a_run_are_refused_not_replaced(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    mine = {"args.json": '{"mine": 1}', "metrics.json": '{"mine": 2}', "log.jsonl": '{"mine": 3}\n'}
    for name, text in mine.items():
        (out / name).write_text(text)
    for extra in ((), ("--replace",)):  # not "a complete run": --replace may not overwrite them either
        with pytest.raises(RunFolderError, match=r"holds args.json, metrics.json, log.jsonl, which a run would "
                                                 r"overwrite, and no slora run .*not even with --replace"):
            finetune.main(argv(setup, out, "--max-steps", "1", *extra))
        assert {p.name: p.read_text() for p in out.iterdir()} == mine


@pytest.mark.parametrize("entry", ["../x", ".", "adapter/../../x"])
def test_a_damaged_manifest_makes_replace_remove_nothing(setup, tmp_path, entry):
    out = tmp_path / "run"
    finetune.main(argv(setup, out, "--max-steps", "1"))
    (tmp_path / "x").write_text("outside the run folder")
    manifest = out / ".slora-run.json"
    manifest.write_text(json.dumps({"files": [entry, "args.json"]}))
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RunFolderError, match=rf"^{manifest}: entry '{re.escape(entry)}' is not a plain file name"):
        finetune.main(argv(setup, out, "--max-steps", "1", "--replace"))
    assert (tmp_path / "x").read_text() == "outside the run folder" and sorted(p.name for p in out.iterdir()) == before


def test_out_may_not_be_contain_or_lie_inside_an_input(setup, tmp_path):
    d, model = setup
    for out, how in ((model, "is"), (model / "run", "lies inside"), (d, "contains")):
        before = sorted(p.name for p in model.iterdir())
        with pytest.raises(RunFolderError, match=rf"^{out}: {how} --(model|train-file) .*which this command reads"):
            finetune.main(argv(setup, out, "--max-steps", "1"))
        assert sorted(p.name for p in model.iterdir()) == before and not (model / "run").exists()


# -----------------------------------------------------------------------------
# A kill or SIGTERM while the finished run's files are moved into OUT

class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of slora's catches it, so what it leaves is what a kill leaves."""


def moves_into(out: Path, after: int, action):
    """os.replace that calls `action` right after the `after`-th move of a run file into `out`."""
    real, moved = os.replace, []

    def replace(src, dst, *a, **kw):
        real(src, dst, *a, **kw)
        if Path(dst).parent == out and Path(src).parent.name == ".slora-partial":
            moved.append(Path(dst).name)
            if len(moved) == after:
                action()
    return replace


def test_a_run_killed_after_3_of_its_7_moves_is_finished_by_resume_or_replaced(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", moves_into(out, 3, lambda: (_ for _ in ()).throw(Killed())))
        with pytest.raises(Killed):
            finetune.main(argv(setup, out, "--max-steps", "2"))
    partial = out / ".slora-partial"
    assert len([p for p in out.iterdir() if not p.name.startswith(".")]) == 3 and len(list(partial.iterdir())) == 5
    files = {str(p.relative_to(partial)): p.read_bytes() for p in partial.rglob("*") if p.is_file()}
    files |= {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
              if p.is_file() and not p.relative_to(out).parts[0].startswith(".")}
    files.pop(".slora-commit.json")
    shutil.copytree(out, tmp_path / "killed")
    assert run_cli(finetune.main, ["--resume", str(out)]) == 0  # finishes the moves
    names = json.loads((out / ".slora-run.json").read_text())["files"]
    assert len(names) == 7 and not partial.exists()
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*")
            if p.is_file() and not p.name.startswith(".")} == files
    # --replace on the killed state: finishes the moves, then runs and replaces the run (the moved files are slora's)
    shutil.rmtree(out)
    shutil.copytree(tmp_path / "killed", out)
    finetune.main(argv(setup, out, "--max-steps", "1", "--replace"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1 and not partial.exists()


def test_sigterm_while_the_files_are_moved_in_waits_for_the_last_move(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(os, "replace", moves_into(out, 3, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert run_cli(finetune.main, argv(setup, out, "--max-steps", "1")) == 143
    assert capsys.readouterr().err == f"error: terminated by SIGTERM; the run had completed: {out}\n"
    assert len(json.loads((out / ".slora-run.json").read_text())["files"]) == 7
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".slora-run.json"]


# -----------------------------------------------------------------------------
# What the error line says was cleaned up is true

def test_sigterm_says_truly_what_was_removed_or_kept(setup, tmp_path, monkeypatch, capsys):
    due = resume.Checkpointer.due
    for stop, out in ((1, tmp_path / "early"), (3, tmp_path / "late")):  # before, and after, checkpoint 2
        with monkeypatch.context() as m:
            m.setattr(resume.Checkpointer, "due",
                      lambda self, s, stop=stop: os.kill(os.getpid(), signal.SIGTERM) if s == stop else due(self, s))
            assert run_cli(finetune.main, argv(setup, out)) == 143
        err = capsys.readouterr().err
        partial = out / ".slora-partial"
        if stop == 1:
            assert err == f"error: terminated by SIGTERM; temporary files were removed ({partial})\n"
            assert not out.exists()
        else:
            command = f"python -m slora.finetune --resume {out}"
            assert err == f"error: terminated by SIGTERM; the run is kept in {partial}: continue it with `{command}`\n"
            assert run_folder.interrupted(out)
            assert run_cli(finetune.main, command.split()[3:]) == 0 and not partial.exists()


def test_a_failed_write_names_the_file_and_leaves_nothing(setup, tmp_path, capsys):
    out = tmp_path / "run"
    with file_size_limit(4096):  # the run's JSON files fit, its adapter's weights (5.6 kB) do not
        assert run_cli(finetune.main, argv(setup, out, "--max-steps", "1")) == 1
    err = capsys.readouterr().err
    partial = out / ".slora-partial"
    assert re.fullmatch(rf"error: {partial}/\.adapter\.partial-\d+-\w+/adapter_model\.safetensors: cannot write it: "
                        rf"File too large; .*; temporary files were removed \({partial}\)\n", err), err
    assert not out.exists()
