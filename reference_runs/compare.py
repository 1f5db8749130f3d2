"""The paired comparisons of the README tables: each method against one baseline, as table cells.

Every comparison row reports (paired.py gives the statistics):
- dev Δ and test Δ: the mean paired difference (method − baseline, ×100) on dev and on test, each side at its own
  dev-picked rate or at the rate the suite's rule gives it. The rates were picked on dev, so a dev Δ well above the
  test Δ is the pick showing, and a test Δ well above the dev Δ is a gain the pick did not see;
- the 95 % interval, by the number of pairs: with 6 or more, the selection-aware bootstrap (the picks redone on dev
  inside each resample, paired.selection_aware_bootstrap), written [lo, hi]; where nothing was picked (one rate each
  side), the plain percentile bootstrap, written [lo, hi]†; with fewer than 6 pairs no bootstrap, but the Student
  t-interval and the range of the differences, written "t [lo, hi]; range [min, max]";
- wins-losses-ties over the pairs;
- the exact sign test and the exact Wilcoxon signed-rank p, each Holm-adjusted over the methods compared with the
  same baseline in the same table section (a family; a family of one is unadjusted).

A grid is {lr: {(task, seed): (dev score, test score)}} (paired.py), scores ×100.
"""
from __future__ import annotations

import statistics

import grid
import paired

NAMES = {"uniform": "LoRA (uniform)", "sensitivity": "Sensitivity-LoRA", "global": "Sg-LoRA (global only)",
         "local": "Sl-LoRA (local only)", "pra": "PRA", "half-mu": "0.5/µ weights",
         "obs": "Sensitivity-LoRA, obs source", "eva": "EVA (ρ = 2)"}
GEN = ("bleu4", "rouge1", "rougeL")


def score(run, split: str, metric: str | None = None) -> float:
    return 100 * grid.score(run, split, metric)


HEADER = "dev Δ | test Δ | 95 % interval | wins-losses-ties | sign p (Holm) | Wilcoxon p (Holm)"
WIDTH = HEADER.count("|") + 1
_memo: dict[str, dict] = {}


def one(method: dict, baseline: dict, shared_pick: bool = False) -> dict:
    """paired.compare_to_baseline for one method's grid (its p-values not yet adjusted), memoised on the scores:
    the selection-aware bootstrap takes about half a second, and the same comparison fills several tables."""
    key = repr((sorted(method.items()), sorted(baseline.items()), shared_pick))
    if key not in _memo:
        if len(method) == 1 and len(baseline) == 1:  # one rate each side: nothing to pick, no selection to redo
            d = paired.dev_test_differences(method, baseline)
            _memo[key] = {"lr": d["lr_method"], "baseline_lr": d["lr_baseline"],
                          "dev": paired.report(d["dev"]) if d["dev"] else None, "test": paired.report(d["test"])}
        else:
            _memo[key] = paired.compare_to_baseline({"m": method}, baseline, shared_pick=shared_pick)["m"]
    return _memo[key]


def family(members: dict) -> dict:
    """{name: entry} for members {name: (grid, baseline grid, shared_pick)} compared with one baseline: each entry
    is one()'s, with "sign_p_holm" and "wilcoxon_p_holm" adjusted over the family (paired.holm)."""
    out = {name: dict(one(*m)) for name, m in members.items()}
    for key in ("sign_p", "wilcoxon_p"):
        for name, adj in zip(out, paired.holm([e["test"][key] for e in out.values()])):
            out[name][key + "_holm"] = adj
    return out


