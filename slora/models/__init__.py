"""Load and save Hugging Face-format checkpoint folders with slora's own model code.

`load_model(path)` reads `config.json`, picks the architecture from `model_type` (a two-branch `if`, not a
registry), builds the model on the meta device (so no weight is ever held twice), and assigns the tensors with a
strict load. Module names already mirror the checkpoint's, so the only renames are the documented ones below.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from tokenizers import Tokenizer

from slora.checkpoint import load_strict, read_config, read_tensors, write_folder
from slora.models.bert import (BertConfig, BertForSequenceClassification, BertModel,
                               RobertaForSequenceClassification, for_sequence_classification)
from slora.models.llama import LlamaConfig, LlamaForCausalLM

ENCODER_TYPES = ("bert", "roberta")
TASK_MODELS = (BertForSequenceClassification, RobertaForSequenceClassification)
DECODER_TYPES = ("llama",)

# Keys that checkpoints carry but the models do not use, dropped on purpose:
# - `embeddings.position_ids` / `embeddings.token_type_ids`: index buffers older transformers versions saved;
# - `cls.*` (BERT MLM/NSP heads) and `lm_head.*` (RoBERTa MLM head): pre-training heads, not part of the encoder;
# - `rotary_emb.inv_freq`: a RoPE buffer old LLaMA checkpoints saved; slora recomputes it from rope_theta.
ENCODER_DROP_PREFIXES = ("cls.", "lm_head.")
ENCODER_DROP_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _encoder_state(sd: dict, model_type: str) -> dict:
    """BertModel keys from a checkpoint saved bare (`encoder.…`) or inside a task model (`bert.encoder.…`)."""
    prefix = f"{model_type}."
    if any(k.startswith(prefix) for k in sd):
        sd = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items()
            if k not in ENCODER_DROP_KEYS and not k.startswith(ENCODER_DROP_PREFIXES)}


def _decoder_state(sd: dict, cfg: LlamaConfig) -> dict:
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: the head is the embedding; transformers omits it on save too
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    return {k: v for k, v in sd.items() if v is not None}


def build_config(hf: dict, source="config.json"):
    """The slora config dataclass for a Hugging Face config dict; unsupported model_type is an error."""
    model_type = hf.get("model_type")
    if model_type in ENCODER_TYPES:
        return BertConfig.from_hf_config(hf)
    if model_type in DECODER_TYPES:
        return LlamaConfig.from_hf_config(hf)
    raise ValueError(f"{source}: unsupported model_type {model_type!r}; slora supports "
                     f"{', '.join(ENCODER_TYPES + DECODER_TYPES)}")


def build_model(cfg) -> nn.Module:
    return BertModel(cfg) if isinstance(cfg, BertConfig) else LlamaForCausalLM(cfg)


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", state: dict | None = None) -> nn.Module:
    """A BertModel (encoder; forward -> (B, T, D)) or LlamaForCausalLM (forward -> (B, T, V)) from a folder.

    The model is returned in eval mode with its config at `model.config`. `state`: the folder's tensors, already
    read (and filtered) by the caller, in place of reading them here.
    """
    path = Path(path)
    hf = read_config(path)
    try:
        cfg = build_config(hf, path / "config.json")
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: {e.args[0]}") from None
    sd = read_tensors(path, dtype=dtype, device=device) if state is None else state
    if isinstance(cfg, BertConfig):
        sd = _encoder_state(sd, cfg.model_type)
        cfg.add_pooling_layer = any(k.startswith("pooler.") for k in sd)
    else:
        sd = _decoder_state(sd, cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    load_strict(model, sd, path)
    if isinstance(model, LlamaForCausalLM):
        model.tie_weights()
    return model.eval()


def save_model(model: nn.Module, path, max_shard_bytes: int | None = None, tokenizer=None,
               extra_files: dict[str, Path] | None = None) -> Path:
    """Write `model` as a Hugging Face-format folder that `load_model` (and transformers) can read back.

    A tied lm_head is left out, as transformers does. A task model (Bert/RobertaForSequenceClassification) is
    written with its head, its architecture and its labels (`num_labels`, and the `id2label`/`label2id` that
    transformers' PretrainedConfig writes), so `load_sequence_classifier` and transformers'
    AutoModelForSequenceClassification read it back. `max_shard_bytes` splits the weights into shards with a
    `model.safetensors.index.json`. `tokenizer` (a path to tokenizer.json) and `extra_files` ({name: source
    path}) are copied alongside.
    """
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight")
    config = model.config.to_hf_config()
    if isinstance(model, TASK_MODELS):
        n = model.num_labels
        config.update(architectures=[type(model).__name__], num_labels=n,
                      id2label={str(i): f"LABEL_{i}" for i in range(n)}, label2id={f"LABEL_{i}": i for i in range(n)})
    extra = dict(extra_files or {}) | ({"tokenizer.json": Path(tokenizer)} if tokenizer else {})
    return write_folder(path, config, sd, max_shard_bytes, extra or None)


def load_sequence_classifier(path, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """A Bert/RobertaForSequenceClassification from a folder written by `save_model` (or transformers): the body
    as `load_model` reads it, the head (`classifier.*`) loaded strictly. The label count comes from config.json
    (`num_labels`, else `id2label`)."""
    path = Path(path)
    hf = read_config(path)
    arch = (hf.get("architectures") or [None])[0]
    if arch not in [c.__name__ for c in TASK_MODELS]:
        raise ValueError(f"{path / 'config.json'}: architectures {hf.get('architectures')!r} is not a sequence "
                         f"classifier ({', '.join(c.__name__ for c in TASK_MODELS)})")
    n = hf.get("num_labels", len(hf.get("id2label") or {}))
    if not n:
        raise ValueError(f"{path / 'config.json'}: neither num_labels nor id2label gives the number of labels")
    sd = read_tensors(path, dtype=dtype, device=device)
    head = {k[len("classifier."):]: v for k, v in sd.items() if k.startswith("classifier.")}
    body = load_model(path, dtype, device, state={k: v for k, v in sd.items() if not k.startswith("classifier.")})
    model = for_sequence_classification(body, n)
    load_strict(model.classifier, head, path)
    return model.eval()


def load_tokenizer(path) -> Tokenizer:
    """`tokenizer.json` of a model folder, with the padding and truncation baked into the file turned off.

    slora pads each batch itself and passes an attention mask; MiniLM's file pads every sentence to 128.
    """
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    tok = Tokenizer.from_file(str(file))
    tok.no_padding()
    tok.no_truncation()
    return tok

