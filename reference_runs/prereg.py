"""The pre-registered suites of grid.py (mpnet-decisive, mpnet-1k, nlg-powered) in the README: the minimum detectable
effects the pre-registration states, how far each suite is recorded, and its primary comparisons.

The minimum detectable effects come from the recorded suites (mpnet, nlg-full) only, never from the pre-registered
ones, so what was stated before the runs does not move as they arrive. A suite's comparison is reported only once
every planned run of it is recorded (the stopping rule): until then its table says how many runs are missing.
"""
from __future__ import annotations

import math
import statistics

import grid
import paired
from compare import NAMES, compare_rows, family, nlg_table, scores
from grid import LRS, NLU_TASKS, SEEDS

ALPHA, POWER = 0.05, 0.80
# the paper's gains over LoRA: RoBERTa-base GLUE mean 85.94 against 85.06 (Table 1); the smallest ROUGE-L gain of
# Table 2
PAPER_GAIN = {"nlu": 0.88, "nlg": 0.54}
COMMANDS = {"mpnet-decisive": "python reference_runs/grid.py mpnet-decisive --device cuda --workers 16",
            "mpnet-1k": "python reference_runs/grid.py mpnet-1k --device cuda --workers 16",
            "nlg-powered": "python reference_runs/grid.py nlg-powered --device cuda --workers 10 --threads 1"}
ARM_NAMES = NAMES | {"value-r8": "uniform, value only at r 8 (96 ranks)",
                     "query-r8": "uniform, query only at r 8 (96 ranks)",
                     "qv-r8": "uniform q,v at r_avg 8 (192 ranks)"}
FAMILY = {"mpnet-decisive": len(grid.DECISIVE_ARMS) - 1, "mpnet-1k": (len(grid.MPNET_1K_METHODS) - 1)
          * len(grid.MPNET_1K_CELLS), "nlg-powered": len(grid.NLG_POWERED_METHODS) - 1}


# -----------------------------------------------------------------------------
# The variance the minimum detectable effects rest on: paired test differences of the recorded suites


def recorded_mpnet(targets: str, method: str, unit: str = "rank") -> dict | None:
    """The grid of a method in the recorded mpnet suite, all 5 seeds; None unless every run is recorded."""
    unit = "rank" if method == "uniform" else unit
    runs = {lr: {(t, s): grid.mpnet_run(t, targets, method, lr, s, unit) for t in NLU_TASKS for s in SEEDS["mpnet"]}
            for lr in LRS["mpnet"]}
    return scores(runs) if all(r.done() for by in runs.values() for r in by.values()) else None


def recorded_nlg_full(method: str) -> dict | None:
    runs = {lr: {("wiki-describe", s): grid.nlg_full_run(method, lr, s) for s in SEEDS["nlg-full"]}
            for lr in LRS["nlg-full"]}
    return scores(runs, "rougeL") if all(r.done() for by in runs.values() for r in by.values()) else None


def sd_at_picks(method: dict, baseline: dict) -> tuple[float, int]:
    """(SD, count) of the paired test differences, each side at its own dev-picked rate."""
    d = paired.dev_test_differences(method, baseline)["test"]
    return statistics.stdev(d), len(d)


def sd_within_rates(method: dict, baseline: dict) -> tuple[float, int]:
    """(SD, degrees of freedom) of the paired test differences at each common rate about that rate's mean, pooled
    over the rates: more degrees of freedom than the few differences at one rate."""
    ss, df = 0.0, 0
    for lr in sorted(baseline):
        d = paired.paired_differences({k: v[1] for k, v in method[lr].items()},
                                      {k: v[1] for k, v in baseline[lr].items()})
        mean = statistics.fmean(d)
        ss, df = ss + math.fsum((x - mean) ** 2 for x in d), df + len(d) - 1
    return math.sqrt(ss / df), df


def mde_sources() -> list[tuple]:
    """(experiment, comparison, pairs, family size, SD, source, paper's gain) of every pre-registered comparison;
    [] while a recorded suite it rests on is incomplete."""
    qv = {m: recorded_mpnet("qv", m) for m in ("uniform", "sensitivity", "eva")}
    al = {m: recorded_mpnet("all", m) for m in ("uniform", "eva")}
    al["sensitivity"] = recorded_mpnet("all", "sensitivity", "param")
    nf = {m: recorded_nlg_full(m) for m in ("uniform", "sensitivity")}
    if any(g is None for g in (*qv.values(), *al.values(), *nf.values())):
        return []
    a, b, c = "(a) mpnet-decisive", "(b) mpnet-1k, each cell", "(c) nlg-powered"
    n_a, n_b, n_c = (len(SEEDS[k]) * t for k, t in (("mpnet-decisive", 3), ("mpnet-1k", 3), ("nlg-powered", 1)))
    rows = []
    for exp, n, fam, where in ((a, n_a, FAMILY["mpnet-decisive"], "q,v"), (b, n_b, FAMILY["mpnet-1k"], "q,v")):
        for m in ("sensitivity", "eva"):
            sd, k = sd_at_picks(qv[m], qv["uniform"])
            rows.append((exp, f"{NAMES[m]} − uniform{', q,v cells' if exp == b else ''}", n, fam, sd,
                         f"mpnet {where}, {k} differences at the dev-picked rates", PAPER_GAIN["nlu"]))
        if exp == a:
            sd, k = sd_at_picks(al["uniform"], qv["uniform"])
            rows.append((exp, "each capacity control − uniform", n, fam, sd, f"mpnet, uniform all linear − uniform "
                         f"q,v, {k} differences at the dev-picked rates", PAPER_GAIN["nlu"]))
    for m, how in (("sensitivity", "budget in parameters"), ("eva", "budget in ranks")):
        sd, k = sd_at_picks(al[m], al["uniform"])
        rows.append((b, f"{NAMES[m]} − uniform, all-linear cells", n_b, FAMILY["mpnet-1k"], sd,
                     f"mpnet all linear ({how}), {k} differences at the dev-picked rates", PAPER_GAIN["nlu"]))
    sd, df = sd_within_rates(nf["sensitivity"], nf["uniform"])
    rows.append((c, "Sensitivity-LoRA − uniform, test ROUGE-L", n_c, FAMILY["nlg-powered"], sd,
                 f"nlg-full, pooled about each of the {len(LRS['nlg-full'])} rates' means ({df} df)",
                 PAPER_GAIN["nlg"]))
    sd, k = sd_at_picks(nf["sensitivity"], nf["uniform"])
    rows.append((c, "the same, SD from the dev pick alone", n_c, FAMILY["nlg-powered"], sd,
                 f"nlg-full, the {k} differences at 2e-3", PAPER_GAIN["nlg"]))
    return rows


