"""Full definition of a BERT / RoBERTa encoder (post-LayerNorm transformer), in one file.

References: Hugging Face transformers `models/bert/modeling_bert.py` and `models/roberta/modeling_roberta.py`
(module names, RoBERTa's position ids), Devlin et al. 2018, Liu et al. 2019.
Module names mirror the Hugging Face weight names (`encoder.layer.3.attention.self.query`), so a model folder loads
with a strict `load_state_dict` and no renaming.

BERT and RoBERTa share every block; they differ only in position ids: BERT counts 0..T-1, RoBERTa counts
non-pad tokens from padding_idx + 1 (pads keep padding_idx), as fairseq did.

Shape legend: B batch, T sequence, D model dim (hidden_size), H heads, hs head size, F feed-forward dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from slora.models.recompute import recomputed

# Activations by their config.json name. "gelu" is the exact erf form; "gelu_new" the tanh approximation.
ACT = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass
class BertConfig:
    model_type: str = "bert"             # "bert" or "roberta": selects the position-id rule
    vocab_size: int = 30522
    hidden_size: int = 384               # D
    num_hidden_layers: int = 6
    num_attention_heads: int = 12        # H; hs = D // H
    intermediate_size: int = 1536        # F
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0                # RoBERTa's padding_idx (1 for RoBERTa models)
    hidden_dropout_prob: float = 0.1     # used only in train mode
    attention_probs_dropout_prob: float = 0.1
    add_pooling_layer: bool = True       # `pooler.dense`: present in BERT model folders, absent in some others

    def __post_init__(self):
        if self.model_type not in ("bert", "roberta"):
            raise ValueError(f"encoder model_type must be 'bert' or 'roberta', got {self.model_type!r}")
        if self.hidden_act not in ACT:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; known: {sorted(ACT)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")

    REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    @classmethod
    def from_hf_config(cls, d: dict) -> "BertConfig":
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise KeyError(f"{d.get('model_type', 'bert')} config.json is missing required field(s): "
                           f"{', '.join(missing)}")
        roberta = d.get("model_type") == "roberta"
        return cls(
            model_type=d.get("model_type", "bert"), vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            intermediate_size=d["intermediate_size"], hidden_act=d.get("hidden_act", "gelu"),
            max_position_embeddings=d.get("max_position_embeddings", 512),
            type_vocab_size=d.get("type_vocab_size", 2),
            layer_norm_eps=d.get("layer_norm_eps", 1e-12),
            pad_token_id=d.get("pad_token_id", 1 if roberta else 0),
            hidden_dropout_prob=d.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=d.get("attention_probs_dropout_prob", 0.1),
        )

    def to_hf_config(self) -> dict:
        d = asdict(self)
        d.pop("add_pooling_layer")
        d["architectures"] = ["RobertaModel" if self.model_type == "roberta" else "BertModel"]
        return d


# -----------------------------------------------------------------------------
# Embeddings

def position_ids_for(cfg: BertConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions. RoBERTa: cumulative count of non-pad tokens + padding_idx, pads stay at padding_idx."""
    B, T = input_ids.shape
    if cfg.model_type == "roberta":
        real = input_ids.ne(cfg.pad_token_id).long()  # (B, T)
        return real.cumsum(1) * real + cfg.pad_token_id
    return torch.arange(T, device=input_ids.device).expand(B, T)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, D)
        self.LayerNorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids)
             + self.position_embeddings(position_ids_for(self.config, input_ids))
             + self.token_type_embeddings(token_type_ids))  # (B, T, D)
        return self.dropout(self.LayerNorm(x))


# -----------------------------------------------------------------------------
# Blocks: self-attention, attention output, feed-forward, layer

class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_head, self.hs = cfg.num_attention_heads, D // cfg.num_attention_heads
        self.query = nn.Linear(D, D)
        self.key = nn.Linear(D, D)
        self.value = nn.Linear(D, D)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, mask):
        B, T, D = x.shape
        q = self.query(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        k = self.key(x).view(B, T, self.n_head, self.hs).transpose(1, 2)    # (B, H, T, hs)
        v = self.value(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, H, T, hs)
        p = self.dropout_p if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # mask: (B, 1, 1, T) bool
        return y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)


