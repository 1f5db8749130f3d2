"""MPNet encoder: against a float64 loop reference, the relative-position buckets, padding, names, loading."""
import copy

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from slora.models.targets import find_linears
from slora.models import for_sequence_classification
from slora.io.model_folder import load_model, save_model
from slora.models.mpnet import MPNetConfig, position_ids_for, relative_position_bucket
from tests.support import naive
from tests.support.bounds import assert_within, float64_bound, oracles_bound
from tests.support.tiny import tiny_mpnet, tiny_mpnet_config

EPS32 = torch.finfo(torch.float32).eps
PAD = 1

# Key-minus-query offsets: the edges of the exact and log-spaced buckets on both sides, and far beyond 128.
EDGES = (0, 1, 7, 8, 11, 12, 15, 16, 22, 23, 31, 32, 45, 46, 63, 64, 90, 91, 127, 128, 129, 1000)
offsets = st.one_of(st.sampled_from(EDGES + tuple(-e for e in EDGES)), st.integers(-5000, 5000))


def padded_batch(seed, lengths, vocab=53):
    """Token ids (B, T) right-padded with PAD, real tokens never equal to PAD, and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, :n] = 1
    return ids, mask


# -----------------------------------------------------------------------------
# Relative-position buckets

def test_bucket_anchors():
    # Hand-worked values of T5's bidirectional rule with 32 buckets and max distance 128 (keys before the
    # query in 0..15, keys after it in 16..31; distances 0..7 exact, then 8 log-spaced buckets up to 128).
    got = relative_position_bucket(torch.tensor([0, -1, -7, -8, -11, -12, -90, -91, -128, -10**6,
                                                 1, 7, 8, 12, 91, 128, 10**6])).tolist()
    assert got == [0, 1, 7, 8, 8, 9, 14, 15, 15, 15,
                   17, 23, 24, 25, 31, 31, 31]


@given(offsets)
@example(0)
@example(-12)
@example(91)
def test_bucket_matches_integer_oracle(offset):
    assert relative_position_bucket(torch.tensor([offset])).item() == naive.mpnet_bucket(offset)


@given(st.integers(1, 5000))
def test_bucket_sides_and_monotone(d):
    left, right = relative_position_bucket(torch.tensor([-d, d, -(d + 1), d + 1])).view(2, 2).T
    assert right[0] == left[0] + 16  # a key d after the query uses the upper half, one d before it the lower
    assert left[0] <= left[1] <= 15 and right[0] <= right[1] <= 31  # farther never lands in a nearer bucket


# -----------------------------------------------------------------------------
# The encoder against the loop reference

@pytest.mark.parametrize("lengths", [(21, 40), (136, 90)])
def test_matches_naive_reference(lengths):
    """Hidden states at real positions equal a float64 loop implementation written from the description.

    (136, 90) covers offsets beyond max distance 128. Tolerances: the model in float64 against the loops in float64,
    the same exact values by other operations, within float64 rounding (bounds.float64_bound: the fp32 model's
    error, scaled by 2^-29); the fp32 model within its own error against itself in float64 (bounds.oracles_bound).
    A wrong bucket or a missing bias moves the hidden states by about 1e-2 (test_bias_matters), far above both."""
    m = tiny_mpnet(seed=3)
    ids, mask = padded_batch(4, lengths)
    with torch.no_grad():
        got, got64 = m(ids, mask), copy.deepcopy(m).double()(ids, mask)
    want = naive.mpnet_hidden(m.state_dict(), 2, 4, m.config.layer_norm_eps, ids, mask, pad=PAD)
    real = mask.bool()
    assert_within(got64[real], want[real], float64_bound(got[real], got64[real]), "float64 model")
    assert_within(got[real], want[real], oracles_bound(got[real], got64[real], want[real], want[real]), "fp32 model")


def test_bias_matters():
    """The shared table changes every layer's logits: zeroing it moves the output (so the test above is not
    vacuous about the bias)."""
    m = tiny_mpnet(seed=3)
    ids, mask = padded_batch(5, (12, 9))
    with torch.no_grad():
        a = m(ids, mask)
        m.encoder.relative_attention_bias.weight.zero_()
        b = m(ids, mask)
    assert (a - b)[mask.bool()].abs().max() > 1e-2
    assert [n for n, _ in m.named_parameters() if "relative_attention_bias" in n] == \
        ["encoder.relative_attention_bias.weight"]  # one table, not one per layer


def test_extra_padding_leaves_real_positions_unchanged():
    m = tiny_mpnet(seed=1)
    ids, mask = padded_batch(2, (7, 7))
    more = torch.cat([ids, torch.full((2, 6), PAD)], 1)
    more_mask = torch.cat([mask, torch.zeros(2, 6, dtype=torch.long)], 1)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        a, a64 = m(ids, mask), m64(ids, mask)
        b, b64 = m(more, more_mask)[:, :7], m64(more, more_mask)[:, :7]
    # padded keys get weight exp(-inf) = 0 and right padding leaves every real offset j - i unchanged: the same
    # exact values by kernels of other shapes, each side within its own fp32 error against float64
    assert_within(b, a, oracles_bound(b, b64, a, a64), "hidden states")


def test_position_ids_start_after_padding_idx():
    cfg = tiny_mpnet_config()
    assert position_ids_for(cfg, torch.tensor([[0, 5, 6, 2, 1, 1]])).tolist() == [[2, 3, 4, 5, 1, 1]]


def test_config_rejects_what_transformers_would_compute_differently():
    with pytest.raises(ValueError, match="relative_attention_num_buckets 64"):
        MPNetConfig(relative_attention_num_buckets=64)
    with pytest.raises(ValueError, match="pad_token_id 0"):
        MPNetConfig(pad_token_id=0)


# -----------------------------------------------------------------------------
# Names, targets, task head, save/load

def test_default_targets_pick_query_and_value_only():
    m = for_sequence_classification(tiny_mpnet(seed=2), num_labels=2)
    want = [f"mpnet.encoder.layer.{i}.attention.attn.{p}" for i in (0, 1) for p in ("q", "v")]
    assert list(find_linears(m, "attn.q,attn.v")) == want
    assert list(find_linears(m, "q,v")) == want  # whole-component suffixes: no other module ends in .q or .v
    assert set(find_linears(m, "all-linear")) == {
        f"mpnet.encoder.layer.{i}.{n}" for i in (0, 1)
        for n in ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o",
                  "intermediate.dense", "output.dense")}  # the classifier head stays out


def test_sequence_classification_names_and_head():
    enc = tiny_mpnet(seed=6)
    assert enc.pooler is not None
    m = for_sequence_classification(enc, num_labels=3, seed=0).eval()
    names = dict(m.named_modules())
    assert {"mpnet.encoder.layer.0.attention.attn.q", "classifier.dense", "classifier.out_proj"} <= set(names)
    assert m.mpnet is enc and enc.pooler is None  # transformers' task model has no pooler
    ids, mask = padded_batch(7, (5, 3))
    with torch.no_grad():
        logits = m(ids, mask)
        h = enc(ids, mask)
        x = torch.tanh(m.classifier.dense(h[:, 0]))  # the <s> token, as MPNetClassificationHead
        want = m.classifier.out_proj(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)


def test_save_load_roundtrip(tmp_path):
    m = tiny_mpnet(seed=8)
    save_model(m, tmp_path / "c")
    back = load_model(tmp_path / "c")
    assert type(back) is type(m) and back.config == m.config
    ids, mask = padded_batch(9, (6, 4))
    with torch.no_grad():
        torch.testing.assert_close(back(ids, mask), m(ids, mask), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# End to end through slora.finetune (a tiny MPNet folder with an MPNet-style tokenizer, pad id 1)

def test_finetune_run_on_tiny_mpnet(tmp_path):
    import json

    from slora.cli import finetune
    from slora.io.adapter import load_adapter
    from tests.support.tiny import sentiment_rows, tiny_model_dir, write_jsonl
    model = tiny_model_dir(tmp_path / "m", "mpnet")
    rows = sentiment_rows(24)
    write_jsonl(tmp_path / "train.jsonl", rows[:16])
    write_jsonl(tmp_path / "dev.jsonl", rows[16:])
    out = finetune.main(["--model", str(model), "--task", "jsonl", "--train-file", str(tmp_path / "train.jsonl"),
                         "--dev-file", str(tmp_path / "dev.jsonl"), "--batch-size", "8", "--calib-n", "8",
                         "--max-steps", "2", "--r-avg", "2", "--out", str(tmp_path / "run")])
    ranks = json.loads((out / "ranks.json").read_text())
    assert set(ranks) == {f"mpnet.encoder.layer.{i}.attention.attn.{p}" for i in (0, 1) for p in ("q", "v")}
    assert sum(ranks.values()) == 2 * len(ranks)
    assert json.loads((out / "args.json").read_text())["resolved"]["targets"] == "attn.q,attn.v"
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    back = load_adapter(for_sequence_classification(load_model(model), 2, seed=5), out / "adapter")
    assert sorted(n for n, _ in back.named_modules() if n.endswith("lora_A")) == sorted(f"{k}.lora_A" for k in ranks)


def test_missing_asset_says_how_to_fetch_it(tmp_path, monkeypatch):
    from slora.cli import finetune
    monkeypatch.setenv("SLORA_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match=r"run `python -m slora.assets --only mpnet` first"):
        finetune.main(["--model", "mpnet", "--allocate-only", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run.partial-*"))  # nothing half written


# -----------------------------------------------------------------------------
# gpu tier (skipped without CUDA): the float bias mask through CUDA's attention kernels, fp32 and bf16 autocast

@pytest.mark.gpu
def test_cuda_matches_cpu_and_runs_under_bf16_autocast():
    m = tiny_mpnet(seed=3)
    ids, mask = padded_batch(4, (136, 90))
    with torch.no_grad():
        want = m(ids, mask)
    m.cuda()
    ids, mask = ids.cuda(), mask.cuda()
    real = mask.bool()
    with torch.no_grad():
        got = m(ids, mask)
    # fp32 on both devices (TF32 is off by default for matmuls): the CPU test's 512·eps32
    torch.testing.assert_close(got[real].cpu(), want[real.cpu()], rtol=0, atol=512 * EPS32)
    m.train()  # dropout on, and a backward pass through the -inf-masked bias in bf16
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(ids, mask)
    out[real].float().square().mean().backward()
    assert torch.isfinite(out[real].float()).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.encoder.relative_attention_bias.weight.grad.abs().sum() > 0  # the shared table is trained too
    m.eval()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        low = m(ids, mask).float()
    # bf16 keeps 8 significant bits (eps 2^-7); two post-LN layers of O(1) activations: 16·eps_bf16 = 0.125
    torch.testing.assert_close(low[real].cpu(), want[real.cpu()], rtol=0,
                               atol=16 * torch.finfo(torch.bfloat16).eps)
