"""python -m slora.gguf MODEL.gguf OUT_DIR

Convert a llama-architecture GGUF file (llama.cpp's format; F32, F16, Q8_0, Q4_0 or Q4_1 tensors) into a Hugging
Face-format folder that slora (and transformers) load: config.json, model.safetensors, tokenizer.json. The
reading and conversion are slora.io.gguf; this is the command.
"""
from __future__ import annotations

from pathlib import Path
from slora.cli.runner import ArgumentParser
from slora.errors import UsageError

from slora.io.gguf import convert_gguf_to_hf


def main(argv=None):
    ap = ArgumentParser(prog="python -m slora.gguf",
                        description="Convert a llama-architecture GGUF into a Hugging Face folder.")
    ap.add_argument("gguf", help="path of the .gguf file")
    ap.add_argument("out_dir", help="folder to create (must not exist)")
    args = ap.parse_args(argv)
    if not Path(args.gguf).is_file():
        raise UsageError(args.gguf, "is a folder, not a .gguf file" if Path(args.gguf).is_dir() else "no such file")
    print(f"wrote {convert_gguf_to_hf(args.gguf, args.out_dir)}")
