"""PEFT-format LoRA adapters: `save_adapter(model, folder, …)` and `load_adapter(model, folder)`.

A folder holds what `PeftModel.from_pretrained` reads (PEFT `utils/save_and_load.py`, `tuners/lora/config.py`):
  - `adapter_model.safetensors`: `base_model.model.<module>.lora_A.weight` (r, d_in) and `….lora_B.weight`
    (d_out, r) for every LoRA module, and for each `modules_to_save` module its whole state dict under
    `base_model.model.<head>.<key>` (PEFT's ModulesToSaveWrapper drops its `modules_to_save.default.` part on
    save and puts it back on load);
  - `adapter_config.json`: only keys that LoraConfig knows (an unknown key breaks older PEFT, peft#2275).

How PEFT resolves a module's rank and alpha (`tuners/lora/model.py` `_create_and_replace`, `utils/other.py`
`get_pattern_key`): the first `rank_pattern` key k with `re.match(rf"(.*\\.)?({k})$", name)` gives r, else the
config's `r`; the same for `alpha_pattern` and `lora_alpha`. A list `target_modules` matches a module named t or
ending in `.t`. So slora writes every LoRA module's fully qualified, `re.escape`d name into both patterns (an
explicit alpha for every module: the mixed-rank pitfall of diffusers#14409), lists exactly the modules with
rank > 0 in `target_modules` (PEFT rejects r = 0), and before writing replays PEFT's resolution on the model:
each key must match exactly one module and every module must resolve to slora's own rank and alpha. Fully
qualified keys need PEFT >= 0.14 (get_pattern_key, peft#2195; older versions required a `.` before the key).

Module names are those of the model passed in, so the adapter of a task model (`bert.encoder.layer.0.…`,
head `classifier`) fits transformers' `AutoModelForSequenceClassification`, and that of `LlamaForCausalLM`
(`model.layers.0.self_attn.q_proj`) fits `AutoModelForCausalLM`. Weights are read only through safetensors.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from slora.io.files import atomic_folder, read_json, writing
from slora.errors import SloraError
from slora.models.lora import LoRALinear, apply_lora, lora_modules
from slora.io.patterns import compile_pattern

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "FEATURE_EXTRACTION")
# PeftModelForSequenceClassification adds these to modules_to_save by itself (peft_model.py), and expects
# saved weights for every module whose name ends with one of them.
PEFT_SEQ_CLS_HEADS = ("classifier", "score")
ALL_LINEAR = "all-linear"  # PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND, compared lower-cased


class UnreadableAdapter(SloraError):
    """An adapter file that cannot be read at all (a damaged safetensors file): reported as itself, never as an
    adapter that does not fit a model."""


# -----------------------------------------------------------------------------
# PEFT's matching rules, replayed

def pattern_key(keys: Iterable[str], name: str, field: str = "rank_pattern") -> Optional[str]:
    """PEFT's get_pattern_key: the first key k with re.match(rf"(.*\\.)?({k})$", name), or None. Keys are checked
    and matched by slora.io.patterns (bounded time; a key that could backtrack without bound is an error)."""
    for k in keys:
        if compile_pattern(k, f"{CONFIG} {field} key").peft_key(name):
            return k
    return None


def _in_modules_to_save(entries, name: str) -> bool:
    """PEFT's `re.match(rf"(^|.*\\.){m}($|\\..*)", name)`: some run of whole dotted components of `name` is
    matched by the entry m."""
    parts = name.split(".")
    windows = [".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)]
    return any(compile_pattern(m, f"{CONFIG} modules_to_save entry").fullmatch(w) for m in entries for w in windows)


def all_linear(model: nn.Module, task_type: Optional[str]) -> set[str]:
    """PEFT's target_modules="all-linear" (`tuners_utils._maybe_include_all_linear_layers`): every nn.Linear,
    except the output head (`lm_head`, what get_output_embeddings returns) or, for a SEQ_CLS model without one,
    the classification head (`score` / `classifier`), and except layers inside an existing LoRA layer."""
    heads = {"lm_head"} if isinstance(getattr(model, "lm_head", None), nn.Module) else \
        ({h for h in PEFT_SEQ_CLS_HEADS if hasattr(model, h)} if task_type == "SEQ_CLS" else set())
    inside_lora = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LoRALinear)
                   for c, _ in m.named_modules() if c}
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - heads - inside_lora


def is_target(config: dict, name: str) -> bool:
    """PEFT's check_target_module_exists for `target_modules` (list: exact or `.`-suffix; str: fullmatch), with
    modules inside a `modules_to_save` module excluded as PEFT excludes them. "all-linear" is resolved by
    `resolve`, which knows the model."""
    if _in_modules_to_save(config.get("modules_to_save") or (), name):
        return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            raise ValueError("target_modules 'all-linear' names modules of a model: use resolve(config, model)")
        return compile_pattern(targets, f"{CONFIG} target_modules").fullmatch(name)
    return name in targets or any(name.endswith("." + t) for t in targets)


def resolve(config: dict, model: nn.Module) -> dict[str, tuple[int, float]]:
    """{module name: (r, alpha)} for every module PEFT would put LoRA on, by PEFT's rules."""
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        config = config | {"target_modules": sorted(all_linear(model, config.get("task_type")))}
    out = {}
    for name, _ in model.named_modules():
        if name and is_target(config, name):
            rk, ak = pattern_key(rp, name, "rank_pattern"), pattern_key(ap, name, "alpha_pattern")
            out[name] = (rp[rk] if rk is not None else config["r"], ap[ak] if ak is not None else config["lora_alpha"])
    return out


