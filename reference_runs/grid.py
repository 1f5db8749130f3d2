"""The fine-tuning comparisons of reference_runs/: every run is one `python -m slora.finetune` command.

    python reference_runs/grid.py nlu --device cuda --workers 10   # MiniLM, paper Tables 1, 3, 7 (one H200: ~20 min)
    python reference_runs/grid.py nlg --workers 2 --threads 1      # SmolLM2, paper Table 2 (2 CPU cores: ~1 h)
    python reference_runs/grid.py mpnet --device cuda --workers 16 # MPNet, every method with its own dev-picked lr
    python reference_runs/grid.py nlg-full --device cuda --workers 9 --threads 1  # SmolLM2 at full size (one H200: 19 min)
    python reference_runs/grid.py nlu --list                       # what is done, what is pending

The pre-registered suites (reference_runs/README.md, "Pre-registration"; not yet run):

    python reference_runs/grid.py mpnet-decisive --device cuda --workers 16          # (a) MPNet q,v, 10 seeds
    python reference_runs/grid.py mpnet-1k --device cuda --workers 16                # (b) 1,000 examples, 10 epochs
    python reference_runs/grid.py nlg-powered --device cuda --workers 10 --threads 1 # (c) SmolLM2, 10 seeds

Each run is one line of reference_runs/<suite>/runs.jsonl (store.py): the exact command, the device, torch and
Python versions, wall time and how many runs shared the device, args.json, metrics.json, ranks.json, θ per module and
what else of the run folder the tables and checks read. The run writes its folder (named by the command's --out,
reference_runs/<suite>/<task>/<run>) inside a scratch directory; the line is appended to the suite's file when the
run completes, and the scratch folder goes (the command rebuilds the adapter and ranks.svg). A recorded run is never
run again, so a grid that stops resumes where it stopped, and a new suite is recorded run by run.

Selection, on the dev split only (the test split is read once per run, after training, and never compared here):
- NLU. Phase "select": uniform LoRA and Sensitivity-LoRA at every learning rate of LRS, three seeds, α policy
  `scale`. The task's learning rate is the one with the best mean dev score over those 2 x 3 runs. Phase
  "methods": the other allocations (Sg, Sl, PRA, 0.5/µ), Sensitivity-LoRA with the other α policies and with the
  `obs` metric source, all at that learning rate. Phase "all-linear": uniform and Sensitivity-LoRA on every linear
  layer at every learning rate (selected the same way, apart). The ablations are not tuned on their own: they get
  the rate picked for uniform and Sensitivity-LoRA.
- NLG. Uniform and Sensitivity-LoRA, attention-only and attention+MLP, two seeds, one fixed learning rate (the
  CPU-sized setting below; not tuned).
- MPNet (RoBERTa-base shape: 12 layers, d 768). Every method at every learning rate of LRS, five seeds, on q,v and on all
  linear layers; the learning rate is picked on dev **per method** (and per task and target set), so no method is
  compared at a rate tuned for another (the tuning critique of arXiv 2602.04998). Methods: uniform, Sensitivity-LoRA,
  Sg, Sl, PRA, the obs metric source, and EVA (`--alloc eva`, ρ = 2). All linear layers once more with the budget
  kept in parameters (`--budget-unit param`) for the methods whose ranks differ between matrix shapes.
- NLG at full size ("nlg-full", paper Table 2). SmolLM2 on all 7,890 wiki-describe training examples (--max-len 256),
  2 epochs, seeds 0 1 2; uniform, Sensitivity-LoRA and EVA on q,k,v,o (the decoder default) at every rate of
  LRS["nlg-full"]; the learning rate is picked on dev per method, as for MPNet. The GPU path of NLG_FULL_COMMON:
  micro-batch 32 in length-grouped batches, evaluation in length-sorted batches of 128, the non-finite check kept
  on the device (read every 50 steps, at checkpoints and before evaluation), fused AdamW, the LM head run on the
  response positions only (7 % of the non-pad positions carry a loss). Dev and test are cut to their first 400
  examples (of 986) and answers to 32 tokens: ROUGE-L of 400 short descriptions, cheap to generate.
  Cost: 1,149,415 non-pad training tokens per epoch (padding: 41 % of the positions in random batches of 32, 1.3 %
  in grouped ones), 2.30 M per run, 82.8 M for the 36 runs; 1,200 generated answers per run (400 dev after each
  epoch, 400 test). Measured on one H200 with 9 runs sharing it (reference_runs/README.md): 9,500-12,600 training
  tokens/s per run, 234-301 s per run, 36 runs in 1,128 s. The rate 4e-3 was added after the first 27 runs, where
  uniform and Sensitivity-LoRA both picked 2e-3, the top of the grid then.
A seed fixes the data split, the calibration sample, the head and LoRA init, the batch order and dropout; every
method of one seed sees the same split, so the methods are compared pairwise.

The pre-registered suites were planned before any of their runs existed; their hypotheses, metrics, minimum
detectable effects and stopping rules are in reference_runs/README.md. They are recorded with the data order drawn
from a stream of its own seeded by --seed alone (slora/train/loop.py, data_order_seed: every method of a seed trains
on the same batches), so they are never compared with the suites above, which were recorded with the earlier order.
- "mpnet-decisive": MPNet q,v at r_avg 4, seeds 0-9, the 3 tasks; uniform, Sensitivity-LoRA and EVA, and three
  capacity controls at the same 96 ranks or twice them: all on value (attn.v at r_avg 8), all on query (attn.q at
  r_avg 8), uniform q,v at r_avg 8. Every arm at every rate of LRS["mpnet-decisive"], picked on dev per arm and task.
- "mpnet-1k": MPNet on the first 1,000 training examples of each seed's split for 10 epochs (the paper's epochs);
  r_avg 4 and 8, on q,v and on all linear layers; uniform, Sensitivity-LoRA (on all linear layers with the budget in
  parameters, equal to uniform's) and EVA (its rule counts ranks); seeds 0-4; picked on dev per method and cell.
- "nlg-powered": SmolLM2 at full size on the whole dev and test splits (986 each), uniform and Sensitivity-LoRA at
  2e-3 (both methods' dev pick in nlg-full), seeds 0-9.
In the two MPNet suites the learning-rate grid widens by a factor of 2 at an edge that a pick lands on, once every
run of the grid so far is recorded (edge_extended), up to EDGE_STEPS rates a side.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import store  # noqa: E402  (reference_runs/store.py)

SEEDS = {"nlu": (0, 1, 2), "nlg": (0, 1), "mpnet": (0, 1, 2, 3, 4), "nlg-full": (0, 1, 2)}
LRS = {"nlu": (5e-4, 1e-3, 2e-3), "nlg": (1e-3,), "mpnet": (5e-4, 1e-3, 2e-3), "nlg-full": (5e-4, 1e-3, 2e-3, 4e-3)}
NLU_TASKS = ("rt-polarity", "rt-regression", "wiki-topic")
NLU_COMMON = "--model minilm --epochs 3 --batch-size 32 --log-every 50"
# NLG is sized for a 2-core CPU (about 100 training tokens/s for SmolLM2): one lr, a 160-example training sample,
# 96-token sequences and 100 dev/test examples (the full size is the nlg-full suite). Not tuned on dev: the lr is fixed.
NLG_COMMON = ("--model smollm2 --task wiki-describe --max-train 160 --max-eval 100 --max-len 96 --calib-n 64 "
              "--epochs 2 --batch-size 8 --gen-tokens 16 --log-every 5")
# NLG at full size (module docstring): the efficient GPU path; 2 epochs at micro-batch 32 are 494 optimizer steps
NLG_FULL_COMMON = ("--model smollm2 --task wiki-describe --max-len 256 --epochs 2 --batch-size 32 --group-by-length "
                   "--eval-batch-size 128 --check-finite log --fused-optim --sparse-lm-head --max-eval 400 "
                   "--gen-tokens 32 --log-every 50")
NLG_FULL_METHODS = {"uniform": "--alloc uniform", "sensitivity": "--alloc sensitivity", "eva": "--alloc eva"}
ABLATIONS = ("global", "local", "pra", "half-mu")
# MPNet: one epoch over the full training split, like the default run (the paper trains 10 epochs); every method gets
# the same schedule
MPNET_COMMON = "--model mpnet --epochs 1 --batch-size 32 --log-every 50"
# method -> finetune arguments; "obs" is Sensitivity-LoRA on the OBS saliency (full-mode H)
MPNET_METHODS = {"uniform": "--alloc uniform", "sensitivity": "--alloc sensitivity", "global": "--alloc global",
                 "local": "--alloc local", "pra": "--alloc pra", "obs": "--alloc sensitivity --metric-source obs",
                 "eva": "--alloc eva"}
# with the budget in parameters, the methods whose ranks differ between matrix shapes (uniform is the baseline)
# (EVA's budget is counted in ranks by its rule: `--alloc eva --budget-unit param` is refused)
MPNET_PARAM_METHODS = ("uniform", "sensitivity", "pra")
MLP = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Run:
    suite: str  # "nlu" | "nlg" | "mpnet" | "nlg-full" | "stability" | "figure3" | a pre-registered suite
    task: str
    name: str  # the run's name in its suite, e.g. "qv-sensitivity-scale-lr1e-3-s0"
    args: str  # slora.finetune arguments, without --out and --device
    phase: str

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.task}/{self.name}"

    @property
    def out(self) -> str:
        """The run folder its command names (--out), relative to the directory the command runs in."""
        return f"reference_runs/{self.key}"

    @property
    def suite_file(self) -> Path:
        """The suite's file of recorded runs."""
        return HERE / self.suite / store.FILE

    @property
    def record(self) -> store.Record | None:
        """The recorded run, or None while it is not recorded."""
        return store.load(self.suite_file).get((self.task, self.name))

    def done(self) -> bool:
        return self.record is not None


