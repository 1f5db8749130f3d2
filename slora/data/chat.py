"""Chat templates without jinja: conversations `[(role, content), …]` rendered to token ids, turn by turn.

The template family is chosen from the tokenizer's special tokens:
  - "chatml" (SmolLM2, Qwen2): <|im_start|>{role}\\n{content}<|im_end|>\\n per message; generation prompt
    <|im_start|>assistant\\n. Some ChatML templates open with a default system turn when the conversation has none
    (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"); `default_system` reads it
    from the model folder's tokenizer_config.json `chat_template`.
  - "llama3" (Meta-Llama-3-Instruct): <|begin_of_text|> once, then <|start_header_id|>{role}<|end_header_id|>\\n\\n
    {content stripped}<|eot_id|> per message; generation prompt <|start_header_id|>assistant<|end_header_id|>\\n\\n.
    LLaMA-3.1 and later templates add a dated system turn (and tools); they are refused rather than approximated.
Anything else is an error that suggests prompt/response records (--jsonl-kind instructions).

Markers are inserted by id; the text between two markers is encoded as one string, as transformers'
`apply_chat_template` does when it tokenizes the rendered text (added tokens split the string). A turn is
`(ids, loss)`: `loss[i]` is True on the content of an assistant turn and its end marker (<|im_end|> or
<|eot_id|>), so the model learns to answer and to stop; headers, other roles and the "\\n" after <|im_end|>
carry no loss.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from slora.io.files import read_json

ROLES = ("system", "user", "assistant")
FAMILIES = {  # family -> the special tokens that identify it (all must be in the vocabulary)
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
STOP_TOKENS = ("<|im_end|>", "<|eot_id|>")  # end of an assistant turn: where generation stops


def template_family(tok: Tokenizer) -> str:
    """"chatml" or "llama3" from the vocabulary; an error when neither (or only part of one) is there."""
    found = [f for f, marks in FAMILIES.items() if all(tok.token_to_id(m) is not None for m in marks)]
    if len(found) == 1:
        return found[0]
    partial = {f: [m for m in marks if tok.token_to_id(m) is None] for f, marks in FAMILIES.items()}
    raise ValueError(f"tokenizer has no chat template slora implements (ChatML needs {FAMILIES['chatml']}, "
                     f"LLaMA-3 needs {FAMILIES['llama3']}; missing: {partial}); for this model write "
                     f"prompt/response records and use --jsonl-kind instructions")


def default_system(model_dir, tok: Tokenizer) -> str | None:
    """The system turn the model's own template adds when a conversation has none, read from
    `model_dir/tokenizer_config.json` `chat_template` (None when the file or template is absent, or when the
    template adds none). A LLaMA-3.1-style template (dated system turn) is an error."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    template = read_json(path).get("chat_template")
    if isinstance(template, list):  # transformers also allows [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return None
    family = template_family(tok)
    if family == "llama3" and "Cutting Knowledge Date" in template:
        raise ValueError(f"{path}: a LLaMA-3.1-style chat template (dated system turn, tools) is not implemented; "
                         f"use --jsonl-kind instructions (prompt/response records)")
    if family != "chatml":
        return None
    # the literal '<|im_start|>system\n…<|im_end|>\n' of a "no system message given" branch; the newline may be a
    # real one or a jinja escape
    m = re.search(r"'<\|im_start\|>system(?:\n|\\n)((?:[^'\\]|\\.)*?)<\|im_end\|>(?:\n|\\n)'", template)
    return m.group(1).replace("\\n", "\n").replace("\\'", "'") if m else None


def with_default_system(messages: tuple, system: str | None) -> tuple:
    """`messages` with `("system", system)` in front when it has no system turn first (the template's rule)."""
    if system is None or (messages and messages[0][0] == "system"):
        return messages
    return (("system", system),) + tuple(messages)


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def _head_and_body(tok: Tokenizer, head: str, body: str) -> tuple[list[int], int]:
    """ids of head + body encoded as one string (as transformers tokenizes the rendered template), and how many
    of them are header: the longest prefix they share with the head encoded alone. When the body starts with
    whitespace a byte-level BPE may merge it with the header's last "\n" (SmolLM2: "\n " is one token); that
    token carries content, so it counts as content (and gets the loss in an assistant turn)."""
    both, alone = _ids(tok, head + body), _ids(tok, head)
    n = 0
    while n < min(len(both), len(alone)) and both[n] == alone[n]:
        n += 1
    return both, n


def render_turns(tok: Tokenizer, messages: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[bool]]]:
    """One (ids, loss) per message, in the model's template; the first carries the template's BOS."""
    family = template_family(tok)
    turns = []
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise ValueError(f"chat role must be one of {ROLES}, got {role!r}")
        train = role == "assistant"
        if family == "chatml":
            s, e = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
            text, n_head = _head_and_body(tok, role + "\n", content)
            nl = _ids(tok, "\n")
            ids = [s] + text + [e] + nl
            loss = [False] * (1 + n_head) + [train] * (len(text) - n_head) + [train] + [False] * len(nl)
        else:
            sh, eh, eot = (tok.token_to_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
            bos = [tok.token_to_id("<|begin_of_text|>")] if i == 0 else []
            r = _ids(tok, role)
            text, n_head = _head_and_body(tok, "\n\n", content.strip())  # jinja `trim`
            ids = bos + [sh] + r + [eh] + text + [eot]
            loss = [False] * (len(bos) + 2 + len(r) + n_head) + [train] * (len(text) - n_head) + [train]
        turns.append((ids, loss))
    return turns


def generation_prompt(tok: Tokenizer) -> list[int]:
    """The ids that open the assistant's answer (`add_generation_prompt=True`)."""
    if template_family(tok) == "chatml":
        return [tok.token_to_id("<|im_start|>")] + _ids(tok, "assistant\n")
    return [tok.token_to_id("<|start_header_id|>")] + _ids(tok, "assistant") + \
        [tok.token_to_id("<|end_header_id|>")] + _ids(tok, "\n\n")


def stop_ids(tok: Tokenizer) -> list[int]:
    """Ids of the end-of-turn markers the vocabulary has."""
    return [i for i in (tok.token_to_id(t) for t in STOP_TOKENS) if i is not None]
