"""python -m slora.bench_dist [--gpus 2] [--small] [--out reference_runs/bench-h200x2]

Data-parallel scaling of slora on one host, 1 process against `--gpus` processes, both launched here through
torchrun (`python -m torch.distributed.run --standalone`), on the same random LLaMA-shaped model and data:

1. calibration (diag mode, every linear a target, sensitivity metrics and allocation): tokens/s over the whole job,
   and whether the ranks equal the one-process ranks exactly (they must: statistics are reduced before rank 0
   allocates);
2. LoRA training with those ranks under DDP (slora.train.backward_step, AdamW, bf16 autocast on CUDA):
   tokens/s of the job at the same micro-batch per process (so the job's batch grows with the world size, as
   data parallelism does), and peak memory per process.

The speedup is tokens/s(N processes) / tokens/s(1 process). Writes result.json and output.txt to --out.
`--small` runs a tiny shape on the CPU with gloo in seconds (the CI smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from slora.dist import process_group, data_parallel
from slora.train import objective
from slora.cli.bench import SHAPES, peak_gb, random_llama, reset_peak, sync
from slora.models.lora import apply_lora, mark_only_lora_trainable
from slora.models.llama import LlamaConfig
from slora.models.targets import find_linears
from slora.dist.calibration import CalibrationGroup
from slora.method.sensitivity import SensitivityConfig, compute


def barrier_time(device) -> float:
    """Wall clock once every rank's queue is drained (so a timed region covers the slowest rank)."""
    sync(device)
    if process_group.get().world > 1:
        torch.distributed.barrier()
    return time.perf_counter()


