"""python -m slora.bench_dist --gpus N: torchrun scaling benchmark (slora.cli.bench_dist)."""
from slora.cli.bench_dist import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
