"""python -m slora.wiki_chat OUT_DIR: chat-format JSONL from the Wikipedia asset (slora.cli.wiki_chat)."""
from slora.cli.wiki_chat import main
from slora.cli.runner import cli

if __name__ == "__main__":
    cli(main)
