"""python -m slora.finetune [--model minilm] [--task rt-polarity] [--alloc sensitivity] [--r-avg 4] ...

Sensitivity-LoRA end to end (arXiv 2509.09119, Fig. 1), written top to bottom as the algorithm:
load -> data -> calibrate -> metrics -> allocate -> apply LoRA -> train -> evaluate, and a run folder that
describes itself: args.json, sensitivity.json, ranks.json, ranks.svg, metrics.json, log.jsonl and a PEFT adapter.

With no arguments it runs the embedded default: MiniLM on the rt-polarity stand-in task, Sensitivity-LoRA ranks with
r_avg 4 on query and value. `--model smollm2 --task wiki-describe` runs the LLaMA path.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from slora import chat, data, scoring, text
from slora.adapter import mis_scaled_modules, save_adapter
from slora.checkpoint import atomic_folder
from slora.heatmap import ranks_svg
from slora.lora import ALPHA_POLICIES, apply_lora, lora_parameters_count, mark_only_lora_trainable, merged_copy
from slora.models import load_model, load_tokenizer
from slora.models.bert import BertModel, for_sequence_classification
from slora.sensitivity import SensitivityConfig, compute
from slora.stability import stability

# Model presets: the offline assets by name (anything else is a path to a Hugging Face-format folder).
PRESETS = ("minilm", "smollm2")
# Per-family defaults; the paper uses r_avg 4 for NLU and 8 for NLG (App. A.2) and names no target modules.
FAMILY_DEFAULTS = {
    "encoder": dict(targets="query,value", r_avg=4, max_len=128),
    "decoder": dict(targets="q_proj,k_proj,v_proj,o_proj", r_avg=8, max_len=256),
}
# --alloc -> (allocation method, θ variant) of slora.sensitivity; "sensitivity" is the paper's full method.
ALLOC = {"sensitivity": ("sra", "sensitivity"), "uniform": ("uniform", "sensitivity"), "global": ("sra", "global"),
         "local": ("sra", "local"), "pra": ("pra", "sensitivity"), "half-mu": ("sra", "half-mu")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m slora.finetune", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # model and task
    p.add_argument("--model", default="minilm", help="preset (minilm, smollm2) or a Hugging Face-format folder")
    p.add_argument("--task", default="rt-polarity", help=f"one of {', '.join(data.TASKS)}, or 'jsonl'")
    p.add_argument("--glue-dir", default=None, help="folder holding CoLA/, SST-2/, ... (GLUE tasks)")
    p.add_argument("--jsonl-kind", default="classification", choices=data.JSONL_KINDS,
                   help="record type of --task jsonl files: {text, label}, {prompt, response}, or chat "
                        "{messages: [{role, content}, ...]} in the model's own chat template")
    p.add_argument("--train-file", default=None, help="JSONL training file (--task jsonl)")
    p.add_argument("--dev-file", default=None, help="JSONL dev file (--task jsonl); default: 10%% of train")
    p.add_argument("--test-file", default=None, help="JSONL test file (--task jsonl); optional")
    p.add_argument("--max-len", type=int, default=None, help="tokens per sequence (default 128 encoder, 256 decoder)")
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training examples (count)")
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N dev/test examples (count)")
    # calibration (paper §4.6-4.7)
    p.add_argument("--calib", default="task", help="calibration text: task (its training inputs), ptb, wiki, rt, "
                   "tweets, amazon, nyt, or a text file with one sequence per line")
    p.add_argument("--calib-n", type=int, default=256, help="calibration sequences (count)")
    p.add_argument("--calib-len", type=int, default=None, help="tokens per calibration sequence (default --max-len)")
    p.add_argument("--hessian", default="diag", choices=("diag", "full"),
                   help="Hessian kept per input: diag (Σx², all the paper's metrics need) or full (d_in²)")
    # allocation (paper §3.2-3.3)
    p.add_argument("--alloc", default="sensitivity", choices=tuple(ALLOC),
                   help="rank allocation: the paper's method, plain LoRA, Sg/Sl ablations, PRA, 0.5/µ weights")
    p.add_argument("--metric-source", default="diag", choices=("diag", "full-diag", "obs"),
                   help="sensitivity vector: diag(H) (N = d_in), the whole-matrix diagonal, or OBS saliency")
    p.add_argument("--r-avg", type=float, default=None, help="average rank per matrix (default 4 encoder, 8 decoder)")
    p.add_argument("--budget-unit", default="rank", choices=("rank", "param"),
                   help="budget kept exact in ranks (Σr) or in parameters (Σ r·(d_in+d_out))")
    p.add_argument("--targets", default=None, help="comma list of module-name suffixes or all-linear "
                   "(default query,value encoder; q_proj,k_proj,v_proj,o_proj decoder)")
    p.add_argument("--r-min", type=int, default=1, help="smallest rank per matrix (0 allowed: no adapter)")
    p.add_argument("--r-max", type=int, default=None, help="largest rank per matrix (default min(d_in, d_out))")
    p.add_argument("--rounding", default="exact", choices=("exact", "paper"),
                   help="exact: largest remainder hits the budget; paper: independent rounding, sum not kept")
    p.add_argument("--k-frac", type=float, default=0.5, help="top-k mean over k = floor(k_frac·N) entries (Eq. 9)")
    p.add_argument("--er-alpha", type=float, default=0.85, help="effective-rank share threshold α (Eq. 10)")
    p.add_argument("--pra-groups", type=int, default=3, help="PRA categories (count)")
    p.add_argument("--allocate-only", action="store_true", help="stop after sensitivity.json, ranks.json, ranks.svg")
    p.add_argument("--epoch-sensitivity", action="store_true",
                   help="re-measure θ and ranks on the merged weights after each epoch, with the same calibration "
                        "batches (paper Table 6); writes epoch_sensitivity.json and τ-b per epoch")
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
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (paper App. A.2: 5e-4 over 10 epochs; 2e-3 suits the 1-epoch default)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decoupled weight decay")
    p.add_argument("--warmup", type=float, default=0.06, help="warmup as a fraction of all steps, then linear decay")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global L2 norm of the gradient (0: off)")
    p.add_argument("--gen-tokens", type=int, default=24, help="max new tokens per generated answer (count)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order, head and LoRA init, dropout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU; weights stay fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    # output
    p.add_argument("--out", default=None, help="run folder (default: a new folder under runs/)")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N optimizer steps")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------
# Run folder: written under a temporary name and renamed when complete

def out_dir(args) -> Path:
    """The run folder. One that already holds a run with other arguments, or other files, is an error."""
    out = Path(args.out) if args.out else Path("runs") / time.strftime(f"%Y%m%d-%H%M%S-{args.task}-{args.alloc}")
    if out.exists():
        old = out / "args.json"
        if not old.is_file():
            if any(out.iterdir()):
                raise FileExistsError(f"{out}: exists and does not hold a slora run; choose another --out")
        else:
            prev = {k: v for k, v in json.loads(old.read_text()).items() if k not in ("resolved", "out")}
            new = {k: v for k, v in vars(args).items() if k != "out"}  # the folder itself may be spelled otherwise
            # an option added after that run was recorded ran at its default there
            defaults = vars(parse_args([]))
            diff = sorted(k for k in set(prev) | set(new) if prev.get(k, defaults.get(k)) != new.get(k))
            if diff:
                raise FileExistsError(f"{out}: already holds a different run (arguments differ in: "
                                      f"{', '.join(diff)}); choose another --out")
    return out


def write_json(path: Path, obj):
    """Strict JSON: an undefined score (NaN, e.g. the correlation of a constant prediction) is written as null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    path.write_text(json.dumps(clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


class Log:
    """Progress lines on stdout and the same records, as JSON, in log.jsonl (one line written per record)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, event: str, text: str = "", **fields):
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        if text:
            print(text, flush=True)


# -----------------------------------------------------------------------------
# Loss and evaluation

def forward_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def loss_fn(model, batch, kind: str, device):
    out = model(**forward_inputs(batch, device))
    y = batch["labels"].to(device)
    if kind == "classification":
        return F.cross_entropy(out.float(), y)
    if kind == "regression":
        return F.mse_loss(out.float().squeeze(-1), y)
    # causal LM: position t predicts token t+1; prompt and pad tokens carry label -100 (response-only loss)
    return F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), y[:, 1:].reshape(-1),
                           ignore_index=text.IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, tok, spec, examples, args, pad_id, device, autocast) -> dict:
    model.eval()
    if spec.kind == "generation":
        feats = text.encode_prompts(tok, examples, args.max_len)
        stops = chat.stop_ids(tok) + [i for i in (model.config.eos_token_id,) if isinstance(i, int)]
        preds = []
        for batch in text.iterate_batches(feats, args.batch_size, pad_id, side="left"):
            with autocast:
                out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     max_new_tokens=args.gen_tokens, eos_token_id=stops)
            preds += text.decode_generations(tok, out.cpu(), batch["input_ids"].shape[1], stops)
        refs = [e.label for e in examples]
    else:
        feats = text.encode_encoder(tok, examples, args.max_len)
        preds = []
        for batch in text.iterate_batches(feats, args.batch_size, pad_id):
            with autocast:
                logits = model(**forward_inputs(batch, device)).float()
            preds += (logits.squeeze(-1) if spec.kind == "regression" else logits.argmax(-1)).tolist()
        refs = [f.labels for f in feats]
    return scoring.score(spec.metrics, preds, refs)


def lr_at(step: int, total: int, warmup: int) -> float:
    """Linear warmup to 1 over `warmup` steps, then linear decay to 0 at `total` (LoRA paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# -----------------------------------------------------------------------------
# The job

def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = out_dir(args)
    with atomic_folder(out) as tmp:  # a failed run leaves nothing half written; a re-run replaces its twin
        run(args, tmp)
    print(f"run folder: {out}")
    return out


def run(args, tmp: Path):
    given = dict(vars(args))  # as parsed; the family defaults below are recorded apart, under "resolved"
    log = Log(tmp / "log.jsonl")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    use_bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    times = {}

    # ---- load: slora's own model code on a Hugging Face-format folder
    t0 = time.time()
    if args.model in PRESETS:
        from slora.assets import model_dir
        model_path = model_dir(args.model)
    else:
        model_path = Path(args.model)
    body = load_model(model_path, device=device)
    tok = load_tokenizer(model_path)
    family = "encoder" if isinstance(body, BertModel) else "decoder"
    for k, v in FAMILY_DEFAULTS[family].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lora_alpha = 2 * args.r_avg if args.lora_alpha is None else args.lora_alpha
    args.calib_len = args.max_len if args.calib_len is None else args.calib_len
    pad_id = body.config.pad_token_id if body.config.pad_token_id is not None else body.config.eos_token_id
    resolved = {k: v for k, v in vars(args).items() if given[k] != v}
    write_json(tmp / "args.json", given | {"resolved": resolved | {"model_path": str(model_path), "family": family}})

    # ---- data: task splits (seeded) and the encoder's task head
    if args.task == "jsonl":
        spec, splits = data.load_jsonl(args.jsonl_kind, args.train_file, args.dev_file, args.test_file,
                                       seed=args.seed)
    else:
        spec, splits = data.get_task(args.task), data.load_task(args.task, glue_dir=args.glue_dir, seed=args.seed)
    if (spec.kind == "generation") != (family == "decoder"):
        raise ValueError(f"task {spec.name} ({spec.kind}) needs a {'decoder' if spec.kind == 'generation' else 'encoder'}"
                         f" model; {args.model} is a {family}")
    if spec.name == "jsonl-chat":  # the model's template decides; a model without one is refused here
        chat.template_family(tok)
        system = chat.default_system(model_path, tok)
        splits = {k: [replace(e, text=chat.with_default_system(e.text, system)) for e in v] for k, v in splits.items()}
    train = splits["train"][:args.max_train]
    evals = {k: v[:args.max_eval] for k, v in splits.items() if k != "train"}
    model = body if family == "decoder" else for_sequence_classification(body, spec.num_labels, args.seed)
    model.to(device).eval()
    times["load_s"] = time.time() - t0
    log("data", f"{spec.name}: train {len(train)}, " + ", ".join(f"{k} {len(v)}" for k, v in evals.items()),
        train=len(train), **{k: len(v) for k, v in evals.items()})

    # ---- calibrate, metrics, allocate (paper §3, Eqs. 8-15)
    t0 = time.time()
    calib = data.calibration_examples(args.calib, min(args.calib_n, len(train)) if args.calib == "task"
                                      else args.calib_n, train=train, seed=args.seed)
    batches = text.calibration_batches(tok, calib, decoder=family == "decoder", max_len=args.calib_len,
                                       batch_size=args.batch_size, pad_id=pad_id)
    method, variant = ALLOC[args.alloc]
    cfg = SensitivityConfig(targets=args.targets, mode="full" if args.metric_source == "obs" else args.hessian,
                            source=args.metric_source, variant=variant, k_frac=args.k_frac, alpha=args.er_alpha,
                            r_avg=args.r_avg, method=method, categories=args.pra_groups, unit=args.budget_unit,
                            r_min=args.r_min, r_max=args.r_max, rounding=args.rounding)

    def progress(stage, done, total):
        if done == total or done % 10 == 0:
            log("calibrate", f"calibrate {done}/{total} batches", done=done, total=total)

    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

    def measure(m, progress=None):
        # full-mode Hessians of a decoder are streamed layer by layer (GPTQ-style): one layer's H lives at a time
        blocks = ([(f"model.layers.{i}", layer) for i, layer in enumerate(m.model.layers)]
                  if family == "decoder" and cfg.mode == "full" else None)
        return compute(m, batches, cfg, blocks=blocks, progress=progress)

    sens, ranks = measure(model, progress)
    times["calibrate_allocate_s"] = time.time() - t0
    write_json(tmp / "sensitivity.json", sens)
    write_json(tmp / "ranks.json", ranks)
    (tmp / "ranks.svg").write_text(ranks_svg(ranks, title=f"{args.model} {spec.name}: {args.alloc} ranks"))
    budget = sens["config"]["budget"]
    log("allocate", f"ranks: {len(ranks)} matrices, sum {sum(ranks.values())}, budget {budget}", budget=budget,
        ranks=ranks)

    if not args.allocate_only:
        tracker = EpochSensitivity(measure, sens, ranks) if args.epoch_sensitivity else None
        result = finetune(model, tok, spec, train, evals, args, pad_id, device, autocast, log, ranks, tracker)
        times.update(result.pop("times"))
        if tracker:
            write_json(tmp / "epoch_sensitivity.json", {"epochs": tracker.epochs})
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


class EpochSensitivity:
    """θ and ranks re-measured on the fine-tuned weights after each epoch, against epoch 0 (paper Table 6).

    `measure(model)` is the run's own calibration + metrics + allocation; the model it gets is a merged copy
    (LoRA folded into W, lora.merged_copy), so the Hessians see the fine-tuned layer inputs."""

    def __init__(self, measure, sens: dict, ranks: dict):
        self.measure = measure
        self.epochs = [self._entry(0, sens, ranks)]

    @staticmethod
    def _entry(epoch: int, sens: dict, ranks: dict) -> dict:
        return {"epoch": epoch, "theta": {k: v["theta"] for k, v in sens["modules"].items()}, "ranks": dict(ranks)}

    def __call__(self, model, epoch: int) -> dict:
        """Measure after `epoch`; return {"tau_theta", "tau_ranks"} against epoch 0 (Kendall's τ-b)."""
        t0 = time.time()
        sens, ranks = self.measure(merged_copy(model).eval())
        self.epochs.append(self._entry(epoch, sens, ranks) | {"seconds": time.time() - t0})
        tau = stability(self.epochs[0], self.epochs[-1])
        return {"tau_theta": tau["tau_theta"], "tau_ranks": tau["tau_ranks"]}


def finetune(model, tok, spec, train, evals, args, pad_id, device, autocast, log, ranks, tracker=None) -> dict:
    """Apply LoRA with the allocated ranks, train with AdamW, evaluate every epoch (and re-measure the sensitivity
    with `tracker`, an EpochSensitivity). Returns metrics.json content."""
    g = torch.Generator().manual_seed(args.seed)
    apply_lora(model, ranks, args.lora_alpha, alpha_policy=args.alpha_policy, dropout=args.lora_dropout,
               generator=g)
    mark_only_lora_trainable(model, extra=("classifier",) if spec.kind != "generation" else ())
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_lora = lora_parameters_count(model)

    if spec.kind == "generation":
        feats = text.encode_lm(tok, train, args.max_len, eos_id=model.config.eos_token_id)
    else:
        feats = text.encode_encoder(tok, train, args.max_len)
    per_epoch = math.ceil(len(feats) / args.batch_size)
    total = math.ceil(args.epochs * per_epoch / args.grad_accum)
    total = min(total, args.max_steps) if args.max_steps else total
    warmup = max(1, round(args.warmup * total))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warmup))
    log("train", f"training {n_train:,} parameters ({n_lora:,} LoRA) for {total} steps", trainable=n_train,
        lora=n_lora, steps=total)

    history, step, micro, tokens, t_start = [], 0, 0, 0, time.time()
    t_eval = 0.0
    for epoch in range(math.ceil(total * args.grad_accum / per_epoch)):
        model.train()
        for batch in text.iterate_batches(feats, args.batch_size, pad_id, generator=g):
            with autocast:
                loss = loss_fn(model, batch, spec.kind, device)
            (loss / args.grad_accum).backward()
            tokens += int(batch["attention_mask"].sum())
            micro += 1
            if micro % args.grad_accum:
                continue
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0 or step == total:
                el = time.time() - t_start - t_eval
                log("step", f"step {step}/{total} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                    f"{tokens / el:,.0f} tok/s ETA {el / step * (total - step):.0f}s", step=step,
                    loss=loss.item(), lr=sched.get_last_lr()[0], tokens_per_s=tokens / el)
            if step >= total:
                break
        t0 = time.time()
        scores = {k: evaluate(model, tok, spec, v, args, pad_id, device, autocast) for k, v in evals.items()
                  if k.startswith("dev")}
        if tracker:
            scores["sensitivity"] = tracker(model, epoch + 1)
        t_eval += time.time() - t0
        history.append({"epoch": epoch + 1, "step": step, **scores})
        log("eval", f"epoch {epoch + 1}: " + json.dumps(scores), **history[-1])
        if step >= total:
            break
    train_s = time.time() - t_start - t_eval
    t0 = time.time()
    # final scores: the last epoch's dev scores and, once, the held-out splits (never used for selection)
    final = {k: v for k, v in history[-1].items() if k.startswith("dev")}
    final |= {k: evaluate(model, tok, spec, v, args, pad_id, device, autocast) for k, v in evals.items()
              if not k.startswith("dev")}
    log("final", "final: " + json.dumps(final), **final)
    return {"epochs": history, "final": final, "main_metric": spec.main_metric, "trainable_params": n_train,
            "lora_params": n_lora, "steps": step,
            "times": {"train_s": train_s, "eval_s": t_eval + time.time() - t0}}


if __name__ == "__main__":
    main(sys.argv[1:])