# -----------------------------------------------------------------------------
# Save

def _mode(values):
    """The most common value; ties go to the smallest, so the choice is deterministic."""
    counts = Counter(values)
    return min(counts, key=lambda v: (-counts[v], v))


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """PEFT's and vLLM's scaling for one (α, r): α/r, or α/√r with rsLoRA (vLLM `lora/peft_helper.py`)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def serving_alphas(model: nn.Module, fold_scaling: bool = False) -> tuple[int, float, dict[str, float]]:
    """(r, lora_alpha, {module: α to write}) for the adapter config.

    Servers that drop rank_pattern/alpha_pattern (vLLM `lora/peft_helper.py`) scale every module by the global
    lora_alpha/r. r is the most common rank and lora_alpha the α of the modules with that rank, so whenever all
    modules share one scaling (policy "scale"), the global pair reproduces it. With `fold_scaling` the α written
    for each module is s·r_w (s·√r_w with rsLoRA), s the global scaling: every module then resolves to s, and
    `adapter_tensors(..., fold=...)` multiplies B by s_w/s so that the update is unchanged."""
    layers = lora_modules(model)
    r = _mode(m.r for m in layers.values())
    alpha = _mode(m.alpha for m in layers.values() if m.r == r)
    if not fold_scaling:
        return r, alpha, {name: m.alpha for name, m in layers.items()}
    s = _scaling(alpha, r, next(iter(layers.values())).use_rslora)
    return r, alpha, {name: s * (math.sqrt(m.r) if m.use_rslora else m.r) for name, m in layers.items()}


def fold_factors(model: nn.Module, config: dict) -> dict[str, float]:
    """{module: s_w / s} with s_w the module's own scaling and s the config's global lora_alpha/r (or /√r):
    the factor that folds the module's scaling into its B for a one-global-scaling loader."""
    s = _scaling(config["lora_alpha"], config["r"], config["use_rslora"])
    return {name: m.scaling / s for name, m in lora_modules(model).items()}


def mis_scaled_modules(model: nn.Module, config: dict, rel: float = 1e-12) -> list[str]:
    """The modules whose resolved scaling (by the config's patterns) differs from the global lora_alpha/r by more
    than `rel` (relative; float rounding of α·r/r_ref stays far below it): empty when a server that applies one
    global scaling computes what PEFT and slora compute."""
    s = _scaling(config["lora_alpha"], config["r"], config["use_rslora"])
    return [name for name, (r, a) in resolve(config, model).items()
            if abs(_scaling(a, r, config["use_rslora"]) - s) > rel * s]


