"""python -m slora.finetune [--model minilm] [--task rt-polarity] [--alloc sensitivity] [--r-avg 4] ...

Sensitivity-LoRA end to end (arXiv 2509.09119, Fig. 1), written top to bottom as the algorithm:
load -> data -> calibrate -> metrics -> allocate -> apply LoRA -> train -> evaluate, and a run folder that
describes itself: args.json, sensitivity.json, ranks.json, ranks.svg, metrics.json, log.jsonl and a PEFT adapter.

With no arguments it runs the embedded default: MiniLM on the rt-polarity stand-in task, Sensitivity-LoRA ranks with
r_avg 4 on query and value. `--model smollm2 --task wiki-describe` runs the LLaMA path; `--model mpnet` the
RoBERTa-base-sized MPNet encoder (an optional asset).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from slora.data import chat, tasks, text
from slora.dist import process_group, data_parallel, sharded_load
from slora.train import run_folder
from slora.method.eva import CapsTooSmall
from slora.models.targets import find_linears
from slora.dist.calibration import CalibrationGroup
from slora.io.adapter import mis_scaled_modules, save_adapter
from slora.cli.argcheck import check_finetune_args, check_positions, position_limit
from slora.io.assets import MODEL_DIRS
from slora.io.hub_cache import locate_model
from slora.io.weights import read_config
from slora.io.files import read_json
from slora.train.divergence import NonFiniteError
from slora.cli.runner import ArgumentParser
from slora.errors import SloraError, UsageError
from slora.train.heatmap import ranks_svg
from slora.models.lora import ALPHA_POLICIES
from slora.models import DECODER_TYPES, for_sequence_classification
from slora.io.model_folder import load_model, load_tokenizer, meta_model
from slora.models.llama import LlamaForCausalLM
from slora.train.resume import NOT_RECORDED, Checkpointer, data_digest
from slora.train.run_folder import Log, sensitivity_json, write_json
from slora.method.sensitivity import SensitivityConfig, compute
from slora.train.loop import EpochSensitivity, TrainConfig, finetune, set_activation_checkpointing

# Model presets: the offline assets by name (anything else is a path to a Hugging Face-format folder).
PRESETS = tuple(MODEL_DIRS)
# Per-family defaults; the paper uses r_avg 4 for NLU and 8 for NLG (App. A.2) and names no target modules.
FAMILY_DEFAULTS = {
    "encoder": dict(targets="query,value", r_avg=4, max_len=128),
    "decoder": dict(targets="q_proj,k_proj,v_proj,o_proj", r_avg=8, max_len=256),
}
# Encoders that name their query and value projections otherwise (transformers' modeling_mpnet: attention.attn.q/v).
ENCODER_TARGETS = {"mpnet": "attn.q,attn.v"}
# --alloc -> (allocation method, θ variant) of slora.method.sensitivity; "sensitivity" is the paper's full method.
ALLOC = {"sensitivity": ("sra", "sensitivity"), "uniform": ("uniform", "sensitivity"), "global": ("sra", "global"),
         "local": ("sra", "local"), "pra": ("pra", "sensitivity"), "half-mu": ("sra", "half-mu"),
         "eva": ("eva", "sensitivity")}  # EVA (arXiv 2410.07170) on eig(H): a peer, not the paper's method


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m slora.finetune", description=__doc__.split("\n\n")[1],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and task
    p.add_argument("--model", default="minilm", help="preset (minilm, smollm2, mpnet), a Hugging Face-format folder, "
                   "or org/name from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or "
                   "~/.cache/huggingface/hub; never downloaded)")
    p.add_argument("--revision", default=None, help="with --model org/name: a branch under the cache's refs/ or a "
                   "commit hash (default main)")
    p.add_argument("--task", default="rt-polarity", help=f"one of {', '.join(tasks.TASKS)}, or 'jsonl'")
    p.add_argument("--glue-dir", default=None, help="folder holding CoLA/, SST-2/, ... (GLUE tasks)")
    p.add_argument("--jsonl-kind", default="classification", choices=tasks.JSONL_KINDS,
                   help="record type of --task jsonl files: {text, label}, {prompt, response}, or chat "
                        "{messages: [{role, content}, ...]} in the model's own chat template")
    p.add_argument("--train-file", default=None, help="JSONL training file (--task jsonl)")
    p.add_argument("--dev-file", default=None, help="JSONL dev file (--task jsonl); default: 10%% of train")
    p.add_argument("--test-file", default=None, help="JSONL test file (--task jsonl); optional")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default 128 encoder, 256 decoder)")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples (count)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N dev/test examples (count)")
    p.add_argument("--num-labels", type=int, default=None, help="classes of --jsonl-kind classification (default: "
                   "those seen in training, which must be 0..K-1)")
    # calibration (paper §4.6-4.7)
    p.add_argument("--calib", default="task", help="calibration text: task (its training inputs), ptb, wiki, rt, "
                   "tweets, amazon, nyt, or a text file with one sequence per line")
    p.add_argument("--calib-n", type=int, default=256, help="calibration sequences (count)")
    p.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (default --max-len)")
    p.add_argument("--hessian", default="diag", choices=("diag", "full"),
                   help="Hessian kept per input: diag (Σx², all the paper's metrics need) or full (d_in²)")
    # allocation (paper §3.2-3.3)
    p.add_argument("--alloc", default="sensitivity", choices=tuple(ALLOC),
                   help="rank allocation: the paper's method, plain LoRA, Sg/Sl ablations, PRA, 0.5/µ weights, "
                   "or EVA's explained-variance rule (uses --hessian full)")
    p.add_argument("--eva-rho", type=float, default=2.0,
                   help="EVA: a matrix takes at most round(rho·r_avg) ranks (PEFT's default 2; 1 is uniform)")
    p.add_argument("--metric-source", default="diag", choices=("diag", "full-diag", "obs"),
                   help="sensitivity vector: diag(H) (N = d_in), the whole-matrix diagonal, or OBS saliency")
    p.add_argument("--r-avg", type=float, default=None, help="average rank per matrix (default 4 encoder, 8 decoder)")
    p.add_argument("--budget-unit", default="rank", choices=("rank", "param"),
                   help="budget kept exact in ranks (Σr) or in parameters (Σ r·(d_in+d_out))")
    p.add_argument("--targets", default=None, help="comma list of module-name suffixes or all-linear "
                   "(default query,value encoder; attn.q,attn.v mpnet; q_proj,k_proj,v_proj,o_proj decoder)")
    p.add_argument("--r-min", type=int, default=1, help="smallest rank per matrix (0 allowed: no adapter)")
    p.add_argument("--r-max", type=int, default=None, help="largest rank per matrix (default min(d_in, d_out))")
    p.add_argument("--rounding", default="exact", choices=("exact", "paper"),
                   help="exact: largest remainder hits the budget; paper: independent rounding, sum not kept")
    p.add_argument("--k-frac", type=float, default=0.5, help="top-k mean over k = floor(k_frac·N) entries (Eq. 9)")
    p.add_argument("--er-alpha", type=float, default=0.85, help="effective-rank share threshold α (Eq. 10)")
    p.add_argument("--pra-groups", type=int, default=3, help="PRA categories (count)")
    p.add_argument("--allocate-only", action="store_true", help="stop after sensitivity.json, ranks.json, ranks.svg")
    p.add_argument("--epoch-sensitivity", action="store_true",
                   help="re-measure θ and ranks on the fine-tuned weights after each epoch (a merged copy; under "
                        "--fsdp the sharded model itself), with the same calibration batches (paper Table 6); "
                        "writes epoch_sensitivity.json and τ-b per epoch")
    # LoRA
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA α (default 2·r_avg, scaling 2 at r_avg)")
    p.add_argument("--alpha-policy", default="scale", choices=ALPHA_POLICIES,
                   help="α for unequal ranks: scale (α·r/r_avg: one scaling for all), constant (α/r), rslora (α/√r)")
    p.add_argument("--lora-dropout", type=float, default=0.1, help="dropout probability on the LoRA input")
    p.add_argument("--fold-scaling", action="store_true",
                   help="fold each module's α_w/r_w ÷ (lora_alpha/r) into its B in the saved adapter, so a server "
                        "that applies one global lora_alpha/r (vLLM) scales every module right")
    # training
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set (may be fractional)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (count)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--group-by-length", action="store_true",
                   help="training batches of similar length (megabatches of 50 batches sorted by length, batch order "
                        "shuffled; seeded), less padding; evaluation batches sorted by length too")
    p.add_argument("--eval-batch-size", type=int, default=None,
                   help="sequences per evaluation / generation batch (default --batch-size)")
    p.add_argument("--check-finite", default="step", choices=("step", "log"),
                   help="when the host reads loss and gradient norm to stop a diverged run: every optimizer step, "
                        "or only at log steps, checkpoints and evaluation (the first bad step is kept on the device "
                        "and named; no GPU stall per step)")
    p.add_argument("--fast-generate", action="store_true",
                   help="causal LM evaluation: generate with the adapters merged into the base (restored after), a "
                        "preallocated key/value cache and, on CUDA, one CUDA graph per token; same text up to rounding")
    p.add_argument("--sparse-lm-head", action="store_true",
                   help="causal LM: the LM head and loss only at positions that carry a loss (the "
                        "response tokens), not all B x T; same loss up to rounding, less work and memory")
    p.add_argument("--fused-optim", action="store_true",
                   help="fused AdamW (one kernel for all LoRA tensors; skips a non-finite step on the device)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (paper App. A.2: 5e-4 over 10 epochs; 2e-3 suits the 1-epoch default)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup as a fraction of all steps, then linear decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global L2 norm of the gradient (0: off)")
    p.add_argument("--gen-tokens", type=int, default=24, help="max new tokens per generated answer (count)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, head and LoRA init, dropout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast: auto = bf16 on CUDA or on a bf16 base, fp32 otherwise")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="frozen base weights, loaded straight into this dtype on the device: auto = bf16 on CUDA "
                        "(fp32 with --precision fp32), fp32 on CPU; LoRA factors and the task head stay fp32")
    p.add_argument("--activation-checkpointing", nargs="?", const=True, default=False, type=recompute_setting,
                   metavar="all|auto|N",
                   help="recompute transformer layers' activations in the backward pass (less memory, up to one more "
                        "forward pass of time): all layers (the flag alone, or 'all'), the first N, or 'auto': as few "
                        "as fit 90%% of the card's memory, measured on the largest micro-batch (CUDA, one process)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer layer (fused elementwise kernels; the first steps compile, "
                        "about half a minute at 8B; rounding differs from eager in the last bits; CUDA, one process)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP2 per transformer "
                   "layer (for models larger than one device) instead of DDP's full copy per rank; each rank reads "
                   "only its 1/N of the base from the files and calibrates through the shards")
    # output
    p.add_argument("--out", default=None, help="run folder (default: a new folder under runs/); the run is written "
                   "in OUT/.slora-partial/ and moved into OUT when complete")
    p.add_argument("--replace", action="store_true",
                   help="replace a complete or interrupted run already in --out (only slora's own files go)")
    p.add_argument("--save-every", type=int, default=0,
                   help="write a training checkpoint (resume point) every N optimizer steps (0: none)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the interrupted run in DIR (its --out or in-progress folder); no other flags: "
                        "the arguments are the run's own")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N optimizer steps")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.resume is not None:
        # any other flag, in any form argparse accepts (--resume=DIR, --max-steps=12, abbreviations), is refused:
        # parsed again with no defaults, the namespace holds exactly the options the command line gave
        p = build_parser()
        for action in p._actions:
            action.default = argparse.SUPPRESS
        given = sorted("--" + k.replace("_", "-") for k in vars(p.parse_args(argv)) if k != "resume")
        if given:
            raise UsageError("--resume", f"takes no other flags, got {', '.join(given)}: the arguments come from the "
                                         f"run's own args.json (a resume continues the run as it started)")
    return args


def recompute_setting(value: str):
    """--activation-checkpointing's value: True (all layers), 'auto', or a count N >= 0 of leading layers."""
    if value in ("all", "auto"):
        return True if value == "all" else "auto"
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: expected all, auto or a count of layers")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training loop's settings: the flags of the same names."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def resumed_args(out: Path) -> argparse.Namespace:
    """The arguments of the interrupted run in `out`, as it recorded them; options added since run at default."""
    stored = read_json(run_folder.partial_of(out) / "args.json")
    stored.pop("resolved", None)
    return argparse.Namespace(**(vars(parse_args([])) | stored | {"resume": None, "replace": False}))


