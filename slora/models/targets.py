"""Which nn.Linear modules a run adapts and calibrates: `find_linears(model, targets)`.

The method (slora.method) takes its modules from the caller; this is the caller's rule. Names are the modules'
qualified names, which mirror the weight names of the model folder (`model.layers.0.self_attn.q_proj`), so the keys of ranks.json
and of an exported adapter are the names PEFT and transformers users know.
"""
from __future__ import annotations

from typing import Sequence
from torch import nn
from slora.models.lora import LoRALinear


# Head modules that "all-linear" leaves out, matched as whole dotted components anywhere in the name. As PEFT
# excludes the output layer, slora excludes task heads: the LM head and classification / QA heads are trained
# or tied to the embeddings, and BERT's pooler is a head input that RoBERTa-style classifiers never call.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler")


def find_linears(model: nn.Module, targets: str | Sequence[str], exclude: Sequence[str] = HEAD_NAMES
                 ) -> dict[str, nn.Linear]:
    """The nn.Linear modules to analyse, keyed by qualified name in model order; in a model with LoRA, a
    LoRALinear counts as the nn.Linear it wraps (same name, same input) and its factors do not count.

    `targets` is "all-linear" (every nn.Linear except those with a component in `exclude`) or a comma list of
    name suffixes matched on whole dotted components: "q_proj" matches "layers.0.attn.q_proj" but not
    "layers.0.attn.xq_proj"; "attn.q_proj" matches the last two components. Raises ValueError naming any
    pattern that matches no nn.Linear.
    """
    # a LoRA layer (slora.models.lora.LoRALinear) stands for the linear it wraps, under the same name, and its factors
    # lora_A / lora_B are no candidates: a fine-tuned model's targets are then its base's, whose input X they see
    # (train.EpochSensitivity measures the live sharded model under --fsdp)
    lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and n.rpartition(".")[0] not in lora}
    if targets == "all-linear":
        found = {n: m for n, m in linears.items() if not set(n.split(".")) & set(exclude)}
        if not found:
            raise ValueError(f"targets 'all-linear' matched no nn.Linear outside the heads {tuple(exclude)}")
        return found
    patterns = [p.strip() for p in (targets.split(",") if isinstance(targets, str) else targets)]
    if not patterns or any(not p for p in patterns):
        raise ValueError(f"empty target pattern in {targets!r}")
    hits = {p: [n for n in linears if n.split(".")[-len(p.split(".")):] == p.split(".")] for p in patterns}
    for p, names in hits.items():
        if not names:
            raise ValueError(f"target pattern {p!r} matches no nn.Linear in the model")
    chosen = {n for names in hits.values() for n in names}
    return {n: m for n, m in linears.items() if n in chosen}
