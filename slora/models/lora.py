"""LoRA for nn.Linear with a rank per module: the whole API is a handful of calls, as in loralib.

    model = apply_lora(model, ranks, alpha=16)        # ranks: {"model.layers.0.self_attn.q_proj": 6, ...}
    mark_only_lora_trainable(model)                   # LoRA factors and the task head train, nothing else
    ... train ...
    merge_lora(model); ...; unmerge_lora(model)        # explicit; `.eval()` never merges (litgpt's fix of loralib)

References: Hu et al. 2021 (LoRA, §4.1: W + (α/r)·B A, A Kaiming-uniform, B = 0), Kalajdzievski 2023 (rsLoRA,
α/√r), microsoft/LoRA `loralib/layers.py`, PEFT `tuners/lora/layer.py` (parameter names, scaling, fp32 adapter
weights on a half-precision base), EVA (Paulus et al. 2024; alpha rescaled with the rank, PEFT `lora/eva.py`).

Layout. `LoRALinear` does not keep the wrapped nn.Linear as a child (PEFT's `base_layer`); it takes over that layer's
own `weight` and `bias` Parameters (the same objects: nothing is copied). So slora's `model.state_dict()` keeps
the base keys of the unadapted model (`…query.weight`, `…query.bias`) and adds `…query.lora_A.weight` (r, d_in) and
`…query.lora_B.weight` (d_out, r): the LoRA keys are PEFT's, less its adapter name, and the base keys stay the
model folder's. LoRALinear is deliberately not an nn.Linear subclass, so a second `apply_lora` or a Linear scan
(`isinstance(m, nn.Linear)`) does not mistake it for a plain layer; its `lora_A`/`lora_B` children are nn.Linear.

Alpha for unequal ranks (`alpha_policy`; the default is provisional until the fine-tuning experiment picks one):
  - "constant": α_w = α for every module, so scaling α/r_w shrinks as r_w grows (PEFT's behaviour when only
    `rank_pattern` is given);
  - "scale":    α_w = α·r_w/r_ref, so every module has the same scaling α/r_ref (EVA's default); r_ref defaults
    to the mean of the given ranks, i.e. the uniform rank with the same budget;
  - "rslora":   α_w = α with rsLoRA scaling α/√r_w.
`use_rslora=True` switches the denominator to √r for "constant" and "scale" too ("scale" then uses
α_w = α·√(r_w/r_ref), again one scaling α/√r_ref for all). Per-module alphas are stored on each layer (`.alpha`)
and returned by `module_alphas` / `lora_alphas`, which is what the PEFT adapter's `alpha_pattern` records.

Shape legend: B batch, T sequence, d_in / d_out the wrapped layer's features, r the module's rank.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ALPHA_POLICIES = ("constant", "scale", "rslora")
ALPHA_POLICY = "scale"  # provisional default; the fine-tuning experiment decides and documents the final one


# -----------------------------------------------------------------------------
# The layer

class LoRALinear(nn.Module):
    """y = x Wᵀ + b + (dropout(x) Aᵀ Bᵀ)·scaling, with A: (r, d_in), B: (d_out, r), scaling = α/r (α/√r rsLoRA).

    Built from an existing nn.Linear whose `weight`/`bias` Parameters it adopts. A starts Kaiming-uniform with
    a = √5 (nn.Linear's own init, as loralib and PEFT), B starts at zero, so a fresh layer computes exactly the
    base layer. On a half-precision base the factors are kept in fp32 (PEFT's `autocast_adapter_dtype`); the
    LoRA branch is computed in the input's dtype.

    `merge()` adds scaling·B A into W and `unmerge()` subtracts it again; both are idempotent through the
    `merged` flag, and nothing else (in particular not `.eval()`) changes it. A merged layer refuses to run in
    training mode, where the factors would silently receive no gradient.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRALinear rank must be an int >= 1, got {r!r} (rank 0 means: leave the layer as is)")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (d_out, d_in), the same Parameter object as the wrapped layer's
        self.bias = base.bias      # (d_out,) or None
        self.r, self.alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        # PEFT's formula, in Python floats, so that slora and PEFT use bit-identical scalings.
        self.scaling = self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r
        w = base.weight
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        # a meta base (a sharded load, slora.dist.sharded_load): the factors are made whole on the CPU, with the values
        # this generator gives on a full model, and FSDP2 shards them
        device = torch.device("cpu") if w.is_meta else w.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)   # weight (r, d_in)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # weight (d_out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters(generator)
        self.train(base.training)  # keep the wrapped layer's mode, so an eval-mode model stays in eval mode

    def reset_lora_parameters(self, generator: Optional[torch.Generator] = None):
        """A drawn on the CPU (from `generator`, a CPU generator) and copied to A's device, so that the same seed
        gives the same initial adapter on every device; B = 0."""
        with torch.no_grad():
            a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)  # (r, d_in), on the CPU
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.weight.copy_(a)
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, (d_out, d_in), computed in fp32 (or the factors' wider dtype) and cast to W's dtype."""
        A, B = self.lora_A.weight, self.lora_B.weight
        ct = torch.promote_types(A.dtype, torch.float32)
        return ((B.to(ct) @ A.to(ct)) * self.scaling).to(self.weight.dtype)  # (d_out, r) @ (r, d_in)

    def merge(self):
        """W ← W + scaling·B A. A no-op when already merged."""
        if not self.merged:
            with torch.no_grad():
                self.weight.add_(self.delta_weight())
            self.merged = True
        return self

    def unmerge(self):
        """W ← W − scaling·B A, exact up to fp32 rounding of the two additions. A no-op when not merged."""
        if self.merged:
            with torch.no_grad():
                self.weight.sub_(self.delta_weight())
            self.merged = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training:
                raise RuntimeError("forward of a merged LoRALinear in training mode: the LoRA factors would get "
                                   "no gradient; call unmerge() (or unmerge_lora(model)) before training")
            return F.linear(x, self.weight, self.bias)  # (B, T, d_out)
        # Every op is a dispatch, a few microseconds of host time, more than a small model's kernel takes on a GPU:
        # no cast when the dtypes agree, and no dropout call in eval mode (where dropout returns its input)
        y = F.linear(x, self.weight, self.bias)  # (B, T, d_out)
        A, B = self.lora_A.weight, self.lora_B.weight  # (r, d_in), (d_out, r)
        A = A if A.dtype == x.dtype else A.to(x.dtype)
        B = B if B.dtype == x.dtype else B.to(x.dtype)
        x = self.lora_dropout(x) if self.training else x
        h = F.linear(x, A) * self.scaling  # (B, T, r): scale the narrow side
        # y + h Bᵀ as one GEMM whose epilogue adds y, rather than a product, a scaling and a sum over (B, T, d_out)
        return torch.addmm(y.reshape(-1, self.out_features), h.reshape(-1, self.r), B.T).view(y.shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, rslora={self.use_rslora}, "
                f"merged={self.merged}")


# -----------------------------------------------------------------------------
# Per-module alpha

def module_alphas(ranks: Mapping[str, int], alpha: float, alpha_policy: str = ALPHA_POLICY,
                  use_rslora: bool = False, r_ref: Optional[float] = None) -> dict[str, float]:
    """α_w for every module with r_w > 0 under `alpha_policy` (see the module docstring for the formulas).

    r_ref (policy "scale" only) defaults to the mean of all the given ranks, zeros included.
    """
    if alpha_policy not in ALPHA_POLICIES:
        raise ValueError(f"unknown alpha_policy {alpha_policy!r}; known: {', '.join(ALPHA_POLICIES)}")
    if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    _check_ranks(ranks)
    live = {name: r for name, r in ranks.items() if r > 0}
    if alpha_policy != "scale":
        if r_ref is not None:
            raise ValueError(f"r_ref is used by alpha_policy 'scale' only, not {alpha_policy!r}")
        return {name: float(alpha) for name in live}
    if r_ref is None:
        r_ref = sum(ranks.values()) / len(ranks) if ranks else 1.0
    if not (math.isfinite(r_ref) and r_ref > 0):
        raise ValueError(f"r_ref must be a finite number > 0, got {r_ref!r}")
    if use_rslora:
        return {name: float(alpha) * math.sqrt(r / r_ref) for name, r in live.items()}
    return {name: float(alpha) * r / r_ref for name, r in live.items()}


def _check_ranks(ranks: Mapping[str, int]):
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"rank of {name!r} must be an int >= 0, got {r!r}")


# -----------------------------------------------------------------------------
# Model-level API

def apply_lora(model: nn.Module, ranks: Mapping[str, int], alpha, alpha_policy: Optional[str] = None,
               use_rslora: bool = False, dropout: float = 0.0, r_ref: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> nn.Module:
    """Replace each named nn.Linear with a LoRALinear of its rank, in place; rank 0 leaves the layer untouched.

    `ranks` maps fully qualified module names (`model.layers.0.self_attn.q_proj`) to ranks. `alpha` is either one
    number, turned into per-module alphas by `alpha_policy` (default ALPHA_POLICY), or a mapping that gives α_w
    for every module with r > 0 explicitly (then `alpha_policy` must be left None). Policy "rslora" turns
    `use_rslora` on. Every name is checked before the model is touched: an unknown name, a module that is not an
    nn.Linear, or one that already has LoRA is an error naming it. `generator` seeds the Kaiming init of A.
    """
    _check_ranks(ranks)
    modules = dict(model.named_modules())
    for name in ranks:
        if name == "" or name not in modules:
            raise KeyError(f"apply_lora: no module named {name!r} in {type(model).__name__}")
        if isinstance(modules[name], LoRALinear):
            raise ValueError(f"apply_lora: {name!r} already has LoRA (rank {modules[name].r})")
        if not isinstance(modules[name], nn.Linear):
            raise TypeError(f"apply_lora: {name!r} is a {type(modules[name]).__name__}, not an nn.Linear")
    if isinstance(alpha, Mapping):
        if alpha_policy is not None or r_ref is not None:
            raise ValueError("apply_lora: per-module alphas were given; leave alpha_policy and r_ref unset")
        live = {name for name, r in ranks.items() if r > 0}
        if set(alpha) != live:
            bad = sorted(set(alpha) ^ live)
            raise ValueError(f"apply_lora: the alpha mapping must name exactly the modules with rank > 0; "
                             f"differs at: {', '.join(bad)}")
        alphas = {name: float(a) for name, a in alpha.items()}
    else:
        policy = ALPHA_POLICY if alpha_policy is None else alpha_policy
        use_rslora = use_rslora or policy == "rslora"
        alphas = module_alphas(ranks, alpha, policy, use_rslora, r_ref)
    for name, r in ranks.items():
        if r == 0:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(modules[name], r, alphas[name], use_rslora, dropout, generator))
    return model


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_ranks(model: nn.Module) -> dict[str, int]:
    return {name: m.r for name, m in lora_modules(model).items()}


def lora_alphas(model: nn.Module) -> dict[str, float]:
    return {name: m.alpha for name, m in lora_modules(model).items()}


def _matching(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    """Modules named exactly `n` or ending in `.n`, for each n; a name that matches nothing is an error."""
    out = {}
    modules = dict(model.named_modules())
    for n in names:
        hits = {k: m for k, m in modules.items() if k == n or k.endswith("." + n)}
        if not hits:
            raise KeyError(f"no module named {n!r} in {type(model).__name__} (for a model without a task head, "
                           f"pass extra=())")
        out.update(hits)
    return out


def mark_only_lora_trainable(model: nn.Module, extra: Iterable[str] = ("classifier",)) -> nn.Module:
    """requires_grad = True for the LoRA factors and the parameters of the `extra` modules (the task head), False
    for everything else. An `extra` name that matches no module is an error (pass extra=() for a causal LM)."""
    heads = _matching(model, extra)
    model.requires_grad_(False)
    for m in lora_modules(model).values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    for m in heads.values():
        m.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The LoRA factors as {`<module>.lora_A.weight`: (r, d_in), `<module>.lora_B.weight`: (d_out, r)}, plus the
    full state of the `extra` modules (`classifier.weight`, …). Tensors are the live ones, detached."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    for name, m in _matching(model, extra).items():
        out.update({f"{name}.{k}": v.detach() for k, v in m.state_dict().items()})
    return out


def lora_parameters_count(model: nn.Module) -> int:
    """Σ r·(d_in + d_out) over the LoRA layers."""
    return sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in lora_modules(model).values())


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA layer (idempotent)."""
    for m in lora_modules(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Unmerge every LoRA layer (idempotent)."""
    for m in lora_modules(model).values():
        m.unmerge()
    return model


@contextlib.contextmanager
def merged(model: nn.Module):
    """Every LoRA layer merged (W + scaling·B A, in W's dtype) inside the block, for inference at the cost of the
    base model alone; afterwards each W is restored bit for bit from a copy kept aside (in bf16, W + Δ − Δ is not W,
    so unmerge() alone would move the base). Memory: one copy of the adapted base weights. Layers merged before the
    block stay merged."""
    layers = [m for m in lora_modules(model).values() if not m.merged]
    saved = [m.weight.detach().clone() for m in layers]  # (d_out, d_in) each
    try:
        for m in layers:
            m.merge()
        yield model
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.weight.copy_(w)
                m.merged = False


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy in which every LoRALinear is a plain nn.Linear holding W + scaling·B A (PEFT's
    `merge_and_unload`, on a copy): the fine-tuned model as an ordinary network, e.g. to re-measure its
    sensitivity (paper Table 6). `model` itself is left as it was."""
    out = copy.deepcopy(model)
    for name, m in lora_modules(out).items():
        # skip_init: no random init, so a copy draws nothing from the global RNG (dropout masks stay the same)
        linear = nn.utils.skip_init(nn.Linear, m.in_features, m.out_features, bias=m.bias is not None,
                                    device=m.weight.device, dtype=m.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(m.weight if m.merged else m.weight + m.delta_weight())
            if m.bias is not None:
                linear.bias.copy_(m.bias)
        linear.train(m.training)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name), child, linear)
    return out