# -----------------------------------------------------------------------------
# The job

def main(argv=None):
    args = parse_args(argv)
    resume = args.resume is not None
    if resume:
        out = run_folder.resolve_resume(args.resume)
        if not run_folder.interrupted(out):  # the run had finished; resolve_resume completed its move into OUT
            print(f"run folder: {out}")
            return out
        args = resumed_args(out)
    else:
        out = Path(args.out) if args.out else Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{args.task}-{args.alloc}")
    # values checked here, not in parse_args: a command recorded on another machine (--device cuda) still parses
    check_finetune_args(args, PRESETS, tasks.TASKS, tasks.CALIBRATION_SOURCES)
    if args.threads:
        torch.set_num_threads(args.threads)
    d = process_group.init(args.device)  # torchrun's environment, or one process without a process group
    with process_group.guard():  # torchrun: a failure on any rank ends every rank with its error
        if d.is_main:
            # a diverged run is no resume point: resuming it would diverge again
            inputs = {f"--{k.replace('_', '-')}": getattr(args, k) for k in
                      ("model", "train_file", "dev_file", "test_file")}  # OUT must lie apart from them
            with run_folder.run_folder(out, resume=resume, replace=args.replace, inputs=inputs,
                                      keep_on_error=lambda e: not isinstance(e, NonFiniteError)) as tmp:
                run(args, tmp, resume)
        else:  # the other ranks compute alongside and write nothing (write_json and Log skip them)
            run(args, Path(f"<rank {d.rank} writes no run folder>"), resume)
    process_group.teardown()
    if d.is_main:
        print(f"run folder: {out}")
    return out


