"""gpu tier: the CUDA-only code paths (run on the device; skipped where torch.cuda.is_available() is False)."""
import json

import pytest
import torch

from slora.method import hessian
from tests.cli.test_finetune import run, write_jsonl
from tests.support.tiny import WORDS, tiny_model_dir

pytestmark = pytest.mark.gpu
EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("d,tile", [(96, 2048), (300, 128)])
def test_bf16_gemm_with_fp32_output_is_fp32_accumulation(d, tile):
    # On CUDA, bf16 activations take the half-precision GEMM with fp32 output. Products of bf16 numbers are exact
    # in fp32, so the result must match a float64 oracle on the same bf16 values to fp32 accumulation error:
    # per entry <= (n + 3·batches)·eps·sqrt(H_ii·H_jj), the bound of the CPU property test.
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(512, d, device="cuda", generator=g).to(torch.bfloat16) * 3 for _ in range(3)]
    acc = hessian.HessianAccumulator(d, "full", torch.float32, "cuda", tile=tile)
    diag = hessian.HessianAccumulator(d, "diag", torch.float32, "cuda")
    for x in xs:
        acc.add_batch(x)
        diag.add_batch(x)
    x64 = torch.cat(xs).double()
    h64 = 2.0 / x64.shape[0] * (x64.T @ x64)
    d64 = h64.diagonal()
    tol = (x64.shape[0] + 3 * len(xs)) * EPS32 * torch.sqrt(d64[:, None] * d64[None, :])
    assert ((acc.value.double() - h64).abs() <= tol).all()
    assert ((diag.value.double() - d64).abs() <= tol.diagonal()).all()
    assert torch.equal(acc.value, acc.value.T)


def test_finetune_runs_on_cuda_with_bf16_autocast(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"text": f"the movie was {WORDS[i % 8]}", "label": int(i % 8 < 4)} for i in range(48)]
    data = write_jsonl(d / "train.jsonl", rows[:40]), write_jsonl(d / "dev.jsonl", rows[40:])
    model = tiny_model_dir(tmp_path / "m", "encoder")
    out = run(tmp_path, model, data, "--device", "cuda", "--dtype", "fp32")  # fp32 base, bf16 autocast
    args = json.loads((out / "args.json").read_text())
    assert args["device"] == "cuda" and args["precision"] == "auto"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["final"]["dev"]["accuracy"] <= 1.0
    cpu = run(tmp_path, model, data, "--device", "cpu", out="cpu")
    # the same calibration on CPU and CUDA gives the same ranks
    assert (out / "ranks.json").read_text() == (cpu / "ranks.json").read_text()


def capital_task(tmp_path):
    """A tiny decoder and 10 train / 2 dev copies of one instruction: (model folder, (train, dev) files)."""
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
    data = write_jsonl(d / "train.jsonl", rows[:10]), write_jsonl(d / "dev.jsonl", rows[10:])
    return tiny_model_dir(tmp_path / "m", "decoder"), data


def test_decoder_finetune_and_generation_on_cuda(tmp_path):
    model, data = capital_task(tmp_path)
    out = run(tmp_path, model, data, "--device", "cuda", kind="instructions")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]["dev"]) == {"bleu4", "rouge1", "rougeL"}