def mde_table() -> list[str]:
    out = ["| experiment | comparison | pairs | SD of the paired test differences (recorded) | MDE, α 0.05 | "
           "MDE, α 0.05/m (m) | pairs for the paper's gain |", "|---" * 7 + "|"]
    for exp, comp, n, m, sd, source, gain in mde_sources():
        mde = paired.minimum_detectable_effect(sd, n, ALPHA, POWER)
        strict = paired.minimum_detectable_effect(sd, n, ALPHA / m, POWER)
        need = paired.pairs_needed(gain, sd, ALPHA, POWER)
        out.append(f"| {exp} | {comp} | {n} | {sd:.2f} ({source}) | {mde:.2f} | {strict:.2f} ({m}) | "
                   f"{need} for +{gain:.2f} |")
    return out


# -----------------------------------------------------------------------------
# Progress, and the comparisons once a suite is whole


def missing(suite: str) -> tuple[int, int]:
    """(recorded, planned) runs of a pre-registered suite."""
    plan = grid.PLANS[suite]()
    return sum(r.done() for r in plan), len(plan)


def progress_table() -> list[str]:
    lrs = {"mpnet-decisive": grid.decisive_lrs(), "mpnet-1k": grid.mpnet_1k_lrs(), "nlg-powered": LRS["nlg-powered"]}
    out = ["| suite | command | planned runs | recorded | missing | learning rates now |", "|---" * 6 + "|"]
    for suite in grid.PREREGISTERED:
        done, planned = missing(suite)
        out.append(f"| {suite} | `{COMMANDS[suite]}` | {planned} | {done} | {planned - done} | "
                   + ", ".join(f"{lr:g}" for lr in lrs[suite]) + " |")
    return out


def not_yet(suite: str) -> list[str] | None:
    done, planned = missing(suite)
    if done == planned:
        return None
    return [f"Recorded: {done} of {planned} planned runs ({planned - done} missing). The comparison is reported once "
            "every planned run is recorded (the stopping rule)."]


def decisive_table() -> list[str]:
    wait = not_yet("mpnet-decisive")
    if wait:
        return wait
    seeds, lrs = SEEDS["mpnet-decisive"], grid.decisive_lrs()
    runs = {a: {lr: {(t, s): grid.decisive_run(t, a, lr, s) for t in NLU_TASKS for s in seeds} for lr in lrs}
            for a in grid.DECISIVE_ARMS}
    return compare_rows(runs, "uniform", ARM_NAMES, NLU_TASKS, seeds)


def mpnet_1k_table() -> list[str]:
    """The 4 cells, one family of every method against uniform in every cell (FAMILY)."""
    wait = not_yet("mpnet-1k")
    if wait:
        return wait
    seeds, lrs = SEEDS["mpnet-1k"], grid.mpnet_1k_lrs()
    runs = {(tg, r): {m: {lr: {(t, s): grid.mpnet_1k_run(t, tg, r, m, lr, s) for t in NLU_TASKS for s in seeds}
                          for lr in lrs} for m in grid.MPNET_1K_METHODS} for tg, r in grid.MPNET_1K_CELLS}
    g = {cell: {m: scores(x) for m, x in by.items()} for cell, by in runs.items()}
    fam = family({(cell, m): (g[cell][m], g[cell]["uniform"], False) for cell in g for m in g[cell] if m != "uniform"})
    out = []
    for (tg, r), by in runs.items():
        out += ["", f"{'q,v' if tg == 'qv' else 'All linear layers'}, r_avg {r}:", ""]
        out += compare_rows(by, "uniform", NAMES, NLU_TASKS, seeds, {m: e for (c, m), e in fam.items() if c == (tg, r)})
    return out[1:]


def nlg_powered_table() -> list[str]:
    wait = not_yet("nlg-powered")
    if wait:
        return wait
    seeds, lr = SEEDS["nlg-powered"], LRS["nlg-powered"][0]
    runs = {m: {lr: {("wiki-describe", s): grid.nlg_powered_run(m, s) for s in seeds}}
            for m in grid.NLG_POWERED_METHODS}
    g = {m: scores(x, "rougeL") for m, x in runs.items()}
    return nlg_table(runs, family({"sensitivity": (g["sensitivity"], g["uniform"], False)}), seeds)


TABLES = {"prereg-mde": mde_table, "prereg-progress": progress_table, "prereg-decisive": decisive_table,
          "prereg-mpnet-1k": mpnet_1k_table, "prereg-nlg-powered": nlg_powered_table}
