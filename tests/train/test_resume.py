"""slora/train/resume.py: `--resume` continues exactly the run that was started. The checkpoint records the run's
arguments, its model folder and a hash of its data; a resume that finds args.json edited or a data file changed is
refused naming the keys (the in-progress folder untouched), paths are recorded absolute so a run resumes from any
directory, and a damaged checkpoint file is named. Run through `python -m slora.finetune` on a tiny encoder."""
import json
import shutil

import pytest

from slora.cli import finetune
from slora.cli.runner import run_cli
from slora.train import resume
from tests.support.corpus import expect_one_line, snapshot
from tests.support.tiny import sentiment_task, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    sentiment_task(d)  # the model folder is d/m/model
    return d


def argv(d, out, model=None, train=None, dev=None, *extra):
    # 30 examples, batch 4: 8 steps per epoch, two epochs; checkpoints every 2 steps, so step 3 is mid-way
    return ["--model", str(model or d / "m" / "model"), "--task", "jsonl", "--train-file", str(train or d / "train.jsonl"),
            "--dev-file", str(dev or d / "dev.jsonl"), "--batch-size", "4", "--epochs", "2", "--calib-n", "8",
            "--log-every", "1", "--save-every", "2", "--threads", "1", "--out", str(out), *extra]


def adapter_bytes(out) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


def interrupted(monkeypatch, args, step=3):
    """Run `args`, stopped (as by Ctrl-C) when step `step` asks for a checkpoint; checkpoint 2 is left."""
    due = resume.Checkpointer.due

    def hook(self, s):
        if s == step:
            raise KeyboardInterrupt("interrupted by the test")
        return due(self, s)
    with monkeypatch.context() as m:
        m.setattr(resume.Checkpointer, "due", hook)
        with pytest.raises(KeyboardInterrupt):
            finetune.main(args)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run."""
    return finetune.main(argv(setup, tmp_path_factory.mktemp("ref") / "run"))


def refused(capsys, out, culprit):
    """`--resume out` fails with one line naming `culprit`, and leaves the in-progress folder as it was."""
    before = snapshot(out)
    code = run_cli(finetune.main, ["--resume", str(out)])
    _, err = capsys.readouterr()
    expect_one_line(code, 1, err, culprit)
    assert snapshot(out) == before, "the refused resume changed the in-progress folder"
    return err


# -----------------------------------------------------------------------------
# args.json edited, data changed: refused, naming the keys

def test_edited_args_json_is_refused_naming_the_keys(setup, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(monkeypatch, argv(setup, out))
    path = out / ".slora-partial" / "args.json"
    original = path.read_text()
    edited = json.loads(original) | {"batch_size": 8, "max_steps": 12, "lr": 0.01}
    path.write_text(json.dumps(edited))
    err = refused(capsys, out, str(path))
    assert "batch_size, lr, max_steps changed since the run started" in err
    assert "batch_size 4 -> 8" in err and "lr 0.002 -> 0.01" in err and "max_steps None -> 12" in err
    path.write_text(original)  # restored: the run resumes, and is the uninterrupted one
    finetune.main(["--resume", str(out)])
    assert adapter_bytes(out) == adapter_bytes(reference)
    assert json.loads((out / "args.json").read_text()) == json.loads(original)


@pytest.mark.parametrize("which", ["train", "dev"])
def test_changed_data_file_is_refused_naming_it(setup, tmp_path, monkeypatch, capsys, which):
    files = {k: shutil.copy(setup / f"{k}.jsonl", tmp_path / f"{k}.jsonl") for k in ("train", "dev")}
    out = tmp_path / "run"
    interrupted(monkeypatch, argv(setup, out, None, files["train"], files["dev"]))
    rows = [json.loads(line) for line in open(files[which])]
    rows[0]["label"] = 1 - rows[0]["label"]  # one label flipped: same size, same lines
    write_jsonl(files[which], rows)
    err = refused(capsys, out, str(files[which]))
    assert f"split(s) {which} changed" in err


def test_checkpoint_records_the_run(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    interrupted(monkeypatch, argv(setup, out))
    record = resume.Checkpointer(out / ".slora-partial", 2).recorded()
    assert record["args"]["lr"] == 0.002 and record["args"]["batch_size"] == 4
    assert not set(resume.NOT_RECORDED) & set(record["args"])
    assert record["model_path"] == str((setup / "m" / "model").resolve())
    assert set(record["data"]) == {"train", "dev"} and all(len(h) == 64 for h in record["data"].values())


# -----------------------------------------------------------------------------
# Relative paths: recorded absolute, so the run resumes from anywhere

def test_run_started_with_relative_paths_resumes_from_another_directory(setup, reference, tmp_path, monkeypatch):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    shutil.copytree(setup / "m" / "model", start / "m")
    for k in ("train", "dev"):
        shutil.copy(setup / f"{k}.jsonl", start / f"{k[0]}.jsonl")
    monkeypatch.chdir(start)
    interrupted(monkeypatch, argv(setup, "run", "./m", "t.jsonl", "d.jsonl"))
    recorded = json.loads((start / "run" / ".slora-partial" / "args.json").read_text())
    assert (recorded["model"], recorded["train_file"], recorded["dev_file"]) == \
        (str(start / "m"), str(start / "t.jsonl"), str(start / "d.jsonl"))
    monkeypatch.chdir(elsewhere)
    finetune.main(["--resume", str(start / "run")])
    assert adapter_bytes(start / "run") == adapter_bytes(reference)


# -----------------------------------------------------------------------------
# A damaged checkpoint is named

def test_damaged_checkpoint_tensors_are_named(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    interrupted(monkeypatch, argv(setup, out))
    path = out / ".slora-partial" / "checkpoint-2" / "tensors.safetensors"
    raw = bytearray(path.read_bytes())
    raw[8:20] = b"not a header"  # the JSON header, just after its 8-byte length
    path.write_bytes(bytes(raw))
    err = refused(capsys, out, str(path))
    assert "unexpected" not in err
