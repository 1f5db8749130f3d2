"""reference_runs/grid.py: the pre-registered suites' plans, the rule that widens their learning-rate grids, and the
run names. (test_tables.py checks every planned command against finetune's argument checks and every recorded run
against its command.)"""
import shlex
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "reference_runs"))
import grid  # noqa: E402
import store  # noqa: E402

BASE = grid.LRS["mpnet-decisive"]


def record(run, dev: float):
    """A recorded run as far as the learning-rate pick reads it."""
    store.append(run.suite_file, {"task": run.task, "name": run.name,
                                  "metrics": {"main_metric": "m", "final": {"dev": {"m": dev}}}})


@pytest.fixture
def one_seed(tmp_path, monkeypatch):
    """An empty reference_runs/ with one seed of the decisive suite planned."""
    monkeypatch.setattr(grid, "HERE", tmp_path)
    monkeypatch.setitem(grid.SEEDS, "mpnet-decisive", (0,))


def record_pending(best):
    """Record every planned run not yet recorded; dev peaks at best(task, arm) (a rate), lower the further away."""
    for r in grid.decisive_plan():
        if not r.done():
            task, arm = r.task, r.name.split("-lr")[0]
            record(r, 0.9 - abs(grid.run_lr(r) - best(task, arm)))


def test_the_grid_stays_while_its_runs_are_missing_and_when_every_pick_is_inside(one_seed):
    assert grid.decisive_lrs() == BASE and len(grid.decisive_plan()) == len(BASE) * 3 * len(grid.DECISIVE_ARMS)
    record_pending(lambda t, a: 2e-3)
    assert grid.decisive_lrs() == BASE
    assert all(r.done() for r in grid.decisive_plan())


def test_a_pick_on_the_top_edge_doubles_the_grid_up_to_edge_steps(one_seed):
    top = lambda t, a: 1.0 if (t, a) == ("rt-polarity", "eva") else 2e-3  # noqa: E731  (one group rises on)
    record_pending(top)
    assert grid.decisive_lrs() == BASE + (1.6e-2,)
    new = [r for r in grid.decisive_plan() if not r.done()]
    assert len(new) == 3 * len(grid.DECISIVE_ARMS)  # every arm and task at the new rate, not only the one group
    assert all("-lr1.6e-2-" in r.name and "--lr 0.016 " in r.args for r in new)
    record_pending(top)
    assert grid.decisive_lrs() == BASE + (1.6e-2, 3.2e-2)
    record_pending(top)
    assert grid.EDGE_STEPS == 2 and grid.decisive_lrs() == BASE + (1.6e-2, 3.2e-2)  # the pick is still on the edge
    assert all(r.done() for r in grid.decisive_plan())


def test_a_pick_on_the_bottom_edge_halves_it(one_seed):
    record_pending(lambda t, a: 0.0 if a == "uniform" else 2e-3)
    assert grid.decisive_lrs() == (5e-4,) + BASE


def test_the_recorded_suites_keep_their_run_names():
    # one significant digit where it holds the rate (every recorded suite's rates), two where it does not
    for suite in ("nlu", "nlg", "mpnet", "nlg-full"):
        for lr in grid.LRS[suite]:
            assert grid.lr_tag(lr) == f"lr{lr:.0e}".replace("e-0", "e-")
    assert (grid.lr_tag(1.6e-2), grid.lr_tag(2.5e-4), grid.lr_tag(8e-3)) == ("lr1.6e-2", "lr2.5e-4", "lr8e-3")


def test_nlg_powered_is_nlg_full_on_the_whole_splits_at_both_methods_dev_pick():
    full, powered = shlex.split(grid.NLG_FULL_COMMON), shlex.split(grid.NLG_POWERED_COMMON)
    i = full.index("--max-eval")
    assert powered == full[:i] + full[i + 2:]
    lrs, seeds = grid.LRS["nlg-full"], grid.SEEDS["nlg-full"]
    picks = {m: grid.pick_lr([grid.nlg_full_run(m, lr, s) for lr in lrs for s in seeds])
             for m in grid.NLG_POWERED_METHODS}
    assert set(picks.values()) == set(grid.LRS["nlg-powered"])
    assert len(grid.nlg_powered_plan()) == 2 * 10


def test_the_1k_suite_keeps_sensitivity_lora_to_uniforms_parameters_on_all_linear_layers():
    for r in grid.mpnet_1k_plan():
        a = shlex.split(r.args)
        assert a[a.index("--max-train") + 1] == "1000" and a[a.index("--epochs") + 1] == "10"
        param = "--budget-unit" in a
        assert param == ("--targets" in a and "sensitivity" in a), r.name
