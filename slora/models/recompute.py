"""Which layers of a stack recompute their activations in the backward pass (activation checkpointing).

A stack's `activation_checkpointing` is False (none), True (every layer) or an int n (the first n layers): the
activations that all layers keep are alive together at the start of the backward pass, so which n layers recompute
does not change the peak, only how many (slora.train.memory picks n for a memory budget).
"""
from __future__ import annotations


def recomputed(setting, i: int) -> bool:
    """Whether layer i recomputes under `setting` (False, True or a count of leading layers)."""
    if isinstance(setting, bool):
        return setting
    return i < setting
