"""Fill the result tables of reference_runs/README.md and of the top-level README.md from the recorded runs (never by
hand).

    python reference_runs/tables.py          # rewrites every <!-- table:NAME --> ... <!-- /table:NAME --> block

Reads reference_runs/<suite>/runs.jsonl (store.py): each run's metrics, ranks, θ, per-epoch θ and training tokens/s.
Learning rates are picked on the dev split by grid.pick_lr's rule, exactly as grid.py did when it chose what to run;
test scores are only reported. Scores are ×100 (as in the paper); mean ± sample std over seeds, with the number of
seeds when it is not the full count. Every comparison with a baseline reports the cells of compare.HEADER (dev and
test Δ, the interval its number of pairs supports, wins-losses-ties, Holm-adjusted sign and Wilcoxon p).
"""
import re
import statistics
import sys

import grid
import prereg
import compare
from compare import (GEN, HEADER, NAMES, WIDTH, common_lr_rows, compare_rows, family, lr_grid_rows, mean_std,
                     nlg_table, score, scores)
from grid import (HERE, LRS, MPNET_METHODS, MPNET_PARAM_METHODS, NLU_TASKS, ROOT, SEEDS, mpnet_run, nlg_run, nlu_run,
                  pick_lr, picked_lrs, select_runs)

sys.path.insert(0, str(HERE.parent))
from slora.method.stability import stability  # noqa: E402

def done(runs):
    return [r for r in runs if r.done()]


def variant(task, lr, s, key):
    """The run of one table row: key = alloc, or (alloc, policy, source)."""
    alloc, policy, source = key if isinstance(key, tuple) else (key, "scale", "diag")
    return nlu_run(task, "qv", alloc, lr, s, "", policy=policy, source=source)


ROWS = [("uniform", NAMES["uniform"]), ("sensitivity", NAMES["sensitivity"]), ("global", NAMES["global"]),
        ("local", NAMES["local"]), ("pra", NAMES["pra"]), ("half-mu", NAMES["half-mu"]),
        (("sensitivity", "constant", "diag"), "Sensitivity-LoRA, α policy constant"),
        (("sensitivity", "rslora", "diag"), "Sensitivity-LoRA, α policy rslora"),
        (("sensitivity", "scale", "obs"), "Sensitivity-LoRA, obs metric source")]


def nlu_main(split: str = "test") -> list[str]:
    lrs = picked_lrs()
    n = len(SEEDS["nlu"])
    out = ["| method (q,v; r_avg 4) | " + " | ".join(f"{t} (lr {lrs[t]:g})" if lrs[t] else t for t in NLU_TASKS)
           + " | mean of tasks | LoRA params |", "|---" * (len(NLU_TASKS) + 3) + "|"]
    for key, label in ROWS:
        cells, means, params = [], [], set()
        for t in NLU_TASKS:
            runs = done([variant(t, lrs[t], s, key) for s in SEEDS["nlu"]]) if lrs[t] else []
            xs = [score(r, split) for r in runs]
            cells.append(mean_std(xs, n))
            means.append(statistics.fmean(xs) if len(xs) == n else None)
            params |= {r.record.metrics["lora_params"] for r in runs}
        avg = f"{statistics.fmean(means):.2f}" if None not in means else "n/a"
        out.append(f"| {label} | " + " | ".join(cells) + f" | {avg} | {', '.join(f'{p:,}' for p in sorted(params))} |")
    return out


def nlu_family() -> dict:
    """MiniLM q,v: every allocation against uniform LoRA, at the rate picked for the task on uniform's and
    Sensitivity-LoRA's dev scores together. Sensitivity-LoRA ran at every rate, so its interval redoes that shared
    pick in each resample; the others ran at the picked rate only, so theirs is the plain bootstrap there."""
    lrs, seeds = picked_lrs(), SEEDS["nlu"]
    if None in lrs.values():
        return {}
    full = {m: scores({lr: {(t, s): nlu_run(t, "qv", m, lr, s, "") for t in NLU_TASKS for s in seeds}
                       for lr in LRS["nlu"]}) for m in ("uniform", "sensitivity")}
    at_pick = {key: scores({0.0: {(t, s): variant(t, lrs[t], s, key) for t in NLU_TASKS for s in seeds}})
               for key, _ in ROWS}
    return family({label: (full["sensitivity"], full["uniform"], True) if key == "sensitivity"
                   else (at_pick[key], at_pick["uniform"], False) for key, label in ROWS[1:]})


