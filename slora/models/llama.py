"""Full definition of a LLaMA-family decoder (LLaMA 2/3/3.1, SmolLM2, Qwen2/2.5, Mistral), in one file.

References: Hugging Face transformers `models/llama/modeling_llama.py` (module names, RoPE convention,
RMSNorm in fp32, llama3 RoPE scaling), `models/qwen2/modeling_qwen2.py` (biases on q/k/v, not o),
`models/mistral/modeling_mistral.py` and `masking_utils.py` (sliding window: query i sees keys j with
i - window < j <= i), Meta's llama `model.py`, gpt-fast `model.py` (meta-device build).
Module names mirror the Hugging Face weight names (`model.layers.3.self_attn.q_proj`), so a model folder loads with a
strict `load_state_dict` and no renaming, and `ranks.json` keys are the names PEFT users know.

Shape legend: B batch, T sequence, D model dim (hidden_size), H query heads, Hkv key/value heads,
hs head size, F feed-forward dim, V vocabulary.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slora.models.recompute import recomputed


# model_type -> the architecture name transformers writes for it. The three families share this decoder:
# Qwen2 adds biases to q/k/v (qkv_bias), Mistral a sliding attention window.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


@dataclass
class LlamaConfig:
    hidden_size: int = 576                 # D
    intermediate_size: int = 1536          # F, the SwiGLU inner width
    num_hidden_layers: int = 30
    num_attention_heads: int = 9           # H
    num_key_value_heads: int = 3           # Hkv; H % Hkv == 0 (grouped-query attention)
    vocab_size: int = 49152                # V
    head_dim: Optional[int] = None         # hs; None means D // H
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False      # lm_head shares model.embed_tokens.weight
    attention_bias: bool = False           # biases on q/k/v/o (LLaMA's flag)
    qkv_bias: bool = False                 # biases on q/k/v only, none on o (Qwen2)
    sliding_window: Optional[int] = None   # Mistral: each query sees at most this many keys, itself included
    mlp_bias: bool = False                 # biases on gate/up/down
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    model_type: str = "llama"              # "llama", "qwen2" or "mistral": what to_hf_config writes back

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"decoder model_type must be one of {', '.join(ARCHITECTURES)}, got {self.model_type!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of tokens, got {self.sliding_window}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported by the LLaMA model (only 'silu')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")

    # Field-by-field from a Hugging Face config.json dict (llama2.c style: no magic).
    REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

    @classmethod
    def from_hf_config(cls, d: dict) -> "LlamaConfig":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise KeyError(f"LLaMA config.json is missing required field(s): {', '.join(missing)}")
        # transformers >= 5 moves rope_theta/rope_scaling into `rope_parameters`; accept both spellings.
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
            scaling = None
        eos = d.get("eos_token_id")
        model_type = d.get("model_type", "llama")
        return cls(
            model_type=model_type, qkv_bias=model_type == "qwen2", sliding_window=_sliding_window(d, model_type),
            hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            vocab_size=d["vocab_size"], head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)), rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            hidden_act=d.get("hidden_act", "silu"), bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos, pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict:
        d = asdict(self)
        d["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.model_type == "qwen2":  # Qwen2Config spells its window switch this way; qkv_bias is implied
            d.update(use_sliding_window=False, sliding_window=None)
        return d


def _sliding_window(d: dict, model_type: str) -> Optional[int]:
    """The attention window of a config.json dict, or None for full causal attention.

    Mistral: `sliding_window` (null in v0.2 and later). Qwen2: a window only with `use_sliding_window`, and then
    only on layers >= `max_window_layers` (transformers' layer_types); slora has one attention kind for all
    layers, so a Qwen2 config that switches the window on, or any layer_types entry other than full
    attention, is refused rather than run with the wrong attention.
    """
    kinds = set(d.get("layer_types") or [])
    if kinds - {"full_attention"} and model_type != "mistral":
        raise ValueError(f"{model_type} config.json: layer_types {sorted(kinds)}: per-layer attention kinds are "
                         "not supported (only full_attention)")
    if model_type == "qwen2":
        if d.get("use_sliding_window", False):
            raise ValueError(f"qwen2 config.json: use_sliding_window = true (window {d.get('sliding_window')} on "
                             f"layers >= max_window_layers = {d.get('max_window_layers')}) is not supported; "
                             "slora runs Qwen2 with full attention in every layer, as its released configs do")
        return None
    if model_type == "mistral":
        if kinds - {"full_attention", "sliding_attention"} or len(kinds) > 1:
            raise ValueError(f"mistral config.json: layer_types {sorted(kinds)}: mixed attention kinds are not "
                             "supported (one window for every layer)")
        return d.get("sliding_window")
    return None


# -----------------------------------------------------------------------------
# Primitives: RMSNorm, rotary embedding

class LlamaRMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), computed in fp32 and cast back, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        # the casts only where they do something: on an fp32 input each is still a dispatched op (host time)
        h = x if dtype == torch.float32 else x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (h if dtype == torch.float32 else h.to(dtype))


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies θ^(-2i/hs), i < hs/2, with LLaMA-3.1's frequency-dependent scaling when configured.

    llama3 scaling (transformers `_compute_llama3_parameters`): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by `factor`, shorter than
    .../high_freq_factor are kept, and the band between is interpolated smoothly.
    Computed on the fly (hs/2 numbers), so the model owns no buffer that a meta-device build would leave empty.
    """
    hs = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.int64, device=device).float() / hs))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_ctx = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: LlamaConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin tables (B, T, hs) for integer positions (B, T), in fp32 then cast (rotate_half layout)."""
    inv_freq = rope_inv_freq(cfg, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    # The halves that x.chunk(2, -1) gives, taken in the fewest dispatched ops (host time): without autograd two
    # slices; with it split, whose backward is one op where each slice's takes three.
    half = x.shape[-1] // 2
    x1, x2 = x.split(half, dim=-1) if x.requires_grad else (x[..., :half], x[..., half:])
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, H, T, hs) rotated by cos/sin of shape (B, T, hs), or (B, 1, T, hs) already broadcast over heads
    (LlamaModel.prepare makes that view once per forward rather than four per layer)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
    return x * cos + rotate_half(x) * sin


# -----------------------------------------------------------------------------
# Blocks: attention, MLP, decoder layer

class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hs = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, b = cfg.hidden_size, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(D, self.n_head * self.hs, bias=b)
        self.k_proj = nn.Linear(D, self.n_kv * self.hs, bias=b)
        self.v_proj = nn.Linear(D, self.n_kv * self.hs, bias=b)
        b = cfg.attention_bias
        self.o_proj = nn.Linear(self.n_head * self.hs, D, bias=b)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)    # (B, Hkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)    # (B, Hkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and "slot" in cache:  # a preallocated cache (models.decode): write at the step's slot
            cache["k"].index_copy_(2, cache["slot"], k)  # (B, Hkv, S, hs), S the cache's fixed length
            cache["v"].index_copy_(2, cache["slot"], v)
            # the G = H/Hkv query heads of each kv head as G·T queries of that head (q head h reads kv head h // G,
            # repeat_interleave's layout): the cache is read in place instead of copied G times per layer and step
            G = self.n_head // self.n_kv
            qg = q.reshape(B, self.n_kv, G * T, self.hs)  # (B, Hkv, G·T, hs)
            mg = mask[:, :, None].expand(B, 1, G, T, mask.shape[-1]).reshape(B, 1, G * T, mask.shape[-1])
            y = F.scaled_dot_product_attention(qg, cache["k"], cache["v"], attn_mask=mg)  # (B, Hkv, G·T, hs)
            y = y.reshape(B, self.n_head, T, self.hs).transpose(1, 2).reshape(B, T, self.n_head * self.hs)
            return self.o_proj(y)
        if cache is not None:  # generation: keys/values of earlier positions are kept, not recomputed
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)  # (B, Hkv, S, hs), S = past + T
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        if mask is None:  # grouped-query attention: each kv head serves H/Hkv query heads, read in place
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_head)
        else:
            if self.n_kv != self.n_head:  # with an explicit mask the fused kernels want equal head counts
                k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, H, S, hs)
                v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)  # (B, H, S, hs)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: (B, 1, T, S) bool
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.hs)  # (B, T, H*hs)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        D, Fd, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(D, Fd, bias=b)
        self.up_proj = nn.Linear(D, Fd, bias=b)
        self.down_proj = nn.Linear(Fd, D, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# The model: body (`model.*`) and causal-LM head (`lm_head`)

def attention_mask_4d(attention_mask: Optional[torch.Tensor], T: int, S: int, device,
                      window: Optional[int] = None, padded: Optional[bool] = None) -> Optional[torch.Tensor]:
    """Causal mask combined with key padding, (B, 1, T, S) bool with True = may attend; None when plain causal.

    The T queries are the last T of S positions (S > T while generating with a cache). `window` (Mistral) keeps
    only keys j with i - window < j <= i, counted in cache positions as transformers' sliding_window_overlay
    does (left padding counts). A query row with no visible key (a left-pad position) may see itself so that
    softmax stays finite; its output is never used.

    `padded`: whether attention_mask holds a 0, when the caller knows it from a host copy (the training loop reads
    it from the CPU batch); None asks the mask itself, a host read that on a GPU waits for the device's queue.
    """
    if padded is None and T == S and attention_mask is not None:
        padded = not bool(attention_mask.all())
    if T == S and (attention_mask is None or not padded) and (window is None or window >= S):
        return None  # SDPA's is_causal path
    q_pos = torch.arange(S - T, S, device=device)  # (T,) absolute position of each query
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    visible = k_pos <= q_pos[:, None]  # (T, S) causal
    if window is not None:
        visible = visible & (k_pos > q_pos[:, None] - window)  # (T, S) sliding window
    mask = visible[None, None]  # (1, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    own = torch.arange(S, device=device)[None, :] == q_pos[:, None]  # (T, S)
    return mask | (own & ~mask.any(-1, keepdim=True))


class LlamaModel(nn.Module):
    # True: in training, each layer's activations are recomputed in the backward pass instead of kept; an int n: the
    # first n layers only (models.recompute). Non-reentrant torch.utils.checkpoint: the reentrant variant gives LoRA
    # no gradient (transformers#26221)
    activation_checkpointing = False

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def prepare(self, input_ids, attention_mask=None, position_ids=None, past: int = 0, padded=None):
        """Embeddings and the per-forward constants every layer needs: (x, cos, sin, mask).

        Split out so that layer-by-layer calibration can run the layers one at a time over cached inputs.
        Positions default to past..past+T-1, as in transformers' forward (generation passes mask-derived ones).
        attention_mask covers all past + T positions; `padded`: see attention_mask_4d.
        """
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)  # (B, T, D)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)  # (B, T, hs) each
        mask = attention_mask_4d(attention_mask, T, past + T, input_ids.device, self.config.sliding_window, padded)
        return x, cos[:, None], sin[:, None], mask  # cos, sin (B, 1, T, hs): broadcast over heads once, not per layer

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, padded=None):
        """Final hidden states (B, T, D). `cache`: one dict per layer, filled and extended in place (generation).
        `padded`: see attention_mask_4d."""
        past = cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0
        x, cos, sin, mask = self.prepare(input_ids, attention_mask, position_ids, past, padded)
        for i, layer in enumerate(self.layers):
            if recomputed(self.activation_checkpointing, i) and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, None if cache is None else cache[i])
        return self.norm(x)  # (B, T, D)


# generate(): decoding steps between two host reads of "has every row finished?" (see there)
GEN_SYNC_EVERY = 8


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def tie_weights(self):
        """Re-point lm_head at the embedding after `load_state_dict(assign=True)` replaced the Parameters."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, padded=None, hidden=False):
        """Logits (B, T, V); with `hidden` the final hidden states (B, T, D), for a caller that applies the LM head
        itself (the training loss runs it in chunks or at some positions only, slora.train.objective). `cache`:
        see LlamaModel.forward; `padded`: see attention_mask_4d."""
        h = self.model(input_ids, attention_mask, position_ids, cache, padded)  # (B, T, D)
        return h if hidden else self.lm_head(h)  # (B, T, V)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None, early_stop=True):
        """Greedy decoding with a key/value cache: the prompt is run once, then one token per step.

        input_ids (B, T) may be left-padded (attention_mask 0 on the left); positions follow the mask, as in
        transformers' generate. eos_token_id: an id or a list of ids (default: the config's). Returns
        (B, T + n); rows that finished early are filled with their eos id. `early_stop` False runs all
        max_new_tokens steps whatever the rows do, with the same output: a caller whose forwards must stay in
        step with other processes' (a model sharded with FSDP2) passes it.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        cache = [{} for _ in self.model.layers]
        width = input_ids.shape[1]
        finished_at = []  # per step, () bool on the device: every row had finished after it
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = self(input_ids, attention_mask, pos, cache)[:, -1]  # (B, V)
        for step in range(max_new_tokens):
            nxt = logits.argmax(-1)  # (B,)
            if len(eos):
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
                finished_at.append(done.all())
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt[:, None])], dim=1)
            # The host asks whether every row has finished only every GEN_SYNC_EVERY tokens: each ask waits for the
            # device to drain, and a small model's decoding step is shorter than that wait. Up to GEN_SYNC_EVERY - 1
            # extra steps then append eos to finished rows only, and are cut off below.
            if step == max_new_tokens - 1:
                break
            if early_stop and (step + 1) % GEN_SYNC_EVERY == 0 and finished_at and bool(finished_at[-1]):
                break
            pos = pos[:, -1:] + 1  # (B, 1)
            logits = self(nxt[:, None], attention_mask, pos, cache)[:, -1]
        if finished_at:  # as many columns as a check after every token gives: up to the first step all had finished
            finished = torch.stack(finished_at).nonzero()  # (k, 1): steps after which every row was done
            if len(finished):
                input_ids = input_ids[:, :width + int(finished[0, 0]) + 1]
        return input_ids
