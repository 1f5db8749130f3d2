"""python -m slora.merge RUN_DIR OUT_DIR: merge a run's adapter into its base (slora.cli.merge)."""
from slora.cli.merge import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