def nlu_compare() -> list[str]:
    fam = nlu_family()
    out = [f"| method (q,v; r_avg 4) | {HEADER} |", "|---" * (WIDTH + 1) + "|",
           f"| {ROWS[0][1]} | {compare.cells(None)} |"]
    return out + [f"| {label} | {compare.cells(e)} |" for label, e in fam.items()]


def nlu_seeds() -> list[str]:
    lrs = picked_lrs()
    out = ["| method | " + " | ".join(f"{t} s{s}" for t in NLU_TASKS for s in SEEDS["nlu"]) + " |",
           "|---" * (1 + len(NLU_TASKS) * len(SEEDS["nlu"])) + "|"]
    for key, label in ROWS:
        cells = []
        for t in NLU_TASKS:
            for s in SEEDS["nlu"]:
                r = variant(t, lrs[t], s, key) if lrs[t] else None
                cells.append(f"{score(r, 'test'):.2f}" if r and r.done() else "n/a")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def paired() -> list[str]:
    """Sensitivity-LoRA minus uniform, per (task, seed), test and dev: the paired view of the main table."""
    lrs = picked_lrs()
    out = ["| task | seed | dev Δ | test Δ |", "|---|---|---|---|"]
    wins = total = 0
    for t in NLU_TASKS:
        for s in SEEDS["nlu"]:
            if not lrs[t]:
                continue
            a, b = variant(t, lrs[t], s, "sensitivity"), variant(t, lrs[t], s, "uniform")
            if not (a.done() and b.done()):
                continue
            d_dev, d_test = score(a, "dev") - score(b, "dev"), score(a, "test") - score(b, "test")
            wins, total = wins + (d_test > 0), total + 1
            out.append(f"| {t} | {s} | {d_dev:+.2f} | {d_test:+.2f} |")
    out.append(f"\nSensitivity-LoRA beats uniform LoRA on the test split in {wins} of {total} paired runs.")
    return out


def nlu_ranks() -> list[str]:
    """The q,v rank vectors (layer order, query then value) of each allocation at seed 0, and in how many
    (task, seed) pairs each equals Sensitivity-LoRA's."""
    lrs = picked_lrs()
    out = ["| allocation | " + " | ".join(f"{t} ranks (seed 0)" for t in NLU_TASKS) + " | same ranks as SRA |",
           "|---" * (len(NLU_TASKS) + 2) + "|"]
    for key, label in ROWS[:6] + ROWS[-1:]:
        cells, same, total = [], 0, 0
        for t in NLU_TASKS:
            if not lrs[t]:
                cells.append("n/a")
                continue
            for s in SEEDS["nlu"]:
                r, ref = variant(t, lrs[t], s, key), variant(t, lrs[t], s, "sensitivity")
                if r.done() and ref.done():
                    same += r.record.ranks() == ref.record.ranks()
                    total += 1
                if s == SEEDS["nlu"][0]:
                    cells.append(" ".join(map(str, r.record.ranks().values())) if r.done() else "n/a")
        out.append(f"| {label} | " + " | ".join(cells) + f" | {same} of {total} |")
    return out


def nlu_select(targets="qv") -> list[str]:
    out = ["| task | method | " + " | ".join(f"lr {lr:g}" for lr in LRS["nlu"]) + " |",
           "|---|---" + "|---" * len(LRS["nlu"]) + "|"]
    for t in NLU_TASKS:
        chosen = pick_lr(select_runs(t, targets))
        for m in ("uniform", "sensitivity"):
            cells = []
            for lr in LRS["nlu"]:
                xs = [score(r, "dev") for r in done([nlu_run(t, targets, m, lr, s, "") for s in SEEDS["nlu"]])]
                c = mean_std(xs, len(SEEDS["nlu"]))
                cells.append(f"**{c}**" if lr == chosen else c)
            out.append(f"| {t} | {NAMES[m]} | " + " | ".join(cells) + " |")
    return out


