"""The adversarial corpus's shared parts: tiny inputs built once, the case table row, the runner.

Every case runs a command's `main(argv)` in-process through `slora.errors.run_cli`, the runner behind
`python -m slora.<command>`, and asserts the convention: the exit status (2 invalid argument, 1 bad input),
exactly one line `error: <culprit>: ...` on stderr that names the culprit, no traceback, and nothing left behind
or lost (the case's folder holds exactly the files it held before). The cases are in tests/cli/test_runner_*.py.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from slora.cli.runner import run_cli
from tests.support.tiny import sentiment_rows, tiny_model_dir
from tests.support.tiny import write_jsonl as jsonl

ROOT = Path(__file__).resolve().parents[2]


# -----------------------------------------------------------------------------
# Shared inputs: tiny models and data, built once

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    rows = sentiment_rows(24)
    gen = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
    return {"enc": tiny_model_dir(d / "enc", "encoder"), "dec": tiny_model_dir(d / "dec", "decoder"),
            "train": jsonl(d / "train.jsonl", rows[:16]), "dev": jsonl(d / "dev.jsonl", rows[16:]),
            "gtrain": jsonl(d / "gtrain.jsonl", gen[:8]), "gdev": jsonl(d / "gdev.jsonl", gen[8:])}




def snapshot(folder: Path) -> dict:
    """{relative path: (size, content hash)} of every file and folder under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (p.stat().st_size, hash(p.read_bytes())) if p.is_file() else "dir"
    return out


def expect_one_line(code, expected_code, err, culprit):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert culprit in errors[0], f"{culprit!r} not named in: {errors[0]}"
    assert all(line.startswith(("error: ", "note: ")) for line in lines), err


@dataclass
class Case:
    id: str
    make: Callable       # (tmp, base) -> argv; writes the damaged input under tmp
    code: int            # expected exit status
    culprit: str         # text the error line must contain; formatted with tmp and the base paths

    def param(self):
        return pytest.param(self, id=self.id)


def run_case(main, case: Case, tmp_path, base, capsys):
    argv = [str(a) for a in case.make(tmp_path, base)]
    before = snapshot(tmp_path)
    code = run_cli(main, argv)
    _, err = capsys.readouterr()
    expect_one_line(code, case.code, err, case.culprit.format(tmp=tmp_path, **base))
    assert snapshot(tmp_path) == before, "files were added, changed or removed"
    return err




def ft(tmp, b, *extra, model=None, train=None, dev=None, kind="classification"):
    return ["--model", model or b["enc"], "--task", "jsonl", "--jsonl-kind", kind, "--train-file",
            train or b["train"], "--dev-file", dev or b["dev"], "--batch-size", 8, "--calib-n", 8,
            "--max-steps", 1, "--threads", 1, "--out", tmp / "run", *extra]

