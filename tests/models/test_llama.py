"""LLaMA decoder: causality, grouped-query attention against a naive loop, RoPE scaling, generation."""
import copy
import math

import pytest
import torch

from slora.models import llama
from slora.models.llama import apply_rope, rope_cos_sin, rope_inv_freq
from tests.support.bounds import assert_within, decided_rollout, oracles_bound
from tests.support.tiny import tiny_llama, tiny_llama_config


def naive_attention(q, k, v):
    """Causal softmax attention written as loops over heads and query positions. q,k,v: (H, T, hs)."""
    H, T, hs = q.shape
    out = torch.zeros_like(q)
    for h in range(H):
        for t in range(T):
            s = torch.stack([q[h, t] @ k[h, j] for j in range(t + 1)]) / math.sqrt(hs)
            w = torch.softmax(s, 0)
            out[h, t] = sum(w[j] * v[h, j] for j in range(t + 1))
    return out


def test_causality_future_tokens_do_not_move_past_logits():
    m = tiny_llama(seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 61, (2, 12), generator=g)
    changed = ids.clone()
    changed[:, 7:] = torch.randint(0, 61, (2, 5), generator=g)
    with torch.no_grad():
        a, b = m(ids), m(changed)
    # the same shapes, kernels and values at positions < 7 (later keys are masked: exactly 0 weight): bit-identical
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # the change is visible where it should be


def attention_and_loops(attn, cfg, x, n_kv):
    """(the layer's attention output, the naive loops' output) for x (1, T, D), in x's dtype."""
    T = x.shape[1]
    cos, sin = rope_cos_sin(cfg, torch.arange(T)[None], x.dtype)
    with torch.no_grad():
        got = attn(x, cos, sin, None)[0]
        hs = cfg.head_dim
        q = attn.q_proj(x).view(T, 4, hs).transpose(0, 1)[None]
        k = attn.k_proj(x).view(T, n_kv, hs).transpose(0, 1)[None]
        v = attn.v_proj(x).view(T, n_kv, hs).transpose(0, 1)
        q, k = apply_rope(q, cos, sin)[0], apply_rope(k, cos, sin)[0]  # (H, T, hs), (Hkv, T, hs)
        group = 4 // n_kv
        k = torch.stack([k[h // group] for h in range(4)])  # query head h reads kv head h // group
        v = torch.stack([v[h // group] for h in range(4)])
        y = naive_attention(q, k, v).transpose(0, 1).reshape(T, 4 * hs)
        return got, attn.o_proj(y)


def test_attention_matches_naive_loop_for_mha_and_gqa():
    # GQA with Hkv == H is plain multi-head attention; with Hkv < H each kv head serves H/Hkv query heads.
    for n_kv in (4, 2, 1):
        m = tiny_llama(seed=2, num_key_value_heads=n_kv, num_hidden_layers=1)
        attn, cfg = m.model.layers[0].self_attn, m.config
        x = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        got, want = attention_and_loops(attn, cfg, x, n_kv)
        got64, want64 = attention_and_loops(copy.deepcopy(attn).double(), cfg, x.double(), n_kv)
        # the same exact values by other operations: each side's fp32 error against itself in float64, added
        assert_within(got, want, oracles_bound(got, got64, want, want64), f"n_kv {n_kv}")


def test_padding_mask_leaves_real_positions_unchanged():
    # Right padding with mask 0 must not change the logits of the real tokens.
    m = tiny_llama(seed=4)
    ids = torch.randint(3, 61, (1, 8), generator=torch.Generator().manual_seed(5))
    padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 8, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)
    m64 = copy.deepcopy(m).double()
    with torch.no_grad():
        a, a64 = m(padded, mask)[:, :8], m64(padded, mask)[:, :8]
        b, b64 = m(ids), m64(ids)
    # the same exact values, by the masked path's kernels against the causal one's (bounds.oracles_bound)
    assert_within(a, b, oracles_bound(a, a64, b, b64), "logits")


def test_llama3_rope_scaling_bands():
    sc = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    cfg = tiny_llama_config(rope_scaling=sc, rope_theta=500000.0, hidden_size=64, num_attention_heads=1,
                            num_key_value_heads=1)
    base = rope_inv_freq(tiny_llama_config(rope_theta=500000.0, hidden_size=64, num_attention_heads=1,
                                           num_key_value_heads=1))
    scaled = rope_inv_freq(cfg)
    wavelen = 2 * math.pi / base
    high = wavelen < 64 / 4   # short wavelengths: untouched
    low = wavelen > 64 / 1    # long wavelengths: divided by factor
    assert high.any() and low.any()
    # the same fp32 powers on the same inputs, then a division by 8 = 2^3, exact in binary: bit-identical
    torch.testing.assert_close(scaled[high], base[high], rtol=0, atol=0)
    torch.testing.assert_close(scaled[low], base[low] / 8, rtol=0, atol=0)
    mid = ~high & ~low
    assert bool(((scaled[mid] <= base[mid]) & (scaled[mid] >= base[mid] / 8)).all())


def test_tied_embeddings_share_storage():
    m = tiny_llama(tie_word_embeddings=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_generate_greedy_matches_argmax_rollout_and_left_padding():
    m = tiny_llama(seed=6)
    ids = torch.randint(3, 61, (1, 5), generator=torch.Generator().manual_seed(7))
    out = m.generate(ids, max_new_tokens=4, eos_token_id=-1)
    seq = decided_rollout(m, ids, 4)  # no cache; every choice decided by more than rounding
    assert torch.equal(out, seq)
    # the same prompt left-padded in a batch gives the same continuation
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)], 1)
    out2 = m.generate(padded, mask, max_new_tokens=4, eos_token_id=-1)
    assert torch.equal(out2[:, 3:], out)


def test_generate_stops_where_a_check_after_every_token_stops(monkeypatch):
    # generate asks the host whether every row has finished only every GEN_SYNC_EVERY tokens and cuts the extra
    # columns: the output must be what a check after every token (GEN_SYNC_EVERY = 1, the old loop) gives
    m = tiny_llama(seed=6)
    ids = torch.randint(3, 61, (3, 5), generator=torch.Generator().manual_seed(7))
    free = m.generate(ids, max_new_tokens=20, eos_token_id=-1)[:, 5:]  # (3, 20): no stop id
    for stop_after in (1, 3, 9):  # every row meets a stop id by then: some earlier, finished rows fill with eos
        eos = sorted(set(free[:, stop_after - 1].tolist()))
        monkeypatch.setattr(llama, "GEN_SYNC_EVERY", 1)
        each = m.generate(ids, max_new_tokens=20, eos_token_id=eos)
        monkeypatch.setattr(llama, "GEN_SYNC_EVERY", 8)
        every8 = m.generate(ids, max_new_tokens=20, eos_token_id=eos)
        assert each.shape[1] <= 5 + stop_after and torch.equal(every8, each), stop_after


def test_bad_config_errors():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_llama_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        tiny_llama_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
