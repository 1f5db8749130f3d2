"""Fast checks of reference_runs/figure3 (paper Fig. 3 and the SmolLM2 all-linear study).

- README.md and the SVGs are what figure3.py writes from results.json (nothing edited by hand);
- results.json follows from the recorded runs (figure3/runs.jsonl): per-metric and capped ranks recomputed with
  today's slora.method.allocate, ranks and metrics equal to each run's ranks and sensitivity metrics;
- every planned run is recorded;
- Spearman's ρ against a float64 numpy oracle.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
import figure3  # noqa: E402

RESULTS = figure3.HERE / "results.json"
needs_results = pytest.mark.skipif(not RESULTS.exists(), reason="figure3/results.json not generated yet")


def results():
    return json.loads(RESULTS.read_text())


@needs_results
def test_readme_and_svgs_are_generated_from_results():
    res = results()
    assert (figure3.HERE / "README.md").read_text() == figure3.report(res), "run reference_runs/figure3.py " \
        "--tables-only"
    for model, entry in res["figure"].items():
        svg = (figure3.HERE / f"{model}.svg").read_text()
        assert svg == figure3.bars_svg(f"{model}: per-layer q+v rank by each metric alone (SRA, r_avg 4)",
                                       figure3.figure_series(entry), entry["command"][:110])


@needs_results
def test_every_planned_run_is_recorded():
    missing = [r.key for r in figure3.plan() if not r.done()]
    assert not missing, f"not recorded: {missing}"


@needs_results
def test_results_follow_from_the_recorded_runs_under_todays_allocation_code():
    res = results()
    for run in figure3.plan():
        sens = run.record.sensitivity()
        entry = res["figure"][run.task] if run.phase == "qv" else res["all_linear"][run.name]
        assert entry["command"] == run.record.command
        assert entry["ranks"] == run.record.ranks()
        assert entry["modules"] == sens["modules"]
        if run.phase == "qv":
            for m in figure3.METRICS:
                assert entry["metric_ranks"][m] == figure3.metric_ranks(sens["modules"], m, 4)
                assert sum(entry["metric_ranks"][m].values()) == 4 * len(sens["modules"])
    sra = res["all_linear"]["all-sra"]
    theta = {n: m["theta"] for n, m in sra["modules"].items()}
    for cap, ranks in res["caps"].items():
        assert ranks == figure3.capped(sra["modules"], theta, 8, int(cap))
        assert max(ranks.values()) <= int(cap) and sum(ranks.values()) == 8 * len(ranks)


@given(st.lists(st.integers(0, 20), min_size=2, max_size=40))
@example([1, 2, 3])
@example([5, 5, 5, 5])
@example([13, 12, 11, 10, 9, 9, 8, 7, 7, 5, 3, 1])
def test_spearman_matches_numpy_pearson_of_average_ranks(ys):
    rho = figure3.spearman(ys)
    y = np.asarray(ys, dtype=np.float64)
    if np.all(y == y[0]):
        assert rho is None
        return
    # average ranks: for each value, the mean position it would occupy in sorted order
    order = np.sort(y)
    r = np.array([(np.searchsorted(order, v, "left") + np.searchsorted(order, v, "right") - 1) / 2 for v in y])
    x = np.arange(len(y), dtype=np.float64)
    want = np.corrcoef(x, r)[0, 1]
    assert rho == pytest.approx(want, abs=64 * np.finfo(np.float64).eps)


def test_verdicts_follow_the_stated_threshold():
    assert figure3.verdict("trace", 0.7) == "held" and figure3.verdict("trace", 0.2) == "weak"
    assert figure3.verdict("effective_rank", 0.3) == "not held" and figure3.verdict("topk", None) == "not held (flat)"
