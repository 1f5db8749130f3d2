"""Slow tier: re-run each recorded run of reference_runs/ (written by reference_runs/record.py, `make reference`)
and compare with what is recorded.

On the recording machine and torch build the run is bit-reproducible (same seed, CPU). Another CPU sums in another
order (torch's fp32 kernels round differently by SIMD path, thread count and shape), so the tolerances are measured
here, on this machine, against what rounding does to this very run:
- ranks: exactly equal (an allocation that flips on rounding would be a finding: θ is far from its boundaries);
- θ per module: within tests.support.bounds.measured_bound, MARGIN times this run's own fp32 error against the same
  calibration in float64 (the run's allocation step again, its statistics and metrics in float64): the recorded θ
  was computed by the same operations in another order, so its error has the same size;
- training loss at every logged step and the final dev and test scores: within bounds.spread_bound of the same run
  on another SIMD path of this machine (ATEN_CPU_CAPABILITY), which measures how far 80 AdamW steps carry last-bit
  differences, amplification included; never below the fp32 sum of a step's 32 loss terms (sum_bound), and for a
  score never below what one flipped prediction changes (`one_flip`, from the recorded confusion counts).
"""
import copy
import json
import os
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from slora.cli import finetune
from slora.data import scores
from tests.support.bounds import assert_within, measured_bound, spread_bound, sum_bound

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
from record import RUNS  # noqa: E402  (reference_runs/record.py: the recorded commands)

pytestmark = pytest.mark.slow


def losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "step"]


def thetas(folder: Path, names) -> list[float]:
    modules = json.loads((folder / "sensitivity.json").read_text())["modules"]
    return [modules[n]["theta"] for n in names]


def allocation_in_float64(argv: list[str], out: Path) -> Path:
    """The run's allocation step (--allocate-only) with the model and the Hessian statistics in float64: the same
    calibration batches and targets, through finetune's own `compute`, on a float64 copy of the model."""
    def compute64(model, batches, modules, cfg, **kw):
        m64 = copy.deepcopy(model).double()
        mods64 = {n: m64.get_submodule(n) for n in modules}
        return compute(m64, batches, mods64, replace(cfg, dtype="float64"), **kw)
    compute = finetune.compute
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune, "compute", compute64)
        return finetune.main(argv + ["--allocate-only", "--out", str(out)])


def other_simd_path() -> dict | None:
    """The environment of a run on another SIMD path of this machine: the default path, or the native one when this
    process runs the default path; None when the machine has no other."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        return env | {"ATEN_CPU_CAPABILITY": "default"}
    native = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                            env=env, capture_output=True, text=True, check=True).stdout.strip()
    return None if native == "DEFAULT" else env


def one_flip(n: int, recorded: dict) -> dict:
    """The largest change one flipped prediction makes to each binary score: the confusion counts (tp, fp, fn, tn)
    of n examples that give the recorded accuracy, F1 and MCC (F1 and MCC are symmetric in fp and fn, so both
    orders are candidates), then each of the four single flips of each candidate."""
    def table(tp, fp, fn, tn):  # predictions and references with these counts
        return [1] * tp + [1] * fp + [0] * fn + [0] * tn, [1] * tp + [0] * fp + [1] * fn + [0] * tn
    right = round(recorded["accuracy"] * n)
    counts = [(tp, fp, n - right - fp, right - tp) for tp in range(right + 1) for fp in range(n - right + 1)
              if abs(scores.f1(*table(tp, fp, n - right - fp, right - tp)) - recorded["f1"]) < 1e-12]
    counts = [c for c in counts if abs(scores.mcc(*table(*c)) - recorded["mcc"]) < 1e-12]
    assert counts, recorded
    flips = [f for tp, fp, fn, tn in counts for f in ((tp - 1, fp, fn + 1, tn), (tp + 1, fp, fn - 1, tn),
                                                      (tp, fp + 1, fn, tn - 1), (tp, fp - 1, fn, tn + 1))]
    score = {"accuracy": scores.accuracy, "f1": scores.f1, "mcc": scores.mcc}
    return {k: max(abs(f(*table(*c)) - recorded[k]) for c in flips if min(c) >= 0) for k, f in score.items()}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_rerun_matches_recorded(name, tmp_path):
    ref = ROOT / name
    assert (ref / "command.txt").read_text().split("--out")[0].strip().endswith(RUNS[name].strip())
    argv = shlex.split(RUNS[name])
    out = finetune.main(argv + ["--out", str(tmp_path / name)])

    assert json.loads((out / "ranks.json").read_text()) == json.loads((ref / "ranks.json").read_text())
    names = list(json.loads((ref / "sensitivity.json").read_text())["modules"])
    assert list(json.loads((out / "sensitivity.json").read_text())["modules"]) == names
    got, want = thetas(out, names), thetas(ref, names)
    oracle = thetas(allocation_in_float64(argv, tmp_path / "float64"), names)
    assert_within(got, want, measured_bound(got, oracle), "θ")

    env = other_simd_path()
    if env is None:
        pytest.skip("no other SIMD path on this machine to measure the spread of the loss curve and scores")
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "slora.finetune", *argv, "--out", str(other)], env=env, check=True,
                   cwd=ROOT.parent, capture_output=True)
    floor = sum_bound(32, max(losses(ref)))  # each logged loss is the mean of a step's 32 examples (--batch-size)
    assert_within(losses(out), losses(ref), spread_bound(losses(out), losses(other), floor), "losses")
    got, want, far = (json.loads((p / "metrics.json").read_text())["final"] for p in (out, ref, other))
    assert got.keys() == want.keys()
    n = int(argv[argv.index("--max-eval") + 1])
    for split in want:
        flip = one_flip(n, want[split])
        for metric, value in want[split].items():
            bound = spread_bound([got[split][metric]], [far[split][metric]], flip[metric])
            assert_within(got[split][metric], value, bound, f"{split} {metric}")
