"""gpu tier: the CUDA-only code paths (run on the device; skipped where torch.cuda.is_available() is False)."""
import json

import pytest
import torch

from slora import hessian
from tests.test_finetune import run, write_jsonl
from tests.tiny import WORDS, tiny_model_dir

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
    out = run(tmp_path, model, data, "--device", "cuda")
    args = json.loads((out / "args.json").read_text())
    assert args["device"] == "cuda" and args["precision"] == "auto"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0.0 <= metrics["final"]["dev"]["accuracy"] <= 1.0
    cpu = run(tmp_path, model, data, "--device", "cpu", out="cpu")
    # the same calibration on CPU and CUDA gives the same ranks
    assert (out / "ranks.json").read_text() == (cpu / "ranks.json").read_text()


def test_decoder_finetune_and_generation_on_cuda(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    rows = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
    data = write_jsonl(d / "train.jsonl", rows[:10]), write_jsonl(d / "dev.jsonl", rows[10:])
    model = tiny_model_dir(tmp_path / "m", "decoder")
    out = run(tmp_path, model, data, "--device", "cuda", kind="instructions")
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]["dev"]) == {"bleu4", "rouge1", "rougeL"}
