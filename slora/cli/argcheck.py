"""Command-line values checked right after parsing, before anything loads: one UsageError (exit 2) naming the flag.

argparse checks only that `--lr` is a float; `inf`, `nan` and `-1` are floats too, and each used to end somewhere
far away: an all-NaN adapter (`--lr inf`), clipping silently off (`--grad-clip nan`), "no cap" (`--max-steps 0`),
"all but 5 examples" (`--max-train -5`), an adapter of values near 7e17 (`--weight-decay 1e12`), a head of 10⁸
classes (`--num-labels 100000000`), or a device error blamed on the model file (`--device cuda` without CUDA,
`--device cpu:7`).
The rules are tables so that the accepted range of every flag can be read in one place. A flag a table names
but the parser lacks is skipped, so the tables serve any command that shares the flag names. The lengths
(`check_positions`) are checked against the model's config.json, still before the weights load.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from slora.dist import process_group
from slora.errors import UsageError
from slora.io.hub_cache import locate_model

# Counts: the smallest accepted value. None (the flag left at a None default) always passes: it means
# "not set", and --help says what that stands for. Zero is accepted only where --help gives it a meaning.
COUNTS = {
    "max_len": 2, "max_train": 1, "max_eval": 1, "calib_n": 1, "calib_len": 2, "pra_groups": 1,
    "max_steps": 1, "batch_size": 1, "eval_batch_size": 1, "grad_accum": 1, "gen_tokens": 1, "threads": 1,
    "log_every": 1,
    "r_min": 0,  # 0: a matrix may get no adapter (--help)
    "r_max": 1, "num_labels": 2, "seed": 0,
    "save_every": 0,  # 0: no training checkpoints (--help)
    "batches": 1, "seq_len": 1, "train_batch": 1, "train_seq_len": 1, "train_steps": 1,  # slora.bench
    "nlg_steps": 1, "nlg_batch": 1, "nlg_eval": 1,  # slora.bench, NLG case
}
# Counts with a largest value: the classes of a task head. The head is one row per class over one pooled token, and
# 65,536 rows over a base-size encoder (D = 768) are 50 M parameters, half of RoBERTa-base: a label count beyond
# this is a label value typed as a count (a head of 10⁸ classes would allocate gigabytes before the first step).
COUNT_MAX = {"num_labels": 2 ** 16}
# Real numbers: (low, high, low included, high included); every one must also be finite.
REALS = {
    "r_avg": (0.0, math.inf, False, False),        # average rank per matrix
    "k_frac": (0.0, 1.0, False, True),             # k = floor(k_frac·N) of N entries (Eq. 9)
    "er_alpha": (0.0, 1.0, False, True),           # energy share of the effective rank (Eq. 10)
    "lora_alpha": (0.0, math.inf, False, False),   # LoRA α > 0 (α = 0 would switch every adapter off)
    "lora_dropout": (0.0, 1.0, True, False),       # a probability; 1 drops every input
    "epochs": (0.0, math.inf, False, False),
    "lr": (0.0, math.inf, False, False),
    "weight_decay": (0.0, 1.0, True, True),        # AdamW's decoupled λ: each step p ← p·(1 − lr·λ); 0.01-0.1 usual
    "warmup": (0.0, 1.0, True, False),             # a fraction of all steps
    "grad_clip": (0.0, math.inf, True, False),     # 0 switches clipping off (--help)
}
SEED_MAX = 2 ** 63  # torch.Generator.manual_seed takes a 64-bit seed


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(args) -> None:
    """Every count and real number of `args` inside its range (tables COUNTS and REALS)."""
    for name, low in COUNTS.items():
        v = getattr(args, name, None)
        if v is not None and not low <= v:
            raise UsageError(flag(name), f"must be an integer >= {low}, got {v}")
    for name, high in COUNT_MAX.items():
        v = getattr(args, name, None)
        if v is not None and v > high:
            raise UsageError(flag(name), f"must be an integer <= {high:,}, got {v:,}")
    if getattr(args, "seed", None) is not None and args.seed >= SEED_MAX:
        raise UsageError("--seed", f"must be below 2**63, got {args.seed}")
    for name, (low, high, low_in, high_in) in REALS.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        inside = math.isfinite(v) and (low <= v if low_in else low < v) and (v <= high if high_in else v < high)
        if not inside:
            span = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise UsageError(flag(name), f"must be a finite number in {span}, got {v}")
    lr, decay = getattr(args, "lr", None), getattr(args, "weight_decay", None)
    if lr is not None and decay is not None and lr * decay >= 1:
        # the decoupled decay multiplies every weight by 1 − lr·λ per step: at lr·λ ≥ 1 that zeroes or flips it
        raise UsageError("--weight-decay", f"{decay:g} × --lr {lr:g} = {lr * decay:g}: AdamW multiplies each weight "
                                           f"by 1 − lr·λ per step, which must stay above 0; lower one of them")


def check_device(spec: str) -> torch.device:
    """The torch device named by `spec`, which must exist on this machine."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError("--device", f"{spec!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device", f"{spec} was asked for, but torch sees no CUDA device here "
                                         f"(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError("--device", f"{spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"numbered from 0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError("--device", "mps was asked for, but torch.backends.mps.is_available() is False")
        if device.index not in (None, 0):
            raise UsageError("--device", f"{spec}: there is one mps device, mps (or mps:0)")
    elif device.type == "cpu":
        if device.index not in (None, 0):  # torch accepts cpu:7 as a name; nothing can run there
            raise UsageError("--device", f"{spec}: the CPU is one device, cpu (or cpu:0); for CPU threads use "
                                         f"--threads")
    else:
        raise UsageError("--device", f"{spec!r}: slora runs on cpu, cuda or mps")
    return device


def check_file(name: str, path) -> None:
    if path is not None and not Path(path).is_file():
        raise UsageError(flag(name), f"{path}: no such file")


def check_finetune_args(args, presets, tasks, calib_sources) -> None:
    """All checks of `python -m slora.finetune` that need nothing loaded."""
    check_ranges(args)
    if args.r_max is not None and args.r_max < args.r_min:
        raise UsageError("--r-max", f"{args.r_max} is below --r-min {args.r_min}")
    if args.alloc == "eva" and args.budget_unit != "rank":
        # EVA's rule (arXiv 2410.07170) ranks explained-variance ratios against a budget of r_avg x matrices
        raise UsageError("--budget-unit", f"{args.budget_unit} does not apply to --alloc eva, whose budget is counted "
                                          "in ranks")
    device = check_device(args.device)
    one_process = process_group.env_world() == 1
    if getattr(args, "activation_checkpointing", None) == "auto" and (device.type != "cuda" or not one_process):
        raise UsageError("--activation-checkpointing", "auto measures one CUDA card's memory: it needs --device cuda "
                                                       "and one process (under torchrun give all or a count)")
    if getattr(args, "compile", False) and (device.type != "cuda" or not one_process):
        raise UsageError("--compile", "compiles the layers of one process's model on CUDA: it needs --device cuda "
                                      "and one process (torch's CPU code generator gives wrong gradients on some CPUs)")
    if getattr(args, "precision", None) == "fp32" and getattr(args, "dtype", None) == "bf16":
        raise UsageError("--precision", "fp32 needs an fp32 base: add --dtype fp32 (a bf16 base computes in bf16)")
    revision = getattr(args, "revision", None)
    if args.model in presets:
        if revision is not None:
            raise UsageError("--revision", f"applies to a model from the Hugging Face cache; {args.model} is a preset")
    else:  # a local folder, or a name in the Hugging Face cache (an error naming where it looked)
        locate_model(args.model, revision)
    if args.task not in tasks and args.task != "jsonl":
        raise UsageError("--task", f"unknown task {args.task!r}; known: {', '.join(tasks)}, jsonl")
    if args.task != "jsonl" and getattr(tasks[args.task], "folder", None) and not args.glue_dir:
        raise UsageError("--glue-dir", f"task {args.task} reads GLUE from a local folder: pass --glue-dir")
    if args.glue_dir is not None and not Path(args.glue_dir).is_dir():
        raise UsageError("--glue-dir", f"{args.glue_dir}: no such folder")
    if args.task == "jsonl":
        if args.train_file is None:
            raise UsageError("--train-file", "--task jsonl needs a training file")
    else:
        given = [flag(k) for k in ("train_file", "dev_file", "test_file") if getattr(args, k) is not None]
        if given:
            raise UsageError(given[0], f"applies to --task jsonl only (the task is {args.task})")
    for name in ("train_file", "dev_file", "test_file"):
        check_file(name, getattr(args, name))
    if getattr(args, "num_labels", None) is not None and (args.task != "jsonl" or
                                                           args.jsonl_kind != "classification"):
        raise UsageError("--num-labels", "applies to --task jsonl --jsonl-kind classification only; named tasks "
                                         "know their classes")
    if args.calib not in calib_sources and not Path(args.calib).is_file():
        raise UsageError("--calib", f"{args.calib!r} is neither a source ({', '.join(calib_sources)}) nor a file")


def position_limit(hf: dict) -> int | None:
    """Tokens a sequence may hold in a model of this config.json; None when the config does not say."""
    n = hf.get("max_position_embeddings")
    if not isinstance(n, int) or isinstance(n, bool):
        return None
    # RoBERTa and MPNet count positions from padding_idx + 1 (fairseq), so the rows below are never a token's
    pad = hf.get("pad_token_id")
    return n - (pad + 1 if hf.get("model_type") in ("roberta", "mpnet") and isinstance(pad, int) else 0)


def check_positions(args, hf: dict, decoder: bool):
    """Lengths asked for beyond the model's positions are argument errors, found from config.json before the
    weights load; --gen-tokens beyond them would generate for minutes."""
    limit = position_limit(hf)
    if limit is None:
        return
    for name in ("max_len", "calib_len"):
        value = getattr(args, name)
        if value is not None and value > limit:
            raise UsageError(f"--{name.replace('_', '-')}", f"{value} is beyond the {limit} positions of "
                                                            f"{args.model} (max_position_embeddings)")
    if decoder and args.gen_tokens > limit:
        raise UsageError("--gen-tokens", f"{args.gen_tokens} is beyond the {limit} positions of {args.model}")
