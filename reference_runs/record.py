"""Regenerate the recorded runs: python reference_runs/record.py [NAME ...]   (make reference)

Each run is one `python -m slora.finetune` command. Its run folder goes to reference_runs/<name>/, with
command.txt (the exact command) and env.json (device, torch version, wall time) beside the run's own files.
tests/test_reference_runs.py re-runs each command and compares with what is recorded here.
"""
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from slora import finetune

HERE = Path(__file__).resolve().parent
# name -> finetune arguments (without --out). Short enough for CI on 2 CPU cores.
RUNS = {
    "minilm-rt-polarity-short": "--model minilm --task rt-polarity --alloc sensitivity --max-steps 80 "
                                "--max-eval 256 --device cpu --seed 0",
}


def record(name: str) -> Path:
    os.chdir(HERE.parent)  # relative paths in args.json and command.txt: the same on every clone
    argv = shlex.split(RUNS[name]) + ["--out", f"reference_runs/{name}"]
    t0 = time.time()
    out = finetune.main(argv)
    wall = time.time() - t0
    (out / "command.txt").write_text("python -m slora.finetune " + " ".join(argv) + "\n")
    env = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "python": platform.python_version(), "wall_s": round(wall, 1)}
    (out / "env.json").write_text(json.dumps(env, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    for name in sys.argv[1:] or RUNS:
        print(f"recorded {record(name)}")