def worker(a) -> dict:
    """One rank: calibration then training; rank 0 returns the job's figures."""
    d = process_group.init(a.device)
    device = d.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = LlamaConfig(**SHAPES[a.shape])
    model = random_llama(cfg, device, dtype)  # same seed on every rank: the same weights
    g = torch.Generator().manual_seed(1)  # the same global data on every rank, then sharded
    calib = [torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len), generator=g) for _ in range(a.batches)]
    mine = [{"input_ids": ids.to(device)} for ids in process_group.shard(calib)]
    scfg = SensitivityConfig(r_avg=8, mode="diag")
    modules = find_linears(model, "all-linear")
    group = CalibrationGroup() if d.world > 1 else None
    # warm-up (collective)
    compute(model, mine[:1] or [{"input_ids": calib[0][:1, :16].to(device)}], modules, scfg, group=group)
    reset_peak(device)
    t0 = barrier_time(device)
    ranks = compute(model, mine, modules, scfg, group=group).ranks
    calib_s = barrier_time(device) - t0
    res = {"world_size": d.world, "shape": a.shape, "calib_tokens": a.batches * a.batch_size * a.seq_len,
           "calib_s": calib_s, "peak_mem_gb_calib": peak_gb(device), "ranks": ranks}
    res["calib_tokens_per_s"] = res["calib_tokens"] / calib_s

    apply_lora(model, {k: v for k, v in ranks.items() if v > 0}, alpha=16.0, alpha_policy="scale",
               generator=torch.Generator().manual_seed(0))
    mark_only_lora_trainable(model, extra=())
    fwd = data_parallel.wrap(model, False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    gt = torch.Generator().manual_seed(2 + d.rank)  # each rank its own sequences (throughput only)
    model.train()

    def step():
        ids = torch.randint(0, cfg.vocab_size, (a.train_batch, a.train_seq_len), generator=gt).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        objective.backward_step(fwd, [(batch, 1.0)], "lm", device, autocast)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()  # warm-up: allocator, DDP buckets
    reset_peak(device)
    t0 = barrier_time(device)
    for _ in range(a.train_steps):
        step()
    train_s = barrier_time(device) - t0
    res.update(train_shape=f"{a.train_batch}x{a.train_seq_len} per process", train_steps=a.train_steps,
               train_s=train_s, peak_mem_gb_train=peak_gb(device),
               train_tokens_per_s=d.world * a.train_batch * a.train_seq_len * a.train_steps / train_s)
    peaks = process_group.all_gather_json([res["peak_mem_gb_calib"], res["peak_mem_gb_train"]])
    res["peak_mem_gb_per_rank"], res["rank"] = peaks, d.rank
    process_group.teardown()
    return res


def launch(world: int, a, argv: list[str]) -> dict:
    """Run this module's worker under torchrun with `world` processes; rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", "slora.bench_dist", "--worker", str(out), *argv]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def report(r: dict) -> str:
    one, many = r["runs"]["1"], r["runs"][str(r["gpus"])]
    lines = [f"slora data-parallel scaling, {r['device']}, shape {one['shape']}",
             f"calibration: {one['calib_tokens']:,} tokens; {one['calib_tokens_per_s']:,.0f} tok/s on 1, "
             f"{many['calib_tokens_per_s']:,.0f} tok/s on {r['gpus']}: x{r['calib_speedup']:.2f}; "
             f"ranks identical to 1 process: {r['ranks_identical']}",
             f"training ({one['train_shape']}): {one['train_tokens_per_s']:,.0f} tok/s on 1, "
             f"{many['train_tokens_per_s']:,.0f} tok/s on {r['gpus']}: x{r['train_speedup']:.2f}",
             f"peak memory per process (calibration, training) GB: 1 -> {one['peak_mem_gb_per_rank']}, "
             f"{r['gpus']} -> {many['peak_mem_gb_per_rank']}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m slora.bench_dist", description=__doc__.split("\n\n")[1])
    p.add_argument("--gpus", type=int, default=2, help="processes of the parallel run (one GPU each on CUDA)")
    p.add_argument("--small", action="store_true", help="tiny shape on the CPU with gloo (CI smoke test)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available, cpu with --small)")
    p.add_argument("--shape", default=None, choices=tuple(SHAPES), help="model shape (default llama-3.1-8b)")
    p.add_argument("--batches", type=int, default=16, help="calibration batches, all ranks together (count)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration batch")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--train-batch", type=int, default=2, help="sequences per training micro-batch per process")
    p.add_argument("--train-seq-len", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (count)")
    p.add_argument("--out", default=None, help="folder for result.json and output.txt")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by launch(): rank 0's JSON path
    a = p.parse_args(argv)
    if a.small:
        a.device, a.shape = a.device or "cpu", a.shape or "tiny"
        a.batches, a.batch_size, a.seq_len, a.train_batch, a.train_seq_len, a.train_steps = 4, 2, 32, 2, 32, 2
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.shape = a.shape or "llama-3.1-8b"
    if a.worker:
        res = worker(a)
        if res.pop("rank") == 0:
            Path(a.worker).write_text(json.dumps(res))
        return res
    pass_on = ["--device", a.device, "--shape", a.shape, "--batches", str(a.batches), "--batch-size",
               str(a.batch_size), "--seq-len", str(a.seq_len), "--train-batch", str(a.train_batch),
               "--train-seq-len", str(a.train_seq_len), "--train-steps", str(a.train_steps)]
    runs = {str(w): launch(w, a, pass_on) for w in (1, a.gpus)}
    one, many = runs["1"], runs[str(a.gpus)]
    r = {"gpus": a.gpus, "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
         "torch": torch.__version__, "command": "python -m slora.bench_dist " + " ".join(argv or sys.argv[1:]),
         "calib_speedup": many["calib_tokens_per_s"] / one["calib_tokens_per_s"],
         "train_speedup": many["train_tokens_per_s"] / one["train_tokens_per_s"],
         "ranks_identical": one["ranks"] == many["ranks"], "runs": runs}
    text = report(r)
    print(text, end="")
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(r, indent=2, sort_keys=True) + "\n")
        (out / "output.txt").write_text(text)
    return r
