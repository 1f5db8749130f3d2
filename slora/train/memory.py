"""Speed for memory on a GPU: how many layers recompute their activations (`--activation-checkpointing auto`), and
regional compilation of the transformer layers (`--compile`).

auto (torchtune's "selective" checkpointing, with the count taken from a measurement instead of a fixed every-k):
one forward and backward of the run's largest micro-batch, with every layer recomputed except the last, gives
  P, the peak memory of a step with one layer keeping its activations, and
  S, the bytes that one layer keeps for its backward (its saved tensors, parameters excluded).
Each further layer that keeps its activations adds S to the peak, so m = 1 + ⌊(budget − P) / S⌋ layers can keep
theirs (clamped to [0, L]), and the first L − m recompute. The measuring step's gradients are thrown away, and it
draws no random numbers the run would otherwise draw (torch.random.fork_rng).
"""
from __future__ import annotations

import torch
import torch.nn as nn

# the share of the card's memory that `auto` plans for: the rest is left to the allocator's fragmentation and to
# what the measuring step does not see (the optimizer's first step allocates its state later)
BUDGET_SHARE = 0.9


def layer_stacks(model: nn.Module) -> list[nn.Module]:
    """The modules that carry an `activation_checkpointing` setting (LlamaModel, BertEncoder, MPNetEncoder)."""
    return [m for m in model.modules() if hasattr(type(m), "activation_checkpointing")]


def stack_layers(stack: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer layers of a stack (LlamaModel.layers, BertEncoder.layer)."""
    lists = [c for c in stack.children() if isinstance(c, nn.ModuleList)]
    if len(lists) != 1:
        raise ValueError(f"{type(stack).__name__}: expected one list of layers, found {len(lists)}")
    return lists[0]


class SavedBytes:
    """A context that counts the bytes `layer`'s forward passes save for the backward pass (distinct storages, not
    parameters): hooks around the layer's forward open a saved_tensors_hooks region; read `.bytes` after the
    backward."""

    def __init__(self, layer: nn.Module):
        self.layer, self.bytes, self._seen, self._region, self._handles = layer, 0, set(), None, []

    def pack(self, t):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            if st.data_ptr() not in self._seen:
                self._seen.add(st.data_ptr())
                self.bytes += st.nbytes()
        return t

    def _enter(self, *_):
        self._region = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._region.__enter__()

    def _exit(self, *_):
        self._region.__exit__(None, None, None)

    def __enter__(self):
        self._handles = [self.layer.register_forward_pre_hook(self._enter),
                         self.layer.register_forward_hook(self._exit)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def plan_recompute(model: nn.Module, step, device, budget_bytes: int | None = None) -> tuple[int, dict]:
    """The number of leading layers that recompute so that a step fits `budget_bytes` (default BUDGET_SHARE of the
    card), from one measured `step()` (forward and backward of the largest micro-batch); see the module docstring.
    Sets it on the model's layer stack and returns (count, the measurement)."""
    if device.type != "cuda":
        raise ValueError("activation checkpointing 'auto' measures the card's memory and needs a CUDA device")
    stacks = layer_stacks(model)
    if len(stacks) != 1:
        raise ValueError(f"activation checkpointing 'auto' needs one layer stack, {type(model).__name__} has "
                         f"{len(stacks)}")
    layers = stack_layers(stacks[0])
    L = len(layers)
    if budget_bytes is None:
        budget_bytes = int(BUDGET_SHARE * torch.cuda.get_device_properties(device).total_memory)
    stacks[0].activation_checkpointing = L - 1
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.random.fork_rng(devices=[device]), SavedBytes(layers[L - 1]) as kept:
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    for p in model.parameters():
        p.grad = None
    per_layer = max(kept.bytes, 1)
    keep = min(L, max(0, 1 + (budget_bytes - peak) // per_layer))
    stacks[0].activation_checkpointing = L - keep
    return L - keep, {"layers": L, "recomputed": L - keep, "peak_one_kept_gb": peak / 1e9,
                      "layer_activations_gb": kept.bytes / 1e9, "budget_gb": budget_bytes / 1e9}


def compile_layers(model: nn.Module) -> int:
    """torch.compile each transformer layer in place (regional compilation: one layer's graph is compiled once and
    reused by every layer of the same shapes, so the first step stays short, where compiling the whole model traces
    every layer). Inductor fuses the elementwise work (RMSNorm, RoPE, SwiGLU, the residual adds) into fewer kernels;
    the rounding of those fused ops differs from eager in the last bits. Returns the number of layers compiled.

    CUDA only: on the CPU, torch 2.13's C++ code generator gave NaN gradients for these layers on the AVX2 path
    (ATEN_CPU_CAPABILITY=avx2; correct with its vectorization off) and failed to build on the default path, so a
    CPU model is refused rather than trained wrongly on some machines."""
    where = {p.device.type for p in model.parameters()}
    if where != {"cuda"}:
        raise ValueError(f"compiling the layers needs the model on a CUDA device, not {', '.join(sorted(where))} "
                         f"(torch's CPU code generator gives wrong gradients on some CPUs)")
    n = 0
    for stack in layer_stacks(model):
        for layer in stack_layers(stack):
            layer.compile(dynamic=None)
            n += 1
    if not n:
        raise ValueError(f"{type(model).__name__} has no layer stack to compile")
    return n
