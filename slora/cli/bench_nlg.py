"""python -m slora.bench --only nlg: SmolLM2 LoRA fine-tuning on wiki-describe, the old training path against the
new one, side by side in one run; and --only decode: greedy decoding, generate against --fast-generate (the path of the full-size NLG comparison, reference_runs/nlg-full).

Each path is a real `python -m slora.finetune` run, in this process: SmolLM2-135M on the whole wiki-describe training
split (--max-len 256), uniform ranks r 8 on q,k,v,o, stopped after --nlg-steps optimizer steps, then evaluated by
greedy generation (--gen-tokens 32) on the first --nlg-eval dev and test examples.
  old   --batch-size 8, random order, the host reads loss and gradient norm after every step, default AdamW
        (the settings of the earlier NLG runs)
  new   NEW_FLAGS at --batch-size --nlg-batch (default 32, as reference_runs/grid.py's nlg-full suite):
        length-grouped batches, length-sorted evaluation batches of 4 x the batch, the non-finite check kept on the
        device, fused AdamW, the LM head on response positions only
Reported per path: training tokens/s (non-pad input tokens, between the first and the last logged step, so the
first steps' warm-up is left out), the padding fraction of one epoch of that path's batches, peak device memory,
evaluation throughput (generated answers per second), and from these the estimated seconds of one run of the
full comparison (2 epochs over all training examples, 400 dev examples after each epoch, 400 test examples).
`--small`: a tiny random LLaMA with a word-level tokenizer and synthetic instructions of skewed lengths, on the CPU
(the CI smoke test); the real path needs the smollm2 asset.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import torch

from slora.data import tasks, text
from slora.cli import finetune
from slora.cli.bench import SHAPES, peak_gb, random_llama, reset_peak, timed
from slora.io.model_folder import load_tokenizer, save_model
from slora.models.llama import LlamaConfig

# the flags of the new path besides its batch size (the same flags reference_runs/grid.py's nlg-full suite runs)
NEW_FLAGS = ("--group-by-length", "--check-finite", "log", "--fused-optim", "--sparse-lm-head")
OLD_BATCH = 8
# the full comparison's evaluation (reference_runs/grid.py NLG_FULL_COMMON): examples generated per run
FULL_EPOCHS, FULL_EVAL = 2, 400


# -----------------------------------------------------------------------------
# Inputs: the real model and task, or a tiny stand-in for the CPU

def tiny_setup(folder: Path, n_train: int = 200, n_dev: int = 24) -> tuple[Path, list[str]]:
    """A tiny random LLaMA with a word-level ChatML tokenizer, and instruction JSONL files whose prompt lengths
    follow an exponential distribution (most short, a long tail, as wiki-describe's); returns (model folder,
    finetune task arguments)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = [f"w{i}" for i in range(200)]
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "\n"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    tok.add_special_tokens(specials)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = LlamaConfig(**(SHAPES["tiny"] | dict(vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    model = save_model(random_llama(cfg, torch.device("cpu"), torch.float32), folder / "model",
                       tokenizer=folder / "tokenizer.json")
    rng = random.Random(0)

    def row():
        n = min(100, 3 + int(rng.expovariate(1 / 20)))  # prompt words: 3 + exponential of mean 20
        return {"prompt": " ".join(rng.choices(words, k=n)), "response": " ".join(rng.choices(words, k=3))}
    files = {}
    for name, n in (("train", n_train), ("dev", n_dev)):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(row()) + "\n" for _ in range(n)))
    return model, ["--task", "jsonl", "--jsonl-kind", "instructions", "--train-file", str(files["train"]),
                   "--dev-file", str(files["dev"]), "--test-file", str(files["dev"])]


def padding_fraction(feats, batch_size: int, group: bool, seed: int = 0) -> float:
    """Pad positions / all positions of one epoch's training batches in the given order (right padding)."""
    g = torch.Generator().manual_seed(seed)
    real = total = 0
    for b in text.iterate_batches(feats, batch_size, 0, generator=g, group_by_length=group):
        real += int(b["attention_mask"].sum())
        total += b["attention_mask"].numel()
    return 1 - real / total


def training_features(model: Path, task_args: list[str], max_len: int):
    """The training split encoded as finetune encodes it (same tokenizer, length cap and end token)."""
    tok = load_tokenizer(model)
    eos = json.loads((model / "config.json").read_text()).get("eos_token_id")
    if "--train-file" in task_args:
        train = tasks.read_jsonl(task_args[task_args.index("--train-file") + 1], "instructions")
    else:
        train = tasks.load_task("wiki-describe", seed=0)["train"]
    return text.encode_lm(tok, train, max_len, eos_id=eos if isinstance(eos, int) else None)


# -----------------------------------------------------------------------------
# One path: a finetune run, read back from its run folder

def run_path(argv: list[str], device) -> dict:
    """Run `python -m slora.finetune ARGV`; tokens/s between the first and last step records of log.jsonl, eval
    throughput from metrics.json (every dev and test example is generated once: --max-steps ends training inside
    the first epoch), peak device memory over the whole run."""
    reset_peak(device)
    out = finetune.main(argv)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["event"] == "step"]
    if len(steps) < 2:
        raise ValueError(f"{out}: {len(steps)} step record(s); tokens/s needs two (more steps or a lower --log-every)")
    first, last = steps[0], steps[-1]
    counts = next(r for r in rows if r["event"] == "data")
    n_eval = sum(v for k, v in counts.items() if k.startswith(("dev", "test")))
    times = json.loads((out / "metrics.json").read_text())["times"]
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
            "timed_steps": last["step"] - first["step"], "final_loss": last["loss"], "eval_examples": n_eval,
            "eval_s": times["eval_s"], "eval_examples_per_s": n_eval / times["eval_s"],
            "setup_s": times["load_s"] + times["calibrate_allocate_s"], "peak_mem_gb": peak_gb(device)}


