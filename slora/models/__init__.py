"""slora's model code: pure forward passes of the encoder and decoder families, and the LoRA layer.

    bert.py     BERT / RoBERTa and their sequence-classification heads
    mpnet.py    MPNet (relative-position bias) and its head
    llama.py    the decoder of LLaMA, Qwen2 and Mistral, with greedy generation over a key/value cache
    decode.py   greedy decoding over a preallocated key/value cache, one CUDA graph per token
    lora.py     LoRALinear and the loralib-sized API (apply_lora, merge, ...)
    targets.py  which nn.Linear modules a run adapts (find_linears)
    recompute.py which layers of a stack recompute their activations (activation checkpointing)

This file picks the architecture from a Hugging Face config dict (`build_config`, `build_model`: a plain `if` over
the families, not a registry). Reading and writing model folders is slora.io.model_folder.
"""
from __future__ import annotations

import math
import torch.nn as nn

from slora.errors import SloraError
from slora.models import bert, mpnet
from slora.models.bert import BertConfig, BertForSequenceClassification, BertModel, RobertaForSequenceClassification
from slora.models.llama import LlamaConfig, LlamaForCausalLM
from slora.models.mpnet import MPNetConfig, MPNetForSequenceClassification, MPNetModel

ENCODER_TYPES = ("bert", "roberta", "mpnet")
DECODER_TYPES = ("llama", "qwen2", "mistral")  # one decoder (models/llama.py) for the three families
TASK_MODELS = (BertForSequenceClassification, RobertaForSequenceClassification, MPNetForSequenceClassification)


# Sizes that must be positive integers when present (a 0 or "32" fails deep inside the model code otherwise).
POSITIVE_INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "max_position_embeddings", "head_dim", "type_vocab_size")
NULLABLE_FIELDS = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null: derived or defaulted
POSITIVE_REAL_FIELDS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")


def check_config_values(hf: dict, source) -> None:
    """Types and ranges of the size fields, checked before any model code sees them; errors name the field."""
    for k in POSITIVE_INT_FIELDS:
        v = hf.get(k)
        if v is None and k in hf and k not in NULLABLE_FIELDS:
            raise SloraError(source, f"{k} is null; it must be a positive integer")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise SloraError(source, f"{k} = {v!r} must be a positive integer")
    for k in POSITIVE_REAL_FIELDS:
        v = hf.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf):
            raise SloraError(source, f"{k} = {v!r} must be a positive finite number")
    heads, dim = hf.get("num_attention_heads"), hf.get("hidden_size")
    if heads and dim and hf.get("head_dim") is None and dim % heads:
        raise SloraError(source, f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")


def build_config(hf: dict, source="config.json"):
    """The slora config dataclass for a Hugging Face config dict; unsupported model_type is an error."""
    model_type = hf.get("model_type")
    check_config_values(hf, source)
    if model_type == "mpnet":
        return MPNetConfig.from_hf_config(hf)
    if model_type in ENCODER_TYPES:
        return BertConfig.from_hf_config(hf)
    if model_type in DECODER_TYPES:
        return LlamaConfig.from_hf_config(hf)
    raise ValueError(f"{source}: unsupported model_type {model_type!r}; slora supports "
                     f"{', '.join(ENCODER_TYPES + DECODER_TYPES)}")


def build_model(cfg) -> nn.Module:
    if isinstance(cfg, MPNetConfig):
        return MPNetModel(cfg)
    return BertModel(cfg) if isinstance(cfg, BertConfig) else LlamaForCausalLM(cfg)


def for_sequence_classification(body: nn.Module, num_labels: int, seed: int = 0) -> nn.Module:
    """The task model of an encoder's family (transformers' *ForSequenceClassification layout) around `body`,
    with a freshly initialized head drawn from `seed`."""
    family = mpnet if isinstance(body, MPNetModel) else bert
    return family.for_sequence_classification(body, num_labels, seed)


