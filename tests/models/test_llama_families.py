"""Qwen2 and Mistral as model_types of slora's decoder (models/llama.py): biases, sliding window, configs.

The window is checked against attention written as loops over an explicit window (tests/models/test_llama.py's
naive_attention idea), and generation with the key/value cache against a full re-run at every step.
Comparison with checkpoints transformers itself writes is outside CI: tests/comparisons/families_compat.py.
"""
import copy
import json

import pytest
import torch

from slora.models import build_config
from slora.io.model_folder import load_model, save_model
from slora.models.llama import LlamaConfig, apply_rope, attention_mask_4d, rope_cos_sin
from tests.support.bounds import assert_within, decided_rollout, oracles_bound
from tests.support.tiny import tiny_llama


def test_qwen2_has_biases_on_qkv_not_o():
    m = tiny_llama(model_type="qwen2", qkv_bias=True)
    attn = m.model.layers[0].self_attn
    assert all(getattr(attn, n).bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    assert attn.o_proj.bias is None and m.model.layers[0].mlp.up_proj.bias is None
    assert set(k for k in m.state_dict() if k.endswith("bias")) == {
        f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in "qkv"}


def qwen2_config_json(**kw):
    """A config.json as transformers' Qwen2Config.save_pretrained writes it (the keys slora reads)."""
    d = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True,
         "use_sliding_window": False, "sliding_window": None, "max_window_layers": 28,
         "layer_types": ["full_attention", "full_attention"], "hidden_act": "silu"}
    d.update(kw)
    return d


def test_qwen2_config_and_save_load_round_trip(tmp_path):
    cfg = build_config(qwen2_config_json())
    assert (cfg.model_type, cfg.qkv_bias, cfg.attention_bias, cfg.sliding_window) == ("qwen2", True, False, None)
    m = tiny_llama(seed=3, model_type="qwen2", qkv_bias=True)
    save_model(m, tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert written["architectures"] == ["Qwen2ForCausalLM"] and written["model_type"] == "qwen2"
    assert written["use_sliding_window"] is False
    back = load_model(tmp_path / "q")
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids))


@pytest.mark.parametrize("kw, match", [
    (dict(use_sliding_window=True, sliding_window=4), r"qwen2 config\.json: use_sliding_window = true"),
    (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types .*per-layer attention kinds"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"rope_scaling type 'yarn' is not supported"),
])
def test_qwen2_refuses_what_is_not_implemented(kw, match):
    with pytest.raises(ValueError, match=match):
        build_config(qwen2_config_json(**kw))


def test_mistral_config_reads_the_window():
    d = {"model_type": "mistral", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 61, "sliding_window": 4096}
    assert build_config(d).sliding_window == 4096 and not build_config(d).qkv_bias
    assert build_config({**d, "sliding_window": None}).sliding_window is None  # Mistral v0.2+: no window
    with pytest.raises(ValueError, match="mixed attention kinds"):
        build_config({**d, "layer_types": ["full_attention", "sliding_attention"]})
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        LlamaConfig(**{**build_config(d).__dict__, "sliding_window": 0})
    with pytest.raises(ValueError, match="decoder model_type must be one of llama, qwen2, mistral, got 'gemma'"):
        LlamaConfig(model_type="gemma")


def test_window_mask_against_definition():
    # query at cache position i sees key j iff j <= i and i - j < window; queries are the last T of S
    for T, S, w in [(6, 6, 3), (1, 9, 4), (3, 8, 8), (5, 5, 1)]:
        m = attention_mask_4d(None, T, S, "cpu", window=w)
        want = torch.tensor([[(j <= i) and (i - j < w) for j in range(S)] for i in range(S - T, S)])
        assert torch.equal(m[0, 0], want), (T, S, w)
    assert attention_mask_4d(None, 6, 6, "cpu", window=6) is None  # the window covers everything: plain causal


def windowed_attention_by_loops(q, k, v, window):
    """Causal softmax attention over the last `window` keys, written as loops. q, k, v: (H, T, hs)."""
    H, T, hs = q.shape
    out = torch.zeros_like(q)
    for h in range(H):
        for t in range(T):
            keys = range(max(0, t - window + 1), t + 1)
            s = torch.stack([q[h, t] @ k[h, j] for j in keys]) / hs ** 0.5
            w = torch.softmax(s, 0)
            out[h, t] = sum(wj * v[h, j] for wj, j in zip(w, keys))
    return out


def test_mistral_window_attention_matches_loops():
    m = tiny_llama(seed=2, model_type="mistral", sliding_window=3, num_hidden_layers=1, num_key_value_heads=4)
    attn, cfg = m.model.layers[0].self_attn, m.config
    x = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))

    def both(attn, x):  # (the layer's output, the loops' output) in x's dtype
        cos, sin = rope_cos_sin(cfg, torch.arange(9)[None], x.dtype)
        with torch.no_grad():
            got = attn(x, cos, sin, attention_mask_4d(None, 9, 9, "cpu", window=3))[0]
            hs = cfg.head_dim
            q = apply_rope(attn.q_proj(x).view(1, 9, 4, hs).transpose(1, 2), cos, sin)[0]  # (H, T, hs)
            k = apply_rope(attn.k_proj(x).view(1, 9, 4, hs).transpose(1, 2), cos, sin)[0]
            v = attn.v_proj(x).view(9, 4, hs).transpose(0, 1)
            return got, attn.o_proj(windowed_attention_by_loops(q, k, v, 3).transpose(0, 1).reshape(9, 4 * hs))
    (got, want), (got64, want64) = both(attn, x), both(copy.deepcopy(attn).double(), x.double())
    # the same exact values by other operations: each side's fp32 error against itself in float64, added
    assert_within(got, want, oracles_bound(got, got64, want, want64), "attention")


