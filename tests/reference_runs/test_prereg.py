"""reference_runs/prereg.py: the pre-registered suites in the README. Until every planned run of a suite is recorded its
table says how many are missing (the stopping rule); once they are, the comparison is the pre-registered one; the
minimum detectable effects rest on the recorded suites alone."""
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
import compare  # noqa: E402
import grid  # noqa: E402
import paired  # noqa: E402
import prereg  # noqa: E402
import store  # noqa: E402


def record(run, dev: float, test: float, params: int = 100):
    metrics = {"main_metric": "m", "lora_params": params,
               "final": {s: {"m": v, "bleu4": v, "rouge1": v, "rougeL": v} for s, v in (("dev", dev), ("test", test))}}
    store.append(run.suite_file, {"task": run.task, "name": run.name, "metrics": metrics,
                                  "log": [{"event": "step", "tokens_per_s": 1000.0}]})


@pytest.fixture
def empty(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "HERE", tmp_path)
    return tmp_path


def test_a_suite_with_runs_missing_reports_how_many_and_no_comparison(empty):
    for suite, table in (("mpnet-decisive", prereg.decisive_table), ("mpnet-1k", prereg.mpnet_1k_table),
                         ("nlg-powered", prereg.nlg_powered_table)):
        n = len(grid.PLANS[suite]())
        assert table() == [f"Recorded: 0 of {n} planned runs ({n} missing). The comparison is reported once every "
                           "planned run is recorded (the stopping rule)."]
    first = grid.nlg_powered_plan()[0]
    record(first, 0.5, 0.5)
    assert prereg.nlg_powered_table()[0].startswith("Recorded: 1 of 20 planned runs (19 missing).")
    rows = [line.split(" | ") for line in prereg.progress_table()[2:]]
    assert [(r[0], r[2:5]) for r in rows] == [("| mpnet-decisive", ["720", "0", "720"]),
                                              ("| mpnet-1k", ["720", "0", "720"]), ("| nlg-powered", ["20", "1", "19"])]


def test_nlg_powered_compares_at_the_fixed_rate_once_whole(empty):
    for s in grid.SEEDS["nlg-powered"]:
        record(grid.nlg_powered_run("uniform", s), 0.40, 0.30 + s / 100)
        record(grid.nlg_powered_run("sensitivity", s), 0.41, 0.31 + s / 100)
    sens = next(line for line in prereg.nlg_powered_table() if line.startswith("| Sensitivity-LoRA")).split(" | ")
    # ROUGE-L +1 in each of 10 seeds; nothing picked, so the plain bootstrap (†); sign and Wilcoxon p 2/1024
    assert sens[1] == "0.002" and sens[5:11] == ["+1.00", "+1.00", "[+1.00, +1.00]†", "10-0-0", "0.002", "0.002"]


def test_the_decisive_table_is_one_family_of_every_arm_against_uniform(empty, monkeypatch):
    monkeypatch.setitem(grid.SEEDS, "mpnet-decisive", (0, 1))
    shift = {"uniform": 0.0, "sensitivity": 0.01, "eva": -0.01, "value-r8": 0.0, "query-r8": -0.02, "qv-r8": 0.02}
    for r in grid.decisive_plan():
        arm, seed = r.name.split("-lr")[0], int(r.name.rsplit("-s", 1)[1])
        at_pick = grid.run_lr(r) == 2e-3  # every arm's dev peaks inside the grid: no edge, no wider grid
        record(r, 0.9 if at_pick else 0.8, (0.8 + shift[arm] + seed / 1000) if at_pick else 0.1)
    assert grid.decisive_lrs() == grid.LRS["mpnet-decisive"]
    out = prereg.decisive_table()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in out[2:]}
    assert list(rows) == [prereg.ARM_NAMES[a] for a in grid.DECISIVE_ARMS]
    w = 4  # the HEADER's cells start after the method and the 3 tasks
    assert rows[prereg.ARM_NAMES["qv-r8"]][w + 1] == "+2.00" and rows[prereg.ARM_NAMES["query-r8"]][w + 1] == "-2.00"
    # 6 pairs each; value-r8 ties uniform everywhere (p 1); the other 4 are 6-0 or 0-6 (p 2/64), Holm over 5
    assert rows[prereg.ARM_NAMES["value-r8"]][w + 3:w + 5] == ["0-0-6", "1.000"]
    assert rows[prereg.ARM_NAMES["eva"]][w + 3:w + 5] == ["0-6-0", compare.p_text(min(1, 5 * 2 / 64))]


def test_sd_within_rates_pools_the_spread_about_each_rates_mean():
    base = {1: {("a", s): (0.0, 0.0) for s in range(3)}, 2: {("a", s): (0.0, 0.0) for s in range(3)}}
    method = {1: {("a", s): (0.0, d) for s, d in enumerate((1.0, 2.0, 3.0))},
              2: {("a", s): (0.0, d) for s, d in enumerate((10.0, 10.0, 16.0))}}
    sd, df = prereg.sd_within_rates(method, base)
    assert df == 4 and sd == pytest.approx(math.sqrt((2.0 + 24.0) / 4), rel=1e-15)
    assert prereg.sd_at_picks(method, base) == (pytest.approx(statistics.stdev([1.0, 2.0, 3.0])), 3)


def test_the_minimum_detectable_effects_rest_on_the_recorded_suites_only(empty):
    for suite in ("mpnet", "nlg-full"):
        (empty / suite).mkdir()
        (empty / suite / store.FILE).symlink_to(ROOT / suite / store.FILE)
    before = prereg.mde_table()
    assert len(before) == 2 + len(prereg.mde_sources()) and len(before) > 2
    for r in grid.nlg_powered_plan()[:4] + grid.decisive_plan()[:6]:
        record(r, 0.5, 0.9)
    assert prereg.mde_table() == before
    # each row's MDE is paired's at the stated pairs, SD and α, and at α / m for the family of m comparisons
    for line, (_, _, n, m, sd, _, _) in zip(before[2:], prereg.mde_sources()):
        cells = line.split(" | ")
        assert cells[4] == f"{paired.minimum_detectable_effect(sd, n, 0.05):.2f}"
        assert cells[5] == f"{paired.minimum_detectable_effect(sd, n, 0.05 / m):.2f} ({m})"


def test_the_1k_table_adjusts_over_every_method_and_cell(empty, monkeypatch):
    monkeypatch.setitem(grid.SEEDS, "mpnet-1k", (0, 1))
    for r in grid.mpnet_1k_plan():
        at_pick = grid.run_lr(r) == 2e-3
        gain = 0.01 if "-sensitivity-" in r.name else 0.0  # EVA ties uniform
        record(r, 0.9 if at_pick else 0.8, 0.8 + gain if at_pick else 0.1)
    out = prereg.mpnet_1k_table()
    cells = ["q,v, r_avg 4:", "q,v, r_avg 8:", "All linear layers, r_avg 4:", "All linear layers, r_avg 8:"]
    assert [line for line in out if line.endswith(":")] == cells
    sens = [line.split(" | ") for line in out if line.startswith("| Sensitivity-LoRA")]
    # 4 cells of 6 pairs all won (p 2/64) and 4 ties (p 1): Holm over the 8 gives 8 x 2/64, not 2 x 2/64 per cell
    assert len(sens) == 4 and all(s[4 + 3:4 + 5] == ["6-0-0", compare.p_text(8 * 2 / 64)] for s in sens)
