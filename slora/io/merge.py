"""Merge a run's LoRA adapter into its base model and write a complete Hugging Face-format folder: config.json,
safetensors weights (shards plus model.safetensors.index.json once they exceed --max-shard-size), tokenizer.json and
the base folder's tokenizer_config.json / special_tokens_map.json / generation_config.json where present. For a task
model (encoder runs) the classification head is included and config.json names the task architecture
(Bert/Roberta/MPNetForSequenceClassification) and num_labels. transformers loads the result with
its Auto classes and slora with `load_model` (decoder) or `load_sequence_classifier` (encoder task model).

This is PEFT's `merge_and_unload` as a command: W ← W + (α_w/r_w)·B A for every LoRA module (`lora.merged_copy`),
written by `io.model_folder.save_model`. The base is the run's: its preset is resolved again on this machine, or its
recorded path (args.json `resolved.model_path`) is read; --base overrides both. An adapter that does not fit the
base is refused with the tensors that differ.

OUT_DIR is an output folder of slora.io.files' protocol, locked from before the base is read until the merged files
are in place: OUT_DIR/.slora-lock, the files written in OUT_DIR/.slora-partial/, then moved in under a journal and
listed in OUT_DIR/.slora-merge.json. An OUT_DIR that is, contains or lies inside the base, the run or its adapter is
refused. The files of an earlier merge that slora wrote there (its .slora-merge.json) are replaced; the user's other
files stay, and a file with a name a merge writes that no .slora-merge.json lists is refused before any work. A
merge killed at any moment is finished or redone by running the same command again.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from slora.io.adapter import CONFIG, PREFIX, WEIGHTS, UnreadableAdapter, load_adapter
from slora.io.assets import MODEL_DIRS, model_dir
from slora.errors import SloraError
from slora.io.files import OutputError, check_apart, completing, output_folder, read_json
from slora.io.hub_cache import locate_model
from slora.models.lora import merged_copy
from slora.models import for_sequence_classification
from slora.io.model_folder import load_model, save_model
from slora.models.llama import LlamaForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Files of the base folder that describe the tokenizer and generation, copied unchanged when present.
BASE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
MANIFEST = ".slora-merge.json"  # in OUT_DIR: the files the merge wrote, which a later merge may replace
# Names a merge writes (shards: model-00001-of-00003.safetensors): in an OUT_DIR that no manifest of slora's
# explains, they are the user's and are never replaced
WRITES = {"config.json", "model.safetensors", "model.safetensors.index.json", "tokenizer.json", *BASE_FILES}
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def merge_writes(name: str) -> bool:
    return name in WRITES or SHARD.fullmatch(name) is not None


def base_path(run_dir: Path, override: Path | None) -> Path:
    """The run's base folder: --base (a preset, a folder or a name in the Hugging Face cache, looked up as finetune's
    --model is), else the run's preset resolved here, else the folder it recorded, else its --model name (and
    --revision) looked up in this machine's Hugging Face cache."""
    if override is not None:
        path, note = locate_model(str(override), flag="--base")
    else:
        args_file = run_dir / "args.json"
        if not args_file.is_file():
            raise FileNotFoundError(f"{args_file}: missing; {run_dir} is not a slora run folder")
        args = read_json(args_file)
        if args.get("model") in MODEL_DIRS:  # a preset: resolved on this machine, as finetune does
            return Path(model_dir(args["model"]))
        recorded = Path(args.get("resolved", {}).get("model_path", args.get("model")))
        if recorded.is_dir() or not isinstance(args.get("model"), str):
            return recorded
        try:  # recorded on another machine: its name, found in this machine's cache
            path, note = locate_model(args["model"], args.get("revision"))
        except SloraError as e:
            raise SloraError(args_file, f"the run's model {recorded} is not here, and {e.message}") from None
    if note:
        print(f"note: {note}", flush=True)
    return path


def num_labels(adapter: Path) -> int:
    """Label count of a SEQ_CLS adapter, from its saved head: the rows of the last classifier weight
    (`classifier.weight` for BERT, `classifier.out_proj.weight` for RoBERTa)."""
    try:
        with safe_open(str(adapter / WEIGHTS), framework="pt", device="cpu") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header or short file
        raise UnreadableAdapter(adapter / WEIGHTS, f"cannot read safetensors file: {e}; the adapter is damaged") \
            from None
    heads = [k for k in shapes if k in (f"{PREFIX}classifier.weight", f"{PREFIX}classifier.out_proj.weight")]
    if len(heads) != 1:
        raise ValueError(f"{adapter / WEIGHTS}: a SEQ_CLS adapter must carry one classifier head weight, "
                         f"found {heads or 'none'}")
    return shapes[heads[0]][0]


def merge(run_dir, out_dir, dtype: torch.dtype = torch.float32, base: Path | None = None,
          max_shard_bytes: int | None = None) -> Path:
    """Load the base and the run's adapter, merge, write OUT_DIR. Returns OUT_DIR."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    adapter = run_dir / "adapter"
    journal = completing(run_dir)
    if journal is not None:  # the run's files are half moved into place: its adapter may be either side
        raise OutputError(run_dir, f"the run's completion was cut short; {journal['finish']} to finish it")
    if not (adapter / CONFIG).is_file():
        raise FileNotFoundError(f"{adapter / CONFIG}: missing; the run has no adapter (an --allocate-only run?)")
    path = base_path(run_dir, base)
    check_apart(out_dir, {"the base model folder": path, "the run folder": run_dir, "the adapter": adapter})
    with output_folder(out_dir, MANIFEST, merge_writes, finish="run the same python -m slora.merge again") as files:
        model = load_model(path)  # fp32: the merge is computed in fp32 and cast once at the end
        task_type = read_json(adapter / CONFIG).get("task_type")
        decoder = isinstance(model, LlamaForCausalLM)
        if (task_type == "CAUSAL_LM") != decoder and task_type in ("CAUSAL_LM", "SEQ_CLS"):
            kind = "a decoder" if decoder else "an encoder"
            raise ValueError(f"{adapter / CONFIG}: task_type {task_type} does not fit the base model {path}, which "
                             f"is {kind} ({model.config.model_type}); give the run's own base (--base)")
        if task_type == "SEQ_CLS":  # an encoder's task model: the head comes with the adapter
            model = for_sequence_classification(model, num_labels(adapter))
        try:
            load_adapter(model, adapter)
        except UnreadableAdapter:
            raise  # a damaged file is named as itself, not as a misfit
        except (ValueError, TypeError) as e:
            raise ValueError(f"{adapter} does not fit the base model {path}: {e}") from None
        tok = path / "tokenizer.json"
        if not tok.is_file():
            raise FileNotFoundError(f"{tok}: the base has no tokenizer.json; a merged folder needs one")
        merged = merged_copy(model.eval()).to(dtype)
        extra = {name: path / name for name in BASE_FILES if (path / name).is_file()}
        save_model(merged, files, max_shard_bytes, tokenizer=tok, extra_files=extra)
    return out_dir