def test_mistral_window_changes_far_logits_only():
    full = tiny_llama(seed=5, model_type="mistral")
    windowed = tiny_llama(seed=5, model_type="mistral", sliding_window=4)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = full(ids), windowed(ids)
        a64, b64 = copy.deepcopy(full).double()(ids), copy.deepcopy(windowed).double()(ids)
    # 2 layers of window 4: positions < 4 see the same keys either way, so the exact values agree; the full model
    # runs SDPA's causal kernel, the windowed one an explicit mask, so fp32 may round differently (oracles_bound)
    assert_within(a[:, :4], b[:, :4], oracles_bound(a[:, :4], a64[:, :4], b[:, :4], b64[:, :4]), "logits")
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_mistral_generate_with_cache_matches_full_rerun_past_the_window():
    m = tiny_llama(seed=6, model_type="mistral", sliding_window=3)
    ids = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(7))
    out = m.generate(ids, max_new_tokens=6, eos_token_id=-1)
    seq = decided_rollout(m, ids, 6)  # no cache; every choice decided by more than rounding
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", [dict(model_type="qwen2", qkv_bias=True),
                                    dict(model_type="mistral", sliding_window=4)])
def test_finetune_runs_on_each_family(tmp_path, family):
    # the whole pipeline (calibration, allocation, LoRA on q/k/v/o including the biased ones, training,
    # generation past the window) on a tiny folder of each family
    from slora.cli import finetune
    from tests.support.tiny import tiny_tokenizer
    tok, n = tiny_tokenizer("decoder")
    tok.save(str(tmp_path / "tokenizer.json"))
    save_model(tiny_llama(seed=1, vocab_size=n, **family), tmp_path / "m", tokenizer=tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == family["model_type"]
    rows = "".join(json.dumps({"prompt": "what is the capital of france", "response": "paris"}) + "\n"
                   for _ in range(6))
    (tmp_path / "train.jsonl").write_text(rows)
    out = finetune.main(["--model", str(tmp_path / "m"), "--task", "jsonl", "--jsonl-kind", "instructions",
                         "--train-file", str(tmp_path / "train.jsonl"), "--dev-file", str(tmp_path / "train.jsonl"),
                         "--batch-size", "4", "--calib-n", "4", "--max-steps", "2", "--gen-tokens", "3",
                         "--out", str(tmp_path / "run")])
    ranks = json.loads((out / "ranks.json").read_text())
    assert set(ranks) == {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkvo"}
    assert "bleu4" in json.loads((out / "metrics.json").read_text())["final"]["dev"]
