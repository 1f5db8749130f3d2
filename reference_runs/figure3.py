"""The paper's Fig. 3 (ranks that each metric alone allocates, per layer) and the SmolLM2 all-linear study.

python reference_runs/figure3.py            # runs what is not recorded, writes figure3/{results.json, README.md, *.svg}
python reference_runs/figure3.py --tables-only   # rewrites README.md and the SVGs from results.json

Every allocation is one `python -m slora.finetune --allocate-only` run, recorded as one line of figure3/runs.jsonl
(store.py: the command, hardware and versions, every metric per module, ranks), named <model>/<key>, run once and
never again. From each run's sensitivity metrics this script
allocates the budget by each metric alone under SRA (Eq. 15 on θ = trace, θ = top-k mean or θ = effective rank, with
slora.method.allocate, exact rounding, r_min 1) and sums the q and v ranks of each layer, as the paper's Fig. 3 does
(RoBERTa-base: 96 = 12 layers x 2 matrices x r_avg 4). The trend with depth is Spearman's ρ between layer index and
per-layer rank; the paper's bar heights (shared/docs/paper.md) get the same statistic.

The SmolLM2 all-linear part shows, with a new user's command, that SRA over all linear layers gives most of the
budget to a few MLP down-projections, explains it with the per-feature diagonal of H at the MLP down-projections (one
calibration pass, here, on the same batches as the run), then shows what a cap does: SRA's θ re-allocated with r_max (pure slora.method.allocate, no new calibration) and
EVA's rule (`--alloc eva`, its own run, ρ = 2).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grid import Run, record_run  # noqa: E402
from slora.method import allocate  # noqa: E402
from slora.cli.finetune import PRESETS  # noqa: E402

HERE = Path(__file__).resolve().parent / "figure3"
METRICS = ("trace", "topk", "effective_rank")
LABEL = {"trace": "trace (Eq. 8)", "topk": "top-k mean (Eq. 9)", "effective_rank": "effective rank (Eq. 10)"}
# The paper's sign of the depth trend (§4.5): trace and top-k rise with depth, effective rank falls.
PAPER_SIGN = {"trace": 1, "topk": 1, "effective_rank": -1}
HELD_RHO = 0.5  # "held": ρ has the paper's sign and |ρ| >= 0.5; "weak": right sign, smaller; else "not held"

# Paper Fig. 3 bar heights (paper.md, read off the figure): per layer, layers 1..L.
PAPER = {
    "RoBERTa-base": {"trace": [6, 8, 7, 8, 7, 7, 8, 7, 8, 9, 10, 12],
                     "topk": [6, 7, 7, 7, 7, 7, 7, 7, 8, 9, 11, 13],
                     "effective_rank": [13, 12, 11, 10, 9, 9, 8, 7, 7, 5, 3, 1]},
    "GPT-2 Large": {"trace": [1, 1, 1, 2, 3, 4, 3, 4, 4, 3, 3, 3, 4, 4] + [5] * 14 + [4, 4, 5, 4, 5, 4, 4, 5],
                    "topk": [1, 1, 1, 2, 4, 5, 4, 4, 4, 3, 3, 3, 4, 4] + [5] * 14 + [4] * 7 + [6],
                    "effective_rank": [7, 6, 5, 4, 2, 2, 3, 3, 3, 4, 5, 5, 5, 5, 3] + [4] * 8 + [3] + [4] * 11
                                      + [3]},
}

# q,v at r_avg 4 (the paper's NLU setting); 128 calibration sequences of at most 128 tokens (as stability.py).
QV = "--allocate-only --r-avg 4 --seed 0 --max-len 128 --calib-n 128 --batch-size 16"
FIG_MODELS = {"mpnet": "--model mpnet --task rt-polarity",
              "minilm": "--model minilm --task rt-polarity",
              "smollm2": "--model smollm2 --task wiki-describe --targets q_proj,v_proj"}
# the all-linear command as a new user types it (decoder defaults: r_avg 8, 256 tokens, 256 calibration sequences)
ALL_LINEAR = "--model smollm2 --task wiki-describe --targets all-linear --allocate-only --seed 0"
CAPS = (16, 32, 64)  # r_max values tried on SRA's θ


def fig_models() -> list[str]:
    """Models of the figure: mpnet only once slora has its preset (branch mpnet)."""
    return [m for m in FIG_MODELS if m in PRESETS]


def plan() -> list[Run]:
    runs = [Run("figure3", m, "qv", f"{FIG_MODELS[m]} {QV}", "qv") for m in fig_models()]
    runs.append(Run("figure3", "smollm2", "all-sra", ALL_LINEAR, "all-linear"))
    runs.append(Run("figure3", "smollm2", "all-eva", f"{ALL_LINEAR} --alloc eva", "all-linear"))
    return runs


# -----------------------------------------------------------------------------
# Per-metric SRA and the depth trend

def layer_of(name: str) -> int:
    """Layer index of a qualified module name: its first all-digit part (encoder.layer.3..., model.layers.3...)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"{name}: no layer index in the module name")