def adapter_config(model: nn.Module, base_model_name_or_path: str, task_type: str,
                   modules_to_save: Optional[Iterable[str]] = None, fold_scaling: bool = False) -> dict:
    """The adapter_config.json dict for `model`'s LoRA layers, checked against PEFT's resolution on `model`.

    `modules_to_save` defaults to ("classifier",) for SEQ_CLS and to none otherwise. `fold_scaling`: write the
    alphas of `serving_alphas(..., fold_scaling=True)` (the tensors must then be folded, see save_adapter).
    """
    if task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {', '.join(TASK_TYPES)}, got {task_type!r}")
    layers = lora_modules(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layer: nothing to save (apply_lora first)")
    for what, get in (("use_rslora", lambda m: m.use_rslora), ("lora_dropout", _dropout_p)):
        values = {name: get(m) for name, m in layers.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"PEFT has one {what} per adapter, but the LoRA layers differ: {values}")
    if modules_to_save is None:
        modules_to_save = ("classifier",) if task_type == "SEQ_CLS" else ()
    modules_to_save = list(modules_to_save)
    names = [name for name, _ in model.named_modules()]
    for m in modules_to_save:
        hits = [n for n in names if n.endswith(m)]  # PEFT's _set_trainable rule: a plain suffix
        if hits != [m]:
            raise ValueError(f"modules_to_save entry {m!r} must name exactly one module, by PEFT's suffix rule; "
                             f"it matches {hits or 'nothing'}")
    if task_type == "SEQ_CLS":
        wrapped = [n for n in names if any(n.endswith(h) for h in PEFT_SEQ_CLS_HEADS)]
        unsaved = [n for n in wrapped if n not in modules_to_save]
        if unsaved:
            raise ValueError(f"PEFT's SEQ_CLS model wraps {unsaved} as modules_to_save and needs their weights; "
                             f"add them to modules_to_save")
        if not modules_to_save:
            raise ValueError("task_type SEQ_CLS needs the classification head in modules_to_save")

    first = next(iter(layers.values()))
    r, lora_alpha, alphas = serving_alphas(model, fold_scaling)
    rank_pattern = {re.escape(name): m.r for name, m in layers.items()}
    alpha_pattern = {re.escape(name): _number(alphas[name]) for name, m in layers.items()}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": str(base_model_name_or_path),
        "inference_mode": True,
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "target_modules": list(layers),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_rslora": first.use_rslora,
        "lora_dropout": _dropout_p(first),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": modules_to_save or None,
    }
    _check_config(config, model, alphas)
    return config


def _dropout_p(m: LoRALinear) -> float:
    return float(m.lora_dropout.p) if isinstance(m.lora_dropout, nn.Dropout) else 0.0


def _check_config(config: dict, model: nn.Module, alphas: dict[str, float]):
    """Replay PEFT's resolution: every pattern key matches exactly one module, and PEFT would build exactly
    slora's LoRA layers with slora's ranks and the given alphas."""
    names = [name for name, _ in model.named_modules() if name]
    for field in ("rank_pattern", "alpha_pattern"):
        for k in config[field]:
            hits = [n for n in names if compile_pattern(k, f"{CONFIG} {field} key").peft_key(n)]
            if len(hits) != 1:
                raise ValueError(f"{field} key {k!r} must match exactly one module; it matches {hits or 'nothing'}")
    want = {name: (m.r, alphas[name]) for name, m in lora_modules(model).items()}
    got = resolve(config, model)
    if set(got) != set(want):
        raise ValueError(f"PEFT would put LoRA on a different set of modules; differs at "
                         f"{sorted(set(got) ^ set(want))}")
    for name, (r, alpha) in want.items():
        if got[name][0] != r or float(got[name][1]) != float(_number(alpha)):
            raise ValueError(f"PEFT would resolve {name!r} to r={got[name][0]}, alpha={got[name][1]}; "
                             f"slora has r={r}, alpha={alpha}")


def adapter_tensors(model: nn.Module, modules_to_save: Iterable[str] = (),
                    fold: Optional[dict[str, float]] = None) -> dict[str, torch.Tensor]:
    """The PEFT-keyed tensors: LoRA factors and the full state of each modules_to_save module. `fold`
    ({module: factor}, see fold_factors) multiplies each B by its factor (in float64, cast back to B's dtype)."""
    out = {}
    for name, m in lora_modules(model).items():
        B = m.lora_B.weight.detach()
        if fold is not None:
            B = (B.double() * fold[name]).to(B.dtype)
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PREFIX}{name}.lora_B.weight"] = B
    for head in modules_to_save:
        out.update({f"{PREFIX}{head}.{k}": v.detach() for k, v in model.get_submodule(head).state_dict().items()})
    return out


def save_adapter(model: nn.Module, folder, base_model_name_or_path, task_type: str,
                 modules_to_save: Optional[Iterable[str]] = None, fold_scaling: bool = False) -> Path:
    """Write `folder/adapter_config.json` and `folder/adapter_model.safetensors`, atomically.

    `fold_scaling`: fold each module's scaling ÷ the global lora_alpha/r into its B and write alphas that resolve
    to the global scaling, so that a loader applying one global lora_alpha/r to every module (vLLM) computes the
    same update as PEFT and slora. Without it, an adapter whose modules have different α_w/r_w (alpha policies
    "constant" and "rslora") is mis-scaled by such a loader; `mis_scaled_modules` names the modules affected.

    The files go to a temporary folder beside `folder` that is renamed into place. An existing `folder` is
    replaced only if it is empty or holds an adapter (an adapter_config.json); anything else is an error.
    """
    config = adapter_config(model, base_model_name_or_path, task_type, modules_to_save, fold_scaling)
    fold = fold_factors(model, config) if fold_scaling else None
    tensors = {k: v.contiguous().cpu()
               for k, v in adapter_tensors(model, config["modules_to_save"] or (), fold).items()}
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and (not any(folder.iterdir()) or (folder / CONFIG).is_file())):
        raise FileExistsError(f"{folder}: exists and is not an adapter folder; not overwriting it")
    with atomic_folder(folder) as tmp:
        with writing(tmp / WEIGHTS):  # a full disk or a folder without permission: an error naming the file
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        with writing(tmp / CONFIG):
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


