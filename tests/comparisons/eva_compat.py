"""Compare slora's `--alloc eva` with PEFT's EVA (`peft.tuners.lora.eva.get_eva_state_dict`) on a real model.

    PYTHONPATH=. python tests/comparisons/eva_compat.py [--model minilm|smollm2] [--calib-n 256] [--rho 2]

Needs transformers and peft (with accelerate) beside slora's own dependencies, and the default assets
(`python -m slora.assets`); HF_HUB_OFFLINE=1 is enough, nothing is downloaded.
Not collected by pytest (no `test_` prefix): it imports transformers and peft, which slora never does. Both sides
see the same calibration batches (slora.data, built exactly as `python -m slora.finetune` builds them for the task),
the same weights (transformers loads the asset folder slora loads), and the same targets and budget (r = r_avg on
every target, rho). PEFT's EVA runs with its defaults (tau 0.99, incremental low-rank PCA, cycling the batches until
the needed components converge). Printed, per model:
  1. PEFT's ranks (EVA's rank_pattern, every target listed);
  2. slora eva, centred:   `--alloc eva --r-min 0` as shipped (hessian.reduce's spectrum "centred", then
     sensitivity.from_stats), on one float64 calibration pass: EVA's rule on eig of the exact covariance
     C = H/2 - µµᵀ (µ: the accumulator's token mean, checked here against a hook's) -- what PEFT computes, without
     its incremental-SVD tolerance;
  3. slora eva, uncentred: the same on eig of H itself (spectrum "uncentred", SensitivityConfig(eva_centred=False));
  4. the matrices where they differ, and for each the explained-variance ratios at the cut, so each difference
     can be told apart as a near-tie at the budget boundary (tolerance) or a real disagreement.
Exits 1 when (2) and PEFT differ by more than `--max-moved` ranks in total (default 0: any difference is reported).
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.config import EvaConfig  # noqa: E402
from peft.tuners.lora.eva import get_eva_state_dict  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

from slora.data import tasks, text  # noqa: E402
from slora.io.assets import model_dir  # noqa: E402
from slora.io.model_folder import load_model, load_tokenizer  # noqa: E402
from slora.method import hessian  # noqa: E402
from slora.method.sensitivity import SensitivityConfig, from_stats  # noqa: E402
from slora.models.targets import find_linears  # noqa: E402

SETUPS = {  # model -> (task, targets as slora suffixes, r_avg, HF auto class, prefix slora adds to HF names)
    "minilm": ("rt-polarity", "query,value", 4, AutoModel, ""),
    "smollm2": ("wiki-describe", "q_proj,v_proj", 8, AutoModelForCausalLM, ""),
}


def token_means(model, batches, modules):
    """Mean of each distinct target input over the unmasked tokens (float64), keyed by module name."""
    sums, counts, handles, mask = {}, {}, [], {}

    def hook(name):
        def f(module, args):
            x = args[0]  # (B, T, d_in)
            keep = x[mask["m"] != 0].to(torch.float64)  # (n, d_in)
            sums[name] = sums.get(name, 0) + keep.sum(0)
            counts[name] = counts.get(name, 0) + keep.shape[0]
        return f
    try:
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        with torch.no_grad():
            for b in batches:
                mask["m"] = b["attention_mask"]
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in modules}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm", choices=tuple(SETUPS))
    p.add_argument("--calib-n", type=int, default=256, help="calibration sequences (count)")
    p.add_argument("--max-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    p.add_argument("--rho", type=float, default=2.0, help="EVA rho")
    p.add_argument("--max-moved", type=int, default=0, help="ranks PEFT and slora (centred) may differ by")
    p.add_argument("--progress", action="store_true", help="show PEFT's progress bar (batches until convergence)")
    args = p.parse_args(argv)
    task, targets, r_avg, auto, prefix = SETUPS[args.model]
    torch.manual_seed(0)

    folder = model_dir(args.model)
    model, tok = load_model(folder), load_tokenizer(folder)
    decoder = auto is AutoModelForCausalLM
    train = tasks.load_task(task, seed=0)["train"]
    calib = tasks.calibration_examples("task", min(args.calib_n, len(train)), train=train, seed=0)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    batches = text.calibration_batches(tok, calib, decoder=decoder, max_len=args.max_len,
                                       batch_size=args.batch_size, pad_id=pad)
    modules = find_linears(model, targets)

    # slora: one calibration pass into float64 accumulators (exact H and token mean), reduced twice -- with the
    # centred and the uncentred spectrum -- and allocated by the code `--alloc eva --r-min 0` runs (from_stats)
    accs = hessian.accumulate(model, batches, modules, mode="full", dtype=torch.float64)
    stats_c = hessian.reduce_all(accs, spectrum="centred")
    stats_u = hessian.reduce_all(accs, spectrum="uncentred")
    owner = {n: stats_c[n].owner for n in modules}
    means = token_means(model, batches, modules)  # an independent check of the accumulator's running mean
    mean_err = max(float((accs[n].mean - means[n]).abs().max() / means[n].abs().max()) for n in set(owner.values()))
    spec_c = {n: stats_c[n].spectrum for n in modules}
    cfg_c = SensitivityConfig(mode="full", method="eva", r_avg=r_avg, eva_rho=args.rho, r_min=0, dtype="float64")
    centred = from_stats(modules, stats_c, cfg_c).ranks
    uncentred = from_stats(modules, stats_u, replace(cfg_c, eva_centred=False)).ranks

    # PEFT: EVA on transformers' model of the same folder, fed the same batches
    hf = auto.from_pretrained(str(folder), dtype=torch.float32).eval()
    cfg = LoraConfig(r=r_avg, lora_alpha=2 * r_avg, target_modules=targets.split(","), init_lora_weights="eva",
                     eva_config=EvaConfig(rho=args.rho))
    sd = get_eva_state_dict(hf, batches, peft_config=cfg, show_progress_bar=args.progress)
    peft_ranks = {prefix + k: v.shape[0] for k, v in sd.items()}
    if set(peft_ranks) != set(modules):
        raise SystemExit(f"module names differ: PEFT {sorted(peft_ranks)[:3]} vs slora {sorted(modules)[:3]}")

    tokens = stats_c[next(iter(modules))].tokens
    print(f"{args.model} {task}, targets {targets}, r_avg {r_avg}, rho {args.rho}: {len(modules)} matrices, "
          f"{len(batches)} batches, {tokens} tokens; accumulator mean vs hook mean: max rel diff {mean_err:.1e}")
    print(f"{'module':52s} {'PEFT':>5s} {'centred':>8s} {'uncentred':>10s}")
    for n in modules:
        print(f"{n:52s} {peft_ranks[n]:5d} {centred[n]:8d} {uncentred[n]:10d}")
    moved = sum(abs(peft_ranks[n] - centred[n]) for n in modules) // 2
    moved_u = sum(abs(peft_ranks[n] - uncentred[n]) for n in modules) // 2
    print(f"ranks moved, PEFT vs slora centred: {moved}; PEFT vs slora uncentred: {moved_u} "
          f"(of a budget of {sum(peft_ranks.values())})")

    # the cut: the smallest ratio taken and the largest left out, over all matrices (centred spectra)
    taken = [(float(spec_c[n][i]), n, i) for n in modules for i in range(centred[n])]
    left = [(float(spec_c[n][i]), n, i) for n in modules for i in range(centred[n], min(len(spec_c[n]),
                                                                                    round(args.rho * r_avg)))]
    print(f"cut (centred): smallest ratio taken {min(taken)[0]:.6g}, largest left {max(left)[0]:.6g}")
    for n in modules:
        if peft_ranks[n] != centred[n]:
            lo, hi = sorted((peft_ranks[n], centred[n]))
            comps = ", ".join(f"#{i + 1}: {float(spec_c[n][i]):.6g}" for i in range(lo, hi))
            print(f"  {n}: PEFT {peft_ranks[n]}, centred {centred[n]}; ratios between them {comps}")
    return 1 if moved > args.max_moved else 0


if __name__ == "__main__":
    sys.exit(main())
