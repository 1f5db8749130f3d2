"""How text becomes batches: encoding for encoders (pairs, truncation) and decoders (prompt + response with the
loss on the response only, generation prompts), collation with dynamic padding, and calibration batches.

  feats = encode_encoder(tok, examples, max_len) | encode_lm(tok, examples, max_len, eos_id)
  for batch in iterate_batches(feats, batch_size, pad_id, generator=g): model(**batch)
What a task is (specs, readers, seeded splits, calibration sources) lives in slora.data; this module only turns
its Examples into tensors. Batches: dicts of input_ids, attention_mask[, token_type_ids][, labels] tensors,
model(**batch)-ready.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tokenizers import Tokenizer

from slora.data import chat
from slora.data.tasks import Example

IGNORE_INDEX = -100  # label of prompt and pad positions: no loss (transformers' and cross_entropy's default)


# -----------------------------------------------------------------------------
# Tokenization


@dataclass
class Features:
    input_ids: list[int]
    token_type_ids: list[int] | None = None         # encoder segment ids; None for decoders
    labels: int | float | list[int] | None = None   # class id | target | per-token ids (-100 = no loss)


def encode_encoder(tok: Tokenizer, examples: Sequence[Example], max_len: int) -> list[Features]:
    """Single sentences or pairs through the tokenizer's post-processor ([CLS] a [SEP] (b [SEP])), truncated to
    max_len longest-first as the tokenizers library does: the shorter text keeps min(its length, budget//2)
    tokens, the longer one the rest. Labels: class ids and regression targets pass through, others become None."""
    a_all = tok.encode_batch([e.text for e in examples], add_special_tokens=False)
    b_all = tok.encode_batch([e.text_pair or "" for e in examples], add_special_tokens=False)
    out = []
    for e, a, b in zip(examples, a_all, b_all):
        b = b if e.text_pair is not None else None
        budget = max_len - tok.num_special_tokens_to_add(b is not None)
        if budget < (2 if b is not None else 1):
            raise ValueError(f"max_len {max_len} leaves no room for text after the special tokens")
        keep_a = min(len(a.ids), budget)
        if b is not None:
            short = min(len(a.ids), len(b.ids), budget // 2)
            keep_a = short if len(a.ids) <= len(b.ids) else min(len(a.ids), budget - short)
            if len(b.ids) > budget - keep_a:
                b.truncate(budget - keep_a)
        if len(a.ids) > keep_a:
            a.truncate(keep_a)
        enc = tok.post_process(a, b, add_special_tokens=True)
        out.append(Features(enc.ids, enc.type_ids, e.label if isinstance(e.label, (int, float)) else None))
    return out


def uses_chatml(tok: Tokenizer) -> bool:
    """True when the vocabulary has ChatML's markers (SmolLM2-Instruct); both must then be present."""
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    if (start is None) != (end is None):
        raise ValueError("tokenizer has only one of <|im_start|> / <|im_end|>; cannot build the chat format")
    return start is not None


def _ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def encode_prompt_parts(tok: Tokenizer, prompt: str, max_prompt: int) -> list[int]:
    """Prompt ids, ending where the response starts. ChatML: <|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n (no system turn); otherwise the prompt then "\\n". The markers are inserted by id, so
    they need not be registered as added tokens. Only the prompt body is cut (from its end) to fit max_prompt."""
    if uses_chatml(tok):
        s, e = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
        head, tail = [s] + _ids(tok, "user\n"), [e] + _ids(tok, "\n") + [s] + _ids(tok, "assistant\n")
    else:
        head, tail = [], _ids(tok, "\n")
    room = max_prompt - len(head) - len(tail)
    if room < 1:
        raise ValueError(f"max length {max_prompt} leaves no room for the prompt inside its chat markers")
    return head + _ids(tok, prompt)[:room] + tail


def is_chat(e: Example) -> bool:
    """A chat example: `text` is the conversation before its final assistant turn, `label` that turn's content."""
    return isinstance(e.text, tuple)


def encode_chat(tok: Tokenizer, e: Example, max_len: int) -> Features:
    """A whole conversation in the model's chat template (slora.data.chat), loss on every assistant turn's content and
    end marker. The final assistant turn keeps up to max_len//2 tokens (as a response does in encode_lm); the
    earlier turns keep their last tokens, as many as fit (the oldest text is dropped first)."""
    turns = chat.render_turns(tok, e.text + (("assistant", e.label),))
    ids, loss = turns[-1][0][:max_len // 2], turns[-1][1][:max_len // 2]
    room = max_len - len(ids)
    ctx = [t for turn in turns[:-1] for t in zip(*turn)][-room:] if room > 0 else []
    pairs = ctx + list(zip(ids, loss))
    return Features([i for i, _ in pairs], None, [i if keep else IGNORE_INDEX for i, keep in pairs])


def chat_prompt(tok: Tokenizer, e: Example, max_len: int) -> list[int]:
    """The conversation before the final assistant turn plus the generation prompt, its last max_len tokens."""
    ids = [i for ids, _ in chat.render_turns(tok, e.text) for i in ids] + chat.generation_prompt(tok)
    return ids[-max_len:]


def encode_lm(tok: Tokenizer, examples: Sequence[Example], max_len: int, eos_id: int | None = None) -> list[Features]:
    """Prompt + response (the example's label) for causal-LM training, labels = IGNORE_INDEX on the prompt: the
    loss is on response tokens only. The response ends with <|im_end|> (ChatML) or eos_id (plain; nothing if
    None), so the model learns to stop, and keeps up to max_len//2 tokens; the prompt body is cut to fit the rest.
    No BOS token: SmolLM2's chat template has none. Chat examples (`is_chat`) go through encode_chat."""
    end = [tok.token_to_id("<|im_end|>")] if uses_chatml(tok) else ([eos_id] if eos_id is not None else [])
    out = []
    for e in examples:
        if is_chat(e):
            out.append(encode_chat(tok, e, max_len))
            continue
        response = (_ids(tok, e.label) + end)[:max_len // 2]
        prompt = encode_prompt_parts(tok, e.text, max_len - len(response))
        out.append(Features(prompt + response, None, [IGNORE_INDEX] * len(prompt) + response))
    return out


def encode_prompts(tok: Tokenizer, examples: Sequence[Example], max_len: int) -> list[Features]:
    """Generation prompts (no response) for batched greedy decoding; batch them with side="left". A chat example's
    prompt is everything before its final assistant turn, with the generation prompt."""
    return [Features(chat_prompt(tok, e, max_len) if is_chat(e) else encode_prompt_parts(tok, e.text, max_len))
            for e in examples]


def decode_generations(tok: Tokenizer, output_ids: torch.Tensor, prompt_width: int,
                       stop_ids: Sequence[int]) -> list[str]:
    """The text generated after a left-padded prompt batch of width prompt_width, cut at the first stop id."""
    rows = output_ids[:, prompt_width:].tolist()
    cuts = [next((i for i, t in enumerate(row) if t in stop_ids), len(row)) for row in rows]
    return [tok.decode(row[:cut], skip_special_tokens=True).strip() for row, cut in zip(rows, cuts)]


# -----------------------------------------------------------------------------
# Batching


def collate(feats: Sequence[Features], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding). Keys: input_ids (pad_id), attention_mask
    (1 = real token), token_type_ids (0) when present, labels: (B,) long for classes, (B,) float32 for
    regression, (B, T) long padded with IGNORE_INDEX for token labels."""
    if side not in ("right", "left"):
        raise ValueError(f"padding side must be 'right' or 'left', got {side!r}")
    T = max(len(f.input_ids) for f in feats)

    def pad(seq, value):
        fill = [value] * (T - len(seq))
        return list(seq) + fill if side == "right" else fill + list(seq)

    batch = {"input_ids": torch.tensor([pad(f.input_ids, pad_id) for f in feats], dtype=torch.long),
             "attention_mask": torch.tensor([pad([1] * len(f.input_ids), 0) for f in feats], dtype=torch.long)}
    if feats[0].token_type_ids is not None:
        batch["token_type_ids"] = torch.tensor([pad(f.token_type_ids, 0) for f in feats], dtype=torch.long)
    labels = [f.labels for f in feats]
    if all(isinstance(y, list) for y in labels):
        batch["labels"] = torch.tensor([pad(y, IGNORE_INDEX) for y in labels], dtype=torch.long)
    elif all(isinstance(y, int) for y in labels):
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    elif all(isinstance(y, (int, float)) for y in labels):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    elif any(y is not None for y in labels):
        raise ValueError("a batch mixes label types (class ids, targets, token labels or none)")
    return batch


# Length grouping: a megabatch holds this many batches; it is sorted by length, then cut into batches. 50 is the
# default of transformers' LengthGroupedSampler (mega_batch_mult): wide enough that neighbours in the sorted order
# differ by a few tokens, narrow enough that the epoch's order stays random at the scale of the megabatch.
MEGABATCH = 50


def grouped_order(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of example indices with similar lengths, for less padding (`--group-by-length`).

    A random permutation (torch.randperm(n, generator)) is cut into megabatches of MEGABATCH·batch_size examples;
    each megabatch is sorted by length, longest first (ties keep the permutation's order, so the result depends only
    on the generator), and cut into batches; then the order of all batches is shuffled (a second randperm), so that
    an epoch does not run from long to short sequences inside each megabatch. Every index appears exactly once. Only
    the last megabatch can end with a short batch, so an epoch has ceil(n / batch_size) batches, as without
    grouping."""
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = MEGABATCH * batch_size
    batches = []
    for i in range(0, n, mega):
        part = sorted(perm[i:i + mega], key=lambda j: -lengths[j])  # stable: equal lengths keep perm's order
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]


def length_sorted(feats: Sequence[Features]) -> list[int]:
    """Indices of `feats`, longest first (ties in input order): evaluation batches of similar length, whose
    predictions `restore_order` puts back in example order."""
    return sorted(range(len(feats)), key=lambda i: -len(feats[i].input_ids))


def restore_order(values: Sequence, order: Sequence[int]) -> list:
    """The inverse of taking `values[k]` for example `order[k]`: out[order[k]] = values[k]."""
    if len(values) != len(order):
        raise ValueError(f"{len(values)} predictions for {len(order)} examples")
    out = [None] * len(order)
    for k, i in enumerate(order):
        out[i] = values[k]
    return out


def iterate_batches(feats: Sequence[Features], batch_size: int, pad_id: int, *,
                    generator: torch.Generator | None = None, side: str = "right",
                    group_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `batch_size` features. With a generator the order is torch.randperm(n, generator): seed one
    generator once for the whole run and each epoch gets a new, reproducible order. group_by_length: batches of
    similar length in a random order drawn from the generator (`grouped_order`). Without a generator the input
    order is kept (evaluation: predictions line up with the examples)."""
    n = len(feats)
    if group_by_length:
        if generator is None:
            raise ValueError("group_by_length draws its order from a generator; none was given")
        batches = grouped_order([len(f.input_ids) for f in feats], batch_size, generator)
    else:
        order = torch.randperm(n, generator=generator).tolist() if generator is not None else list(range(n))
        batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for idx in batches:
        yield collate([feats[j] for j in idx], pad_id, side)


# -----------------------------------------------------------------------------
# Calibration batches (the examples come from slora.data.calibration_examples)


def calibration_batches(tok: Tokenizer, examples: Sequence[Example], *, decoder: bool, max_len: int,
                        batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Input batches (no labels) in the examples' order. Task examples are encoded as in training (pairs for the
    encoder, chat-formatted prompt + response for the decoder); plain text as one sequence."""
    if decoder:
        feats = [Features(encode_lm(tok, [e], max_len)[0].input_ids if isinstance(e.label, str)
                          else _ids(tok, e.text)[:max_len]) for e in examples]
    else:
        feats = [Features(f.input_ids, f.token_type_ids) for f in encode_encoder(tok, examples, max_len)]
    return list(iterate_batches(feats, batch_size, pad_id))