# -----------------------------------------------------------------------------
# Load

# Config keys whose value changes the adapter's maths, with the only value slora implements.
REQUIRED_VALUES = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False}
# Keys slora reads or that carry no maths.
KNOWN = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
         "auto_mapping", "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
         "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights", "modules_to_save",
         "megatron_core", "qalora_group_size"}  # the last two only matter with megatron_config / use_qalora
INIT_OK = (True, False, "gaussian")  # the others (pissa, olora, corda, loftq, …) also rewrite the base weights


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is not a rank


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Types of the keys slora reads (a JSON boolean is a boolean: "false" as a string would be truthy).
TYPES = {"peft_type": str, "task_type": (str, type(None)), "base_model_name_or_path": (str, type(None)),
         "inference_mode": bool, "use_rslora": bool, "bias": str, "fan_in_fan_out": bool,
         "rank_pattern": (dict, type(None)), "alpha_pattern": (dict, type(None)),
         "target_modules": (str, list, type(None)), "modules_to_save": (list, type(None))}


def check_config(config, path: Path, model: nn.Module):
    """Every value slora reads, its type included, and every pattern (compiled: slora.io.patterns refuses what can
    backtrack without bound), before the model is touched. Errors name the file and the key."""
    if not isinstance(config, dict):
        raise SloraError(path, f"must hold a JSON object, not a {type(config).__name__}")
    for k, t in TYPES.items():
        if k in config and not isinstance(config[k], t):
            kinds = [x.__name__.replace("NoneType", "null") for x in (t if isinstance(t, tuple) else (t,))]
            raise SloraError(path, f"{k} = {config[k]!r} has the wrong type ({type(config[k]).__name__}); "
                                   f"expected {' or '.join(kinds)}")
    for k, v in REQUIRED_VALUES.items():
        if config.get(k, v) != v:
            raise SloraError(path, f"{k}={config[k]!r} is not supported by slora (only {v!r})")
    if config.get("init_lora_weights", True) not in INIT_OK or isinstance(config.get("init_lora_weights"), int) \
            and not isinstance(config.get("init_lora_weights"), bool):
        raise SloraError(path, f"init_lora_weights={config['init_lora_weights']!r} changes the base weights; "
                               f"slora loads plain LoRA adapters only")
    # Any other key is accepted only while it is switched off (None, False, empty): DoRA, layer replication,
    # layers_to_transform, trainable tokens, LoRA bias, target_parameters, … all change the maths.
    on = sorted(k for k, v in config.items() if k not in KNOWN and v not in (None, False, {}, [], ""))
    if on:
        raise SloraError(path, "options slora does not implement are set: "
                         + ", ".join(f"{k}={config[k]!r}" for k in on))
    for k in ("r", "lora_alpha"):
        if k not in config:
            raise SloraError(path, f"missing {k!r}")
    if not _is_int(config["r"]) or config["r"] <= 0:
        raise SloraError(path, f"r = {config['r']!r} must be an integer > 0")
    if not _is_real(config["lora_alpha"]):
        raise SloraError(path, f"lora_alpha = {config['lora_alpha']!r} must be a finite number")
    dropout = config.get("lora_dropout", 0.0)
    if not _is_real(dropout) or not 0 <= dropout < 1:
        raise SloraError(path, f"lora_dropout = {dropout!r} must be a number in [0, 1)")
    for field, ok, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "an integer > 0"),
                            ("alpha_pattern", _is_real, "a finite number")):
        for key, v in (config.get(field) or {}).items():
            if not ok(v):
                raise SloraError(path, f"{field}[{key!r}] = {v!r} must be {what}")
            compile_pattern(key, f"{path} {field} key")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        bad = [t for t in targets if not isinstance(t, str)]
        if bad:
            raise SloraError(path, f"target_modules entry {bad[0]!r} is not a string")
    elif isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        compile_pattern(targets, f"{path} target_modules")
    for m in config.get("modules_to_save") or ():
        compile_pattern(m, f"{path} modules_to_save entry")