def lr_tag(lr: float) -> str:
    """lr1e-3, lr2e-3; a rate that one significant digit does not hold keeps two (lr1.6e-2, lr2.5e-4)."""
    digits = 0 if float(f"{lr:.0e}") == lr else 1
    return f"lr{lr:.{digits}e}".replace("e-0", "e-")


def nlu_run(task, targets, alloc, lr, seed, phase, policy="scale", source="diag") -> Run:
    tag = {"qv": "", "all": "--targets all-linear "}[targets]
    extra = f"--metric-source {source} " if source != "diag" else ""
    # θ is re-measured after each epoch on the Sensitivity-LoRA runs (paper Table 6)
    extra += "--epoch-sensitivity " if alloc == "sensitivity" and policy == "scale" and source == "diag" else ""
    name = f"{targets}-{alloc}{'-' + source if source != 'diag' else ''}-{policy}-{lr_tag(lr)}-s{seed}"
    args = (f"{NLU_COMMON} --task {task} --alloc {alloc} --alpha-policy {policy} --lr {lr:g} --seed {seed} "
            f"{tag}{extra}").strip()
    return Run("nlu", task, name, args, phase)


def nlg_run(targets, alloc, lr, seed) -> Run:
    tag = {"attn": "", "mlp": f"--targets {MLP} "}[targets]
    extra = "--epoch-sensitivity " if alloc == "sensitivity" else ""
    args = f"{NLG_COMMON} --alloc {alloc} --lr {lr:g} --seed {seed} {tag}{extra}".strip()
    return Run("nlg", "wiki-describe", f"{targets}-{alloc}-{lr_tag(lr)}-s{seed}", args, "compare")


