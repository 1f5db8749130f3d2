"""python -m slora.finetune: fine-tune with Sensitivity-LoRA ranks (slora.cli.finetune)."""
from slora.cli.finetune import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