def nlu_all_linear() -> list[str]:
    """MiniLM on every linear layer: uniform and Sensitivity-LoRA at the rate picked on their dev scores together,
    and the paired comparison (the shared pick redone in each resample)."""
    n, seeds = len(SEEDS["nlu"]), SEEDS["nlu"]
    out = ["| method (all linear; r_avg 4) | " + " | ".join(NLU_TASKS) + f" | {HEADER} | LoRA params |",
           "|---" * (len(NLU_TASKS) + WIDTH + 2) + "|"]
    lrs = picked_lrs("all")
    if None in lrs.values():
        return out
    grids = {m: scores({lr: {(t, s): nlu_run(t, "all", m, lr, s, "") for t in NLU_TASKS for s in seeds}
                        for lr in LRS["nlu"]}) for m in ("uniform", "sensitivity")}
    fam = family({"sensitivity": (grids["sensitivity"], grids["uniform"], True)})
    for m in ("uniform", "sensitivity"):
        runs = [nlu_run(t, "all", m, lrs[t], s, "") for t in NLU_TASKS for s in seeds]
        cols = [f"{mean_std([grids[m][lrs[t]][(t, s)][1] for s in seeds], n)} (lr {lrs[t]:g})" for t in NLU_TASKS]
        out.append(f"| {NAMES[m]} | " + " | ".join(cols) + f" | {compare.cells(fam.get(m))} | {compare.params(runs)} |")
    return out


def diag_obs() -> list[str]:
    lrs = picked_lrs()
    out = ["| task | seed | τ-b θ (diag vs obs) | τ-b ranks | ranks diag | ranks obs | test diag | test obs |",
           "|---|---|---|---|---|---|---|---|"]
    for t in NLU_TASKS:
        for s in SEEDS["nlu"]:
            if not lrs[t]:
                continue
            a, b = variant(t, lrs[t], s, "sensitivity"), variant(t, lrs[t], s, ("sensitivity", "scale", "obs"))
            if not (a.done() and b.done()):
                continue
            st = stability(a.record.allocation(), b.record.allocation())
            ra, rb = (" ".join(str(v) for v in r.record.ranks().values()) for r in (a, b))
            out.append(f"| {t} | {s} | {st['tau_theta']:.3f} | {st['tau_ranks']:.3f} | {ra} | {rb} | "
                       f"{score(a, 'test'):.2f} | {score(b, 'test'):.2f} |")
    return out


def epoch_tau() -> list[str]:
    """τ-b of θ (and of the ranks) after each epoch against epoch 0 (paper Table 6): the range over seeds."""
    rows, groups = [], []
    for tg in ("qv", "all"):
        for t in NLU_TASKS:
            lr = pick_lr(select_runs(t, tg))  # the seeds at the dev-picked rate (a diverged run is no fine-tuning)
            groups.append((f"MiniLM {t}, {tg}", [nlu_run(t, tg, "sensitivity", lr, s, "") for s in SEEDS["nlu"]]
                           if lr else []))
    groups += [(f"SmolLM2 wiki-describe, {tg}", [nlg_run(tg, "sensitivity", lr, s) for lr in LRS["nlg"]
                                                 for s in SEEDS["nlg"]]) for tg in ("attn", "mlp")]
    width = 0
    for label, runs in groups:
        per_epoch: dict[int, list] = {}
        modules = None
        for r in done(runs):
            eps = r.record.epochs()
            modules = len(eps[0]["theta"])
            for e in eps[1:]:
                st = stability(eps[0], e)
                per_epoch.setdefault(e["epoch"], []).append((st["tau_theta"], st["tau_ranks"]))
        if not per_epoch:
            continue
        width = max(width, max(per_epoch))
        cells = [f"{min(v[0] for v in per_epoch[e]):.3f}–{max(v[0] for v in per_epoch[e]):.3f} "
                 f"({min(v[1] for v in per_epoch[e]):.2f}–{max(v[1] for v in per_epoch[e]):.2f})"
                 for e in sorted(per_epoch)]
        rows.append((f"| {label} | {modules} | {len(done(runs))} | " + " | ".join(cells), len(cells)))
    head = ["| model, task, targets | matrices | seeds | " + " | ".join(f"epoch {e}" for e in range(1, width + 1))
            + " |", "|---" * (3 + width) + "|"]
    return head + [row + " | —" * (width - n) + " |" for row, n in rows]


