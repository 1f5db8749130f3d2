"""Rebuild a `tokenizers.Tokenizer` from the vocabulary stored in a GGUF file, tokenizing as llama.cpp does.

Two tokenizer models are read (`tokenizer.ggml.model`):
- `gpt2`: byte-level BPE from the stored merges (SmolLM2, LLaMA-3), with the pre-tokenizer named by
  `tokenizer.ggml.pre` (smollm, gpt-2, llama-bpe);
- `llama`: SentencePiece BPE (LLaMA-2 style) from the stored pieces and scores, with byte fallback.

References: llama.cpp src/llama-vocab.cpp (llm_tokenizer_spm_session, the LLaMA-3 pre-tokenizer regex,
ignore_merges, the per-model add_bos defaults), transformers' convert_slow_tokenizer.py (SentencePieceExtractor:
SentencePiece scores turned into BPE merge ranks; the legacy LLaMA normalizer). Tested token for token against
llama.cpp's own test vectors (tests/io/test_gguf_tokenizer.py).
"""
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED, TOKEN_TYPE_BYTE = 3, 4, 6  # llama.cpp's llama_token_type enum
SPM_SPACE = "\u2581"  # "▁", SentencePiece's visible space

# LLaMA-3's split, as llama.cpp adapts it from tokenizer.json (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_LLAMA3):
# contractions (case-insensitive), letters with one leading non-letter, numbers of 1-3 digits, punctuation runs
# with an optional leading space, newline runs, other whitespace.
LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# llama.cpp's default for prepending the bos token when the GGUF has no `tokenizer.ggml.add_bos_token`
# (llama-vocab.cpp: true for SentencePiece and for the llama-bpe pre-tokenizer, false otherwise).
ADD_BOS_DEFAULT = {("llama", None): True, ("gpt2", "llama-bpe"): True}


class GGUFError(ValueError):
    """A GGUF file that slora cannot read or convert; the message names the file and the culprit.

    Defined here, in the lowest of the two GGUF modules, and imported by slora.gguf (where callers find it)."""


def _meta(gf, key: str):
    if key not in gf.metadata:
        raise GGUFError(f"{gf.path}: metadata key {key!r} is missing")
    return gf.metadata[key]


def _vocab(gf) -> tuple:
    """(tokens, token types, {token: id}); duplicate tokens are an error (a BPE vocab is a bijection)."""
    tokens = _meta(gf, "tokenizer.ggml.tokens")
    types = gf.metadata.get("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{gf.path}: tokenizer.ggml.token_type has {len(types)} entries for "
                                 f"{len(tokens)} tokens")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFError(f"{gf.path}: tokenizer.ggml.tokens has duplicate entries")
    return tokens, types, vocab


# -----------------------------------------------------------------------------
# Byte-level BPE (`gpt2`)

def _byte_level_pre_tokenizer(gf):
    pre = gf.metadata.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex split
    if pre == "smollm":  # SmolLM's tokenizer.json: every digit its own piece, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre == "gpt-2":
        return byte_level
    if pre == "llama-bpe":  # LLaMA-3's tokenizer.json: its own regex split, then bytes -> characters only
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise GGUFError(f"{gf.path}: tokenizer.ggml.pre = {pre!r} is not supported (smollm, gpt-2, llama-bpe)")


def _byte_level_bpe(gf, vocab: dict) -> Tokenizer:
    merges = []
    for m in _meta(gf, "tokenizer.ggml.merges"):
        pair = m.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{gf.path}: merge {m!r} is not two space-separated tokens")
        merges.append(tuple(pair))
    pre = gf.metadata.get("tokenizer.ggml.pre")
    # llama-bpe: a pre-token that is itself in the vocabulary is taken whole, before any merge
    # (llama.cpp's ignore_merges; LLaMA-3's tokenizer.json sets "ignore_merges": true as well)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(gf)
    tok.decoder = decoders.ByteLevel()
    return tok


# -----------------------------------------------------------------------------
# SentencePiece BPE (`llama`)