def nlg_full_run(method, lr, seed) -> Run:
    args = f"{NLG_FULL_COMMON} {NLG_FULL_METHODS[method]} --lr {lr:g} --seed {seed}"
    return Run("nlg-full", "wiki-describe", f"attn-{method}-{lr_tag(lr)}-s{seed}", args, "compare")


def nlg_full_plan() -> list[Run]:
    """Seed-major, so that an early stop leaves whole seeds of every method at every learning rate."""
    return [nlg_full_run(m, lr, s) for s in SEEDS["nlg-full"] for lr in LRS["nlg-full"] for m in NLG_FULL_METHODS]


def mpnet_run(task, targets, method, lr, seed, unit="rank") -> Run:
    """targets "qv" (query, value) or "all" (every linear layer); unit "param" keeps the budget in parameters."""
    tag = {"qv": "", "all": "--targets all-linear "}[targets] + ("--budget-unit param " if unit == "param" else "")
    name = f"{targets}{'-param' if unit == 'param' else ''}-{method}-{lr_tag(lr)}-s{seed}"
    args = f"{MPNET_COMMON} --task {task} {MPNET_METHODS[method]} --lr {lr:g} --seed {seed} {tag}".strip()
    return Run("mpnet", task, name, args, f"{targets}{'-param' if unit == 'param' else ''}")


