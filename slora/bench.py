"""python -m slora.bench: GPU calibration and training benchmarks, side by side (slora.cli.bench)."""
from slora.cli.bench import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
