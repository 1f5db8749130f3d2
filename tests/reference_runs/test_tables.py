"""Fast checks of the recorded runs (reference_runs/<suite>/runs.jsonl) and of the README tables built from them.

- reference_runs/README.md, the top-level README.md and stability/README.md are in sync with the recorded runs:
  generating them again changes nothing;
- every run that grid.py and stability.py plan for the recorded suites is recorded, whole, once, and nothing
  unplanned is; the pre-registered suites (grid.PREREGISTERED) are checked as their runs arrive: whatever is recorded
  is planned and whole, and the count still missing is reported as a warning;
- each recorded run's command is the command grid.py would give, and its args (args.json) are what that command
  parses to;
- the recorded ranks follow from the recorded θ under today's allocation code (exactly);
- a new run is recorded as one line from the run folder it writes in a scratch directory (store.py).
"""
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from slora.method import allocate
from slora.cli import finetune

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
import grid  # noqa: E402
import stability  # noqa: E402  (reference_runs/stability.py)
import store  # noqa: E402
import tables  # noqa: E402

COMPLETE = ("nlu", "nlg", "stability", "mpnet", "nlg-full")
SUITES = COMPLETE + grid.PREREGISTERED
# every recorded suite is complete: each planned run is recorded and consistent with its command, and nothing else is
PLANNED = grid.nlu_plan() + grid.nlg_plan() + stability.plan() + grid.mpnet_plan() + grid.nlg_full_plan()
# a pre-registered suite is checked run by run as its runs are recorded; a suite with none yet checks nothing here
ARRIVED = [r for suite in grid.PREREGISTERED for r in grid.PLANS[suite]() if r.done()]
KEYS = {"task", "name", "command", "env", "args", "metrics", "sensitivity", "modules", "hessian", "log"}


def recorded_runs(suites=SUITES):
    """{suite/task/name: Record} of the suite files (store.load refuses a cut line and a run recorded twice)."""
    return {f"{suite}/{task}/{name}": rec for suite in suites
            for (task, name), rec in store.load(ROOT / suite / store.FILE).items()}


@pytest.mark.parametrize("readme", tables.READMES, ids=lambda p: p.relative_to(ROOT.parent).as_posix())
def test_readme_tables_are_generated_from_the_recorded_runs(readme):
    text = readme.read_text()
    assert ("<!-- table:nlu-main -->" if readme.parent == ROOT else "<!-- table:headline -->") in text
    assert tables.fill(text) == text, f"{readme} is stale: run python reference_runs/tables.py"


def test_stability_readme_is_generated_from_the_recorded_runs():
    got = stability.report(stability.collect(run_missing=False))
    assert (stability.HERE / "README.md").read_text() == got, "run python reference_runs/stability.py --tables-only"


def test_unknown_table_block_is_an_error():
    with pytest.raises(KeyError, match="no-such-table"):
        tables.fill("<!-- table:no-such-table -->\nold\n<!-- /table:no-such-table -->")


def test_every_planned_run_is_recorded_and_nothing_else():
    planned = {r.key for r in PLANNED}
    recorded = recorded_runs(COMPLETE)
    assert not planned - set(recorded), f"planned but not recorded: {sorted(planned - set(recorded))[:5]}"
    assert not set(recorded) - planned, f"recorded but not planned: {sorted(set(recorded) - planned)[:5]}"
    whole = {k: KEYS - set(rec.line) for k, rec in recorded.items() if KEYS - set(rec.line)}
    assert not whole, f"lines without some of the record's keys: {sorted(whole.items())[:3]}"


@pytest.mark.parametrize("suite", grid.PREREGISTERED)
def test_a_preregistered_suite_records_only_planned_runs(suite):
    """What is recorded is planned and whole; the runs still missing are reported, not failed."""
    planned = {r.key for r in grid.PLANS[suite]()}
    recorded = recorded_runs((suite,))
    assert not set(recorded) - planned, f"recorded but not planned: {sorted(set(recorded) - planned)[:5]}"
    whole = {k: KEYS - set(rec.line) for k, rec in recorded.items() if KEYS - set(rec.line)}
    assert not whole, f"lines without some of the record's keys: {sorted(whole.items())[:3]}"
    if len(planned) > len(recorded):
        warnings.warn(f"{suite}: {len(planned) - len(recorded)} of {len(planned)} planned runs not recorded yet; "
                      f"{tables.prereg.COMMANDS[suite]} records them")


