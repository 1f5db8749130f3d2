"""Fast checks of the recorded runs (reference_runs/{nlu,nlg,stability}) and of the README tables built from them.

- reference_runs/README.md is in sync with the run folders: running tables.py again changes nothing;
- every run that grid.py plans is recorded, complete, and nothing unplanned is;
- each folder's command.txt is the command grid.py would give, and args.json is what that command parses to;
- the recorded ranks follow from the recorded θ under today's allocation code (exactly).
"""
import json
import shlex
import sys
from pathlib import Path

import pytest

from slora import allocate, finetune

ROOT = Path(__file__).resolve().parents[1] / "reference_runs"
sys.path.insert(0, str(ROOT))
import grid  # noqa: E402
import stability  # noqa: E402  (reference_runs/stability.py)
import tables  # noqa: E402

SUITES = ("nlu", "nlg", "stability", "mpnet", "nlg-full")
# every suite is complete: each planned run is recorded and consistent with its command, and nothing else is there
PLANNED = grid.nlu_plan() + grid.nlg_plan() + stability.plan() + grid.mpnet_plan() + grid.nlg_full_plan()


def recorded_folders():
    return sorted(p.parent for suite in SUITES for p in (ROOT / suite).glob("*/*/env.json"))


def test_readme_tables_are_generated_from_the_run_folders():
    readme = (ROOT / "README.md").read_text()
    assert "<!-- table:nlu-main -->" in readme and "<!-- table:nlg -->" in readme
    assert tables.fill(readme) == readme, "reference_runs/README.md is stale: run python reference_runs/tables.py"


def test_unknown_table_block_is_an_error():
    with pytest.raises(KeyError, match="no-such-table"):
        tables.fill("<!-- table:no-such-table -->\nold\n<!-- /table:no-such-table -->")


def test_every_planned_run_is_recorded_and_nothing_else():
    planned = {r.folder for r in PLANNED}
    recorded = set(recorded_folders())
    assert not planned - recorded, f"planned but not recorded: {sorted(planned - recorded)[:5]}"
    assert not recorded - planned, f"recorded but not planned: {sorted(recorded - planned)[:5]}"
    partial = [p for suite in SUITES for p in (ROOT / suite).glob("*/.*partial*")]
    assert not partial, f"half-written run folders: {partial[:3]}"


@pytest.mark.parametrize("run", PLANNED, ids=lambda r: f"{r.suite}/{r.task}/{r.name}")
def test_recorded_run_matches_its_command_and_its_ranks_follow_from_theta(run):
    folder = run.folder
    command = (folder / "command.txt").read_text().strip()
    argv = shlex.split(command.removeprefix("python -m slora.finetune "))
    assert argv[:len(shlex.split(run.args))] == shlex.split(run.args), "command.txt is not grid.py's command"
    recorded = {k: v for k, v in json.loads((folder / "args.json").read_text()).items() if k != "resolved"}
    parsed = vars(finetune.parse_args(argv))
    # an option added after the run was recorded ran at its default there (the rule of resume and the run folder)
    defaults = vars(finetune.parse_args([]))
    assert recorded == {k: v for k, v in parsed.items() if k in recorded or v != defaults[k]}

    sens = json.loads((folder / "sensitivity.json").read_text())
    cfg, mods = sens["config"], sens["modules"]
    shapes = {n: (m["d_in"], m["d_out"]) for n, m in mods.items()}
    cap = {n: min(d_in, d_out) if cfg["r_max"] is None else min(d_in, d_out, cfg["r_max"])
           for n, (d_in, d_out) in shapes.items()}
    ranks = json.loads((folder / "ranks.json").read_text())
    metrics = json.loads((folder / "metrics.json").read_text())
    if cfg["method"] == "eva":
        # EVA ranks follow from eigenvalue ratios that sensitivity.json does not hold (slora.eva): check the budget,
        # the ρ·r_avg cap and the floor, and that matrices sharing an input (one spectrum) differ by at most the one
        # rank where the budget boundary cuts through their tied values (slora.eva)
        assert metrics["budget"]["achieved"] == metrics["budget"]["target"] == sum(ranks.values())
        assert all(cfg["r_min"] <= r <= min(cap[n], round(cfg["eva_rho"] * cfg["r_avg"])) for n, r in ranks.items())
        owner = {n: h["shared_with"] for n, h in cfg["hessian"].items()}
        assert all(abs(ranks[n] - ranks[o]) <= 1 for n, o in owner.items() if cap[n] == cap[o])
        return
    got = allocate.allocate({n: m["theta"] for n, m in mods.items()}, cfg["r_avg"], method=cfg["method"],
                            unit=cfg["unit"], shapes=shapes, rounding=cfg["rounding"], categories=cfg["categories"],
                            r_min=cfg["r_min"], r_max=cap)
    assert got.ranks == ranks
    budget = metrics["budget"]
    assert (budget["achieved"], budget["target"]) == (got.achieved, got.target)
    if cfg["unit"] == "rank":
        assert budget["achieved"] == budget["target"] == sum(ranks.values())
    else:  # a rank of w costs d_in + d_out; the budget is met to within the dearest rank (slora.allocate)
        cost = {n: d_in + d_out for n, (d_in, d_out) in shapes.items()}
        assert budget["achieved"] == sum(r * cost[n] for n, r in ranks.items())
        assert budget["target"] - max(cost.values()) < budget["achieved"] <= budget["target"]


@pytest.mark.parametrize("suite", sorted(grid.PLANS))
def test_every_planned_command_passes_the_argument_checks(suite):
    """A run the grid plans but finetune refuses would fail on the device and waste its slot: `--alloc eva
    --budget-unit param` did, 335 times in one call, before grid.py stopped planning it."""
    from slora import data
    from slora.argcheck import check_finetune_args
    for run in grid.PLANS[suite]():
        args = finetune.parse_args(shlex.split(run.args) + ["--out", "x"])
        check_finetune_args(args, finetune.PRESETS, data.TASKS, data.CALIBRATION_SOURCES)


def test_nlg_full_runs_the_benchmarked_gpu_path():
    """grid.py's nlg-full suite runs the flags `python -m slora.bench --only nlg` measures as the new path
    (slora.bench_nlg.NEW_FLAGS, evaluation batches of 4 x the micro-batch), so the bench's speed is the runs' own."""
    from slora.bench_nlg import NEW_FLAGS
    argv = shlex.split(grid.NLG_FULL_COMMON)
    flags = [a for a in argv if a.startswith("--")]
    for flag in (f for f in NEW_FLAGS if f.startswith("--")):
        assert flag in flags, f"{flag} is in the benchmarked path but not in NLG_FULL_COMMON"
    assert argv[argv.index("--check-finite") + 1] == NEW_FLAGS[NEW_FLAGS.index("--check-finite") + 1]
    assert int(argv[argv.index("--eval-batch-size") + 1]) == 4 * int(argv[argv.index("--batch-size") + 1])
