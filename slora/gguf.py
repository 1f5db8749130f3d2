"""python -m slora.gguf MODEL.gguf OUT_DIR: convert a llama GGUF to a Hugging Face folder (slora.cli.gguf)."""
from slora.cli.gguf import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
