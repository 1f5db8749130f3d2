"""Greedy decoding with a preallocated key/value cache, and on CUDA one CUDA graph per decoding step.

LlamaForCausalLM.generate grows its cache by concatenation and dispatches every op of every layer from the host at
each token: for a small model (SmolLM2-135M: 30 layers, thousands of ops per token) the GPU then waits on the host.
`generate_static` computes the same greedy continuation with fixed shapes and fixed addresses:
- the prompt runs once through the model's own forward (the same ops as generate's first step);
- its keys and values are copied into buffers of the final length S = T + max_new_tokens, (B, Hkv, S, hs) per
  layer; each step writes its key and value at slot T + step (index_copy_) and attends over the whole buffer under a
  mask of the slots written so far (B, 1, 1, S): the slots not yet written are masked out, so the step attends to
  exactly the keys generate's step attends to;
- one step (embedding, rope, every layer, norm, LM head, argmax, the eos bookkeeping) touches only these buffers,
  so on CUDA it is captured once as a CUDA graph and replayed per token (torch.cuda.CUDAGraph): one launch per
  token instead of one per op.
What differs from generate is rounding only: the attention sums run over S slots (the masked ones add exact zeros)
instead of the past + 1 that exist, which a blocked reduction may group differently. tests/models/test_decode.py
holds the generated tokens equal to generate's on the CPU and the logits within a stated bound; the gpu tier holds
the graph's tokens equal to the same steps run without it.

Shape legend: B batch, T prompt length, S cache slots (T + max_new_tokens), D model dim, V vocabulary, Hkv key/value
heads, hs head size.
"""
from __future__ import annotations

import torch

from slora.models.llama import GEN_SYNC_EVERY, LlamaForCausalLM, rope_cos_sin


@torch.no_grad()
def generate_static(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 32, eos_token_id=None, graph: bool | None = None) -> torch.Tensor:
    """generate's greedy continuation (B, T + n) of left-padded prompts `input_ids` (B, T); `graph` (default: on
    CUDA) replays each decoding step as one CUDA graph. Rows that finish early are filled with their eos id, and
    the output stops at the first step after which every row had finished, as generate's does."""
    B, T = input_ids.shape
    device = input_ids.device
    graph = device.type == "cuda" if graph is None else graph
    if graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
    if max_new_tokens < 1:
        return input_ids
    cfg, body = model.config, model.model
    mask2d = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=device, dtype=torch.long)
    S = T + max_new_tokens

    # the prompt: the model's own forward with a growing cache, then its keys and values moved into S slots
    cache = [{} for _ in body.layers]
    pos = (mask2d.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): positions follow the mask, as in generate
    logits = model(input_ids, mask2d, pos, cache)[:, -1]  # (B, V)
    slot = torch.full((1,), T - 1, dtype=torch.long, device=device)  # the slot the next step writes, less one
    for c in cache:
        k, v = c.pop("k"), c.pop("v")  # (B, Hkv, T, hs)
        c["k"] = k.new_zeros(B, k.shape[1], S, k.shape[3])  # (B, Hkv, S, hs)
        c["v"] = v.new_zeros(B, v.shape[1], S, v.shape[3])
        c["k"][:, :, :T], c["v"][:, :, :T] = k, v
        c["slot"] = slot  # LlamaAttention writes its step's key and value there
    keys = torch.zeros(B, S, dtype=torch.bool, device=device)  # (B, S): the slots a query may attend to
    keys[:, :T] = mask2d.bool()
    window = cfg.sliding_window
    slots = torch.arange(S, device=device)  # (S,)

    # the step's state, all on the device: the last token, its position, the rows done, the output so far
    last = logits.argmax(-1)  # (B,) the first new token
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # (B, n)
    all_done = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)  # after step i, every row had finished
    step_i = torch.zeros(1, dtype=torch.long, device=device)
    pos_last = pos[:, -1:].clone()  # (B, 1)

    def emit():
        """Record `last` as the token of step step_i (eos for rows already done) and update `done`."""
        nxt = last
        if len(eos):
            nxt = torch.where(done, eos[0], nxt)
            done.logical_or_((nxt[:, None] == eos[None, :]).any(-1))
            all_done.index_copy_(0, step_i, done.all()[None])
        out.index_copy_(1, step_i, nxt[:, None])
        last.copy_(nxt)

    def step():
        """One token: the forward of `last` at the next slot, then emit its argmax."""
        slot.add_(1)
        step_i.add_(1)
        pos_last.add_(1)
        keys.index_fill_(1, slot, True)
        visible = keys if window is None else keys & (slots > slot - window)  # (B, S)
        x = body.embed_tokens(last[:, None])  # (B, 1, D)
        cos, sin = rope_cos_sin(cfg, pos_last, x.dtype)  # (B, 1, hs)
        cos, sin, mask = cos[:, None], sin[:, None], visible[:, None, None, :]  # (B, 1, 1, hs), (B, 1, 1, S)
        for layer, c in zip(body.layers, cache):
            x = layer(x, cos, sin, mask, c)
        last.copy_(model.lm_head(body.norm(x))[:, -1].argmax(-1))  # (B,)
        emit()

    emit()  # step 0: the prompt's own next token
    replay = step
    for i in range(1, max_new_tokens):
        # the host asks whether every row has finished every GEN_SYNC_EVERY tokens, as generate does
        if i % GEN_SYNC_EVERY == 0 and bool(all_done[i - 1]):
            break
        if graph and i == 2:  # step 1 ran eagerly (kernels chosen, memory allocated); capture step 2 onwards
            replay = _captured(step)
        replay()
    n = max_new_tokens
    if len(eos):
        finished = all_done.nonzero()  # (k, 1)
        if len(finished):
            n = int(finished[0, 0]) + 1
    return torch.cat([input_ids, out[:, :n]], dim=1)


def _captured(step):
    """`step` captured as a CUDA graph: the returned function replays it (each replay is one more step)."""
    g = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        step()
    return g.replay
