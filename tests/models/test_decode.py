"""slora.models.decode: greedy decoding over a preallocated key/value cache gives generate's tokens.

The two paths differ in rounding only: the static one attends over all S = T + n cache slots, the slots not yet
written masked out (exact zeros in the softmax sums), where generate attends over the past + 1 keys that exist; a
blocked reduction may group the sums differently. On the tiny fp32 models here the greedy choices sit far from
ties (checked: each choice of the rollout wins by more than twice its logits' measured fp32 error,
tests.support.bounds.assert_argmax_decided), so the tokens must be equal; the logits of one step agree within each
path's own fp32 error against the same step in float64 (bounds.oracles_bound).
"""
import copy

import pytest
import torch

from slora.models import decode, llama
from slora.models.lora import apply_lora, lora_modules, merged
from tests.support.bounds import assert_argmax_decided, assert_within, oracles_bound
from tests.support.tiny import randomize_lora, tiny_llama


def prompts(seed: int, B: int, T: int, vocab: int = 61) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (B, T): left-padded prompts of random lengths 1..T (id 0 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] >= (T - lengths)[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("seed,B,T,kw", [
    (0, 1, 5, {}),
    (1, 4, 9, {}),
    (2, 3, 7, dict(num_key_value_heads=4)),  # no grouped-query attention
    (3, 5, 12, dict(model_type="mistral", sliding_window=6)),  # the window cuts into the cache while decoding
    (4, 2, 3, dict(model_type="qwen2", qkv_bias=True)),
])
@pytest.mark.parametrize("lora", [False, True])
def test_static_cache_gives_the_tokens_of_generate(seed, B, T, kw, lora):
    m = tiny_llama(seed=seed, **kw)
    if lora:  # LoRA on every projection, B non-zero: the branches run in the step too
        apply_lora(m, {n: 2 for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and "lm_head" not in n},
                   4.0)
        randomize_lora(m, seed=seed)
        m.eval()
    ids, mask = prompts(seed, B, T)
    free = m.generate(ids, mask, max_new_tokens=20, eos_token_id=-1)
    whole = torch.cat([mask, torch.ones(B, 20, dtype=torch.long)], 1)
    with torch.no_grad():  # the rollout's logits at the 20 chosen positions, and in float64
        assert_argmax_decided(m(free, whole)[:, T - 1:-1], copy.deepcopy(m).double()(free, whole)[:, T - 1:-1],
                              "rollout")
    assert torch.equal(decode.generate_static(m, ids, mask, 20, eos_token_id=-1, graph=False), free)
    for stop_after in (1, 4, 11):  # stop ids every row meets by then; finished rows fill with eos, output is cut
        eos = sorted(set(free[:, T + stop_after - 1].tolist()))
        want = m.generate(ids, mask, max_new_tokens=20, eos_token_id=eos)
        got = decode.generate_static(m, ids, mask, 20, eos_token_id=eos, graph=False)
        assert torch.equal(got, want), stop_after


def static_and_growing_step(m) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of one decoding step through the preallocated cache, the model's forward on the grown cache)."""
    ids, mask = prompts(5, 3, 8)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    grow = [{} for _ in m.model.layers]
    with torch.no_grad():
        m(ids, mask, pos, grow)
        nxt = torch.tensor([[7], [11], [13]])
        mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        want = m(nxt, mask2, pos[:, -1:] + 1, grow)[:, -1]  # (B, V)
        S = 8 + 4
        static, slot = [], torch.tensor([8])
        for c in grow:
            k = torch.zeros(3, c["k"].shape[1], S, c["k"].shape[3], dtype=c["k"].dtype)
            v = torch.zeros(3, c["v"].shape[1], S, c["v"].shape[3], dtype=c["v"].dtype)
            k[:, :, :9], v[:, :, :9] = c["k"], c["v"]
            k[:, :, 8:9], v[:, :, 8:9] = 0.0, 0.0  # the step writes its own slot
            static.append({"k": k, "v": v, "slot": slot})
        keys = torch.zeros(3, S, dtype=torch.bool)
        keys[:, :9] = mask2.bool()
        x = m.model.embed_tokens(nxt)
        cos, sin = llama.rope_cos_sin(m.config, pos[:, -1:] + 1, x.dtype)
        for layer, c in zip(m.model.layers, static):
            x = layer(x, cos[:, None], sin[:, None], keys[:, None, None, :], c)
        return m.lm_head(m.model.norm(x))[:, -1], want


def test_a_static_step_computes_the_logits_of_a_growing_step():
    """One decoding step through the preallocated cache against the model's forward on the grown cache."""
    m = tiny_llama(seed=5)
    got, want = static_and_growing_step(m)
    got64, want64 = static_and_growing_step(copy.deepcopy(m).double())
    # the same exact logits by reductions over S slots against over the keys that exist
    assert_within(got, want, oracles_bound(got, got64, want, want64), "step logits")
    assert want.abs().max() > 0.1  # not a vacuous comparison of near-zero logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_block_restores_the_base_bit_for_bit(dtype):
    """In bf16, W + Δ − Δ is not W: `merged` puts the saved W back, exactly, and leaves the layers unmerged."""
    m = tiny_llama(seed=2).to(dtype)
    apply_lora(m, {"model.layers.0.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 2}, 8.0)
    randomize_lora(m, seed=4)
    m.eval()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    ids = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = m(ids).float()
        with merged(m):
            assert all(x.merged for x in lora_modules(m).values())
            inside = m(ids).float()
            moved = any(not torch.equal(p, before[n]) for n, p in m.named_parameters())
    assert moved  # the block did merge something
    assert not any(x.merged for x in lora_modules(m).values())
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), n
    # merged inference computes the same function up to the dtype's rounding of W + Δ
    tol = 0.05 if dtype == torch.bfloat16 else 1e-4
    assert (inside - plain).abs().max() <= tol * plain.abs().max()


def test_graphs_need_cuda():
    m = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        decode.generate_static(m, torch.ones(1, 2, dtype=torch.long), max_new_tokens=2, graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replays_the_same_steps(dtype):
    """The captured step is the same kernels as the eager static step: tokens equal to it exactly; in fp32 (TF32
    off) also equal to generate's."""
    m = tiny_llama(seed=3).cuda().to(dtype)
    ids, mask = (t.cuda() for t in prompts(3, 4, 9))
    eager = decode.generate_static(m, ids, mask, 24, eos_token_id=-1, graph=False)
    graphed = decode.generate_static(m, ids, mask, 24, eos_token_id=-1, graph=True)
    assert torch.equal(graphed, eager)
    if dtype == torch.float32:
        assert torch.equal(graphed, m.generate(ids, mask, max_new_tokens=24, eos_token_id=-1))
    eos = sorted(set(eager[:, 9 + 10].tolist()))
    assert torch.equal(decode.generate_static(m, ids, mask, 24, eos_token_id=eos, graph=True),
                       decode.generate_static(m, ids, mask, 24, eos_token_id=eos, graph=False))
