"""tables.nlg_full_compare on synthetic recorded runs: each method's lr picked on dev, test scores at that lr, the
paired ROUGE-L difference against uniform over the seeds, and the throughput of each run's last logged step."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "reference_runs"
sys.path.insert(0, str(ROOT))
import grid  # noqa: E402
import store  # noqa: E402
import tables  # noqa: E402


def record(run, dev: float, test: float, tps: float, params: int):
    metrics = {"main_metric": "rougeL", "lora_params": params,
               "final": {"dev": {"bleu4": dev / 2, "rouge1": dev, "rougeL": dev},
                         "test": {"bleu4": test / 2, "rouge1": test, "rougeL": test}}}
    store.append(run.suite_file, {"task": run.task, "name": run.name, "metrics": metrics,
                                  "log": [{"event": "step", "tokens_per_s": tps / 2},
                                          {"event": "step", "tokens_per_s": tps}]})


@pytest.fixture
def fake_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "HERE", tmp_path)
    lrs = grid.LRS["nlg-full"]
    for s in grid.SEEDS["nlg-full"]:
        for lr in lrs:
            # uniform is best on dev at the smallest rate, the others at the largest; test follows a known offset
            for m, best, offset in (("uniform", lrs[0], 0.0), ("sensitivity", lrs[-1], 0.01), ("eva", lrs[-1], -0.02)):
                good = lr == best
                record(grid.nlg_full_run(m, lr, s), dev=0.5 if good else 0.4,
                       test=(0.30 + 0.01 * s + offset) if good else 0.9, tps=1000 * (s + 1), params=100)
    return lrs


def test_nlg_full_table_picks_each_methods_lr_on_dev_and_pairs_by_seed(fake_runs):
    lrs = fake_runs
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in tables.nlg_full_compare()
            if line.startswith("| ") and not line.startswith("| method")}
    assert tables.nlg_full_compare()[0] == "Seeds with every run recorded: 3 of 3 planned (s0, s1, s2)."
    uni, sens, eva = rows["LoRA (uniform)"], rows["Sensitivity-LoRA"], rows["EVA (ρ = 2)"]
    assert uni[1] == f"{lrs[0]:g}" and sens[1] == f"{lrs[-1]:g}" and eva[1] == f"{lrs[-1]:g}"
    assert uni[4] == "31.00 ± 1.00"  # test ROUGE-L ×100 at the picked lr: 30, 31, 32 (the 90s are never chosen)
    # dev Δ at the picks is 0 (both 50); test Δ +1 and -2 in every seed: 3 pairs, so the t-interval and the range
    assert sens[5:9] == ["+0.00", "+1.00", "t [+1.00, +1.00]; range [+1.00, +1.00]", "3-0-0"]
    assert eva[5:9] == ["+0.00", "-2.00", "t [-2.00, -2.00]; range [-2.00, -2.00]", "0-3-0"]
    # 3 of 3 one way: sign and Wilcoxon p 2/8 each, Holm over the 2 methods doubles them
    assert sens[9:11] == eva[9:11] == ["0.500", "0.500"]
    assert uni[5:11] == ["—"] * 6
    assert uni[11] == "2,000"  # the last step's tokens/s, mean over seeds 1000, 2000, 3000


def test_nlg_full_table_counts_only_complete_seeds(fake_runs):
    gone = grid.nlg_full_run("eva", fake_runs[0], 2)
    path = gone.suite_file
    path.write_text("".join(store.dumps(r.line) + "\n" for k, r in store.load(path).items()
                            if k != (gone.task, gone.name)))
    assert tables.nlg_full_compare()[0] == "Seeds with every run recorded: 2 of 3 planned (s0, s1)."


def test_nlg_full_lr_table_marks_the_dev_pick_and_shows_every_rate(fake_runs):
    lrs = fake_runs
    lines = tables.nlg_full_lrs()
    assert lines[0] == "| method | " + " | ".join(f"lr {lr:g}: dev / test" for lr in lrs) + " |"
    uni = next(line for line in lines if line.startswith("| LoRA (uniform)")).split(" | ")[1:]
    uni[-1] = uni[-1].rstrip(" |")
    # uniform is best on dev at the smallest rate: dev 50, test 30 + s over seeds 0-2 -> 31; elsewhere dev 40, test 90
    assert uni[0] == "**50.00 / 31.00**" and all(c == "40.00 / 90.00" for c in uni[1:])
    sens = next(line for line in lines if line.startswith("| Sensitivity-LoRA")).split(" | ")
    assert sens[-1] == "**50.00 / 32.00** |" and sum("**" in c for c in sens) == 1
