"""python -m slora.bench [--small] [--only CASE] [--out DIR]

Side-by-side measurements of what slora costs on the current device, every figure and ratio from one run:

1. Calibration at LLaMA-3.1-8B shape (random bf16 weights built on the device; time and memory do not depend on
   the values), every linear layer a target, 262,144 tokens as 16 batches of 8 x 2048:
   the bare forward pass of slora's model and of transformers' LLaMA on the same shapes, then `diag` mode
   (Σx², metrics, allocation) and `full` mode (Hessians streamed layer by layer, block Cholesky, metrics,
   allocation), each as a ratio to the bare forward, with achieved TFLOP/s and peak memory.
2. Accuracy of full-mode H (fp32 accumulation of bf16 activations) against a float64 oracle on one layer and one
   batch, and whether any rank changes when the accumulation runs in float64.
3. A LoRA training step with the allocated ranks at LLaMA-3.2-1B shape: slora against PEFT on transformers'
   model (same ranks through `rank_pattern`, same batch and sequence length), when peft is installed.
4. LoRA training at LLaMA-3.1-8B shape (the README's "One GPU at 8B"): random bf16 base, every linear layer adapted with ranks
   allocated at r_avg 8 (diag calibration on one 2 x 1024 batch), micro-batch 2 x 2048, activation checkpointing
   (slora's per-layer non-reentrant checkpointing; transformers' gradient checkpointing, non-reentrant), each
   library's own training loss (slora's chunked LM head; transformers' `labels=`). Tokens/s and peak memory of
   both, and their ratio (goals: >= 1.10x PEFT, <= 22 GB).

5. NLG fine-tuning (the full-size NLG comparison's path): `python -m slora.finetune` on SmolLM2 and wiki-describe, the old path (batch 8, random
   order, a host read per step) against the new one (bigger micro-batch, length-grouped batches, the non-finite
   check on the device, fused AdamW, the LM head on response positions only): tokens/s, padding, peak memory,
   generation throughput (slora.cli.bench_nlg).

`--only CASE` (calibration, train1b, train8b, nlg, decode; repeatable) runs a subset; with `--out` the keys of an existing
result.json that were not re-measured are kept. `--small` runs tiny shapes on the CPU in seconds (the CI smoke
test). transformers and peft are optional
comparison baselines: when missing, their rows say so and the run goes on.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from slora.method import hessian
from slora.models.targets import find_linears
from slora.cli.argcheck import check_device, check_ranges
from slora.cli.runner import ArgumentParser
from slora.models.llama import LlamaConfig, LlamaForCausalLM
from slora.method.sensitivity import SensitivityConfig, compute, from_stats

# Model shapes (Meta's published configs for LLaMA-3.1-8B and LLaMA-3.2-1B; a tiny one for --small).
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                         max_position_embeddings=131072, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         rope_scaling=LLAMA3_ROPE | {"factor": 32.0}, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
                 max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 1) -> float:
    """Wall seconds of fn() (mean over `repeat`), with the device queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    del out
    return (time.perf_counter() - t0) / repeat


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def random_llama(cfg: LlamaConfig, device, dtype) -> LlamaForCausalLM:
    """slora's LLaMA with N(0, 0.02²) weights made on the device (no host copy, no checkpoint)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype)  # dtype chosen on meta: no fp32 copy is ever made on the device
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.tie_weights()
    return model.eval()


def forward_flops(cfg: LlamaConfig, B: int, T: int) -> float:
    """Matmul FLOPs of one decoder-body forward over (B, T): 2·tokens·Σ(d_in·d_out) plus causal attention."""
    D, Fd, hs = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    linear = D * H * hs + 2 * D * Hkv * hs + H * hs * D + 3 * D * Fd  # q, k+v, o, gate+up+down
    attn = 2 * H * hs * T  # QKᵀ and AV: 2·2·T·H·hs per token, halved by the causal mask
    return cfg.num_hidden_layers * B * T * 2 * (linear + attn)


def hessian_flops(cfg: LlamaConfig, tokens: int, tile: int) -> float:
    """FLOPs of the upper-block-triangle XᵀX for the four distinct inputs of each layer (qkv, o, gate/up, down)."""
    def tri(d):
        nb = -(-d // tile)
        return 2 * tokens * d * d * (nb + 1) / (2 * nb)
    D, Fd = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * (3 * tri(D) + tri(Fd))


# -----------------------------------------------------------------------------
# 1. Calibration

def streaming_inputs(body, batches) -> list[hessian.CachedInput]:
    """The first decoder layer's inputs per batch straight from the embedding (`LlamaModel.prepare`): the
    model-specific shortcut that spares `hessian.capture_inputs` its full forward pass."""
    with torch.no_grad():
        return [hessian.CachedInput(body.prepare(ids), {}, None) for ids in batches]


def bench_calibration(cfg, batches, device, dtype, with_transformers: bool) -> dict:
    B, T = batches[0].shape
    tokens = B * T * len(batches)
    body = random_llama(cfg, device, dtype).model  # the decoder body: every target linear, no LM head
    weights_gb = sum(p.numel() * p.element_size() for p in body.parameters()) / 1e9
    res = {"tokens": tokens, "weights_gb": weights_gb, "n_layers": cfg.num_hidden_layers}
    feed = [{"input_ids": ids} for ids in batches]

    def forward():
        with torch.no_grad():
            for ids in batches:
                body(ids)
    forward()  # warm-up: kernels chosen, allocator primed
    reset_peak(device)
    res["forward_s"] = timed(forward, device)
    res["peak_mem_gb_forward"] = peak_gb(device)

    sens_cfg = dict(r_avg=8)
    modules = find_linears(body, "all-linear")
    reset_peak(device)
    t0 = time.perf_counter()
    ranks_diag = compute(body, feed, modules, SensitivityConfig(mode="diag", **sens_cfg)).ranks
    sync(device)
    res["calib_diag_s"] = time.perf_counter() - t0
    res["peak_mem_gb_diag"] = peak_gb(device)

    reset_peak(device)
    t0 = time.perf_counter()
    blocks = [(f"layers.{i}", layer) for i, layer in enumerate(body.layers)]
    stats = hessian.collect_streaming(blocks, streaming_inputs(body, batches), modules, mode="full")
    ranks_full = from_stats(modules, stats, SensitivityConfig(mode="full", **sens_cfg)).ranks
    sync(device)
    res["calib_full_s"] = time.perf_counter() - t0
    res["peak_mem_gb_full"] = peak_gb(device)
    res["ranks_full_equal_diag"] = ranks_full == ranks_diag
    del stats
    res["profile_full_layer"] = profile_full_layer(body, batches, modules, device)

    # float64 accumulation (diag mode) as the oracle for the ranks
    ranks64 = compute(body, feed, modules, SensitivityConfig(mode="diag", dtype="float64", **sens_cfg)).ranks
    res["ranks_fp32_equal_fp64"] = ranks_diag == ranks64
    res["accuracy"] = full_h_accuracy(body, batches[0], layer=len(body.layers) // 2)
    res["flops_forward"] = forward_flops(cfg, B, T) * len(batches)
    res["flops_hessian_full"] = hessian_flops(cfg, tokens, hessian.HessianAccumulator(1).tile)
    res["ranks"] = ranks_diag
    del body
    if with_transformers:
        try:
            res.update(transformers_forward(cfg, batches, device, dtype))
        except Exception as e:  # the baseline is optional; its failure is reported in the table, not hidden
            res.update(forward_s_transformers=None, transformers=f"failed: {e!r}"[:300])
    return res


def profile_full_layer(body, batches, modules, device) -> dict:
    """Where full mode spends its time, on one decoder layer over all batches: the layer's own forward, the
    forward with Hessian accumulation, the reduction (block Cholesky, inverse diagonal, dominance), and the
    torch.profiler table of the whole streamed layer (top device-time operators)."""
    inputs = streaming_inputs(body, batches)
    layer = body.layers[0]
    mine = {n: m for n, m in modules.items() if n.startswith("layers.0.")}

    def plain():
        with torch.no_grad():
            for c in inputs:
                layer(*c.args)
    plain()
    out = {"layer_forward_s": timed(plain, device)}
    t0 = time.perf_counter()
    accs = hessian.accumulate(_Seq(layer, inputs), [{"i": i} for i in range(len(inputs))], mine, mode="full")
    sync(device)
    out["layer_forward_with_H_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    hessian.reduce_all(accs)
    sync(device)
    out["layer_reduce_s"] = time.perf_counter() - t0
    del accs
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            hessian.collect_streaming([("layers.0", layer)], inputs, mine, mode="full")
            sync(device)
        out["torch_profiler"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12,
                                                          max_name_column_width=48)
    return out


class _Seq(torch.nn.Module):
    """Runs one cached layer input per call, so `hessian.accumulate` can drive a single layer."""

    def __init__(self, layer, inputs):
        super().__init__()
        self.layer, self.inputs = layer, inputs

    def forward(self, i):
        return self.layer(*self.inputs[i].args)


def full_h_accuracy(body, ids, layer: int) -> dict:
    """Relative error of fp32-accumulated H (from bf16 activations, the full-mode path) against float64 from the
    same activations, for each distinct input of one layer and one batch."""
    mods = find_linears(body.layers[layer], "all-linear")
    grabbed = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: grabbed.setdefault(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in mods.items()]
    try:
        with torch.no_grad():
            body(ids[:1])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        x = grabbed[name]
        acc = hessian.HessianAccumulator(x.shape[1], "full", torch.float32, x.device)
        acc.add_batch(x)
        x64 = x.double()
        h64 = 2.0 / x.shape[0] * (x64.T @ x64)  # (d_in, d_in) oracle
        d64 = h64.diagonal()
        scale = torch.sqrt(d64[:, None] * d64[None, :]).clamp_min(1e-300)
        out[name] = {"diag_rel_err": ((acc.diag().double() - d64).abs() / d64.clamp_min(1e-300)).max().item(),
                     "offdiag_err_over_sqrt_hii_hjj": ((acc.value.double() - h64).abs() / scale).max().item()}
    return out


def transformers_llama(cls, cfg: LlamaConfig, device, dtype):
    """transformers' `cls` (LlamaModel or LlamaForCausalLM) with slora's config, random weights made on the
    device in `dtype` (the comparison baseline; transformers is imported only by the callers)."""
    import transformers
    hf_cfg = transformers.LlamaConfig(**vars(cfg), attn_implementation="sdpa", use_cache=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(hf_cfg)
    finally:
        torch.set_default_dtype(prev)


def transformers_forward(cfg: LlamaConfig, batches, device, dtype) -> dict:
    """transformers' LlamaModel on the same shapes and batches (random weights), for the speed baseline."""
    try:
        import transformers
    except ImportError:
        return {"forward_s_transformers": None, "transformers": "not installed"}
    hf = transformers_llama(transformers.LlamaModel, cfg, device, dtype).eval()

    def forward():
        with torch.no_grad():
            for ids in batches:
                hf(input_ids=ids, use_cache=False)
    forward()
    t = timed(forward, device)
    del hf
    return {"forward_s_transformers": t, "transformers": transformers.__version__}


