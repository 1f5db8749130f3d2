"""Tiny seeded models for the fast tier: built from a seed, saved as Hugging Face-format folders.

Nothing is downloaded; these stand in for llama2.c's stories260K. `fixed_init` gives every parameter values drawn
from one seeded generator, so two builds with the same seed are bit-identical.
"""
import torch

from slora.models import save_model
from slora.models.bert import BertConfig, BertModel
from slora.models.llama import LlamaConfig, LlamaForCausalLM


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


def save_tiny(model, folder, **kw):
    return save_model(model, folder, **kw)
