"""--fsdp under torchrun loads the base sharded (slora.dist.sharded_load): no rank reads or holds a whole tensor of it,
calibration runs through the sharded model, and LoRA is added to a second sharded skeleton.

Oracles: the same tensors loaded whole (load_model), and the DDP path at the same world size, which test_dist.py
checks against one process. Tolerances: ranks and sensitivity.json exactly equal (the sharded forward gathers the
very weights DDP holds, and runs the same kernels on the same batches); losses and the adapter within
tests.support.bounds.spread_bound of DDP's: FSDP2 reduce-scatters the gradients and takes the clipping norm over
shards, so the updates round differently; the bound is MARGIN times the spread of DDP against one process at 2·b
(the same rows batched otherwise, a larger perturbation), measured in the test. Process launches cost seconds: the fast tier holds one (about 3 s: the memory test), the rest is
@pytest.mark.slow.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import example, given, strategies as st
from safetensors.torch import load_file, save_file

from slora.io import weights
from slora.dist import sharded_load
from slora.io.model_folder import meta_model, save_model
from tests.support.bounds import assert_within, pooled_spread_bounds, spread_bound
from tests.support.dist_launch import launch
from tests.dist.test_data_parallel import cls_files, gen_files, log_rows, run_argv, step_losses  # noqa: F401
from tests.support.tiny import tiny_bert, tiny_llama, tiny_model_dir, tiny_mpnet


@given(n=st.integers(1, 300), world=st.integers(1, 9))
@example(n=5, world=4)  # torch.chunk makes 3 parts of 2, 2, 1: the fourth rank keeps nothing
@example(n=61, world=2)  # the tiny decoder's vocabulary: 31 and 30 rows
def test_shard_rows_are_fsdp2_chunks(n, world):
    """FSDP2 shards dim 0 as torch.chunk, padded with empty parts (_chunk_with_empty)."""
    parts = torch.chunk(torch.arange(n), world)
    for r in range(world):
        want = parts[r].tolist() if r < len(parts) else []
        assert list(sharded_load.shard_rows(n, r, world)) == want


def test_meta_model_reads_no_tensor_and_registers_no_buffer(tmp_path):
    """Every family's skeleton is all meta (nothing read) and has no buffer, which a meta build would leave empty:
    RoPE frequencies and position ids are computed in forward (shardload's docstring relies on it)."""
    models = {"llama": tiny_llama(), "qwen2": tiny_llama(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True),
              "mistral": tiny_llama(model_type="mistral", sliding_window=4), "bert": tiny_bert(),
              "roberta": tiny_bert(model_type="roberta", pad_token_id=1), "mpnet": tiny_mpnet()}
    for name, m in models.items():
        save_model(m, tmp_path / name)
        skeleton = meta_model(tmp_path / name, torch.bfloat16)
        assert list(skeleton.named_buffers()) == [], name
        assert all(p.is_meta and p.dtype == torch.bfloat16 for p in skeleton.parameters()), name
        assert skeleton.state_dict().keys() == m.state_dict().keys(), name


def test_a_mismatched_checkpoint_is_named_before_sharding(tmp_path):
    save_model(tiny_llama(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"missing tensor\(s\): model\.layers\.2\.input_layernorm\.weight"):
        sharded_load.materialise(meta_model(tmp_path / "m"), tmp_path / "m", torch.device("cpu"))


def test_read_rows_reads_rows_and_names_a_non_finite_tensor(tmp_path):
    t = torch.arange(12.0).reshape(4, 3)
    bad = t.clone()
    bad[3, 1] = math.nan
    save_file({"w": t, "bad": bad}, str(tmp_path / "x.safetensors"))
    assert torch.equal(weights.read_rows(tmp_path / "x.safetensors", "w", range(1, 3), torch.bfloat16),
                       t[1:3].to(torch.bfloat16))
    assert weights.read_rows(tmp_path / "x.safetensors", "bad", range(0, 2)).isfinite().all()  # rows 0-1 clean
    with pytest.raises(ValueError, match=r"tensor 'bad'.*rows 2:4 are NaN or inf"):
        weights.read_rows(tmp_path / "x.safetensors", "bad", range(2, 4))


# -----------------------------------------------------------------------------
# Memory: what each rank reads from the files

def test_each_rank_reads_only_its_rows_of_every_tensor(tmp_path):
    """Two ranks load five checkpoints sharded, with every safetensors read recorded (tests/support/fsdp_load_worker.py):
    each tensor the model uses is read exactly once over the ranks, each rank reading only its FSDP2 rows (about
    half, never the whole tensor), nothing through get_tensor, nothing the model drops (RoBERTa's and MPNet's
    pooler); the shards equal the rows of a whole load, in the asked dtype; each rank holds about half the model.
    Then the training model with LoRA is built from it without reading the files again."""
    cases = {  # kind, dtype, model, save_model kwargs, tensors the task model drops
        "llama-sharded-files": ("decoder", "float32", tiny_llama(seed=1), {"max_shard_bytes": 20_000}, ()),
        "qwen2-tied-bf16": ("decoder", "bfloat16", tiny_llama(seed=2, model_type="qwen2", qkv_bias=True,
                                                              tie_word_embeddings=True), {}, ()),
        "bert": ("encoder", "float32", tiny_bert(seed=3), {}, ()),
        "roberta": ("encoder", "float32", tiny_bert(seed=4, model_type="roberta", pad_token_id=1), {}, ("pooler.",)),
        "mpnet": ("encoder", "bfloat16", tiny_mpnet(seed=5), {}, ("pooler.",)),
    }
    specs = []
    for name, (kind, dtype, model, kw, _) in cases.items():
        save_model(model, tmp_path / name, **kw)
        specs.append(f"{kind}:{dtype}:{tmp_path / name}")
    res = launch(2, ["tests/support/fsdp_load_worker.py", str(tmp_path / "r"), *specs])
    for rank, (rc, text, _) in enumerate(res):
        assert rc == 0, f"rank {rank} failed:\n{text[-3000:]}"
    got = [json.loads((tmp_path / f"r.{r}.json").read_text()) for r in range(2)]
    for spec, (name, (_, _, _, _, dropped)) in zip(specs, cases.items()):
        shapes = got[0][spec]["shapes"]
        assert len(shapes) > 10, name
        for t, shape in shapes.items():
            reads = [g[spec]["reads"].get(t, 0) for g in got]
            if t.startswith(dropped or ("\0",)):
                assert reads == [0, 0], (name, t)
                continue
            row = math.prod(shape[1:])
            assert reads == [len(sharded_load.shard_rows(shape[0], r, 2)) * row for r in range(2)], (name, t, reads)
            assert sum(reads) == math.prod(shape), (name, t)  # read once over the ranks
        for g in got:
            assert g[spec]["whole"] == [], name
            assert all(g[spec]["same"].values()) and len(g[spec]["same"]) > 10, name
            # the task head (3 labels) is the only rounding beyond half: ceil of odd row counts
            assert g[spec]["local"] <= g[spec]["total"] / 2 + 200, (name, g[spec]["local"], g[spec]["total"])
            # the training model (sharded_load.with_lora): LoRA rows as apply_lora draws them on the whole model, the
            # base taken over, not read again; the checkpointing flag carried over; LoRA (and head) trainable
            lora = g[spec]["lora"]
            assert all(lora["same"].values()) and sum(".lora_A." in n for n in lora["same"]) > 4, name
            assert g[spec]["reads_after"] == g[spec]["reads"] and g[spec]["whole_after"] == [], name
            assert lora["checkpointing"] == [True], name
            assert all(".lora_" in n or n.startswith("classifier.") for n in lora["trainable"]), name


# -----------------------------------------------------------------------------
# End to end: the sharded --fsdp path against DDP at the same world size

def encoder_dir(tmp_path, kind):
    model = tiny_model_dir(tmp_path / "m", kind)
    cfg = json.loads((model / "config.json").read_text())  # dropout 0: DDP and FSDP runs must be comparable
    (model / "config.json").write_text(json.dumps(cfg | {"hidden_dropout_prob": 0.0,
                                                         "attention_probs_dropout_prob": 0.0}))
    return model


def check_fsdp_matches_ddp(tmp_path, model, files, *extra, tol=None, exact=True):
    """Two ranks each way; --calib-n 10 at batch 4 makes 3 calibration batches, 2 on rank 0 and 1 on rank 1, so
    the sharded path runs a stand-in batch (sharded_load.calibration_shard). `exact`: sensitivity.json equal, else
    its numbers within rtol `tol` (ranks are compared exactly either way). `tol` None (CPU): losses and adapter
    within the spread of DDP against one process (module docstring); else within rtol = atol = `tol`."""
    from slora.cli import finetune
    outs = {}
    for how in ("ddp", "fsdp"):
        outs[how] = tmp_path / how
        flags = [*extra, "--calib-n", "10"] + (["--fsdp"] if how == "fsdp" else [])
        res = launch(2, ["-m", "slora.finetune", *run_argv(model, files, outs[how], 4, *flags)])
        for rank, (rc, text, _) in enumerate(res):
            assert rc == 0, f"{how} rank {rank} failed:\n{text[-3000:]}"
    ddp, fsdp = outs["ddp"], outs["fsdp"]
    assert sorted(p.name for p in fsdp.iterdir()) == sorted(p.name for p in ddp.iterdir())
    assert json.loads((fsdp / "ranks.json").read_text()) == json.loads((ddp / "ranks.json").read_text())
    sens = [json.loads((p / "sensitivity.json").read_text())["modules"] for p in (fsdp, ddp)]
    if exact:
        assert sens[0] == sens[1]
    else:
        assert sens[0].keys() == sens[1].keys()
        for n in sens[1]:
            assert sens[0][n]["theta"] == pytest.approx(sens[1][n]["theta"], rel=tol), n
    assert len(set(json.loads((ddp / "ranks.json").read_text()).values())) > 1  # allocated, not uniform
    (got, _), (want, floor) = step_losses(fsdp), step_losses(ddp)
    a, b = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (fsdp, ddp))
    assert len(want) >= 2 and a.keys() == b.keys()
    assert all(b[k].abs().max() > 0 for k in b)
    if tol is None:
        one = finetune.main(run_argv(model, files, tmp_path / "one", 8, *extra, "--calib-n", "10"))
        assert_within(got, want, spread_bound(want, step_losses(one)[0], floor), "step losses")
        bounds = pooled_spread_bounds(b, load_file(one / "adapter" / "adapter_model.safetensors"))
        for k in a:
            assert_within(a[k], b[k], bounds[k], k)
    else:
        assert got == pytest.approx(want, rel=tol)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
    m1, m2 = (json.loads((p / "metrics.json").read_text()) for p in (fsdp, ddp))
    assert m1["final"] == m2["final"] and m1["steps"] == m2["steps"]


@pytest.mark.slow
def test_decoder_full_hessian_streamed_through_the_shards_matches_ddp(tmp_path, gen_files):
    """Full-mode Hessians of a decoder are streamed layer by layer, each layer called as its own FSDP2 unit."""
    model = tiny_model_dir(tmp_path / "m", "decoder")
    check_fsdp_matches_ddp(tmp_path, model, gen_files, "--hessian", "full", "--targets", "all-linear")


@pytest.mark.slow
def test_bf16_base_sharded_matches_ddp(tmp_path, gen_files):
    """A bf16 base read as bf16 rows, fp32 LoRA factors in the same FSDP2 unit, bf16 autocast. The bound is
    measured as in fp32: the spread of DDP against one process, here with bf16 rounding in both."""
    model = tiny_model_dir(tmp_path / "m", "decoder")
    check_fsdp_matches_ddp(tmp_path, model, gen_files, "--dtype", "bf16", "--targets", "all-linear")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder", "mpnet"])
def test_encoder_task_model_matches_ddp(tmp_path, cls_files, kind):
    """BERT (pooler kept, a task head in the root unit) and MPNet (pooler dropped) classifiers."""
    check_fsdp_matches_ddp(tmp_path, encoder_dir(tmp_path, kind), cls_files, "--targets", "all-linear", "--r-avg", "4",
                           "--seed", "3")  # a head seed other than for_sequence_classification's default


@pytest.mark.slow
def test_obs_metric_is_refused_under_sharded_load(tmp_path, gen_files):
    model = tiny_model_dir(tmp_path / "m", "decoder")
    res = launch(2, ["-m", "slora.finetune", *run_argv(model, gen_files, tmp_path / "o", 4, "--fsdp",
                                                        "--hessian", "full", "--metric-source", "obs")])
    for rank, (rc, text, _) in enumerate(res):
        assert rc not in (0, None) and "--metric-source: obs reads each whole weight matrix" in text, text[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sharded_load_on_two_gpus_matches_ddp(tmp_path, gen_files, dtype):
    """NCCL, each rank on its GPU: fp32 within rtol = atol = 1e-4 (cuBLAS may pick other kernels for the gathered
    weights' layout, test_dist's GPU tolerance); bf16 base (fp32 LoRA in the same FSDP2 unit) within 2e-2, a few
    bf16 ulps (2^-8 relative each) over three steps. Ranks are compared exactly in both."""
    model = tiny_model_dir(tmp_path / "m", "decoder")
    tol, precision = (1e-4, "fp32") if dtype == "fp32" else (2e-2, "bf16")
    check_fsdp_matches_ddp(tmp_path, model, gen_files, "--device", "cuda", "--dtype", dtype, "--precision",
                           precision, "--targets", "all-linear", tol=tol, exact=False)
