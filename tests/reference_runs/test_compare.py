"""reference_runs/compare.py: the comparison cells of the README tables.

Oracles: paired.py itself (compare_to_baseline, report, holm, bootstrap_ci), which test_paired.py checks against exact
enumerations; and grids built so that the picks, the differences and the signs are known by construction.
"""
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reference_runs"))
import compare  # noqa: E402
import paired  # noqa: E402

LRS = (1e-3, 2e-3, 4e-3)


def grids(seed: int, shift: float, best: float, tasks="ab", seeds=range(4)):
    """A method's grid: random dev scores with `best` ahead by 10 on every pair (so the pick is known), test scores
    80 + noise + shift."""
    rng = random.Random(seed)
    return {lr: {(t, s): (rng.uniform(0, 1) + 10 * (lr == best), 80 + rng.gauss(0, 0.1) + shift) for t in tasks
                 for s in seeds} for lr in LRS}


def cells(e):
    return compare.cells(e).split(" | ")


def test_family_adjusts_the_p_values_over_its_members():
    base = grids(0, 0.0, 2e-3)
    members = {"up": (grids(1, 1.0, 4e-3), base, False), "down": (grids(2, -1.0, 1e-3), base, False),
               "same": (grids(3, 0.0, 2e-3), base, False)}
    fam = compare.family(members)
    assert list(fam) == list(members)
    for key in ("sign_p", "wilcoxon_p"):
        assert [fam[m][key + "_holm"] for m in members] == paired.holm([fam[m]["test"][key] for m in members])
    # each member alone is compare_to_baseline's entry, the same whichever family it is in
    alone = paired.compare_to_baseline({"up": members["up"][0]}, base)["up"]
    assert fam["up"]["test"] == alone["test"] and fam["up"]["selection_aware_ci95"] == alone["selection_aware_ci95"]
    assert fam["up"]["lr"] == {"a": 4e-3, "b": 4e-3} and fam["up"]["baseline_lr"] == {"a": 2e-3, "b": 2e-3}
    # the test Δ at the picks (4e-3 against 2e-3); 8 pairs all one way, as are "down"'s: sign p 2/256 each, and
    # Holm multiplies the smallest of 3 by 3 and the next by 2 (but never below the one before)
    up, m, b = cells(fam["up"]), members["up"][0][4e-3], base[2e-3]
    assert up[1] == f"{sum(m[k][1] - b[k][1] for k in b) / len(b):+.2f}"
    assert up[3] == "8-0-0" and up[4] == cells(fam["down"])[4] == compare.p_text(3 * 2 / 256)


def test_cells_with_enough_pairs_give_the_selection_aware_interval():
    e = compare.family({"m": (grids(1, 0.5, 4e-3), grids(0, 0.0, 2e-3), False)})["m"]
    lo, hi = e["selection_aware_ci95"]
    assert cells(e)[2] == f"[{lo:+.2f}, {hi:+.2f}]"


def test_cells_at_one_rate_give_the_plain_bootstrap_marked():
    m, b = grids(1, 0.5, 4e-3), grids(0, 0.0, 2e-3)
    e = compare.family({"m": ({2e-3: m[2e-3]}, {2e-3: b[2e-3]}, False)})["m"]
    d = paired.dev_test_differences({2e-3: m[2e-3]}, {2e-3: b[2e-3]})
    lo, hi = paired.bootstrap_ci(d["test"])
    assert cells(e)[2] == f"[{lo:+.2f}, {hi:+.2f}]†"
    # with nothing to pick, the selection-aware bootstrap is the plain one (the shortcut gives what it would)
    sel = paired.selection_aware_bootstrap({2e-3: m[2e-3]}, {2e-3: b[2e-3]})
    assert sel["interval"] == (lo, hi)