def bench_nlg(device, steps: int, batch: int, n_eval: int, small: bool) -> dict:
    """Keys nlg_<path>_* for path old and new, nlg_epoch_tokens, nlg_full_run_s_<path> (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if small:
            model, task_args = tiny_setup(tmp / "tiny")
            model_arg, max_len = str(model), 64
        else:
            from slora.io.assets import model_dir
            model, task_args = model_dir("smollm2"), ["--task", "wiki-describe"]
            model_arg, max_len = "smollm2", 256
        feats = training_features(model, task_args, max_len)
        log_every = max(1, steps // 4)
        base = ["--model", model_arg, *task_args, "--max-len", str(max_len), "--alloc", "uniform", "--r-avg", "8",
                "--calib-n", "64", "--max-steps", str(steps), "--log-every", str(log_every), "--max-eval",
                str(n_eval), "--gen-tokens", "32", "--lr", "1e-3", "--device", str(device), "--seed", "0"]
        paths = {"old": ["--batch-size", str(OLD_BATCH)],
                 "new": ["--batch-size", str(batch), "--eval-batch-size", str(4 * batch), *NEW_FLAGS]}
        epoch_tokens = sum(len(f.input_ids) for f in feats)
        res = {"nlg_model": "tiny" if small else "smollm2", "nlg_train_examples": len(feats),
               "nlg_epoch_tokens": epoch_tokens, "nlg_steps": steps, "nlg_new_flags": " ".join(paths["new"])}
        for name, flags in paths.items():
            r = run_path(base + flags + ["--out", str(tmp / name)], device)
            size = OLD_BATCH if name == "old" else batch
            r["padding_fraction"] = padding_fraction(feats, size, group=name == "new")
            r["batch_size"] = size
            res.update({f"nlg_{name}_{k}": v for k, v in r.items()})
            # one run of the full comparison: setup, 2 epochs of training, dev after each epoch and test once
            res[f"nlg_full_run_s_{name}"] = (r["setup_s"] + FULL_EPOCHS * epoch_tokens / r["tokens_per_s"]
                                            + (FULL_EPOCHS + 1) * FULL_EVAL / r["eval_examples_per_s"])
            print(f"[bench] nlg {name}: {r['tokens_per_s']:,.0f} tok/s, eval {r['eval_examples_per_s']:.1f} "
                  f"answers/s", flush=True)
    return res


# -----------------------------------------------------------------------------
# Report

def report_nlg(r: dict) -> list[str]:
    def gb(x):
        return "n/a (CPU)" if x is None else f"{x:.2f} GB"
    lines = [f"NLG fine-tuning ({r['nlg_model']}, {r['nlg_train_examples']:,} training examples, "
             f"{r['nlg_epoch_tokens']:,} tokens per epoch, {r['nlg_steps']} steps per path):"]
    for name in ("old", "new"):
        p = lambda k: r[f"nlg_{name}_{k}"]  # noqa: E731
        lines.append(f"  {name:3s} batch {p('batch_size'):4d}  {p('tokens_per_s'):10,.0f} tok/s   padding "
                     f"{p('padding_fraction'):5.1%}   peak {gb(p('peak_mem_gb'))}   eval "
                     f"{p('eval_examples_per_s'):7.1f} answers/s   full-size run ~{r[f'nlg_full_run_s_{name}']:.0f} s")
    lines.append(f"  new / old: training {r['nlg_new_tokens_per_s'] / r['nlg_old_tokens_per_s']:.2f}x, evaluation "
                 f"{r['nlg_new_eval_examples_per_s'] / r['nlg_old_eval_examples_per_s']:.2f}x   (new path: "
                 f"{r['nlg_new_flags']})")
    return lines


# -----------------------------------------------------------------------------
# Decoding: generate against generate_static (merged adapters, preallocated cache, CUDA graphs)

def bench_decode(device, batch: int, prompt_len: int, new_tokens: int, small: bool) -> dict:
    """Greedy decoding throughput at SmolLM2-135M's shape (random weights, so the keys need no asset): the
    evaluation path as it is (LlamaForCausalLM.generate, LoRA branches unmerged) against --fast-generate (the
    adapters merged for the block, models.decode.generate_static, a CUDA graph per token on CUDA), side by side on
    the same prompts: `batch` left-padded prompts of 1/2 to 1 x `prompt_len` tokens (longest first, as evaluation
    sorts them), LoRA r 8 on q,k,v,o with non-zero B, every answer `new_tokens` long (no stop id), as many answers
    per second as a 4 x 32 evaluation batch of the full NLG comparison. Keys decode_*."""
    from slora.models.decode import generate_static
    from slora.models.lora import apply_lora, lora_modules, merged
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    cfg = LlamaConfig(**SHAPES["tiny" if small else "smollm2-135m"])
    model = random_llama(cfg, device, dtype)
    apply_lora(model, {n: 8 for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))},
               16.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    model.eval()
    lengths = sorted(torch.randint(prompt_len // 2, prompt_len + 1, (batch,), generator=g).tolist(), reverse=True)
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt_len), generator=g)
    mask = (torch.arange(prompt_len)[None, :] >= (prompt_len - torch.tensor(lengths))[:, None]).long()
    ids, mask = (ids * mask).to(device), mask.to(device)

    def eager():
        return model.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=-1)

    def fast():
        with merged(model):
            return generate_static(model, ids, mask, new_tokens, eos_token_id=-1, graph=device.type == "cuda")
    res = {"decode_model": "tiny" if small else "smollm2-135m", "decode_batch": batch, "decode_prompt_len": prompt_len,
           "decode_new_tokens": new_tokens}
    outs = {}
    for name, fn in (("eager", eager), ("fast", fast)):
        outs[name] = fn()  # warm-up: kernels chosen, graph memory allocated
        s = timed(fn, device, repeat=3)
        res[f"decode_{name}_s"] = s
        res[f"decode_{name}_answers_per_s"] = batch / s
        res[f"decode_{name}_tokens_per_s"] = batch * new_tokens / s
    res["decode_speedup"] = res["decode_eager_s"] / res["decode_fast_s"]
    same = (outs["eager"] == outs["fast"]).all(-1)  # (B,) whole answers equal
    res["decode_same_answers"] = float(same.float().mean())
    print(f"[bench] decode: eager {res['decode_eager_answers_per_s']:.1f} answers/s, fast "
          f"{res['decode_fast_answers_per_s']:.1f} ({res['decode_speedup']:.2f}x), same answers "
          f"{res['decode_same_answers']:.1%}", flush=True)
    return res


def report_decode(r: dict) -> list[str]:
    return [f"Greedy decoding ({r['decode_model']} shape, random weights, LoRA r 8 on q,k,v,o; {r['decode_batch']} "
            f"prompts of up to {r['decode_prompt_len']} tokens, {r['decode_new_tokens']} new tokens each):",
            f"  generate          {r['decode_eager_answers_per_s']:8.1f} answers/s  "
            f"{r['decode_eager_tokens_per_s']:10,.0f} tokens/s",
            f"  --fast-generate   {r['decode_fast_answers_per_s']:8.1f} answers/s  "
            f"{r['decode_fast_tokens_per_s']:10,.0f} tokens/s   {r['decode_speedup']:.2f}x, "
            f"{r['decode_same_answers']:.1%} of the answers identical"]