@pytest.mark.parametrize("run", PLANNED + ARRIVED, ids=lambda r: r.key)
def test_recorded_run_matches_its_command_and_its_ranks_follow_from_theta(run):
    rec = run.record
    argv = shlex.split(rec.command.removeprefix("python -m slora.finetune "))
    assert argv[:len(shlex.split(run.args))] == shlex.split(run.args), "the command is not grid.py's command"
    assert argv[-2:] == ["--out", run.out], "the command's run folder is not the run's name"
    recorded = {k: v for k, v in rec.args.items() if k != "resolved"}
    parsed = vars(finetune.parse_args(argv))
    # an option added after the run was recorded ran at its default there (the rule of resume and the run folder)
    defaults = vars(finetune.parse_args([]))
    assert recorded == {k: v for k, v in parsed.items() if k in recorded or v != defaults[k]}

    sens = rec.sensitivity()
    cfg, mods = sens["config"], sens["modules"]
    shapes = {n: (m["d_in"], m["d_out"]) for n, m in mods.items()}
    cap = {n: min(d_in, d_out) if cfg["r_max"] is None else min(d_in, d_out, cfg["r_max"])
           for n, (d_in, d_out) in shapes.items()}
    ranks = rec.ranks()
    metrics = rec.metrics
    if cfg["method"] == "eva":
        # EVA ranks follow from eigenvalue ratios that sensitivity.json does not hold (slora.method.eva): check the budget,
        # the ρ·r_avg cap and the floor, and that matrices sharing an input (one spectrum) differ by at most the one
        # rank where the budget boundary cuts through their tied values (slora.method.eva)
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
    else:  # a rank of w costs d_in + d_out; the budget is met to within the dearest rank (slora.method.allocate)
        cost = {n: d_in + d_out for n, (d_in, d_out) in shapes.items()}
        assert budget["achieved"] == sum(r * cost[n] for n, r in ranks.items())
        assert budget["target"] - max(cost.values()) < budget["achieved"] <= budget["target"]


@pytest.mark.parametrize("suite", sorted(grid.PLANS))
def test_every_planned_command_passes_the_argument_checks(suite):
    """A run the grid plans but finetune refuses would fail when the grid reaches it and waste its slot: finetune
    refuses `--alloc eva --budget-unit param` (EVA's rule counts ranks), so grid.py must not plan it."""
    from slora.data import tasks
    from slora.cli.argcheck import check_finetune_args
    for run in grid.PLANS[suite]():
        args = finetune.parse_args(shlex.split(run.args) + ["--out", "x"])
        check_finetune_args(args, finetune.PRESETS, tasks.TASKS, tasks.CALIBRATION_SOURCES)


def test_nlg_full_runs_the_benchmarked_gpu_path():
    """grid.py's nlg-full suite runs the flags `python -m slora.bench --only nlg` measures as the new path
    (slora.cli.bench_nlg.NEW_FLAGS, evaluation batches of 4 x the micro-batch), so the bench's speed is the runs' own."""
    from slora.cli.bench_nlg import NEW_FLAGS
    argv = shlex.split(grid.NLG_FULL_COMMON)
    flags = [a for a in argv if a.startswith("--")]
    for flag in (f for f in NEW_FLAGS if f.startswith("--")):
        assert flag in flags, f"{flag} is in the benchmarked path but not in NLG_FULL_COMMON"
    assert argv[argv.index("--check-finite") + 1] == NEW_FLAGS[NEW_FLAGS.index("--check-finite") + 1]
    assert int(argv[argv.index("--eval-batch-size") + 1]) == 4 * int(argv[argv.index("--batch-size") + 1])


# -----------------------------------------------------------------------------
# Recording a new run: one line per run, from a run folder written in a scratch directory