def test_cells_with_few_pairs_give_the_t_interval_and_the_range():
    m, b = grids(1, 0.5, 4e-3, tasks="a", seeds=range(3)), grids(0, 0.0, 2e-3, tasks="a", seeds=range(3))
    e = compare.family({"m": (m, b, False)})["m"]
    t = e["test"]
    assert "selection_aware_ci95" not in e and "bootstrap_ci95" not in t
    lo, hi = paired.t_interval(paired.dev_test_differences(m, b)["test"])
    assert cells(e)[2] == f"t [{lo:+.2f}, {hi:+.2f}]; range [{t['min_diff']:+.2f}, {t['max_diff']:+.2f}]"


def test_the_baseline_row_is_dashes_and_small_p_is_written_in_full():
    assert compare.cells(None) == " | ".join(["—"] * compare.WIDTH)
    assert compare.WIDTH == len(compare.HEADER.split(" | "))
    assert compare.p_text(6.103515625e-05) == "6.1e-05" and compare.p_text(0.0461) == "0.046"


class Rec:
    """What the row builders read of a recorded run."""

    def __init__(self, dev, test, params=10):
        self.record = type("R", (), {"metrics": {"main_metric": "m", "lora_params": params,
                                                 "final": {"dev": {"m": dev}, "test": {"m": test}}}})()


def runs_of(g: dict, params=10) -> dict:
    """{lr: {key: Rec}} from a grid of ×100 scores."""
    return {lr: {k: Rec(d / 100, t / 100, params) for k, (d, t) in by.items()} for lr, by in g.items()}


def test_compare_rows_pick_each_method_on_dev_and_report_its_test_scores():
    base, up = grids(0, 0.0, 2e-3), grids(1, 1.0, 4e-3)
    out = compare.compare_rows({"u": runs_of(base), "m": runs_of(up, 20)}, "u", {"u": "U", "m": "M"}, "ab", range(4))
    assert out[0] == f"| method | a | b | {compare.HEADER} | LoRA params |"
    u, m = (line.split(" | ") for line in out[2:])
    mean_a = sum(up[4e-3][("a", s)][1] for s in range(4)) / 4
    assert u[1].endswith("(lr 0.002)") and m[1].endswith("(lr 0.004)") and m[1].startswith(f"{mean_a:.2f} ± ")
    assert u[3:3 + compare.WIDTH] == ["—"] * compare.WIDTH and m[-1] == "20 |"
    assert m[3:3 + compare.WIDTH] == cells(compare.family({"m": (up, base, False)})["m"])


def test_common_lr_rows_are_one_family_per_rate():
    base, up, down = grids(0, 0.0, 2e-3), grids(1, 1.0, 4e-3), grids(2, -1.0, 1e-3)
    out = compare.common_lr_rows({"u": runs_of(base), "m": runs_of(up), "d": runs_of(down)}, "u",
                                 {"m": "M", "d": "D"})
    assert len(out) == 2 + 2 * len(LRS)
    for i, lr in enumerate(LRS):
        fam = compare.family({k: ({lr: g[lr]}, {lr: base[lr]}, False) for k, g in (("m", up), ("d", down))})
        assert out[2 + 2 * i] == f"| M | {lr:g} | {compare.cells(fam['m'])} |"
        assert out[3 + 2 * i] == f"| D | {lr:g} | {compare.cells(fam['d'])} |"


def test_lr_grid_rows_mark_the_pick_and_count_the_edges():
    out = compare.lr_grid_rows({"u": runs_of(grids(0, 0.0, 4e-3)), "m": runs_of(grids(1, 0.0, 2e-3))},
                               {"u": "U", "m": "M"}, "ab")
    u, m = out[2].split(" | "), out[3].split(" | ")
    assert u[1].count("**") == 2 and u[1].split(" / ")[2].startswith("**")
    assert m[1].split(" / ")[1].startswith("**")
    assert out[-1] == "\nPicks at the largest rate: 2 of 4; at the smallest: 0 of 4."


@pytest.mark.parametrize("xs, want", [([1.0, 2.0, 3.0], "2.00 ± 1.00"), ([1.0, float("nan")], "1.00 (n=1)"),
                                      ([], "n/a")])
def test_mean_std(xs, want):
    assert compare.mean_std(xs, 3 if len(xs) == 3 else 2) == want