def p_text(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def interval(e: dict) -> str:
    t = e["test"]
    if t["n_pairs"] < paired.SMALL_N:
        lo, hi = t["t_interval95"] if t["t_interval95"] else (float("nan"),) * 2
        return f"t [{lo:+.2f}, {hi:+.2f}]; range [{t['min_diff']:+.2f}, {t['max_diff']:+.2f}]"
    if "selection_aware_ci95" in e:
        lo, hi = e["selection_aware_ci95"]
        return f"[{lo:+.2f}, {hi:+.2f}]"
    lo, hi = t["bootstrap_ci95"]
    return f"[{lo:+.2f}, {hi:+.2f}]†"


def cells(e: dict | None) -> str:
    """The HEADER's cells of one family entry; dashes for the baseline's own row (None)."""
    if e is None:
        return " | ".join(["—"] * WIDTH)
    t = e["test"]
    dev = f"{e['dev']['mean_diff']:+.2f}" if e["dev"] else "n/a"
    return (f"{dev} | {t['mean_diff']:+.2f} | {interval(e)} | {t['wins']}-{t['losses']}-{t['ties']} | "
            f"{p_text(e['sign_p_holm'])} | {p_text(e['wilcoxon_p_holm'])}")


def scores(runs: dict, metric: str | None = None) -> dict:
    """The grid of recorded runs {lr: {(task, seed): Run}}: (dev, test) ×100 of each (grid.score)."""
    return {lr: {k: (100 * grid.score(r, "dev", metric), 100 * grid.score(r, "test", metric)) for k, r in by.items()}
            for lr, by in runs.items()}


def mean_std(xs: list[float], n_full: int) -> str:
    """mean ± sample SD of the defined values, with their count when it is not the full one."""
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    s = f"{statistics.fmean(xs):.2f}"
    s += f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    return s + (f" (n={len(xs)})" if len(xs) != n_full else "")


def params(runs) -> str:
    return ", ".join(f"{p:,}" for p in sorted({r.record.metrics["lora_params"] for r in runs})) or "n/a"


# -----------------------------------------------------------------------------
# Row builders over runs {method: {lr: {(task, seed): Run}}}, every run recorded


def compare_rows(runs: dict, baseline: str, names: dict, tasks, seeds, fam: dict | None = None) -> list[str]:
    """Test score per task (mean ± SD over seeds) at each method's own dev-picked rate, then the family of every
    method against `baseline` (HEADER; `fam`: entries of a larger family, by method), and the LoRA parameters."""
    grids = {m: scores(r) for m, r in runs.items()}
    if fam is None:
        fam = family({m: (g, grids[baseline], False) for m, g in grids.items() if m != baseline})
    out = ["| method | " + " | ".join(tasks) + f" | {HEADER} | LoRA params |", "|---" * (len(tasks) + WIDTH + 2) + "|"]
    for m, g in grids.items():
        picks = paired.pick_lrs(g)
        cols = [f"{mean_std([g[picks[t]][(t, s)][1] for s in seeds], len(seeds))} (lr {picks[t]:g})" for t in tasks]
        used = [runs[m][picks[t]][(t, s)] for t in tasks for s in seeds]
        out.append(f"| {names[m]} | " + " | ".join(cols) + f" | {cells(fam.get(m))} | {params(used)} |")
    return out


def common_lr_rows(runs: dict, baseline: str, names: dict, metric: str | None = None) -> list[str]:
    """Every method against `baseline` at each common rate (no pick: one family per rate)."""
    grids = {m: scores(r, metric) for m, r in runs.items()}
    out = [f"| method | lr | {HEADER} |", "|---" * (WIDTH + 2) + "|"]
    for lr in sorted(grids[baseline]):
        fam = family({m: ({lr: g[lr]}, {lr: grids[baseline][lr]}, False) for m, g in grids.items() if m != baseline})
        out += [f"| {names[m]} | {lr:g} | {cells(e)} |" for m, e in fam.items()]
    return out


def lr_grid_rows(runs: dict, names: dict, tasks, metric: str | None = None) -> list[str]:
    """Mean dev score at each rate of the grid per method and task, the dev pick in bold, and how many picks land
    on an edge of the grid (where the optimum is not bracketed)."""
    grids = {m: scores(r, metric) for m, r in runs.items()}
    lrs = sorted(next(iter(grids.values())))
    out = ["| method | " + " | ".join(f"{t}: dev at lr " + " / ".join(f"{lr:g}" for lr in lrs) for t in tasks) + " |",
           "|---" * (len(tasks) + 1) + "|"]
    picks = []
    for m, g in grids.items():
        pick = paired.pick_lrs(g)
        picks += [pick[t] for t in tasks]
        row = []
        for t in tasks:
            devs = [statistics.fmean(v[0] for k, v in g[lr].items() if k[0] == t) for lr in lrs]
            row.append(" / ".join(f"**{d:.2f}**" if lr == pick[t] else f"{d:.2f}" for lr, d in zip(lrs, devs)))
        out.append(f"| {names[m]} | " + " | ".join(row) + " |")
    out.append(f"\nPicks at the largest rate: {picks.count(lrs[-1])} of {len(picks)}; at the smallest: "
               f"{picks.count(lrs[0])} of {len(picks)}.")
    return out


def nlg_table(runs: dict, fam: dict, seeds) -> list[str]:
    """SmolLM2 (nlg-full, nlg-powered): test scores ×100 at each method's dev-picked lr, the family against uniform
    LoRA in ROUGE-L over the seeds (compare.HEADER), and the training throughput of each run."""
    out = ["| method | lr | " + " | ".join(f"test {g}" for g in GEN) + f" | {HEADER} | training tok/s per run | "
           "LoRA params |", "|---" * (len(GEN) + WIDTH + 4) + "|"]
    for m, by_lr in runs.items():
        lr = grid.pick_lr([r for at in by_lr.values() for r in at.values()])
        used = list(by_lr[lr].values())
        cols = [mean_std([score(r, "test", g) for r in used], len(seeds)) for g in GEN]
        tps = [r.record.log("step")[-1]["tokens_per_s"] for r in used]  # each run's last logged rate
        out.append(f"| {NAMES[m]} | {lr:g} | " + " | ".join(cols) + f" | {cells(fam.get(m))} | "
                   f"{statistics.fmean(tps):,.0f} | {params(used)} |")
    return out