def absolute_paths(args: argparse.Namespace):
    """The data paths of `args` made absolute (resolved), as args.json records them: the run resumes, and its files
    are found again, from any directory. Names of tasks and calibration sources stay names."""
    for k in ("train_file", "dev_file", "test_file", "glue_dir"):
        if getattr(args, k) is not None:
            setattr(args, k, str(Path(getattr(args, k)).resolve()))
    if args.calib not in tasks.CALIBRATION_SOURCES:
        args.calib = str(Path(args.calib).resolve())


def run(args, tmp: Path, resume: bool = False):
    """The stages, writing into the in-progress folder `tmp`; `resume`: continue from its newest checkpoint."""
    if resume and process_group.get().world > 1:
        # torchrun: rank 0 holds the lock on the in-progress folder; every rank reads its checkpoint, sensitivity.json
        # and ranks.json from there (one host's filesystem, or a shared one); writes stay rank 0's (write_json, Log)
        shared = Path(process_group.broadcast_json(str(tmp.resolve())))
        tmp = tmp if process_group.get().is_main else shared
    checkpoint = Checkpointer(tmp, args.save_every) if args.save_every or resume else None
    if resume and not checkpoint.exists():  # a rank that would silently start from step 0 while the others resume
        raise FileNotFoundError(f"rank {process_group.get().rank}: {tmp / run_folder.CHECKPOINT} is not readable here; "
                                f"--resume under torchrun needs the run folder on a filesystem every rank sees")
    # the model: a preset, a local folder (which wins over the Hugging Face cache, said in the log), or a snapshot of
    # the cache; a resumed run takes the folder its first part recorded (a cache branch may point elsewhere by now)
    model_path, note = (checkpoint.recorded_model(), None) if resume else (None, None)
    if model_path is None:
        model_path, note = locate_model(args.model, args.revision)
        if args.model not in PRESETS and Path(args.model).is_dir():
            args.model = str(model_path)  # recorded absolute
    absolute_paths(args)
    given = dict(vars(args))  # as parsed; the family defaults below are recorded apart, under "resolved"
    if checkpoint is not None:
        # what the run is, saved with each checkpoint; a resume that finds it changed is refused, naming the keys
        recorded = {k: v for k, v in given.items() if k not in NOT_RECORDED}
        if resume:
            defaults = {k: v for k, v in vars(parse_args([])).items() if k not in NOT_RECORDED}
            checkpoint.check("args", recorded, defaults)
        checkpoint.record |= {"args": recorded, "model_path": str(model_path)}
    log = Log(tmp / "log.jsonl", muted=resume)
    if note:
        log("model", note)
    torch.manual_seed(args.seed)
    device = process_group.get().device if process_group.get().world > 1 else torch.device(args.device)  # cuda:LOCAL_RANK
    bf16_base = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda" and args.precision != "fp32")
    if bf16_base and args.precision == "fp32":
        raise ValueError("--precision fp32 needs an fp32 base: add --dtype fp32 (a bf16 base computes in bf16)")
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and (device.type == "cuda" or bf16_base))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    times = {}

    # ---- load: slora's own model code on a Hugging Face-format folder
    t0 = time.time()
    hf = read_config(model_path)
    check_positions(args, hf, decoder=hf.get("model_type") in DECODER_TYPES)
    # --fsdp under torchrun: a meta skeleton here; each rank reads only its shards once the task head is known
    sharded = args.fsdp and process_group.get().world > 1
    if sharded and args.metric_source == "obs":  # rank 0 alone allocates, and OBS reads whole weight matrices
        raise UsageError("--metric-source", "obs reads each whole weight matrix on rank 0, which --fsdp shards; "
                                            "use diag or full-diag, or leave out --fsdp")
    if sharded and args.fast_generate:  # merging writes whole weights, which each rank holds a shard of
        raise UsageError("--fast-generate", "merges the adapters into whole weights, which --fsdp shards; leave out "
                                            "one of the two")
    base_dtype = torch.bfloat16 if bf16_base else torch.float32
    tok = load_tokenizer(model_path)  # checked against config.json's vocabulary before the weights load
    if sharded:
        body = meta_model(model_path, base_dtype)
    else:
        body = load_model(model_path, dtype=base_dtype, device=device)
    family = "decoder" if isinstance(body, LlamaForCausalLM) else "encoder"
    if args.targets is None and family == "encoder":
        args.targets = ENCODER_TARGETS.get(body.config.model_type)
    for k, v in FAMILY_DEFAULTS[family].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lora_alpha = 2 * args.r_avg if args.lora_alpha is None else args.lora_alpha
    limit = position_limit(hf)
    if limit is not None and args.max_len > limit:  # the family default, cut to the model: recorded as resolved
        args.max_len = limit
    args.calib_len = args.max_len if args.calib_len is None else args.calib_len
    pad_id = body.config.pad_token_id if body.config.pad_token_id is not None else body.config.eos_token_id
    resolved = {k: v for k, v in vars(args).items() if given[k] != v} | {"model_path": str(model_path),
                                                                          "family": family}
    if not resume:  # a resumed run keeps the files its first part wrote
        write_json(tmp / "args.json", given | {"resolved": resolved})

    # ---- data: task splits (seeded) and the encoder's task head
    if args.task == "jsonl":
        spec, splits = tasks.load_jsonl(args.jsonl_kind, args.train_file, args.dev_file, args.test_file,
                                       num_labels=args.num_labels, seed=args.seed)
    else:
        spec, splits = tasks.get_task(args.task), tasks.load_task(args.task, glue_dir=args.glue_dir, seed=args.seed)
    if checkpoint is not None:  # the data as read, hashed per split: a resume on changed data is refused
        digest = data_digest(splits)
        if resume:
            files = {"train": args.train_file, "dev": args.dev_file or args.train_file, "test": args.test_file}
            sources = files if args.task == "jsonl" else {k: f"task {args.task}" for k in splits}
            checkpoint.check("data", digest, sources=sources)
        checkpoint.record["data"] = digest
    if (spec.kind == "generation") != (family == "decoder"):
        need, have = ("a decoder", "an encoder") if family == "encoder" else ("an encoder", "a decoder")
        raise SloraError(args.model, f"is {have}, but task {spec.name} ({spec.kind}) needs {need}")
    for flag in ("sparse_lm_head", "fast_generate"):
        if getattr(args, flag) and spec.kind != "generation":
            raise UsageError(f"--{flag.replace('_', '-')}", f"applies to causal-LM tasks; {spec.name} is {spec.kind}")
    if spec.name == "jsonl-chat":  # the model's template decides; a model without one is refused here
        chat.template_family(tok)
        system = chat.default_system(model_path, tok)
        splits = {k: [replace(e, text=chat.with_default_system(e.text, system)) for e in v] for k, v in splits.items()}
    train = splits["train"][:args.max_train]
    evals = {k: v[:args.max_eval] for k, v in splits.items() if k != "train"}
    tasks.check_classes(spec, train, args.train_file or f"task {spec.name}")
    n_calib = min(args.calib_n, len(train)) if args.calib == "task" else args.calib_n
    # a count asked for but not available is recorded as what was used (args.json "resolved"), never as asked
    used = {k: n for k, asked, n in (("max_train", args.max_train, len(train)), ("calib_n", args.calib_n, n_calib),
                                     ("max_eval", args.max_eval, max(map(len, evals.values()), default=0)))
            if asked is not None and n < asked}
    if used and not resume:
        resolved |= used
        write_json(tmp / "args.json", given | {"resolved": resolved})
        log("counts", "fewer examples than asked for; using " + ", ".join(f"{k} {v}" for k, v in used.items()),
            **used)
    model = body if family == "decoder" else for_sequence_classification(body, spec.num_labels, args.seed)
    if sharded:
        sharded_load.materialise(model, model_path, device)  # FSDP2 per layer then root; this rank's rows only
    else:
        model.to(device).eval()
    times["load_s"] = time.time() - t0
    log("data", f"{spec.name}: train {len(train)}, " + ", ".join(f"{k} {len(v)}" for k, v in evals.items()),
        train=len(train), **{k: len(v) for k, v in evals.items()})

    # ---- calibrate, metrics, allocate (paper §3, Eqs. 8-15)
    t0 = time.time()
    calib = tasks.calibration_examples(args.calib, n_calib, train=train, seed=args.seed)
    batches = text.calibration_batches(tok, calib, decoder=family == "decoder", max_len=args.calib_len,
                                       batch_size=args.batch_size, pad_id=pad_id)
    method, variant = ALLOC[args.alloc]
    full = args.metric_source == "obs" or args.alloc == "eva"  # diag(H⁻¹) and eig(H) need the whole H
    cfg = SensitivityConfig(mode="full" if full else args.hessian, eva_rho=args.eva_rho,
                            source=args.metric_source, variant=variant, k_frac=args.k_frac, alpha=args.er_alpha,
                            r_avg=args.r_avg, method=method, categories=args.pra_groups, unit=args.budget_unit,
                            r_min=args.r_min, r_max=args.r_max, rounding=args.rounding)

    def progress(stage, done, total):
        if done == total or done % 10 == 0:
            log("calibrate", f"calibrate {done}/{total} batches", done=done, total=total)

    # torchrun: each rank calibrates on its contiguous share of the batches; sums are reduced over ranks
    group = CalibrationGroup() if process_group.get().world > 1 else None
    batches = [{k: v.to(device) for k, v in b.items()} for b in sharded_load.calibration_shard(batches, sharded)]

    def measure(m, progress=None):
        # full-mode Hessians of a decoder are streamed layer by layer (GPTQ-style): one layer's H lives at a time
        blocks = ([(f"model.layers.{i}", layer) for i, layer in enumerate(m.model.layers)]
                  if family == "decoder" and cfg.mode == "full" else None)
        # a bf16 base calibrates in bf16 (the fp32 task head under autocast); statistics still accumulate in fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_base):
            try:
                s = compute(m, batches, find_linears(m, args.targets), cfg, blocks=blocks, group=group,
                            progress=progress)
            except CapsTooSmall as e:
                raise UsageError("--eva-rho", str(e)) from None
        if s.config["concentration"]["warn"]:
            logging.getLogger(__name__).warning("rank allocation: --r-max or --alloc eva spreads the budget")
        return sensitivity_json(s, args.targets), s.ranks

    if resume:  # allocation is deterministic: the interrupted run's own result is read back, not recomputed
        sens, ranks = (read_json(tmp / f) for f in ("sensitivity.json", "ranks.json"))
    else:
        sens, ranks = measure(model, progress)
        write_json(tmp / "sensitivity.json", sens)
        write_json(tmp / "ranks.json", ranks)
        if process_group.get().is_main:
            (tmp / "ranks.svg").write_text(ranks_svg(ranks, title=f"{args.model} {spec.name}: {args.alloc} ranks"))
    times["calibrate_allocate_s"] = time.time() - t0
    budget = sens["config"]["budget"]
    log("allocate", f"ranks: {len(ranks)} matrices, sum {sum(ranks.values())}, budget {budget}", budget=budget,
        ranks=ranks)

    if not args.allocate_only:
        tracker = EpochSensitivity(measure, sens, ranks) if args.epoch_sensitivity else None
        # 'auto': all layers until the training loop has measured a step (slora.train.memory)
        set_activation_checkpointing(model, True if args.activation_checkpointing == "auto"
                                     else args.activation_checkpointing)
        if checkpoint is not None:
            checkpoint.tracker = tracker
        log.muted = False
        result, model = finetune(model, tok, spec, train, evals, train_config(args), pad_id, device, autocast, log, ranks, tracker,
                                 checkpoint)  # sharded: a new model, with LoRA inside its layers' FSDP2 units
        times.update(result.pop("times"))
        if tracker:
            write_json(tmp / "epoch_sensitivity.json", {"epochs": tracker.epochs})
        data_parallel.full_trainable(model)  # FSDP2: gather the adapter on every rank (a collective), rank 0 writes
        if process_group.get().is_main:
            save_adapter(model, tmp / "adapter", str(model_path), "CAUSAL_LM" if family == "decoder" else "SEQ_CLS",
                         fold_scaling=args.fold_scaling)
            log_serving(log, model, tmp / "adapter", args.fold_scaling)
        write_json(tmp / "metrics.json", result | {"times": times, "budget": budget})
    else:
        write_json(tmp / "metrics.json", {"times": times, "budget": budget, "allocate_only": True})


def log_serving(log, model, adapter, folded: bool):
    """Record in log.jsonl whether one global lora_alpha/r (vLLM drops rank_pattern/alpha_pattern) reproduces every
    module's scaling, and the largest rank (vLLM's --max-lora-rank must be at least that); warn when it does not.
    PEFT's LoraConfig has no free-text field, so this note lives in the run folder, not in adapter_config.json."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    bad = mis_scaled_modules(model, config)
    max_rank = max(config["rank_pattern"].values())
    log("serving", f"adapter: global lora_alpha/r = {config['lora_alpha']}/{config['r']}, max rank {max_rank}"
        + (", scaling folded into B" if folded else ""), global_alpha=config["lora_alpha"], global_r=config["r"],
        max_rank=max_rank, folded=folded, mis_scaled=bad)
    if bad:
        log("warning", f"WARNING: {len(bad)} of {len(config['rank_pattern'])} modules have α/r != lora_alpha/r "
            f"(e.g. {bad[0]}): servers that apply one global α/r (vLLM drops rank_pattern/alpha_pattern) will "
            f"mis-scale this adapter; re-run with --fold-scaling or --alpha-policy scale")