def test_bf16_load_on_cuda_makes_no_fp32_copy_of_the_model(tmp_path):
    # an fp32 checkpoint read with dtype bf16: the device holds the bf16 weights plus at most one fp32 tensor at a
    # time (checkpoint.read_tensors casts tensor by tensor), never a whole fp32 shard
    from slora.io.model_folder import load_model, save_model
    from tests.support.tiny import tiny_llama
    model = tiny_llama(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                       vocab_size=8192)
    save_model(model, tmp_path / "m")
    bf16_bytes = sum(p.numel() * 2 for p in model.parameters())
    largest_fp32 = max(p.numel() * 4 for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loaded = load_model(tmp_path / "m", dtype=torch.bfloat16, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert peak <= bf16_bytes + largest_fp32 + 2**20, (peak, bf16_bytes, largest_fp32)  # 1 MiB allocator slack


def test_finetune_on_cuda_defaults_to_a_bf16_base_with_fp32_lora(tmp_path):
    from safetensors.torch import load_file
    model, data = capital_task(tmp_path)
    out = run(tmp_path, model, data, "--device", "cuda", "--activation-checkpointing", "--save-every", "1",
              kind="instructions")
    assert json.loads((out / "args.json").read_text())["dtype"] == "auto"
    sd = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sd and {t.dtype for t in sd.values()} == {torch.float32}


# the efficient NLG path (grid.py nlg-full): grouped batches, sorted evaluation, device-side non-finite check, fused
# AdamW, LM head on target rows, batches through pinned memory
FAST = ("--group-by-length", "--eval-batch-size", "5", "--check-finite", "log", "--fused-optim", "--sparse-lm-head",
        "--log-every", "2", "--epochs", "2", "--max-steps", "6")


def test_decoder_fast_path_on_cuda_follows_the_cpu(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": f"what is the {WORDS[i % 7]} of {WORDS[(3 * i) % 11]}" + " very" * (i % 9),
             "response": " ".join(WORDS[i % 20:i % 20 + 1 + i % 4])} for i in range(40)]
    data = write_jsonl(d / "train.jsonl", rows[:32]), write_jsonl(d / "dev.jsonl", rows[32:])
    model = tiny_model_dir(tmp_path / "m", "decoder")
    # compare arithmetic, not bf16 rounding; and no dropout: CPU and CUDA draw different masks, which moved the loss by
    # 2e-3 from the second step on (the first step's matched: B = 0 there, so the mask had no effect)
    fp32 = ("--dtype", "fp32", "--precision", "fp32", "--lora-dropout", "0")
    gpu = run(tmp_path, model, data, "--device", "cuda", *fp32, *FAST, kind="instructions", out="gpu")
    cpu = run(tmp_path, model, data, "--device", "cpu", *fp32, *FAST, kind="instructions", out="cpu")
    losses = [[r["loss"] for r in map(json.loads, (o / "log.jsonl").read_text().splitlines()) if r["event"] == "step"]
              for o in (gpu, cpu)]
    assert len(losses[0]) == 3
    # same batches and updates; fp32 kernels of another summation order (cuBLAS and CUDA SDPA against the CPU's)
    # over 6 steps: 1e-3 relative. A wrong batch order or a skipped update moves the loss by far more (~1e-1 here).
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_diverging_run_on_cuda_stops_at_the_first_bad_step(tmp_path):
    model, data = capital_task(tmp_path)
    msgs = []
    for i, extra in enumerate(((), ("--check-finite", "log", "--log-every", "50"), FAST)):
        with pytest.raises(FloatingPointError, match=r"step \d+: .* not finite") as e:
            run(tmp_path, model, data, "--device", "cuda", "--batch-size", "2", "--lr", "1e30", *extra,
                kind="instructions", out=f"run{i}")
        assert not (tmp_path / f"run{i}" / "adapter").exists()
        msgs.append(str(e.value))
    assert msgs[1] == msgs[0]  # the same first bad step and value, read after every step or once on the device


def test_auto_checkpointing_and_compiled_layers_on_cuda(tmp_path):
    """--activation-checkpointing auto plans on the longest micro-batch (a tiny model fits: no layer recomputes) and
    --compile trains the same steps as eager: fp32 losses within the 1e-3 of the CPU-vs-CUDA comparison above (fused
    elementwise kernels round otherwise; a wrong fusion or a lost update moves the loss by ~1e-1 here)."""
    model, data = capital_task(tmp_path)
    # 10 examples at batch 8 are 2 steps an epoch: 2 epochs for the 3 steps of --max-steps
    fp32 = ("--dtype", "fp32", "--precision", "fp32", "--lora-dropout", "0", "--log-every", "1", "--epochs", "2")
    eager = run(tmp_path, model, data, "--device", "cuda", *fp32, kind="instructions", out="eager")
    fast = run(tmp_path, model, data, "--device", "cuda", *fp32, "--activation-checkpointing", "auto", "--compile",
               kind="instructions", out="fast")
    logs = [[json.loads(line) for line in (o / "log.jsonl").read_text().splitlines()] for o in (eager, fast)]
    (plan,) = [r for r in logs[1] if r["event"] == "memory"]
    assert plan["recomputed"] == 0 and plan["layers"] == 2 and plan["layer_activations_gb"] > 0
    losses = [[r["loss"] for r in log if r["event"] == "step"] for log in logs]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-3)
