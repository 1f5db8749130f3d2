"""python -m slora.wiki_chat OUT_DIR [--n-train 96] [--n-dev 16]

Write a small chat-format JSONL pair (train.jsonl, dev.jsonl) from the Wikipedia asset, for trying
`--jsonl-kind chat` (and for tests/comparisons/serve_compat.py).

Each record is a two-exchange conversation about one Vital Article: the user gives the title and the start of
the extract and asks for a short description (the article's own description answers), then asks for its topic
(the article's topic answers). Every third record opens with a system turn, so conversations with and without
one (SmolLM2's template then adds its default) both occur. Articles are taken in slora's seeded order (seed 0).
"""
import json
from pathlib import Path

from slora.cli.runner import ArgumentParser
from slora.data.tasks import Example, read_wiki, seeded_order

SYSTEM = "You answer in a few words."
EXTRACT_CHARS = 300  # keeps a conversation under ~150 SmolLM2 tokens


def conversation(i: int, d: dict) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
    messages += [
        {"role": "user", "content": f"Title: {d['title']}\n\n{d['extract'][:EXTRACT_CHARS]}\n\n"
                                    f"Describe this article in a few words."},
        {"role": "assistant", "content": d["description"]},
        {"role": "user", "content": "Which topic is it filed under?"},
        {"role": "assistant", "content": d["topic"]},
    ]
    return {"messages": messages}


def main(argv=None):
    p = ArgumentParser(prog="python -m slora.wiki_chat", description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="folder for train.jsonl and dev.jsonl")
    p.add_argument("--n-train", type=int, default=96, help="training conversations (count)")
    p.add_argument("--n-dev", type=int, default=16, help="dev conversations (count)")
    args = p.parse_args(argv)
    items = [d for d in read_wiki() if d["description"].strip() and d["topic"] != "Uncategorized"]
    order = seeded_order([Example(d["title"], "") for d in items], seed=0)
    by_title = {d["title"]: d for d in items}
    picked = [by_title[e.uid] for e in order[:args.n_train + args.n_dev]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", picked[:args.n_train]), ("dev", picked[args.n_train:])):
        lines = [json.dumps(conversation(i, d), ensure_ascii=False) for i, d in enumerate(part)]
        (args.out_dir / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.n_train} + {args.n_dev} conversations to {args.out_dir}/{{train,dev}}.jsonl")
