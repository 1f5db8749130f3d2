"""Fill the result tables of reference_runs/README.md from the recorded runs (never by hand).

    python reference_runs/tables.py          # rewrites every <!-- table:NAME --> ... <!-- /table:NAME --> block

Reads reference_runs/{nlu,nlg,mpnet,nlg-full}/runs.jsonl (store.py): each run's metrics, ranks, θ, per-epoch θ and
training tokens/s. Learning rates are picked on the dev split by grid.pick_lr, exactly as grid.py did when it
chose what to run; test scores are only reported. Scores are ×100 (as in the paper); mean ± sample std over seeds,
with the number of seeds when it is not the full count.
"""
import re
import statistics
import sys

import grid
from grid import (HERE, LRS, MPNET_METHODS, MPNET_PARAM_METHODS, NLU_TASKS, SEEDS, Run, mpnet_run, nlg_run, nlu_run, pick_lr,
                  picked_lrs, select_runs)
from paired import paired_differences, summary

sys.path.insert(0, str(HERE.parent))
from slora.method.stability import stability  # noqa: E402

NAMES = {"uniform": "LoRA (uniform)", "sensitivity": "Sensitivity-LoRA", "global": "Sg-LoRA (global only)",
         "local": "Sl-LoRA (local only)", "pra": "PRA", "half-mu": "0.5/µ weights",
         "obs": "Sensitivity-LoRA, obs source", "eva": "EVA (ρ = 2)"}
GEN = ("bleu4", "rouge1", "rougeL")


def score(run: Run, split: str, metric: str | None = None) -> float:
    return 100 * grid.score(run, split, metric)


def mean_std(xs: list[float], n_full: int) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    s = f"{statistics.fmean(xs):.2f}"
    s += f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else ""
    return s + (f" (n={len(xs)})" if len(xs) != n_full else "")


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
    n = len(SEEDS["nlu"])
    out = ["| method (all linear; r_avg 4) | " + " | ".join(NLU_TASKS) + " | LoRA params |",
           "|---" * (len(NLU_TASKS) + 2) + "|"]
    lrs = picked_lrs("all")
    for m in ("uniform", "sensitivity"):
        cells, params = [], set()
        for t in NLU_TASKS:
            runs = done([nlu_run(t, "all", m, lrs[t], s, "") for s in SEEDS["nlu"]]) if lrs[t] else []
            cells.append(f"{mean_std([score(r, 'test') for r in runs], n)}" + (f" (lr {lrs[t]:g})" if lrs[t] else ""))
            params |= {r.record.metrics["lora_params"] for r in runs}
        out.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {', '.join(f'{p:,}' for p in sorted(params))} |")
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


def nlg_seeds() -> list[str]:
    out = ["| run | " + " | ".join(f"dev {g}" for g in GEN) + " | " + " | ".join(f"test {g}" for g in GEN) + " |",
           "|---" * 7 + "|"]
    for r in done(grid.nlg_plan()):
        out.append(f"| {r.name} | " + " | ".join(f"{score(r, 'dev', g):.2f}" for g in GEN) + " | "
                   + " | ".join(f"{score(r, 'test', g):.2f}" for g in GEN) + " |")
    return out


def mpnet_seeds(targets: str, unit: str = "rank") -> list[int]:
    """The seeds whose every run of this comparison (all tasks, methods and learning rates) is recorded: every
    method is compared on the same seeds, and a seed with a run not yet recorded counts for none."""
    methods = [m for m in MPNET_METHODS if unit == "rank" or m in MPNET_PARAM_METHODS]
    return [s for s in SEEDS["mpnet"]
            if all(mpnet_run(t, targets, m, lr, s, "rank" if m == "uniform" else unit).done()
                   for t in NLU_TASKS for m in methods for lr in LRS["mpnet"])]