# -----------------------------------------------------------------------------
# Report

def _training_cases():
    """slora.cli.bench_train (cases 3 and 4), which builds on this module's helpers, hence imported at run time."""
    from slora.cli import bench_train
    return bench_train


def report(r: dict) -> str:
    """The table printed and written to output.txt: one section per case that ran."""
    lines = [f"device: {r['device']}   torch {r['torch']}"]
    if "forward_s" in r:
        lines += report_calibration(r)
    bench_train = _training_cases()
    if "train_step_s_slora" in r:
        lines += bench_train.report_training(r)
    if "train8b_step_s_slora" in r:
        lines += bench_train.report_train8b(r)
    if "nlg_new_tokens_per_s" in r:
        from slora.cli import bench_nlg
        lines += bench_nlg.report_nlg(r)
    if "decode_speedup" in r:
        from slora.cli import bench_nlg
        lines += bench_nlg.report_decode(r)
    return "\n".join(lines)


def report_calibration(r: dict) -> list[str]:
    f = r["forward_s"]
    lines = [f"calibration tokens: {r['tokens']:,}",
             f"weights: {r['weights_gb']:.2f} GB",
             f"bare forward, slora:        {f:8.3f} s   {r['flops_forward'] / f / 1e12:7.1f} TFLOP/s"]
    if r.get("forward_s_transformers"):
        t = r["forward_s_transformers"]
        lines.append(f"bare forward, transformers: {t:8.3f} s   {r['flops_forward'] / t / 1e12:7.1f} TFLOP/s"
                     f"   slora/transformers = {f / t:.3f}  (target <= 1.05)")
    else:
        lines.append(f"bare forward, transformers: skipped ({r.get('transformers')})")
    d, fu = r["calib_diag_s"], r["calib_full_s"]
    lines += [f"calibration diag (Σx², metrics, allocation): {d:8.3f} s   ratio to forward {d / f:.3f}"
              f"  (target <= 1.05)   peak {r['peak_mem_gb_diag'] or 0:.2f} GB",
              f"calibration full (streamed H, Cholesky, metrics, allocation): {fu:8.3f} s   ratio to forward "
              f"{fu / f:.3f}  (target <= 1.5)   peak {r['peak_mem_gb_full'] or 0:.2f} GB   "
              f"{(r['flops_forward'] + r['flops_hessian_full']) / fu / 1e12:.1f} TFLOP/s",
              f"ranks: full == diag: {r['ranks_full_equal_diag']}; fp32 == fp64 accumulation: "
              f"{r['ranks_fp32_equal_fp64']}"]
    pf = r["profile_full_layer"]
    n_layers = r["n_layers"]
    lines.append(f"  full-mode profile, one layer over all batches: forward {pf['layer_forward_s']:.3f} s, with H "
                 f"accumulation {pf['layer_forward_with_H_s']:.3f} s, reduction {pf['layer_reduce_s']:.3f} s "
                 f"(x{n_layers} layers: {n_layers * pf['layer_forward_s']:.2f} / "
                 f"{n_layers * pf['layer_forward_with_H_s']:.2f} / {n_layers * pf['layer_reduce_s']:.2f} s)")
    for name, a in r["accuracy"].items():
        lines.append(f"  H accuracy {name:18s} max rel err diag {a['diag_rel_err']:.2e}   "
                     f"max |ΔH_ij|/sqrt(H_ii H_jj) {a['offdiag_err_over_sqrt_hii_hjj']:.2e}  (target diag <= 1e-3)")
    return lines