def metric_ranks(modules: dict, metric: str, r_avg: float) -> dict[str, int]:
    """SRA (Eq. 15, exact rounding, r_min 1, r_max min(d_in, d_out)) with θ = one metric alone."""
    theta = {n: float(m[metric]) for n, m in modules.items()}
    cap = {n: min(m["d_in"], m["d_out"]) for n, m in modules.items()}
    return allocate.allocate(theta, r_avg, method="sra", r_max=cap).ranks


def per_layer(ranks: dict[str, int]) -> list[int]:
    """Σ of the ranks of each layer's matrices (q + v), layers in order."""
    out: dict[int, int] = {}
    for n, r in ranks.items():
        out[layer_of(n)] = out.get(layer_of(n), 0) + r
    return [out[i] for i in sorted(out)]


def spearman(ys: list[float]) -> float | None:
    """Spearman's ρ between position (0, 1, ...) and ys, ties given their average rank; None if ys is constant."""
    def avg_ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    a, b = avg_ranks(list(range(len(ys)))), avg_ranks(list(ys))
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    sab = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    saa, sbb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    return None if sbb == 0 else sab / math.sqrt(saa * sbb)


def verdict(metric: str, rho: float | None) -> str:
    if rho is None:
        return "not held (flat)"
    if rho * PAPER_SIGN[metric] <= 0:
        return "not held"
    return "held" if abs(rho) >= HELD_RHO else "weak"


# -----------------------------------------------------------------------------
# SmolLM2 all-linear: per-feature evidence and caps

def evidence(command: str) -> dict:
    """diag(H) of every down_proj and q_proj input on the calibration batches of `command` (the all-linear SRA run),
    and where it comes from: the largest feature's share of tr(H), the token position-0 share of tr(H), and the
    largest |x| seen with its feature. Same batches as slora.finetune builds (task inputs, seed 0, defaults)."""
    from slora.data import tasks, text
    from slora.method import hessian
    from slora.models.targets import find_linears
    from slora.io.assets import model_dir
    from slora.cli.finetune import parse_args
    from slora.io.model_folder import load_model, load_tokenizer

    args = parse_args(command.split())
    folder = model_dir(args.model)
    model, tok = load_model(folder), load_tokenizer(folder)
    train = tasks.load_task(args.task, seed=args.seed)["train"]
    calib = tasks.calibration_examples("task", min(args.calib_n, len(train)), train=train, seed=args.seed)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    batches = text.calibration_batches(tok, calib, decoder=True, max_len=256, batch_size=args.batch_size,
                                       pad_id=pad)  # 256: the decoder default max_len that run resolved to
    mods = find_linears(model, "down_proj,q_proj")
    pos0, peak, mask = {}, {}, {}

    def hook(name):
        def f(module, inputs):
            x = inputs[0].detach().to(torch.float64)  # (B, T, d_in)
            m = mask["m"].to(torch.bool)  # (B, T)
            sq = x.square() * m[..., None]  # (B, T, d_in), padded tokens zeroed
            pos0[name] = pos0.get(name, 0.0) + float(sq[:, 0].sum())
            a = (x.abs() * m[..., None]).amax(dim=(0, 1))  # (d_in,)
            j = int(a.argmax())
            if float(a[j]) > peak.get(name, (0.0, -1))[0]:
                peak[name] = (float(a[j]), j)
        return f
    handles = [mm.register_forward_pre_hook(hook(n)) for n, mm in mods.items()]
    try:
        with torch.no_grad():
            for b in batches:
                mask["m"] = b["attention_mask"]
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    stats = hessian.collect(model, batches, mods, mode="diag")
    out = {}
    for n in mods:
        d = stats[n].diag
        tr = float(d.sum())
        top = torch.sort(d, descending=True)
        # (2/N)·Σ x² is diag(H); position-0 Σ x² is rescaled the same way to be a share of tr(H)
        out[n] = {"trace": tr, "top_feature": int(top.indices[0]), "top_share": float(top.values[0]) / tr,
                  "top5_share": float(top.values[:5].sum()) / tr,
                  "pos0_share": pos0[n] * 2 / stats[n].tokens / tr,
                  "max_abs": peak[n][0], "max_abs_feature": peak[n][1], "tokens": stats[n].tokens}
    return out


