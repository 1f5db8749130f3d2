"""python -m slora.merge RUN_DIR OUT_DIR [--dtype bf16] [--base PATH] [--max-shard-size 2GB]

Merge a run's LoRA adapter into its base model and write a complete Hugging Face-format folder: config.json,
safetensors weights (shards plus model.safetensors.index.json once they exceed --max-shard-size), tokenizer.json and
the base folder's tokenizer_config.json / special_tokens_map.json / generation_config.json where present. For a task
model (encoder runs) the classification head is included and config.json names the task architecture
(Bert/Roberta/MPNetForSequenceClassification) and num_labels. The merge itself is slora.io.merge.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from slora.io.merge import DTYPES, merge


def parse_size(text: str) -> int:
    """'2GB' -> 2·10⁹ bytes, '500MB', '64KB', or a plain byte count (transformers' max_shard_size units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(GB|MB|KB|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"shard size {text!r}: expected a number with GB, MB, KB or B")
    unit = {"GB": 10 ** 9, "MB": 10 ** 6, "KB": 10 ** 3, "B": 1, None: 1}[(m.group(2) or "B").upper()]
    return int(float(m.group(1)) * unit)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m slora.merge", description=__doc__.split("\n\n")[1])
    p.add_argument("run_dir", type=Path, help="a slora run folder (args.json and adapter/)")
    p.add_argument("out_dir", type=Path, help="the merged model folder to write (an earlier merge slora wrote there "
                                              "is replaced; other files stay)")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="dtype of the written weights")
    p.add_argument("--base", type=Path, default=None, help="base model folder (default: the run's preset or path)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                   help="largest safetensors shard (bytes, or with GB/MB/KB)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = merge(args.run_dir, args.out_dir, DTYPES[args.dtype], args.base, args.max_shard_size)
    print(f"merged model: {out}")
    return out