CASES = ("calibration", "train1b", "train8b", "nlg", "decode")


def main(argv=None):
    p = ArgumentParser(prog="python -m slora.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--small", action="store_true", help="tiny shapes on the CPU in seconds (CI smoke test)")
    p.add_argument("--only", action="append", choices=CASES, default=None,
                   help="run only this case (repeatable); default: all of them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--batches", type=int, default=16, help="calibration batches (count)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per calibration batch")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration sequence")
    p.add_argument("--train-batch", type=int, default=4, help="sequences per training step (1B case)")
    p.add_argument("--train-seq-len", type=int, default=2048, help="tokens per training sequence (1B case)")
    p.add_argument("--train8b-batch", type=int, default=2, help="sequences per training step (8B case)")
    p.add_argument("--train8b-seq-len", type=int, default=2048, help="tokens per training sequence (8B case)")
    p.add_argument("--train-steps", type=int, default=10, help="timed training steps (count)")
    p.add_argument("--nlg-steps", type=int, default=40, help="optimizer steps per NLG path (count)")
    p.add_argument("--nlg-batch", type=int, default=32,
                   help="sequences per micro-batch of the new NLG path (evaluation: 4 x as many)")
    p.add_argument("--nlg-eval", type=int, default=100, help="dev and test examples generated per NLG path (count)")
    p.add_argument("--decode-batch", type=int, default=128, help="prompts per decoding batch (count)")
    p.add_argument("--decode-prompt-len", type=int, default=256, help="tokens of the longest prompt (count)")
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens per answer (count)")
    p.add_argument("--out", default=None, help="folder for result.json and output.txt; the keys of an existing "
                   "result.json that this run does not measure are kept")
    args = p.parse_args(argv)
    check_ranges(args)
    cases = args.only or CASES
    bench_train = _training_cases()
    device = torch.device("cpu") if args.small else check_device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.small:
        args.batches, args.batch_size, args.seq_len, args.train_batch, args.train_seq_len = 2, 2, 32, 2, 32
        args.train8b_batch, args.train8b_seq_len, args.train_steps = 2, 32, 2
        args.nlg_steps, args.nlg_batch, args.nlg_eval = 8, 32, 8
        args.decode_batch, args.decode_prompt_len, args.decode_tokens = 4, 16, 8
    calib_shape = "tiny" if args.small else "llama-3.1-8b"
    train_shape = "tiny" if args.small else "llama-3.2-1b"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    res = {"device": name, "torch": torch.__version__,
           "command": "python -m slora.bench " + " ".join(argv if argv is not None else sys.argv[1:])}
    if "calibration" in cases:
        cfg = LlamaConfig(**SHAPES[calib_shape])
        g = torch.Generator(device=device).manual_seed(0)
        batches = [torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=device, generator=g)
                   for _ in range(args.batches)]
        res["calib_model"] = calib_shape
        res.update(bench_calibration(cfg, batches, device, dtype, with_transformers=True))
        del batches
        print(f"[bench] calibration done: forward {res['forward_s']:.3f} s, diag {res['calib_diag_s']:.3f} s, "
              f"full {res['calib_full_s']:.3f} s", flush=True)
    if "train1b" in cases:
        res["train_model"] = train_shape
        try:
            res.update(bench_train.bench_training(LlamaConfig(**SHAPES[train_shape]), args.train_batch,
                                                  args.train_seq_len, device, dtype, args.train_steps, with_peft=True))
        except Exception as e:  # reported in the table and result.json rather than losing the other figures
            res.update(train_step_s_slora=None, train_error=f"{e!r}"[:300], train_rank_sum=None, train_shape=None)
        reset_peak(device)
    if "train8b" in cases:
        # LLaMA-3.1-8B shape, bf16 base, micro-batch 2 x 2048, activation checkpointing on both sides
        res["train8b_model"] = calib_shape
        try:
            res.update(bench_train.bench_training(LlamaConfig(**SHAPES[calib_shape]), args.train8b_batch,
                                                  args.train8b_seq_len, device, dtype, args.train_steps,
                                                  with_peft=True, checkpointing=True, prefix="train8b",
                                                  own_loss=True, variants=bench_train.TRAIN8B_VARIANTS
                                                  if device.type == "cuda" else ()))
        except Exception as e:
            res.update(train8b_step_s_slora=None, train8b_tokens_per_s_slora=None, train8b_error=f"{e!r}"[:300])
        reset_peak(device)
    if "nlg" in cases:
        from slora.cli import bench_nlg  # builds on this module's helpers, like bench_train
        res.update(bench_nlg.bench_nlg(device, args.nlg_steps, args.nlg_batch, args.nlg_eval, args.small))
        reset_peak(device)
    if "decode" in cases:
        from slora.cli import bench_nlg
        res.update(bench_nlg.bench_decode(device, args.decode_batch, args.decode_prompt_len, args.decode_tokens,
                                          args.small))
        reset_peak(device)
    if args.out and (Path(args.out) / "result.json").is_file():
        old = json.loads((Path(args.out) / "result.json").read_text())
        res = old | res | {"command": "; ".join(dict.fromkeys(filter(None, (old.get("command"), res["command"]))))}
    text = report(res)
    if (res.get("profile_full_layer") or {}).get("torch_profiler"):
        text += "\n\ntorch.profiler, full mode, one streamed layer:\n" + res["profile_full_layer"]["torch_profiler"]
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        (out / "output.txt").write_text(text + "\n")
    return res