def mpnet_scores(task, targets, method, seeds, unit="rank") -> tuple[float | None, dict]:
    """(the method's own dev-picked lr over `seeds`, {seed: test score at that lr}); (None, {}) without seeds."""
    unit = "rank" if method == "uniform" else unit  # uniform ranks do not depend on the budget unit
    lr = pick_lr([mpnet_run(task, targets, method, lr, s, unit) for lr in LRS["mpnet"] for s in seeds])
    if lr is None:
        return None, {}
    return lr, {s: score(mpnet_run(task, targets, method, lr, s, unit), "test") for s in seeds}


def mpnet_compare(targets: str, unit: str = "rank") -> list[str]:
    """Test ×100 per task at each method's own dev-picked lr, and the paired difference against uniform LoRA (also
    at its own lr) over the (task, seed) pairs: mean, 95 % bootstrap interval, wins-losses and sign-test p."""
    methods = [m for m in MPNET_METHODS if unit == "rank" or m in MPNET_PARAM_METHODS]
    seeds = mpnet_seeds(targets, unit)
    n = len(seeds)
    out = [f"Seeds with every run recorded: {len(seeds)} of {len(SEEDS['mpnet'])} planned"
           f"{' (' + ', '.join(f's{s}' for s in seeds) + ')' if seeds else ''}.", "",
           "| method | " + " | ".join(NLU_TASKS) + " | Δ vs uniform (95 % CI) | wins-losses | sign p | "
           "LoRA params |", "|---" * (len(NLU_TASKS) + 5) + "|"]
    base = {}
    for t in NLU_TASKS:
        base |= {(t, s): v for s, v in mpnet_scores(t, targets, "uniform", seeds)[1].items()}
    for m in methods:
        cells, mine, params = [], {}, set()
        for t in NLU_TASKS:
            lr, by_seed = mpnet_scores(t, targets, m, seeds, unit)
            cells.append(f"{mean_std(list(by_seed.values()), n)} (lr {lr:g})" if lr else "n/a")
            mine |= {(t, s): v for s, v in by_seed.items()}
            if lr:
                params |= {mpnet_run(t, targets, m, lr, s, "rank" if m == "uniform" else unit)
                           .record.metrics["lora_params"] for s in seeds}
        diffs = paired_differences(mine, base) if m != "uniform" else []
        if diffs:
            st = summary(diffs)
            stats = (f"{st['mean']:+.2f} [{st['ci95'][0]:+.2f}, {st['ci95'][1]:+.2f}] | {st['wins']}-{st['losses']} | "
                     f"{st['sign_p']:.3f}")
        else:
            stats = "— | — | —"
        out.append(f"| {NAMES[m]} | " + " | ".join(cells) + f" | {stats} | "
                   + (", ".join(f"{p:,}" for p in sorted(params)) or "n/a") + " |")
    return out


def nlg_full_seeds() -> list[int]:
    """The nlg-full seeds whose every run (each method at each rate) is recorded: only they are compared."""
    lrs, methods = LRS["nlg-full"], grid.NLG_FULL_METHODS
    return [s for s in SEEDS["nlg-full"] if all(grid.nlg_full_run(m, lr, s).done() for m in methods for lr in lrs)]