def capped(modules: dict, theta: dict, r_avg: float, cap: int) -> dict[str, int]:
    r_max = {n: min(cap, m["d_in"], m["d_out"]) for n, m in modules.items()}
    return allocate.allocate(theta, r_avg, method="sra", r_max=r_max).ranks


def summary(ranks: dict[str, int]) -> dict:
    c = allocate.concentration(ranks)
    return {"max": max(ranks.values()), "rank1": sum(r == 1 for r in ranks.values()), "n": len(ranks),
            "top5pct_share": c["share"], "warn": c["warn"], "top": c["top"]}


# -----------------------------------------------------------------------------
# Collect

def collect(old: dict | None) -> dict:
    """Run what is not recorded (CPU, one at a time) and gather everything the report needs."""
    res = {"torch": torch.__version__, "figure": {}, "all_linear": {}}
    for run in plan():
        if not run.done():
            print(f"[figure3] {record_run(run, 'cpu')}", flush=True)
    for run in plan():
        rec = run.record
        sens = rec.sensitivity()
        entry = {"command": rec.command, "ranks": rec.ranks(),
                 "modules": sens["modules"], "concentration": sens["config"].get("concentration")}
        if run.phase == "qv":
            entry["metric_ranks"] = {m: metric_ranks(sens["modules"], m, 4) for m in METRICS}
            res["figure"][run.task] = entry
        else:
            res["all_linear"][run.name] = entry
    sra = res["all_linear"]["all-sra"]
    cmd = sra["command"].removeprefix("python -m slora.finetune ")
    reuse = old and old.get("evidence_command") == cmd
    res["evidence"] = old["evidence"] if reuse else evidence(cmd)
    res["evidence_command"] = cmd
    theta = {n: m["theta"] for n, m in sra["modules"].items()}
    res["caps"] = {str(c): capped(sra["modules"], theta, 8, c) for c in CAPS}
    return res


# -----------------------------------------------------------------------------
# SVG: one panel per metric, one bar per layer (written by hand, as slora/heatmap.py)

COLOURS = {"trace": "#3182bd", "topk": "#31a354", "effective_rank": "#e6550d"}