def read_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter folder, read through json and safetensors only; every tensor must be a
    finite floating-point tensor."""
    folder = Path(folder)
    for f in (CONFIG, WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f}: missing (an adapter folder holds {CONFIG} and {WEIGHTS})")
    config = read_json(folder / CONFIG, CONFIG)
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header or short file
        raise UnreadableAdapter(folder / WEIGHTS, f"cannot read safetensors file: {e}; the adapter is damaged") \
            from None
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise SloraError(f"{folder / WEIGHTS}: tensor {k!r}", f"is {t.dtype}; LoRA factors and heads are "
                                                                  f"floating point")
        if not bool(torch.isfinite(t).all()):
            raise SloraError(f"{folder / WEIGHTS}: tensor {k!r}", "holds NaN or inf values; the adapter is damaged "
                                                                  "or was saved from a diverged run")
    return config, tensors


def load_adapter(model: nn.Module, folder) -> nn.Module:
    """Apply the adapter in `folder` to `model` in place: LoRA with PEFT's per-module ranks and alphas, the
    factors loaded strictly (every missing, unexpected or mis-shaped tensor is named), modules_to_save weights
    copied into the model's heads. Atomic: every value is checked before the model is touched, and should the
    change itself fail the replaced layers and head weights are put back."""
    folder = Path(folder)
    config, tensors = read_adapter(folder)
    check_config(config, folder / CONFIG, model)
    modules = dict(model.named_modules())
    plan = resolve(config, model)
    if not plan:
        raise SloraError(folder / CONFIG, f"target_modules {config.get('target_modules')!r} match no module "
                                          f"of {type(model).__name__}")
    for name, (r, alpha) in plan.items():
        if isinstance(modules[name], LoRALinear):
            raise SloraError(folder / CONFIG, f"{name!r} already has a LoRA layer; load onto a fresh model")
        if not isinstance(modules[name], nn.Linear):
            raise SloraError(folder / CONFIG, f"target {name!r} is a {type(modules[name]).__name__}; slora "
                                              f"puts LoRA on nn.Linear only")
        if not _is_int(r) or r <= 0:
            raise SloraError(folder / CONFIG, f"rank of {name!r} resolves to {r!r}; PEFT needs an int > 0")
        if not _is_real(alpha):
            raise SloraError(folder / CONFIG, f"alpha of {name!r} resolves to {alpha!r}; it must be a finite "
                                              f"number")

    expected = {}
    for name, (r, _) in plan.items():
        lin = modules[name]
        expected[f"{PREFIX}{name}.lora_A.weight"] = (r, lin.in_features)
        expected[f"{PREFIX}{name}.lora_B.weight"] = (lin.out_features, r)
    heads = {}
    for m in config.get("modules_to_save") or ():
        hits = [n for n in modules if n and n.endswith(m)]  # PEFT's suffix rule
        for h in hits:
            heads[h] = modules[h]
            expected.update({f"{PREFIX}{h}.{k}": tuple(v.shape) for k, v in modules[h].state_dict().items()})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = sorted(f"{k}: file {tuple(tensors[k].shape)} vs model {expected[k]}"
                    for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    problems = ([f"missing tensor(s): {', '.join(missing)}"] if missing else []) + \
               ([f"unexpected tensor(s): {', '.join(unexpected)}"] if unexpected else []) + \
               ([f"mis-shaped tensor(s): {'; '.join(shapes)}"] if shapes else [])
    if problems:
        raise SloraError(folder / WEIGHTS, "adapter does not match the model: " + " | ".join(problems))

    # the change: layers swapped and head weights overwritten; undone as a whole if anything fails midway
    originals = {name: modules[name] for name in plan}
    saved_heads = {h: {k: v.detach().clone() for k, v in mod.state_dict().items()} for h, mod in heads.items()}
    try:
        apply_lora(model, {name: r for name, (r, _) in plan.items()}, {name: a for name, (_, a) in plan.items()},
                   use_rslora=config.get("use_rslora", False), dropout=float(config.get("lora_dropout", 0.0)))
        with torch.no_grad():
            for name, layer in lora_modules(model).items():
                if name in plan:
                    layer.lora_A.weight.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
                    layer.lora_B.weight.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
            for h, mod in heads.items():
                for k, v in mod.state_dict(keep_vars=True).items():
                    v.copy_(tensors[f"{PREFIX}{h}.{k}"])
    except BaseException:
        with torch.no_grad():
            for name, lin in originals.items():
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, lin)
            for h, mod in heads.items():
                for k, v in mod.state_dict(keep_vars=True).items():
                    v.copy_(saved_heads[h][k])
        raise
    return model