def nlg() -> list[str]:
    n = len(SEEDS["nlg"])
    out = ["| targets | method | lr (fixed) | " + " | ".join(f"test {g}" for g in GEN) + " | mean | dev rougeL | "
           "LoRA params |", "|---" * 9 + "|"]
    for tg, label in (("attn", "q,k,v,o"), ("mlp", "q,k,v,o + MLP")):
        lr = pick_lr([nlg_run(tg, m, lr, s) for s in SEEDS["nlg"] for lr in LRS["nlg"]
                      for m in ("uniform", "sensitivity")])
        if lr is None:
            out.append(f"| {label} | (selection runs incomplete) |" + " |" * 7)
            continue
        for m in ("uniform", "sensitivity"):
            runs = done([nlg_run(tg, m, lr, s) for s in SEEDS["nlg"]])
            cols = [[score(r, "test", g) for r in runs] for g in GEN]
            avg = [statistics.fmean(c) for c in zip(*cols)]
            params = {r.record.metrics["lora_params"] for r in runs}
            out.append(f"| {label} | {NAMES[m]} | {lr:g} | " + " | ".join(mean_std(c, n) for c in cols)
                       + f" | {mean_std(avg, n)} | {mean_std([score(r, 'dev') for r in runs], n)} | "
                       + ", ".join(f"{p:,}" for p in sorted(params)) + " |")
    return out


def nlg_compare() -> list[str]:
    """The CPU-sized SmolLM2 runs: Sensitivity-LoRA against uniform LoRA in ROUGE-L per target set, at the fixed
    rate (nothing picked), over the 2 seeds; each target set is its own family."""
    out = [f"| targets | {HEADER} |", "|---" * (WIDTH + 1) + "|"]
    for tg, label in (("attn", "q,k,v,o"), ("mlp", "q,k,v,o + MLP")):
        runs = {m: {lr: {("wiki-describe", s): nlg_run(tg, m, lr, s) for s in SEEDS["nlg"]} for lr in LRS["nlg"]}
                for m in ("uniform", "sensitivity")}
        if not all(r.done() for by in runs.values() for at in by.values() for r in at.values()):
            continue
        g = {m: scores(r, "rougeL") for m, r in runs.items()}
        out.append(f"| {label} | {compare.cells(family({'s': (g['sensitivity'], g['uniform'], False)})['s'])} |")
    return out


def nlg_seeds() -> list[str]:
    out = ["| run | " + " | ".join(f"dev {g}" for g in GEN) + " | " + " | ".join(f"test {g}" for g in GEN) + " |",
           "|---" * 7 + "|"]
    for r in done(grid.nlg_plan()):
        out.append(f"| {r.name} | " + " | ".join(f"{score(r, 'dev', g):.2f}" for g in GEN) + " | "
                   + " | ".join(f"{score(r, 'test', g):.2f}" for g in GEN) + " |")
    return out


def mpnet_methods(unit: str = "rank") -> list[str]:
    return [m for m in MPNET_METHODS if unit == "rank" or m in MPNET_PARAM_METHODS]


def mpnet_seeds(targets: str, unit: str = "rank") -> list[int]:
    """The seeds whose every run of this comparison (all tasks, methods and learning rates) is recorded: every
    method is compared on the same seeds, and a seed with a run not yet recorded counts for none."""
    return [s for s in SEEDS["mpnet"]
            if all(mpnet_run(t, targets, m, lr, s, "rank" if m == "uniform" else unit).done()
                   for t in NLU_TASKS for m in mpnet_methods(unit) for lr in LRS["mpnet"])]