def nlg_full_compare() -> list[str]:
    """SmolLM2 at full size (grid.py nlg-full): test scores ×100 at each method's own dev-picked lr, the paired test
    difference in ROUGE-L against uniform LoRA over the seeds, and the training throughput of each run."""
    lrs, methods = LRS["nlg-full"], grid.NLG_FULL_METHODS
    seeds = nlg_full_seeds()
    out = [f"Seeds with every run recorded: {len(seeds)} of {len(SEEDS['nlg-full'])} planned"
           f"{' (' + ', '.join(f's{s}' for s in seeds) + ')' if seeds else ''}.", "",
           "| method | lr | " + " | ".join(f"test {g}" for g in GEN) + " | Δ ROUGE-L vs uniform (95 % CI) | "
           "wins-losses | training tok/s per run | LoRA params |", "|---" * (len(GEN) + 6) + "|"]
    picked = {m: pick_lr([grid.nlg_full_run(m, lr, s) for lr in lrs for s in seeds]) for m in methods}
    runs = {m: [grid.nlg_full_run(m, picked[m], s) for s in seeds] if picked[m] else [] for m in methods}
    base = {("wiki-describe", r_seed): score(r, "test", "rougeL") for r_seed, r in zip(seeds, runs["uniform"])}
    for m in methods:
        if not runs[m]:
            out.append(f"| {NAMES[m]} | n/a |" + " n/a |" * (len(GEN) + 4))
            continue
        cells = [mean_std([score(r, "test", g) for r in runs[m]], len(seeds)) for g in GEN]
        mine = {("wiki-describe", s): score(r, "test", "rougeL") for s, r in zip(seeds, runs[m])}
        diffs = paired_differences(mine, base) if m != "uniform" else []
        st = summary(diffs) if diffs else None
        stats = (f"{st['mean']:+.2f} [{st['ci95'][0]:+.2f}, {st['ci95'][1]:+.2f}] | {st['wins']}-{st['losses']}"
                 if st else "— | —")
        tps = [r.record.log("step")[-1]["tokens_per_s"] for r in runs[m]]  # each run's last logged rate
        params = sorted({r.record.metrics["lora_params"] for r in runs[m]})
        out.append(f"| {NAMES[m]} | {picked[m]:g} | " + " | ".join(cells) + f" | {stats} | "
                   f"{statistics.fmean(tps):,.0f} | {', '.join(f'{p:,}' for p in params)} |")
    return out


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
    """The q,v allocations (layers 0-11, query then value) at seed 0, lr 2e-3 (ranks do not depend on the lr)."""
    out = ["| method | " + " | ".join(f"{t}: q / v" for t in NLU_TASKS) + " |", "|---" * (len(NLU_TASKS) + 1) + "|"]
    for m in MPNET_METHODS:
        cells = []
        for t in NLU_TASKS:
            r = mpnet_run(t, "qv", m, LRS["mpnet"][-1], SEEDS["mpnet"][0])
            if not r.done():
                cells.append("n/a")
                continue
            ranks = r.record.ranks()
            q, v = ([ranks[k] for k in sorted(ranks, key=lambda k: int(k.split(".")[3])) if k.endswith(f".attn.{p}")]
                    for p in "qv")
            cells.append(f"{' '.join(map(str, q))} / {' '.join(map(str, v))}")
        out.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return out


TABLES = {"nlu-main": nlu_main, "nlu-main-dev": lambda: nlu_main("dev"), "nlu-seeds": nlu_seeds, "nlu-paired": paired, "nlu-ranks": nlu_ranks, "nlu-select": nlu_select,
          "nlu-select-all": lambda: nlu_select("all"), "nlu-all-linear": nlu_all_linear,
          "diag-obs": diag_obs, "epoch-tau": epoch_tau, "nlg": nlg, "nlg-seeds": nlg_seeds,
          "mpnet-qv": lambda: mpnet_compare("qv"), "mpnet-ranks": mpnet_ranks, "mpnet-all": lambda: mpnet_compare("all"),
          "mpnet-all-param": lambda: mpnet_compare("all", "param"), "nlg-full": nlg_full_compare,
          "nlg-full-lrs": nlg_full_lrs}


def fill(text: str) -> str:
    """Replace the body of every table block; a block naming an unknown table is an error."""
    def body(m):
        name = m.group(1)
        if name not in TABLES:
            raise KeyError(f"README.md: unknown table block {name!r}; known: {', '.join(TABLES)}")
        return f"<!-- table:{name} -->\n" + "\n".join(TABLES[name]()) + f"\n<!-- /table:{name} -->"
    return re.sub(r"<!-- table:([\w-]+) -->.*?<!-- /table:\1 -->", body, text, flags=re.S)


if __name__ == "__main__":
    readme = HERE / "README.md"
    readme.write_text(fill(readme.read_text()))
    print(f"filled {readme}")
