"""Full definition of an MPNet encoder (post-LayerNorm transformer with a relative-position attention bias).

References: Hugging Face transformers `models/mpnet/modeling_mpnet.py` (module names, bucket function, heads),
Song et al. 2020 "MPNet" (arXiv 2004.09297), Raffel et al. 2020 "T5" §2.1 (bucketed relative positions).
Module names mirror the Hugging Face weight names (`encoder.layer.3.attention.attn.q`), so a model folder such as
all-mpnet-base-v2 loads with a strict `load_state_dict` and no renaming, and ranks.json keys are PEFT's names.

Why a file of its own rather than a third variant inside bert.py: MPNet shares BERT's feed-forward half
(`intermediate.dense`, `output.dense`, `output.LayerNorm`) and RoBERTa's classification head, and those blocks are
imported from bert.py unchanged. But its attention half is named differently (`attention.attn.{q,k,v,o}` and
`attention.LayerNorm`, where BERT has `attention.self.{query,key,value}` and `attention.output.{dense,LayerNorm}`),
its embeddings have no token types, and its encoder owns the shared bias table. Folding that into bert.py would
put an `if mpnet` in the embeddings, the attention, the encoder and the config, and make BERT's forward pass
harder to read for a model it does not concern. Here each forward pass reads straight through.

What differs from RoBERTa:
- attention logits get a learned bias b[bucket(j - i), head], one table `encoder.relative_attention_bias`
  (num_buckets, H) shared by every layer (T5-style bidirectional buckets, 32 buckets, max distance 128);
- no token-type embeddings (slora's batches may carry token_type_ids; MPNet, as in transformers, has none to add);
- position ids start at padding_idx + 1 = 2 (fairseq's make_positions, as RoBERTa).

Shape legend: B batch, T sequence, D model dim (hidden_size), H heads, hs head size, F feed-forward dim,
nb number of relative-position buckets.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slora.models.bert import ACT, BertIntermediate, BertOutput, BertPooler, RobertaClassificationHead, new_head
from slora.models.recompute import recomputed

# transformers' MPNetEncoder.relative_position_bucket fixes max_distance at 128 (no config field carries it).
MAX_DISTANCE = 128
# transformers' MPNetEmbeddings fixes padding_idx at 1 whatever config.json says; slora requires the config to agree.
PADDING_IDX = 1


@dataclass
class MPNetConfig:
    model_type: str = "mpnet"
    vocab_size: int = 30527
    hidden_size: int = 768                # D
    num_hidden_layers: int = 12
    num_attention_heads: int = 12         # H; hs = D // H
    intermediate_size: int = 3072         # F
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514    # 512 tokens + the 2 ids below the first position (pad 1, unused 0)
    relative_attention_num_buckets: int = 32  # nb; transformers always buckets into 32 (see __post_init__)
    layer_norm_eps: float = 1e-5
    pad_token_id: int = PADDING_IDX
    hidden_dropout_prob: float = 0.1      # used only in train mode
    attention_probs_dropout_prob: float = 0.1
    add_pooling_layer: bool = True        # `pooler.dense`: all-mpnet-base-v2 carries one (unused by the task head)

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    def __post_init__(self):
        if self.model_type != "mpnet":
            raise ValueError(f"MPNetConfig model_type must be 'mpnet', got {self.model_type!r}")
        if self.hidden_act not in ACT:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACT)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        # transformers calls compute_position_bias with its default num_buckets=32 and hard-codes padding_idx=1;
        # another value would make slora and transformers compute different models from the same weights.
        if self.relative_attention_num_buckets != 32:
            raise ValueError(f"relative_attention_num_buckets {self.relative_attention_num_buckets}: transformers' "
                             "MPNet always uses 32 buckets, so slora supports only 32")
        if self.pad_token_id != PADDING_IDX:
            raise ValueError(f"pad_token_id {self.pad_token_id}: transformers' MPNet counts positions from "
                             f"padding_idx {PADDING_IDX} whatever the config says; slora supports only {PADDING_IDX}")

    @classmethod
    def from_hf_config(cls, d: dict) -> "MPNetConfig":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise KeyError(f"mpnet config.json is missing required field(s): {', '.join(missing)}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
            hidden_act=d.get("hidden_act", "gelu"), max_position_embeddings=d.get("max_position_embeddings", 512),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),  # missing fields take transformers' MPNetConfig defaults
            pad_token_id=d.get("pad_token_id", PADDING_IDX),
            hidden_dropout_prob=d.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=d.get("attention_probs_dropout_prob", 0.1),
        )

    def to_hf_config(self) -> dict:
        d = asdict(self)
        d.pop("add_pooling_layer")
        d["architectures"] = ["MPNetModel"]
        return d


# -----------------------------------------------------------------------------
# Relative positions (T5 §2.1, as MPNet's fairseq code and transformers implement it)

def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bucket of each key-minus-query offset j - i, integer tensor in [0, num_buckets).

    Half the buckets serve keys at or left of the query (j <= i), the other half, offset by num_buckets/2, keys to
    its right. Within a half, distances 0 .. nb/4 - 1 get a bucket each; larger distances share buckets spaced
    logarithmically up to max_distance, and everything beyond falls in the last bucket. The log is taken in
    float32, as in the code the checkpoint was trained with, so bucket edges match it exactly.
    """
    half = num_buckets // 2                           # 16: buckets per direction
    exact = half // 2                                 # 8: distances with a bucket of their own
    distance = (-relative_position).abs()             # |i - j|
    right = (relative_position > 0).long() * half     # keys after the query use the upper half
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return right + torch.where(distance < exact, distance, far)