def mpnet_runs(targets: str, unit: str = "rank") -> dict:
    """{method: {lr: {(task, seed): Run}}} over the complete seeds; uniform ranks do not depend on the budget unit."""
    seeds = mpnet_seeds(targets, unit)
    return {m: {lr: {(t, s): mpnet_run(t, targets, m, lr, s, "rank" if m == "uniform" else unit)
                     for t in NLU_TASKS for s in seeds} for lr in LRS["mpnet"]} for m in mpnet_methods(unit)}


def seeds_line(seeds, planned) -> str:
    return (f"Seeds with every run recorded: {len(seeds)} of {len(planned)} planned"
            f"{' (' + ', '.join(f's{s}' for s in seeds) + ')' if seeds else ''}.")


def mpnet_family(targets: str, unit: str = "rank") -> dict:
    """Every MPNet method against uniform LoRA, each at its own dev-picked rate per task (one family)."""
    g = {m: scores(r) for m, r in mpnet_runs(targets, unit).items()}
    return family({m: (x, g["uniform"], False) for m, x in g.items() if m != "uniform"})


def mpnet_compare(targets: str, unit: str = "rank") -> list[str]:
    """Test ×100 per task at each method's own dev-picked lr, and the family against uniform LoRA (compare.HEADER)."""
    seeds = mpnet_seeds(targets, unit)
    out = [seeds_line(seeds, SEEDS["mpnet"]), ""]
    return out + (compare_rows(mpnet_runs(targets, unit), "uniform", NAMES, NLU_TASKS, seeds) if seeds else [])


def mpnet_common_lr(targets: str, unit: str = "rank") -> list[str]:
    return common_lr_rows(mpnet_runs(targets, unit), "uniform", NAMES) if mpnet_seeds(targets, unit) else []


def mpnet_lr_grid(targets: str) -> list[str]:
    return lr_grid_rows(mpnet_runs(targets), NAMES, NLU_TASKS) if mpnet_seeds(targets) else []


def mpnet_secondary_family() -> dict:
    """The comparisons with another baseline than uniform LoRA at the same targets, each its own family: capacity
    (uniform on every linear layer against uniform on q,v) and the metric source (Sensitivity-LoRA against its obs
    variant), each side at its own dev-picked rates."""
    g = {tg: {m: scores(r) for m, r in mpnet_runs(tg).items()} for tg in ("qv", "all")}
    return {"capacity": family({"x": (g["all"]["uniform"], g["qv"]["uniform"], False)})["x"]} | {
        f"obs-{tg}": family({"x": (g[tg]["sensitivity"], g[tg]["obs"], False)})["x"] for tg in ("qv", "all")}


SECONDARY = {"capacity": "uniform LoRA, all linear layers − uniform LoRA, q,v (r_avg 4 both)",
             "obs-qv": "Sensitivity-LoRA − Sensitivity-LoRA on obs, q,v",
             "obs-all": "Sensitivity-LoRA − Sensitivity-LoRA on obs, all linear layers"}


def mpnet_secondary() -> list[str]:
    if not (mpnet_seeds("qv") and mpnet_seeds("all")):
        return []
    fam = mpnet_secondary_family()
    out = [f"| comparison (each its own family) | LoRA params | {HEADER} |", "|---" * (WIDTH + 2) + "|"]
    for key, label in SECONDARY.items():
        tg, (m, base) = ("all", ("uniform", "uniform")) if key == "capacity" else (key[4:], ("sensitivity", "obs"))
        runs = mpnet_runs(tg)
        base_runs = mpnet_runs("qv" if key == "capacity" else tg)[base]
        pm = compare.params(r for by in runs[m].values() for r in by.values())
        pb = compare.params(r for by in base_runs.values() for r in by.values())
        out.append(f"| {label} | {pm} against {pb} | {compare.cells(fam[key])} |")
    return out


def nlg_full_seeds() -> list[int]:
    """The nlg-full seeds whose every run (each method at each rate) is recorded: only they are compared."""
    lrs, methods = LRS["nlg-full"], grid.NLG_FULL_METHODS
    return [s for s in SEEDS["nlg-full"] if all(grid.nlg_full_run(m, lr, s).done() for m in methods for lr in lrs)]