def mpnet_plan() -> list[Run]:
    """q,v first, then all linear layers, then the parameter budget; seed-major inside each, so that an early stop
    leaves whole seeds of every method at every learning rate (what the per-method lr pick needs)."""
    plan = []
    for targets, unit, methods in (("qv", "rank", MPNET_METHODS), ("all", "rank", MPNET_METHODS),
                                   ("all", "param", MPNET_PARAM_METHODS[1:])):
        for s in SEEDS["mpnet"]:
            plan += [mpnet_run(t, targets, m, lr, s, unit) for t in NLU_TASKS for lr in LRS["mpnet"]
                     for m in methods]
    return plan


def score(run: Run, split: str = "dev", metric: str | None = None) -> float:
    """A final score of a recorded run (the task's main metric by default); NaN where it was undefined."""
    m = run.record.metrics
    v = m["final"][split][metric or m["main_metric"]]
    return float("nan") if v is None else v


def pick_lr(runs: list[Run]) -> float | None:
    """The learning rate with the best mean dev score over `runs` (all of one selection group); None until every
    run of the group is done. A NaN score (a constant prediction) counts as the worst."""
    if not runs or not all(r.done() for r in runs):
        return None
    by_lr: dict[float, list[float]] = {}
    for r in runs:
        s = score(r)
        by_lr.setdefault(run_lr(r), []).append(-1e9 if s != s else s)
    return max(by_lr, key=lambda lr: (statistics.fmean(by_lr[lr]), -lr))  # ties: the smaller rate


def run_lr(run: Run) -> float:
    a = shlex.split(run.args)
    return float(a[a.index("--lr") + 1])


def select_runs(task: str, targets: str = "qv") -> list[Run]:
    """The lr-selection group of a task: uniform and Sensitivity-LoRA at every rate and seed."""
    phase = "select" if targets == "qv" else "all-linear"
    return [nlu_run(task, targets, m, lr, s, phase) for s in SEEDS["nlu"] for lr in LRS["nlu"]
            for m in ("uniform", "sensitivity")]


def picked_lrs(targets: str = "qv") -> dict[str, float | None]:
    """{task: the dev-picked learning rate, or None while its selection group is incomplete}."""
    return {t: pick_lr(select_runs(t, targets)) for t in NLU_TASKS}