# -----------------------------------------------------------------------------
# Embeddings

def position_ids_for(cfg: MPNetConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions: cumulative count of non-pad tokens + padding_idx; pads stay at padding_idx (as RoBERTa)."""
    real = input_ids.ne(cfg.pad_token_id).long()  # (B, T)
    return real.cumsum(1) * real + cfg.pad_token_id


class MPNetEmbeddings(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.LayerNorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids_for(self.config, input_ids))
        return self.dropout(self.LayerNorm(x))  # (B, T, D)


# -----------------------------------------------------------------------------
# Blocks: self-attention with the bias, attention (residual + LayerNorm), layer

class MPNetSelfAttention(nn.Module):
    """softmax(q kᵀ/√hs + bias) v, then the output projection `o` (which MPNet keeps inside `attn`)."""

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_head, self.hs = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, bias):
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = self.k(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        v = self.v(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        p = self.dropout_p if self.training else 0.0
        # bias: (B or 1, H, T, T) float, relative-position bias with -inf on padded keys; SDPA adds it to the
        # scaled logits and wants it in q's dtype (bf16 under autocast; -inf survives the cast).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=p)  # (B, H, T, hs)
        return self.o(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class MPNetAttention(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(attn(x)))."""

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attn = MPNetSelfAttention(cfg)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, bias):
        return self.LayerNorm(x + self.dropout(self.attn(x, bias)))  # (B, T, D)


class MPNetLayer(nn.Module):
    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.attention = MPNetAttention(cfg)
        self.intermediate = BertIntermediate(cfg)  # same tensors and maths as transformers' MPNetIntermediate
        self.output = BertOutput(cfg)              # likewise MPNetOutput

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class MPNetEncoder(nn.Module):
    # True: in training, each layer's activations are recomputed in the backward pass instead of kept; an int n: the
    # first n layers only (models.recompute). Non-reentrant torch.utils.checkpoint: the reentrant variant gives LoRA
    # no gradient (transformers#26221)
    activation_checkpointing = False

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.layer = nn.ModuleList(MPNetLayer(cfg) for _ in range(cfg.num_hidden_layers))
        # one (nb, H) table for all layers: MPNet computes the bias once per forward pass and adds it everywhere
        self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_attention_heads)

    def position_bias(self, T: int, device) -> torch.Tensor:
        """(1, H, T, T): bias[h, i, j] = table[bucket(j - i), h], from token indices (as transformers, which passes
        no position ids here): right padding leaves the real tokens' offsets unchanged."""
        pos = torch.arange(T, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.relative_attention_bias.num_embeddings)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # (T, T, H) -> (1, H, T, T)

    def forward(self, x, bias):
        for i, layer in enumerate(self.layer):
            if recomputed(self.activation_checkpointing, i) and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, bias, use_reentrant=False)
            else:
                x = layer(x, bias)
        return x


# -----------------------------------------------------------------------------
# The model

class MPNetModel(nn.Module):
    """Encoder body. forward returns the last hidden states (B, T, D); `pool` gives the pooler output (B, D)."""

    def __init__(self, cfg: MPNetConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = MPNetEmbeddings(cfg)
        self.encoder = MPNetEncoder(cfg)
        self.pooler = BertPooler(cfg) if cfg.add_pooling_layer else None  # transformers' MPNetPooler is BERT's

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """token_type_ids is accepted so that every encoder takes the same batch; MPNet has no segment embeddings."""
        B, T = input_ids.shape
        bias = self.encoder.position_bias(T, input_ids.device)  # (1, H, T, T)
        if attention_mask is not None:
            keys = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys
            bias = bias.masked_fill(~keys, float("-inf"))  # (B, H, T, T)
        return self.encoder(self.embeddings(input_ids), bias)

    def pool(self, hidden):
        if self.pooler is None:
            raise ValueError("this model has no pooler (pooler.dense.*); use the hidden states instead")
        return self.pooler(hidden)


# -----------------------------------------------------------------------------
# Sequence classification, named like transformers' MPNetForSequenceClassification so that adapter keys
# (`mpnet.encoder.layer.0.attention.attn.q`, `classifier.dense`, `classifier.out_proj`) are PEFT's.

class MPNetForSequenceClassification(nn.Module):
    """logits = out_proj(dropout(tanh(dense(dropout(h[:, 0])))))  (the <s> token; no pooler, as RoBERTa).

    transformers' MPNetClassificationHead has RoBERTa's head's tensors and maths, so bert.py's class serves."""

    def __init__(self, cfg: MPNetConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.mpnet = MPNetModel(cfg)
        self.classifier = RobertaClassificationHead(cfg, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.mpnet(input_ids, attention_mask, token_type_ids))  # (B, num_labels)


def for_sequence_classification(body: MPNetModel, num_labels: int, seed: int = 0) -> MPNetForSequenceClassification:
    """Wrap a loaded MPNet in MPNetForSequenceClassification with a freshly initialized (seeded) head.

    transformers builds the task model's MPNetModel with add_pooling_layer=False, so a model folder's pooler is
    dropped here (it would otherwise be a frozen module that PEFT's base model does not have)."""
    cfg = body.config
    with torch.device("meta"):
        model = MPNetForSequenceClassification(cfg, num_labels)
    body.pooler, cfg.add_pooling_layer = None, False
    model.mpnet = body
    new_head(model.classifier, body, seed)
    return model
