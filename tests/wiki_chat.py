"""Write a small chat-format JSONL pair (train.jsonl, dev.jsonl) from the Wikipedia asset, for trying
`--jsonl-kind chat` and for tests/serve_compat.py:

    PYTHONPATH=. python tests/wiki_chat.py OUT_DIR [--n-train 96] [--n-dev 16]

Each record is a two-exchange conversation about one Vital Article: the user gives the title and the start of
the extract and asks for a short description (the article's own description answers), then asks for its topic
(the article's topic answers). Every third record opens with a system turn, so conversations with and without
one (SmolLM2's template then adds its default) both occur. Articles are taken in slora's seeded order (seed 0).
Not collected by pytest (no `test_` prefix).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slora.data import Example, read_wiki, seeded_order  # noqa: E402

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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    main()
