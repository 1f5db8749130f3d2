"""Regenerate the recorded runs: python reference_runs/record.py [NAME ...]   (make reference)

Each run is one `python -m slora.finetune` command. Its whole run folder goes to reference_runs/<name>/ (the PEFT
adapter included), with command.txt (the exact command) and env.json (hardware, torch version, wall time) beside the
run's own files (grid.record). tests/reference_runs/test_record.py re-runs each command and compares with what is recorded
here, file by file.
"""
import shlex
import sys

from grid import HERE, record

# name -> finetune arguments (without --out). Short enough for CI on 2 CPU cores.
RUNS = {
    "minilm-rt-polarity-short": "--model minilm --task rt-polarity --alloc sensitivity --max-steps 80 "
                                "--max-eval 256 --device cpu --seed 0",
}

if __name__ == "__main__":
    for name in sys.argv[1:] or RUNS:
        # --replace: re-recording replaces the run files; command.txt and env.json are rewritten by record()
        record(shlex.split(RUNS[name]) + ["--out", f"reference_runs/{name}", "--replace"])
        print(f"recorded {HERE / name}")