def bars_svg(title: str, series: dict[str, list[int]], note: str = "") -> str:
    """Small multiples: a row per metric, bars = per-layer rank with its value on top, layer numbers below."""
    n = max(len(v) for v in series.values())
    bar, gap, ph, left, top = (22 if n <= 12 else 14), 3, 110, 150, 46
    width = left + n * (bar + gap) + 20
    height = top + len(series) * (ph + 34) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="14" font-weight="bold">{title}</text>',
           f'<text x="10" y="34" fill="#555">{note}</text>']
    for row, (metric, ys) in enumerate(series.items()):
        y0 = top + row * (ph + 34) + ph  # baseline
        vmax = max(max(ys), 1)
        out.append(f'<text x="10" y="{y0 - ph / 2:.0f}">{LABEL[metric]}</text>')
        out.append(f'<text x="10" y="{y0 - ph / 2 + 14:.0f}" fill="#555">Σ {sum(ys)}, ρ '
                   f'{_fmt(spearman(ys))}</text>')
        out.append(f'<line x1="{left - 4}" y1="{y0}" x2="{width - 16}" y2="{y0}" stroke="#999"/>')
        for i, v in enumerate(ys):
            h = (ph - 14) * v / vmax
            x = left + i * (bar + gap)
            out.append(f'<rect x="{x}" y="{y0 - h:.1f}" width="{bar}" height="{h:.1f}" fill="{COLOURS[metric]}"/>')
            out.append(f'<text x="{x + bar / 2}" y="{y0 - h - 2:.1f}" text-anchor="middle" font-size="9">{v}</text>')
            out.append(f'<text x="{x + bar / 2}" y="{y0 + 12}" text-anchor="middle" font-size="9" fill="#555">'
                       f'{i + 1}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


# -----------------------------------------------------------------------------
# Report

def figure_series(entry: dict) -> dict[str, list[int]]:
    return {m: per_layer(entry["metric_ranks"][m]) for m in METRICS}


def report(res: dict) -> str:
    out = ["# Fig. 3: ranks that each metric allocates alone, per layer",
           "",
           "Generated by `python reference_runs/figure3.py` from `results.json` (torch " + res["torch"] + ", CPU); "
           "never edited by hand. Each model's metrics come from one recorded `--allocate-only` run (a line of "
           "`runs.jsonl`; commands below). Per metric, SRA (Eq. 15, slora's exact rounding, r_min 1) spends the q,v budget of "
           "r_avg 4 using that metric alone as θ; a layer's bar is its q rank plus its v rank, as in the paper "
           "(RoBERTa-base: 96 over 12 layers). q and v read the same input, so with diag(H) they always get the "
           "same rank and every bar is even. ρ is Spearman's rank correlation of layer index against the bar. "
           f"Verdict against the paper's description (§4.5: trace and top-k rise with depth, effective rank falls): "
           f"*held* when ρ has the paper's sign and |ρ| >= {HELD_RHO}, *weak* when the sign is right but |ρ| is "
           "smaller, *not held* otherwise.", ""]
    rows = ["| model | layers | budget | metric | per-layer ranks (layer 1 first) | ρ | verdict |",
            "|---|---|---|---|---|---|---|"]
    for name, bars in PAPER.items():
        for m in METRICS:
            rho = spearman(bars[m])
            rows.append(f"| paper: {name} | {len(bars[m])} | Σ {sum(bars[m])} | {m} | "
                        f"{' '.join(map(str, bars[m]))} | {_fmt(rho)} | {verdict(m, rho)} |")
    for model, entry in res["figure"].items():
        series = figure_series(entry)
        for m in METRICS:
            rho = spearman(series[m])
            rows.append(f"| slora: {model} | {len(series[m])} | {sum(series[m])} | {m} | "
                        f"{' '.join(map(str, series[m]))} | {_fmt(rho)} | {verdict(m, rho)} |")
    out += ["<!-- table:figure3 -->"] + rows + ["<!-- /table:figure3 -->", ""]
    if "mpnet" not in res["figure"]:
        out += ["MPNet (the RoBERTa-base-shaped model, 12 layers, 96 ranks) is missing: slora had no `--model mpnet` "
                "preset when this was generated. Once it has, `python reference_runs/figure3.py` adds it.", ""]
    out += ["Figures: " + ", ".join(f"[`{m}.svg`]({m}.svg)" for m in res["figure"]) + ", [`paper.svg`](paper.svg) and "
            "[`paper-gpt2.svg`](paper-gpt2.svg) (the paper's bar heights drawn the same way).", "",
            "Runs: " + "; ".join(f"`{e['command']}`" for e in res["figure"].values()), ""]
    out += all_linear_report(res)
    return "\n".join(out) + "\n"


def all_linear_report(res: dict) -> list[str]:
    sra, evr = res["all_linear"]["all-sra"], res["all_linear"]["all-eva"]
    s = summary(sra["ranks"])
    top = sorted(sra["ranks"].items(), key=lambda kv: -kv[1])[:5]
    out = ["## SmolLM2, all linear layers, r_avg 8", "",
           f"`{sra['command']}` allocates the 1,680-rank budget over {s['n']} matrices like this: "
           + ", ".join(f"`{n}` {r}" for n, r in top)
           + f"; {s['rank1']} of {s['n']} matrices get rank 1. The top 5 % of matrices by rank hold "
             f"{s['top5pct_share']:.0%} of the budget, so slora now logs a warning and records "
             "`config.concentration` in sensitivity.json (threshold: top 5 % of matrices > 50 % of Σ r).", "",
           "### Why: a few features of the down-projection inputs dominate Σx²", "",
           "diag(H) = (2/N)·Σ_t x_t² per input feature, from one pass over the run's own calibration batches "
           f"({next(iter(res['evidence'].values()))['tokens']} tokens). Trace is Σ of it (Eq. 8), and θ's global "
           "term is the trace, so a matrix whose input carries a huge feature gets a huge θ. Columns: the largest "
           "feature's share of tr(H), the share of tr(H) contributed by the first token of each sequence, and the "
           "largest |x| seen (feature index).", "",
           "| module | tr(H) | θ | rank (SRA) | top feature share | top-5 share | first-token share "
           "| max abs x (feature) |",
           "|---|---|---|---|---|---|---|---|"]
    ev = res["evidence"]
    down = sorted((n for n in ev if n.endswith("down_proj")), key=lambda n: -ev[n]["trace"])
    for n in down[:6] + [n for n in ev if n.endswith("q_proj")][:1] + [down[len(down) // 2]]:
        e, m = ev[n], sra["modules"][n]
        out.append(f"| {n} | {e['trace']:.4g} | {m['theta']:.4g} | {sra['ranks'][n]} | {e['top_share']:.1%} "
                   f"| {e['top5_share']:.1%} | {e['pos0_share']:.1%} | {e['max_abs']:.4g} ({e['max_abs_feature']}) |")
    traces = sorted(ev[n]["trace"] for n in down)
    out += ["", f"Median down_proj tr(H) {traces[len(traces) // 2]:.4g}; largest {traces[-1]:.4g} "
            f"({traces[-1] / traces[len(traces) // 2]:.0f}x the median). The trace recomputed here matches the "
            "run's sensitivity.json to "
            f"{max(abs(ev[n]['trace'] - sra['modules'][n]['trace']) / sra['modules'][n]['trace'] for n in ev):.1e}"
            " (relative).", "",
            "### What a cap does", "",
            "| allocation | largest rank | matrices at rank 1 | top 5 % share | warning |", "|---|---|---|---|---|"]
    variants = {"SRA (no cap)": sra["ranks"]}
    variants |= {f"SRA, --r-max {c}": r for c, r in res["caps"].items()}
    variants["EVA, ρ 2 (cap 16), `--alloc eva`"] = evr["ranks"]
    for label, ranks in variants.items():
        v = summary(ranks)
        out.append(f"| {label} | {v['max']} | {v['rank1']} | {v['top5pct_share']:.0%} | "
                   f"{'yes' if v['warn'] else 'no'} |")
    types = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in sra["ranks"]))
    out += ["", "Σ rank by module type (30 matrices each; uniform LoRA gives 240):", "",
            "| allocation | " + " | ".join(types) + " |", "|---" * (len(types) + 1) + "|"]
    for label, ranks in variants.items():
        per = {t: sum(r for n, r in ranks.items() if n.endswith("." + t)) for t in types}
        out.append(f"| {label} | " + " | ".join(str(per[t]) for t in types) + " |")
    out += ["", "The capped SRA rows re-allocate the recorded θ with `slora.method.allocate` (water-filling gives what the "
            "cap frees to the other matrices in proportion to θ); EVA is its own run, on the centred covariance of "
            "each input (as PEFT).", ""]
    return out


def write(res: dict) -> None:
    (HERE / "README.md").write_text(report(res))
    for model, entry in res["figure"].items():
        (HERE / f"{model}.svg").write_text(bars_svg(f"{model}: per-layer q+v rank by each metric alone (SRA, r_avg 4)",
                                                    figure_series(entry), entry["command"][:110]))
    panels = [bars_svg(f"paper Fig. 3, {name} (bar heights read off the figure)", bars) for name, bars in PAPER.items()]
    (HERE / "paper.svg").write_text(panels[0])
    (HERE / "paper-gpt2.svg").write_text(panels[1])


if __name__ == "__main__":
    HERE.mkdir(exist_ok=True)
    if "--runs-only" in sys.argv:
        for run in plan():
            if not run.done():
                print(f"[figure3] {record_run(run, 'cpu')}", flush=True)
        sys.exit(0)
    path = HERE / "results.json"
    old = json.loads(path.read_text()) if path.exists() else None
    if "--tables-only" not in sys.argv:
        path.write_text(json.dumps(collect(old), indent=1, sort_keys=True) + "\n")
    write(json.loads(path.read_text()))
    print(f"wrote {HERE / 'README.md'}")