def nlu_plan() -> list[Run]:
    """Every NLU run whose inputs are known now, in priority order (phase "methods" needs phase 1's choice)."""
    S, L = SEEDS["nlu"], LRS["nlu"]
    plan = []
    select = {t: select_runs(t) for t in NLU_TASKS}
    for s in S:  # seed-major: an early stop still leaves whole seeds
        plan += [r for t in NLU_TASKS for r in select[t] if r.name.endswith(f"-s{s}")]
    for t in NLU_TASKS:
        lr = pick_lr(select[t])
        if lr is None:
            continue
        for s in S:
            plan += [nlu_run(t, "qv", m, lr, s, "methods") for m in ABLATIONS]
            plan += [nlu_run(t, "qv", "sensitivity", lr, s, "methods", policy=p) for p in ("constant", "rslora")]
            plan.append(nlu_run(t, "qv", "sensitivity", lr, s, "methods", source="obs"))
    for s in S:
        plan += [nlu_run(t, "all", m, lr, s, "all-linear") for t in NLU_TASKS for lr in L
                 for m in ("uniform", "sensitivity")]
    return plan


def nlg_plan() -> list[Run]:
    return [nlg_run(tg, m, lr, s) for s in SEEDS["nlg"] for tg in ("attn", "mlp") for lr in LRS["nlg"]
            for m in ("uniform", "sensitivity")]


# -----------------------------------------------------------------------------
# Pre-registered suites (module docstring; reference_runs/README.md, "Pre-registration")

SEEDS |= {"mpnet-decisive": tuple(range(10)), "mpnet-1k": tuple(range(5)), "nlg-powered": tuple(range(10))}
LRS |= {"mpnet-decisive": (1e-3, 2e-3, 4e-3, 8e-3), "mpnet-1k": (1e-3, 2e-3, 4e-3, 8e-3), "nlg-powered": (2e-3,)}
EDGE_STEPS = 2  # rates a side that a pick on an edge may add to a pre-registered grid, each a factor of 2 further
# (a): the compared methods, then the capacity controls (96 ranks on value alone, on query alone, and 192 on q,v)
DECISIVE_ARMS = {"uniform": "--alloc uniform", "sensitivity": "--alloc sensitivity", "eva": "--alloc eva",
                 "value-r8": "--alloc uniform --targets attn.v --r-avg 8",
                 "query-r8": "--alloc uniform --targets attn.q --r-avg 8", "qv-r8": "--alloc uniform --r-avg 8"}
# (b): the paper's 10 epochs on a 1,000-example training sample of each seed's split
MPNET_1K_COMMON = "--model mpnet --max-train 1000 --epochs 10 --batch-size 32 --log-every 50"
MPNET_1K_CELLS = (("qv", 4), ("qv", 8), ("all", 4), ("all", 8))
MPNET_1K_METHODS = ("uniform", "sensitivity", "eva")
# (c): nlg-full's command on the whole dev and test splits, at the rate both methods picked there
NLG_POWERED_COMMON = NLG_FULL_COMMON.replace(" --max-eval 400", "")
NLG_POWERED_METHODS = ("uniform", "sensitivity")


def edge_extended(lrs: tuple, groups) -> tuple:
    """A pre-registered grid as the recorded runs have widened it: while every run of the grid so far is recorded
    and some selection group (groups(lrs): a list of run lists) picks its largest (smallest) rate on dev, the grid
    gains twice that rate (half of it), at most EDGE_STEPS rates a side. Doubling and halving are exact in binary."""
    lrs, base = tuple(sorted(lrs)), tuple(sorted(lrs))
    while True:
        picks = [pick_lr(g) for g in groups(lrs)]
        if not picks or None in picks:
            return lrs
        up = lrs[-1] in picks and lrs[-1] / base[-1] < 2 ** EDGE_STEPS
        down = lrs[0] in picks and base[0] / lrs[0] < 2 ** EDGE_STEPS
        if not (up or down):
            return lrs
        lrs = ((lrs[0] / 2,) if down else ()) + lrs + ((lrs[-1] * 2,) if up else ())