def spm_merges(tokens: list, scores: list, vocab: dict) -> list:
    """BPE merges, best first, that reproduce SentencePiece's score-driven merging.

    llama.cpp (llm_tokenizer_spm_session) starts from UTF-8 characters and repeatedly merges the adjacent pair
    whose concatenation is the vocabulary piece of highest score, leftmost on ties. A BPE model does the same
    when its merge ranks follow that score: every split (left, right) of a piece with both halves in the
    vocabulary becomes a merge, ranked by the piece's score (descending), then by the halves' ids
    (transformers' SentencePieceExtractor makes the same list). Control and byte tokens ("<s>", "<0x0A>")
    are never the result of a merge in llama.cpp's sense of text, so they get no merges here.
    """
    ranked = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _sentencepiece_bpe(gf, tokens: list, types: list, vocab: dict) -> Tokenizer:
    scores = _meta(gf, "tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise GGUFError(f"{gf.path}: tokenizer.ggml.scores has {len(scores)} entries for "
                                 f"{len(tokens)} tokens")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in vocab]
    if missing:  # llama.cpp's byte_to_token needs all 256; so does tokenizers' byte_fallback
        raise GGUFError(f"{gf.path}: SentencePiece vocabulary lacks byte tokens {missing[:4]} "
                                 f"({len(missing)} of 256 missing)")
    # text pieces only: control and byte pieces must not be reachable by merging ordinary characters
    text_vocab = {t: i for t, i in vocab.items() if types[i] not in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_BYTE)}
    unk_id = gf.metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, text_vocab), unk_token=unk,
                               fuse_unk=True, byte_fallback=True))
    # llama.cpp prefixes one space to each run of text (after the start or a special token) when
    # add_space_prefix is on (default for SentencePiece), then writes every space as "▁". tokenizers runs the
    # normalizer on each text segment between added tokens, so Prepend reproduces "after a special token" too.
    steps = [normalizers.Replace(" ", SPM_SPACE)]
    if gf.metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend(SPM_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    strip = 1 if gf.metadata.get("tokenizer.ggml.add_space_prefix", True) else 0
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", strip, 0)])
    return tok


# -----------------------------------------------------------------------------
# Public entry points

def hf_tokenizer(gf) -> Tokenizer:
    """A `tokenizers.Tokenizer` that gives llama.cpp's token ids for the GGUF's vocabulary.

    Control tokens (token_type 3) become special added tokens and user-defined ones (4) plain added tokens, so
    that "<|im_start|>" in a chat prompt maps to its single id. The bos token is prepended when
    `tokenizer.ggml.add_bos_token` says so, or by llama.cpp's default for the tokenizer (ADD_BOS_DEFAULT).
    No padding or truncation.
    """
    model = gf.metadata.get("tokenizer.ggml.model")
    tokens, types, vocab = _vocab(gf)
    if model == "gpt2":
        tok = _byte_level_bpe(gf, vocab)
    elif model == "llama":
        tok = _sentencepiece_bpe(gf, tokens, types, vocab)
    else:
        raise GGUFError(f"{gf.path}: tokenizer.ggml.model = {model!r}; slora rebuilds byte-level BPE "
                                 "('gpt2') and SentencePiece ('llama')")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_TYPE_USER_DEFINED])
    if add_bos_token(gf):
        bos = tokens[_meta(gf, "tokenizer.ggml.bos_token_id")]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, vocab[bos])])
    tok.no_padding()
    tok.no_truncation()
    return tok


def add_bos_token(gf) -> bool:
    """Whether llama.cpp prepends bos for this GGUF: the metadata key, else its per-tokenizer default."""
    model, pre = gf.metadata.get("tokenizer.ggml.model"), gf.metadata.get("tokenizer.ggml.pre")
    default = ADD_BOS_DEFAULT.get((model, None if model == "llama" else pre), False)
    return bool(gf.metadata.get("tokenizer.ggml.add_bos_token", default))


def hf_tokenizer_config(gf, config: dict) -> dict:
    """tokenizer_config.json: the special tokens by text and the chat template, as transformers reads them."""
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    name = lambda key: tokens[gf.metadata[key]] if key in gf.metadata else None  # noqa: E731
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",  # uses tokenizer.json exactly as written
        "bos_token": name("tokenizer.ggml.bos_token_id"),
        "eos_token": name("tokenizer.ggml.eos_token_id"),
        "pad_token": name("tokenizer.ggml.padding_token_id"),
        "unk_token": name("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": add_bos_token(gf),
        "add_eos_token": bool(gf.metadata.get("tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": gf.metadata.get("tokenizer.chat_template"),
    }