class BertSelfOutput(nn.Module):
    """Post-LN residual: LayerNorm(x + dropout(dense(y)))."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, y, x):
        return self.LayerNorm(x + self.dropout(self.dense(y)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)  # HF's name; `self.self` is how the weight names spell it
        self.output = BertSelfOutput(cfg)

    def forward(self, x, mask):
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT[cfg.hidden_act]

    def forward(self, x):
        return self.act(self.dense(x))  # (B, T, F)


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h, x):
        return self.LayerNorm(x + self.dropout(self.dense(h)))  # (B, T, D)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    # True: in training, each layer's activations are recomputed in the backward pass instead of kept; an int n: the
    # first n layers only (models.recompute). Non-reentrant torch.utils.checkpoint: the reentrant variant gives LoRA
    # no gradient (transformers#26221)
    activation_checkpointing = False

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x, mask):
        for i, layer in enumerate(self.layer):
            if recomputed(self.activation_checkpointing, i) and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(first token)), the [CLS] representation BERT's classifier reads."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))  # (B, D)


# -----------------------------------------------------------------------------
# The model

class BertModel(nn.Module):
    """Encoder body. forward returns the last hidden states (B, T, D); `pool` gives the pooler output (B, D)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if cfg.add_pooling_layer else None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys
        return self.encoder(self.embeddings(input_ids, token_type_ids), mask)

    def pool(self, hidden):
        if self.pooler is None:
            raise ValueError("this model has no pooler (pooler.dense.*); use the hidden states instead")
        return self.pooler(hidden)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean over tokens (sentence-transformers' pooling), (B, T, D) -> (B, D)."""
    m = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


# -----------------------------------------------------------------------------
# Sequence-classification heads, named like transformers' *ForSequenceClassification so that adapter keys
# (`bert.encoder.layer.0.attention.self.query`, `classifier`) are the ones PEFT and transformers use.
# num_labels == 1 is regression (transformers' problem_type "regression": MSE on a scalar).

def init_head(module: nn.Module, seed: int, std: float = 0.02):
    """transformers' `_init_weights` for a new head: weights N(0, 0.02²), biases 0, from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def new_head(head: nn.Module, body: nn.Module, seed: int):
    """Materialise a task head built on the meta device beside `body` and initialise it (init_head). The head is
    trained, so it stays fp32 on a bf16 base, as the LoRA factors do (autocast runs it in bf16). A meta body (a
    sharded load, slora.dist.sharded_load): the head is made whole on the CPU, and FSDP2 shards it."""
    device = next(body.parameters()).device
    head.to_empty(device="cpu" if device.type == "meta" else device)
    init_head(head, seed)


class BertForSequenceClassification(nn.Module):
    """logits = classifier(dropout(pooler(h)))  (BERT reads the tanh-pooled [CLS] token)."""

    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.bert = BertModel(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        h = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, D)
        return self.classifier(self.dropout(self.bert.pool(h)))  # (B, num_labels)


class RobertaClassificationHead(nn.Module):
    """out_proj(dropout(tanh(dense(dropout(h[:, 0])))))  (RoBERTa has no pooler; the head has its own dense)."""

    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.out_proj = nn.Linear(cfg.hidden_size, num_labels)

    def forward(self, h):
        x = self.dropout(h[:, 0])  # (B, D): the <s> token
        return self.out_proj(self.dropout(torch.tanh(self.dense(x))))


class RobertaForSequenceClassification(nn.Module):
    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.config, self.num_labels = cfg, num_labels
        self.roberta = BertModel(cfg)
        self.classifier = RobertaClassificationHead(cfg, num_labels)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.classifier(self.roberta(input_ids, attention_mask, token_type_ids))  # (B, num_labels)


def for_sequence_classification(body: BertModel, num_labels: int, seed: int = 0) -> nn.Module:
    """Wrap a loaded encoder in the task model of its family, with a freshly initialized (seeded) head.

    RoBERTa's task model has no pooler (transformers builds it with add_pooling_layer=False), so a pooler that
    the model folder carried is dropped here.
    """
    cfg = body.config
    cls = RobertaForSequenceClassification if cfg.model_type == "roberta" else BertForSequenceClassification
    with torch.device("meta"):
        model = cls(cfg, num_labels)
    if cfg.model_type == "roberta":
        body.pooler, cfg.add_pooling_layer = None, False
        model.roberta = body
    else:
        model.bert = body
    new_head(model.classifier, body, seed)
    return model