def decisive_run(task, arm, lr, seed) -> Run:
    args = f"{MPNET_COMMON} --task {task} {DECISIVE_ARMS[arm]} --lr {lr:g} --seed {seed}"
    return Run("mpnet-decisive", task, f"{arm}-{lr_tag(lr)}-s{seed}", args, "decisive")


def decisive_lrs() -> tuple:
    """The rates of (a): one selection group per arm and task."""
    seeds = SEEDS["mpnet-decisive"]
    return edge_extended(LRS["mpnet-decisive"], lambda lrs: [[decisive_run(t, a, lr, s) for lr in lrs for s in seeds]
                                                            for t in NLU_TASKS for a in DECISIVE_ARMS])


def decisive_plan() -> list[Run]:
    """Seed-major, so that an early stop leaves whole seeds (the rates a widened grid adds join each seed)."""
    lrs = decisive_lrs()
    return [decisive_run(t, a, lr, s) for s in SEEDS["mpnet-decisive"] for t in NLU_TASKS for lr in lrs
            for a in DECISIVE_ARMS]


def mpnet_1k_run(task, targets, r_avg, method, lr, seed) -> Run:
    """Sensitivity-LoRA on all linear layers keeps the budget in parameters (uniform's); EVA's rule counts ranks."""
    tag = "" if targets == "qv" else "--targets all-linear "
    tag += "--budget-unit param " if targets == "all" and method == "sensitivity" else ""
    args = (f"{MPNET_1K_COMMON} --task {task} {MPNET_METHODS[method]} --r-avg {r_avg} --lr {lr:g} --seed {seed} "
            f"{tag}").strip()
    return Run("mpnet-1k", task, f"{targets}-r{r_avg}-{method}-{lr_tag(lr)}-s{seed}", args, f"{targets}-r{r_avg}")


def mpnet_1k_lrs() -> tuple:
    """The rates of (b): one selection group per method, task, target set and r_avg."""
    seeds = SEEDS["mpnet-1k"]
    return edge_extended(LRS["mpnet-1k"], lambda lrs: [[mpnet_1k_run(t, tg, r, m, lr, s) for lr in lrs for s in seeds]
                                                      for tg, r in MPNET_1K_CELLS for t in NLU_TASKS
                                                      for m in MPNET_1K_METHODS])


def mpnet_1k_plan() -> list[Run]:
    lrs = mpnet_1k_lrs()
    return [mpnet_1k_run(t, tg, r, m, lr, s) for s in SEEDS["mpnet-1k"] for tg, r in MPNET_1K_CELLS
            for t in NLU_TASKS for lr in lrs for m in MPNET_1K_METHODS]


def nlg_powered_run(method, seed) -> Run:
    lr = LRS["nlg-powered"][0]
    args = f"{NLG_POWERED_COMMON} {NLG_FULL_METHODS[method]} --lr {lr:g} --seed {seed}"
    return Run("nlg-powered", "wiki-describe", f"attn-{method}-{lr_tag(lr)}-s{seed}", args, "compare")


def nlg_powered_plan() -> list[Run]:
    return [nlg_powered_run(m, s) for s in SEEDS["nlg-powered"] for m in NLG_POWERED_METHODS]


PLANS = {"nlu": nlu_plan, "nlg": nlg_plan, "mpnet": mpnet_plan, "nlg-full": nlg_full_plan,
         "mpnet-decisive": decisive_plan, "mpnet-1k": mpnet_1k_plan, "nlg-powered": nlg_powered_plan}
PREREGISTERED = ("mpnet-decisive", "mpnet-1k", "nlg-powered")


# -----------------------------------------------------------------------------
# Execution: worker processes, each running one finetune job at a time

def _init_worker(threads: int):
    import torch
    torch.set_num_threads(threads)


