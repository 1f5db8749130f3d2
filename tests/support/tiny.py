"""Tiny seeded models for the fast tier: built from a seed, saved as Hugging Face-format folders.

Nothing is downloaded; these stand in for llama2.c's stories260K. `fixed_init` gives every parameter values drawn
from one seeded generator, so two builds with the same seed are bit-identical.
"""
import json
from pathlib import Path

import torch

from slora.io.model_folder import save_model
from slora.models.bert import BertConfig, BertModel
from slora.models.llama import LlamaConfig, LlamaForCausalLM
from slora.models.mpnet import MPNetConfig, MPNetModel


def tiny_llama_config(**kw) -> LlamaConfig:
    base = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=61, max_position_embeddings=128, rms_norm_eps=1e-5,
                rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_bert_config(**kw) -> BertConfig:
    base = dict(model_type="bert", vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
    base.update(kw)
    return BertConfig(**base)


def tiny_mpnet_config(**kw) -> MPNetConfig:
    base = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=160, pad_token_id=1)
    base.update(kw)
    return MPNetConfig(**base)


def fixed_init(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Deterministic values for every parameter: N(0, std²) for matrices, 1 + N(0, std²)/4 for norm weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + noise * std / 4)
            else:
                p.copy_(noise * std)
    return model


def tiny_llama(seed=0, **kw) -> LlamaForCausalLM:
    return fixed_init(LlamaForCausalLM(tiny_llama_config(**kw)), seed).eval()


def tiny_bert(seed=0, **kw) -> BertModel:
    return fixed_init(BertModel(tiny_bert_config(**kw)), seed).eval()


def tiny_mpnet(seed=0, **kw) -> MPNetModel:
    return fixed_init(MPNetModel(tiny_mpnet_config(**kw)), seed).eval()


def save_tiny(model, folder, **kw):
    return save_model(model, folder, **kw)


# -----------------------------------------------------------------------------
# Tiny tokenizers and run folders for end-to-end smoke tests

WORDS = ("good great fine fun bad awful dull poor movie plot actor scene the a is was very not and it "
         "paris france capital of what city name answer").split()


def sentiment_rows(n: int) -> list[dict]:
    """n separable classification records: "the movie was <positive word>" (label 1) or <negative word> (label 0)."""
    pos, neg = WORDS[:4], WORDS[4:8]
    return [{"text": f"the movie was {(pos if i % 2 else neg)[i % 4]}", "label": i % 2} for i in range(n)]


def write_jsonl(path, rows) -> Path:
    """Rows as JSON lines; a str row is written as it is (e.g. a broken line), bytes as raw bytes."""
    raw = b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n"
                   for r in rows)
    Path(path).write_bytes(raw)
    return Path(path)


def tiny_tokenizer(kind: str):
    """A word-level `tokenizers.Tokenizer` over WORDS: BERT-style ([CLS] a [SEP] b [SEP]), MPNet-style
    (<s> a </s></s> b </s>, pad id 1 as all-mpnet-base-v2) or a ChatML decoder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    specials = {"encoder": ["[PAD]", "[UNK]", "[CLS]", "[SEP]"], "mpnet": ["<s>", "<pad>", "</s>", "<unk>"],
                "decoder": ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]}[kind]
    vocab = {w: i for i, w in enumerate(specials + ["user", "assistant", "\n"] + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token={"encoder": "[UNK]"}.get(kind, "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "removed")
    if kind == "encoder":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    if kind == "mpnet":
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))  # (sep, cls)
    tok.add_special_tokens(specials)
    return tok, len(vocab)


def tiny_model_dir(folder, kind: str, seed: int = 0):
    """A tiny seeded model saved with its tokenizer as a Hugging Face-format folder; returns the folder."""
    from pathlib import Path
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, n = tiny_tokenizer(kind)
    tok.save(str(folder / "tokenizer.json"))
    model = {"encoder": tiny_bert, "mpnet": tiny_mpnet, "decoder": tiny_llama}[kind](seed, vocab_size=n)
    save_model(model, folder / "model", tokenizer=folder / "tokenizer.json")
    return folder / "model"


def sentiment_task(folder) -> Path:
    """The inputs of a tiny classification run in `folder`: train.jsonl (30 sentiment_rows), dev.jsonl (6) and a tiny
    encoder folder m/; returns the model folder (folder/m/model)."""
    folder = Path(folder)
    rows = sentiment_rows(36)
    write_jsonl(folder / "train.jsonl", rows[:30])
    write_jsonl(folder / "dev.jsonl", rows[30:])
    return tiny_model_dir(folder / "m", "encoder")


def randomize_lora(model, seed=0, std=0.3):
    """Fresh seeded A and non-zero B in every LoRA layer, so that LoRA changes the output."""
    from slora.models.lora import lora_modules
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
    return model


# -----------------------------------------------------------------------------
# The pre-training step as python -m slora.finetune records it

def as_files(s, targets: str = "all-linear") -> tuple[dict, dict]:
    """(sensitivity.json content, ranks.json content) of a sensitivity.Sensitivity."""
    from slora.train.run_folder import sensitivity_json
    return sensitivity_json(s, targets), s.ranks


def compute_files(model, batches, cfg, targets: str = "all-linear", **kw) -> tuple[dict, dict]:
    """sensitivity.compute on the modules `targets` selects, as the two files a run writes."""
    from slora.models.targets import find_linears
    from slora.method.sensitivity import compute
    return as_files(compute(model, batches, find_linears(model, targets), cfg, **kw), targets)