def nlg_full_runs() -> dict:
    seeds = nlg_full_seeds()
    return {m: {lr: {("wiki-describe", s): grid.nlg_full_run(m, lr, s) for s in seeds} for lr in LRS["nlg-full"]}
            for m in grid.NLG_FULL_METHODS}


def nlg_full_family() -> dict:
    g = {m: scores(r, "rougeL") for m, r in nlg_full_runs().items()}
    return family({m: (x, g["uniform"], False) for m, x in g.items() if m != "uniform"})


def nlg_full_compare() -> list[str]:
    seeds = nlg_full_seeds()
    return [seeds_line(seeds, SEEDS["nlg-full"]), ""] + (nlg_table(nlg_full_runs(), nlg_full_family(), seeds)
                                                         if seeds else [])


def nlg_full_common_lr() -> list[str]:
    return common_lr_rows(nlg_full_runs(), "uniform", NAMES, "rougeL") if nlg_full_seeds() else []


def nlg_full_lrs() -> list[str]:
    """The learning-rate grid of nlg-full: mean dev / test ROUGE-L ×100 over the complete seeds for every method and
    rate, the dev-picked rate in bold, so a pick at the edge of the grid shows."""
    lrs, methods = LRS["nlg-full"], grid.NLG_FULL_METHODS
    seeds = nlg_full_seeds()
    out = ["| method | " + " | ".join(f"lr {lr:g}: dev / test" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for m in methods:
        picked = pick_lr([grid.nlg_full_run(m, lr, s) for lr in lrs for s in seeds]) if seeds else None
        cells = []
        for lr in lrs:
            runs = [grid.nlg_full_run(m, lr, s) for s in seeds]
            cell = (f"{statistics.fmean(score(r, 'dev', 'rougeL') for r in runs):.2f} / "
                    f"{statistics.fmean(score(r, 'test', 'rougeL') for r in runs):.2f}") if runs else "n/a"
            cells.append(f"**{cell}**" if lr == picked else cell)
        out.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return out


def mpnet_ranks() -> list[str]:
    """The q,v allocations (layers 0-11, query then value) at seed 0, lr 2e-3 (ranks do not depend on the lr), and
    over every (task, seed) pair how far each lies from uniform's and from SRA's: ranks moved, Σ|r − r'| / 2 of
    96."""
    out = ["| method | " + " | ".join(f"{t}: q / v" for t in NLU_TASKS) + " | ranks moved from uniform | ranks moved "
           "from SRA | SRA's ranks exactly |", "|---" * (len(NLU_TASKS) + 4) + "|"]
    lr, pairs = LRS["mpnet"][-1], [(t, s) for t in NLU_TASKS for s in SEEDS["mpnet"]]
    if not all(mpnet_run(t, "qv", m, lr, s).done() for t, s in pairs for m in MPNET_METHODS):
        return out
    ranks = {(m, t, s): mpnet_run(t, "qv", m, lr, s).record.ranks() for m in MPNET_METHODS for t, s in pairs}

    def moved(a, b):
        return statistics.fmean(sum(abs(ranks[a, t, s][k] - ranks[b, t, s][k]) for k in ranks[a, t, s]) / 2
                                for t, s in pairs)
    for m in MPNET_METHODS:
        cols = []
        for t in NLU_TASKS:
            r = ranks[m, t, SEEDS["mpnet"][0]]
            q, v = ([r[k] for k in sorted(r, key=lambda k: int(k.split(".")[3])) if k.endswith(f".attn.{p}")]
                    for p in "qv")
            cols.append(f"{' '.join(map(str, q))} / {' '.join(map(str, v))}")
        same = sum(ranks[m, t, s] == ranks["sensitivity", t, s] for t, s in pairs)
        out.append(f"| {NAMES[m]} | " + " | ".join(cols) + f" | {moved(m, 'uniform'):.1f} | "
                   f"{moved(m, 'sensitivity'):.1f} | {same} of {len(pairs)} |")
    return out


def headline() -> list[str]:
    """The primary comparisons, for the top-level README: the same entries (and Holm families) as the tables of
    reference_runs/README.md."""
    out = [f"| comparison | pairs | {HEADER} | Holm family |", "|---" * (WIDTH + 3) + "|"]
    if not (mpnet_seeds("qv") and mpnet_seeds("all") and mpnet_seeds("all", "param") and nlg_full_seeds()):
        return out
    qv, al, pa = mpnet_family("qv"), mpnet_family("all"), mpnet_family("all", "param")
    sec, nlg_f = mpnet_secondary_family(), nlg_full_family()
    six, two, alone = "6 methods vs uniform", "2 methods vs uniform", "one comparison"
    rows = [("MPNet q,v: Sensitivity-LoRA − uniform", qv["sensitivity"], six),
            ("MPNet q,v: EVA − uniform", qv["eva"], six),
            ("MPNet q,v: Sensitivity-LoRA on obs − uniform", qv["obs"], six),
            ("MPNet all linear, budget in ranks: Sensitivity-LoRA − uniform", al["sensitivity"], six),
            ("MPNet all linear, budget in parameters: Sensitivity-LoRA − uniform", pa["sensitivity"], two),
            ("MPNet all linear: Sensitivity-LoRA − Sensitivity-LoRA on obs", sec["obs-all"], alone),
            ("MPNet capacity: uniform on all linear layers − uniform on q,v", sec["capacity"], alone),
            ("SmolLM2 full size, ROUGE-L: Sensitivity-LoRA − uniform", nlg_f["sensitivity"], two),
            ("SmolLM2 full size, ROUGE-L: EVA − uniform", nlg_f["eva"], two)]
    return out + [f"| {label} | {e['test']['n_pairs']} | {compare.cells(e)} | {fam} |" for label, e, fam in rows]


TABLES = {"nlu-main": nlu_main, "nlu-main-dev": lambda: nlu_main("dev"), "nlu-compare": nlu_compare,
          "nlu-seeds": nlu_seeds, "nlu-paired": paired, "nlu-ranks": nlu_ranks, "nlu-select": nlu_select,
          "nlu-select-all": lambda: nlu_select("all"), "nlu-all-linear": nlu_all_linear,
          "diag-obs": diag_obs, "epoch-tau": epoch_tau, "nlg": nlg, "nlg-compare": nlg_compare, "nlg-seeds": nlg_seeds,
          "mpnet-qv": lambda: mpnet_compare("qv"), "mpnet-ranks": mpnet_ranks,
          "mpnet-all": lambda: mpnet_compare("all"),
          "mpnet-all-param": lambda: mpnet_compare("all", "param"), "mpnet-secondary": mpnet_secondary,
          "mpnet-qv-lrs": lambda: mpnet_lr_grid("qv"), "mpnet-all-lrs": lambda: mpnet_lr_grid("all"),
          "mpnet-qv-common-lr": lambda: mpnet_common_lr("qv"), "mpnet-all-common-lr": lambda: mpnet_common_lr("all"),
          "mpnet-all-param-common-lr": lambda: mpnet_common_lr("all", "param"),
          "nlg-full": nlg_full_compare, "nlg-full-lrs": nlg_full_lrs, "nlg-full-common-lr": nlg_full_common_lr,
          "headline": headline} | prereg.TABLES
READMES = (HERE / "README.md", ROOT / "README.md")  # the second: its section "What the reference runs show"


def fill(text: str) -> str:
    """Replace the body of every table block; a block naming an unknown table is an error."""
    def body(m):
        name = m.group(1)
        if name not in TABLES:
            raise KeyError(f"README.md: unknown table block {name!r}; known: {', '.join(TABLES)}")
        return f"<!-- table:{name} -->\n" + "\n".join(TABLES[name]()) + f"\n<!-- /table:{name} -->"
    return re.sub(r"<!-- table:([\w-]+) -->.*?<!-- /table:\1 -->", body, text, flags=re.S)


if __name__ == "__main__":
    for readme in READMES:
        readme.write_text(fill(readme.read_text()))
        print(f"filled {readme}")