def finetune_in(cwd: Path, argv: list[str], concurrent_runs: int = 1) -> tuple[Path, str, dict]:
    """Run `python -m slora.finetune ARGV` (ARGV ends with --out FOLDER, relative) in the directory `cwd`; return its
    run folder, the command, and the hardware and versions it ran on with its wall time (env)."""
    import torch
    from slora.cli import finetune
    before = os.getcwd()
    os.chdir(cwd)  # a relative --out: args.json and the command read the same on every clone
    try:
        t0 = time.time()
        out = cwd / finetune.main(argv)
        wall = time.time() - t0
    finally:
        os.chdir(before)
    dev = torch.device(json.loads((out / "args.json").read_text())["device"])
    env = {"concurrent_runs": concurrent_runs, "cpu": platform.processor() or platform.machine(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "python":
           platform.python_version(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "wall_s": round(wall, 1)}
    return out, "python -m slora.finetune " + " ".join(argv), env


def record(argv: list[str]) -> float:
    """A whole run folder in the repository (record.py, the CI run): run `python -m slora.finetune ARGV` (ARGV ends
    with --out FOLDER) from the repository root, then write command.txt and env.json (hardware, versions, wall
    time) into its folder; returns the wall time."""
    out, command, env = finetune_in(ROOT, argv)
    (out / "command.txt").write_text(command + "\n")
    (out / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    return env["wall_s"]


def execute(run: Run, device: str, workers: int) -> dict:
    """One run of a suite (in a worker process): its run folder is written in a scratch directory and returned as
    the run's line (store.py); the scratch directory goes."""
    argv = shlex.split(run.args) + ["--device", device, "--out", run.out]
    with tempfile.TemporaryDirectory(prefix="slora-run-") as scratch:
        folder, command, env = finetune_in(Path(scratch), argv, concurrent_runs=workers)
        return store.from_folder(folder, run.task, run.name, command, env)


def record_run(run: Run, device: str, workers: int = 1) -> str:
    """Run one run here and append its line to the suite's file; the progress line to print."""
    line = execute(run, device, workers)
    store.append(run.suite_file, line)
    return f"{run.key}: {line['env']['wall_s']:.0f}s"


def drive(suite: str, device: str, workers: int, budget_s: float, threads: int) -> None:
    """Run pending runs of `suite`, `workers` at a time, until none is left or `budget_s` has passed (runs in
    flight then finish). Each completed run's line is appended to the suite's file here, by this one process. The
    plan is recomputed whenever a run ends, so later phases start once their inputs are done."""
    t0, running, failed = time.time(), {}, set()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        while True:
            busy = {r.key for r in running.values()}
            # a run that failed is not tried again by this process: it would fail again, at the cost of a slot
            todo = [r for r in PLANS[suite]() if not r.done() and r.key not in busy | failed]
            while todo and len(running) < workers and time.time() - t0 < budget_s:
                r = todo.pop(0)
                running[pool.submit(execute, r, device, workers)] = r
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                r = running.pop(f)
                try:
                    line = f.result()
                except Exception as e:  # a failed run is reported and left unrecorded; the rest go on
                    failed.add(r.key)
                    print(f"[{time.time() - t0:5.0f}s] FAILED {r.key}: {e!r}", flush=True)
                    continue
                store.append(r.suite_file, line)
                print(f"[{time.time() - t0:5.0f}s] {r.key}: {line['env']['wall_s']:.0f}s", flush=True)
    left = [r for r in PLANS[suite]() if not r.done()]
    print(f"{suite}: {len(left)} runs pending ({len(failed)} failed) after {time.time() - t0:.0f}s", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("suite", choices=tuple(PLANS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1, help="runs at a time (count)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default cores/workers)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no run after this many seconds")
    p.add_argument("--list", action="store_true", help="print the plan with done/pending and exit")
    args = p.parse_args(argv)
    if args.list:
        for r in PLANS[args.suite]():
            print(f"{'done   ' if r.done() else 'pending'} {r.phase:10s} {r.key}")
        return
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    drive(args.suite, args.device, args.workers, args.budget_s, threads)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main(sys.argv[1:])
