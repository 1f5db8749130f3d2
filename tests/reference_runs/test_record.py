"""Slow tier: re-run each recorded run of reference_runs/ (written by reference_runs/record.py, `make reference`)
and compare with what is recorded.

Stated tolerances. On the recording machine and torch build the run is bit-reproducible (same seed, CPU); the
tolerances allow for another CPU or BLAS build summing in another order:
- ranks: exactly equal;
- θ per module: relative 1e-4 (fp32 accumulation over the ~8k calibration tokens, far above its rounding error);
- training loss at every logged step: relative 2e-2 (80 steps of AdamW amplify last-bit differences);
- final dev and test scores: within 0.02 absolute (5 of the 256 evaluated sentences).
"""
import json
import shlex
import sys
from pathlib import Path

import pytest

from slora.cli import finetune

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
from record import RUNS  # noqa: E402  (reference_runs/record.py: the recorded commands)

pytestmark = pytest.mark.slow


def losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


@pytest.mark.parametrize("name", sorted(RUNS))
def test_rerun_matches_recorded(name, tmp_path):
    ref = ROOT / name
    assert (ref / "command.txt").read_text().split("--out")[0].strip().endswith(RUNS[name].strip())
    out = finetune.main(shlex.split(RUNS[name]) + ["--out", str(tmp_path / name)])

    assert json.loads((out / "ranks.json").read_text()) == json.loads((ref / "ranks.json").read_text())
    got = json.loads((out / "sensitivity.json").read_text())["modules"]
    want = json.loads((ref / "sensitivity.json").read_text())["modules"]
    assert got.keys() == want.keys()
    for m in want:
        assert got[m]["theta"] == pytest.approx(want[m]["theta"], rel=1e-4), m

    assert losses(out) == pytest.approx(losses(ref), rel=2e-2)
    got, want = (json.loads((p / "metrics.json").read_text())["final"] for p in (out, ref))
    assert got.keys() == want.keys()
    for split in want:
        for metric, value in want[split].items():
            assert got[split][metric] == pytest.approx(value, abs=0.02), (split, metric)
