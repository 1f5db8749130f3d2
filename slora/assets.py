"""python -m slora.assets: fetch and check the offline models and data (slora.cli.assets)."""
from slora.cli.assets import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
