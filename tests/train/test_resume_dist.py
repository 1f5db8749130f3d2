"""--save-every and --resume under torchrun (DDP and FSDP2, CPU/gloo): a 2-process run killed (SIGKILL, every rank)
after a checkpoint and resumed by 2 processes equals the uninterrupted 2-process run: adapter bytes, every logged
loss and the evaluation history, exactly. Under FSDP2 the sharded parameters and AdamW state are saved whole and
re-sharded on resume. LoRA dropout 0.1 and BERT's own dropout stay on, so the per-rank RNG states (dropout draws
from seed + rank) must come back for the losses to match."""
from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from slora.cli import finetune
from tests.support.dist_launch import launch
from tests.support.tiny import sentiment_task

# every rank kills itself when the loop asks whether step KILL_AT is due for a checkpoint (rank 0 logged it first)
KILL = ("import os, signal, sys; from slora.cli import finetune; from slora.train import resume\n"
        "due = resume.Checkpointer.due\n"
        "def hook(self, s):\n"
        "    if s == int(os.environ['SLORA_TEST_KILL_AT']): os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return due(self, s)\n"
        "resume.Checkpointer.due = hook\n"
        "finetune.main(sys.argv[1:])\n")


def argv(d, model, out, *extra):
    # 30 examples, global micro-batch 2 x 4 = 8: 4 micro-batches per epoch, accumulation 3: steps of 3 and 1
    # micro-batches, 2 per epoch; 3 epochs = 6 steps; checkpoints at 2 (an epoch's end) and 4
    return ["--model", str(model), "--task", "jsonl", "--train-file", str(d / "train.jsonl"), "--dev-file",
            str(d / "dev.jsonl"), "--batch-size", "4", "--grad-accum", "3", "--epochs", "3", "--calib-n", "8",
            "--log-every", "1", "--save-every", "2", "--out", str(out), *extra]


def steps(folder) -> list:
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if r["event"] == "step"]


def ok(res):
    for rank, (rc, text, _) in enumerate(res):
        assert rc == 0, f"rank {rank} failed (rc {rc}):\n{text[-3000:]}"


# CUDA (NCCL, each rank's own device generator restored; fp32 so no bf16 autocast): the same claim, bit for bit,
# which holds as long as cuBLAS and NCCL pick the same kernels and reduction order in both runs of one machine
GPU2 = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]
CUDA = pytest.param(("--device", "cuda", "--precision", "fp32", "--dtype", "fp32"), id="cuda", marks=GPU2)
FSDP_CUDA = pytest.param(("--device", "cuda", "--precision", "fp32", "--dtype", "fp32", "--fsdp"), id="fsdp-cuda",
                         marks=GPU2)


@pytest.mark.slow
@pytest.mark.parametrize("how", [
    pytest.param(("--device", "cpu"), id="ddp-cpu"),
    pytest.param(("--device", "cpu", "--fsdp"), id="fsdp-cpu"),  # sharded state gathered whole, re-sharded on resume
    CUDA, FSDP_CUDA])
@pytest.mark.parametrize("kill_at", [3, 5])  # 3: mid-epoch 2 (checkpoint 2); 5: mid-epoch 3 (checkpoint 4)
def test_two_process_resume_equals_uninterrupted(tmp_path, kill_at, how):
    d = tmp_path
    model = sentiment_task(d)
    ref = d / "ref"
    ok(launch(2, ["-m", "slora.finetune", *argv(d, model, ref, *how)]))
    out = d / "run"
    res = launch(2, ["-c", KILL, *argv(d, model, out, *how)], env={"SLORA_TEST_KILL_AT": str(kill_at)})
    assert res[0][0] == -signal.SIGKILL, res[0][1][-3000:]
    partial = out / ".slora-partial"
    assert steps(partial)[-1][0] == kill_at  # logged beyond the checkpoint: cut on resume
    ckpt = partial / json.loads((partial / "checkpoint.json").read_text())["checkpoint"]
    tensors = load_file(ckpt / "tensors.safetensors")
    assert not (tensors["rng.torch"] == tensors["rng.rank1.torch"]).all()  # the ranks' dropout streams differ
    meta = json.loads((ckpt / "state.json").read_text())
    assert meta["world"] == 2 and meta["fsdp"] == ("--fsdp" in how)
    # whole tensors under FSDP2 too: the LoRA factors and AdamW moments have the model's full shapes
    one = finetune_shapes(ref)
    for key, shape in one.items():
        assert tuple(tensors[f"param.{key}"].shape) == shape, key
    n_params = sum(t.numel() for k, t in tensors.items() if k.startswith("param."))
    for moment in ("exp_avg", "exp_avg_sq"):  # a shard would hold about half
        assert sum(t.numel() for k, t in tensors.items() if k.endswith(f".{moment}")) == n_params, moment
    if "cuda" in how:
        assert tensors["rng.cuda"].shape[0] == tensors["rng.rank1.cuda"].shape[0] == 1  # each rank's own device

    # another world size is refused, naming both (FSDP2: one process cannot shard, refused first), and the
    # interrupted run stays resumable
    refusal = "--fsdp shards the model over torchrun ranks" if "--fsdp" in how else \
        r"written by 2 process\(es\), resumed by 1"
    with pytest.raises(ValueError, match=refusal):
        finetune.main(["--resume", str(out)])
    assert (partial / "checkpoint.json").is_file()

    res = launch(2, ["-m", "slora.finetune", "--resume", str(out)])
    ok(res)
    assert sum("run folder:" in text for _, text, _ in res) == 1  # rank 0 alone reports (and writes) the folder
    assert not partial.exists() and not list(d.glob("<rank*"))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert steps(out) == steps(ref) and len(steps(ref)) == 6
    m_out, m_ref = (json.loads((p / "metrics.json").read_text()) for p in (out, ref))
    assert m_out["epochs"] == m_ref["epochs"] and m_out["final"] == m_ref["final"]


def finetune_shapes(run) -> dict[str, tuple]:
    """Full shapes of the LoRA factors in a finished run's adapter, under the model's parameter names."""
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    # PEFT names: base_model.model.<module>.lora_A.weight -> <module>.lora_A.weight
    return {k.removeprefix("base_model.model."): tuple(v.shape) for k, v in adapter.items() if "lora_" in k}
