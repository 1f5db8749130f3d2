"""Hugging Face-format model folders read into slora's own model code, and written back.

`load_model(path)` reads `config.json`, picks the architecture from `model_type` (a plain `if` over the families
BERT/RoBERTa, MPNet and LLaMA, not a registry), builds the model on the meta device (so no weight is ever held
twice), and assigns the tensors with a strict load. Module names already mirror the files' tensor names, so the only
renames are the documented ones below.
"""
from __future__ import annotations

from pathlib import Path
import torch
import torch.nn as nn
from tokenizers import Tokenizer
from slora.io.weights import load_strict, read_config, read_tensors, tensor_shapes, write_folder
from slora.errors import SloraError
from slora.models.bert import BertConfig
from slora.models.llama import LlamaConfig, LlamaForCausalLM
from slora.models.mpnet import MPNetConfig
from slora.models import TASK_MODELS, build_config, build_model, for_sequence_classification


# Keys that model folders carry but the models do not use, dropped on purpose:
# - `embeddings.position_ids` / `embeddings.token_type_ids`: index buffers older transformers versions saved;
# - `cls.*` (BERT MLM/NSP heads) and `lm_head.*` (RoBERTa and MPNet MLM heads): pre-training heads, not part of
#   the encoder;
# - `rotary_emb.inv_freq`: a RoPE buffer old LLaMA model folders saved; slora recomputes it from rope_theta.
ENCODER_DROP_PREFIXES = ("cls.", "lm_head.")


ENCODER_DROP_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _encoder_state(sd: dict, model_type: str) -> dict:
    """Encoder keys from a model folder saved bare (`encoder.…`) or inside a task model (`bert.encoder.…`,
    `mpnet.encoder.…`)."""
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


def load_model(path, dtype: torch.dtype = torch.float32, device="cpu", state: dict | None = None) -> nn.Module:
    """A BertModel or MPNetModel (encoder; forward -> (B, T, D)) or LlamaForCausalLM (forward -> (B, T, V)).

    The model is returned in eval mode with its config at `model.config`. `state`: the folder's tensors, already
    read (and filtered) by the caller, in place of reading them here.
    """
    path = Path(path)
    cfg = _folder_config(path)
    sd = read_tensors(path, dtype=dtype, device=device) if state is None else state
    if isinstance(cfg, (BertConfig, MPNetConfig)):
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


def _folder_config(path: Path):
    hf = read_config(path)
    try:
        return build_config(hf, path / "config.json")
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # from_hf_config on a value of the wrong kind
        what = str(e.args[0]) if e.args else type(e).__name__
        if what.startswith(str(path / "config.json")):  # already names the file
            raise
        raise SloraError(path / "config.json", what) from None


def file_keys(cfg, names) -> dict[str, str]:
    """{model key: tensor name in the files} for a model folder holding tensors `names`: load_model's renames and
    drops applied to the names alone (a tied lm_head maps to the embedding's tensor)."""
    same = {n: n for n in names}
    if isinstance(cfg, (BertConfig, MPNetConfig)):
        return _encoder_state(same, cfg.model_type)
    return _decoder_state(same, cfg)


def meta_model(path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of a folder as `load_model` builds it, with every parameter on the meta device in `dtype` and no
    tensor read (only the file headers, for the pooler's presence): the skeleton of a sharded load
    (slora.dist.sharded_load), which then reads each rank's rows."""
    path = Path(path)
    cfg = _folder_config(path)
    if isinstance(cfg, (BertConfig, MPNetConfig)):
        keys = file_keys(cfg, tensor_shapes(path))
        cfg.add_pooling_layer = any(k.startswith("pooler.") for k in keys)
    with torch.device("meta"):
        model = build_model(cfg).to(dtype)
    if isinstance(model, LlamaForCausalLM):
        model.tie_weights()
    return model.eval()


def save_model(model: nn.Module, path, max_shard_bytes: int | None = None, tokenizer=None,
               extra_files: dict[str, Path] | None = None) -> Path:
    """Write `model` as a Hugging Face-format folder that `load_model` (and transformers) can read back.

    A tied lm_head is left out, as transformers does. A task model (Bert/Roberta/MPNetForSequenceClassification) is
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
    """A Bert/Roberta/MPNetForSequenceClassification from a folder written by `save_model` (or transformers): the
    body as `load_model` reads it, the head (`classifier.*`) loaded strictly. The label count comes from config.json
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

    slora pads each batch itself and passes an attention mask; MiniLM's file pads every sentence to 128. Given a
    model folder, the tokenizer is checked against its config.json (`check_vocabulary`).
    """
    folder = Path(path) if Path(path).is_dir() else None
    file = folder / "tokenizer.json" if folder is not None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception for bad JSON or an unknown model type
        raise SloraError(file, f"cannot read the tokenizer ({e}); the file is damaged or not a tokenizers "
                               f"tokenizer.json") from None
    tok.no_padding()
    tok.no_truncation()
    if folder is not None and (folder / "config.json").is_file():
        check_vocabulary(tok, read_config(folder), file)
    return tok


def check_vocabulary(tok: Tokenizer, config: dict, file) -> None:
    """Every id the tokenizer `file` can produce, and the config's pad and eos ids (which slora puts into batches:
    padding, the end of a response), must index a row of the model's embedding (config.json `vocab_size`). A
    tokenizer.json from another model otherwise fails at the first batch as torch's `index out of range in self`.
    The embedding may be larger than the vocabulary (padded for speed, as in Qwen2), never smaller."""
    n = config.get("vocab_size")
    if not isinstance(n, int) or isinstance(n, bool):
        return  # the config's own check names it when the model is built
    vocab = tok.get_vocab(with_added_tokens=True)
    if vocab:
        top = max(vocab, key=vocab.get)
        if vocab[top] >= n:
            raise SloraError(file, f"token {top!r} has id {vocab[top]}, but the model embeds {n} tokens (config.json "
                                   f"vocab_size): the tokenizer's {vocab[top] + 1} ids do not fit; is this the "
                                   f"tokenizer.json of another model?")
    for key in ("pad_token_id", "eos_token_id"):
        ids = config.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and not isinstance(i, bool) and not 0 <= i < n:
                raise SloraError(Path(file).parent / "config.json", f"{key} {i} is outside the vocabulary of "
                                                                    f"{n} tokens (vocab_size)")