def fake_finetune(argv):
    """What slora.finetune.main writes, in small: a run folder under the command's --out (relative to the cwd)."""
    out = Path(argv[argv.index("--out") + 1])
    out.mkdir(parents=True)
    names = ["m.0.q", "m.0.v"]
    files = {"args.json": {"alloc": "uniform", "device": "cpu", "out": str(out), "allocate_only": False},
             "ranks.json": {"m.0.q": 3, "m.0.v": 5},
             "metrics.json": {"budget": {"achieved": 8, "target": 8, "unit": "rank"}, "final": {"dev": {"a": 0.5}},
                              "epochs": [{"epoch": 1, "step": 2, "dev": {"a": 0.5}}], "lora_params": 8,
                              "main_metric": "a"},
             "sensitivity.json": {"config": {"method": "sra", "hessian": {n: {"dead_inputs": 0, "shared_with": "m.0.q"}
                                                                         for n in names}},
                                  "modules": {n: {"d_in": 4, "d_out": 4, "theta": 0.25 + i, "trace": 7.0}
                                              for i, n in enumerate(names)},
                                  "weights": {"beta1": 1.0}}}
    for name, obj in files.items():
        (out / name).write_text(json.dumps(obj))
    events = [{"event": "data", "train": 10}, {"event": "allocate", "budget": files["metrics.json"]["budget"],
                                               "ranks": files["ranks.json"]},
              {"event": "step", "step": 2, "loss": 1.5, "tokens_per_s": 100.0},
              {"event": "eval", "epoch": 1, "step": 2, "dev": {"a": 0.5}}, {"event": "final", "dev": {"a": 0.5}}]
    (out / "log.jsonl").write_text("".join(json.dumps(e | {"time": 1.0}) + "\n" for e in events))
    (out / "adapter").mkdir()
    return out


def test_a_new_run_is_recorded_as_one_line_and_not_run_again(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "HERE", tmp_path)
    monkeypatch.setattr(finetune, "main", fake_finetune)
    cwd = os.getcwd()
    run = grid.nlg_run("attn", "uniform", 1e-3, 0)
    assert not run.done() and run in grid.nlg_plan()
    grid.record_run(run, "cpu")
    assert os.getcwd() == cwd
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["nlg", "nlg/runs.jsonl"]
    rec = run.record
    assert rec.command == f"python -m slora.finetune {run.args} --device cpu --out {run.out}"
    assert rec.args["out"] == run.out == "reference_runs/nlg/wiki-describe/attn-uniform-lr1e-3-s0"
    assert rec.env["device"] == "cpu" and rec.env["concurrent_runs"] == 1 and "torch" in rec.env
    assert list(rec.ranks().items()) == [("m.0.q", 3), ("m.0.v", 5)]
    # a fine-tuning run keeps θ and the shapes of each module; the Hessian sharing whole
    assert rec.sensitivity() == {"config": {"method": "sra", "hessian": {
        n: {"dead_inputs": 0, "shared_with": "m.0.q"} for n in ("m.0.q", "m.0.v")}}, "modules": {
        "m.0.q": {"d_in": 4, "d_out": 4, "theta": 0.25}, "m.0.v": {"d_in": 4, "d_out": 4, "theta": 1.25}},
        "weights": {"beta1": 1.0}}
    # the log less timestamps and less what ranks.json and metrics.json hold
    assert rec.log() == [{"event": "data", "train": 10}, {"event": "step", "step": 2, "loss": 1.5,
                                                          "tokens_per_s": 100.0}]
    assert run not in [r for r in grid.nlg_plan() if not r.done()]  # a stopped grid resumes after it
    with pytest.raises(ValueError, match="recorded twice"):
        store.append(run.suite_file, rec.line)
        store.load(run.suite_file)


def test_a_cut_line_is_an_error(tmp_path):
    path = tmp_path / store.FILE
    path.write_text('{"task": "t", "name": "a"}\n{"task": "t", "na')
    with pytest.raises(ValueError, match=":2: not a JSON line"):
        store.load(path)
