"""slora.io.gguf_tokenizer: GGUF vocabularies rebuilt as `tokenizers` tokenizers give llama.cpp's token ids.

Fast tier: tiny SentencePiece vocabularies written by tests/support/gguf_writer.py, against `llama_cpp_spm`, a direct
transcription of llama.cpp's llm_tokenizer_spm_session (src/llama-vocab.cpp) kept deliberately naive.
Slow tier: llama.cpp's own test vectors (vocab-only LLaMA-2 SPM and LLaMA-3 BPE GGUFs with .inp/.out files,
the optional asset `python -m slora.assets --only vocab`), every string to exactly the expected ids.
"""
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from slora.io.gguf import GGUFError, read_gguf
from slora.io.gguf_tokenizer import hf_tokenizer
from tests.support import gguf_writer as gw

SP = "\u2581"  # ▁
BYTES = [f"<0x{b:02X}>" for b in range(256)]
# A tiny LLaMA-2-style vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces with scores. The scores
# make the merge order differ from length order ("ab" beats "bc" beats "abc"; "▁a" low) so that a wrong
# ranking shows; "aa" and "aaa" test ties between equal pairs (leftmost first); "é" is a 2-byte character.
PIECES = [(SP, -1e9), ("a", -1e9), ("b", -1e9), ("c", -1e9), ("é", -1e9), ("ab", -1.0), ("bc", -2.0),
          ("abc", -3.0), ("aa", -4.0), ("aaa", -5.0), (SP + "a", -9.0), (SP + "ab", -6.0), ("ca", -7.0),
          ("cé", -8.0), (SP + SP, -10.0), ("bcab", -0.5)]


def spm_vocab():
    tokens = ["<unk>", "<s>", "</s>"] + BYTES + [p for p, _ in PIECES]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * (3 + 256) + [s for _, s in PIECES]
    return tokens, types, scores


def write_spm(path, **overrides):
    tokens, types, scores = spm_vocab()
    md = {"general.architecture": "llama", "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
          "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": (gw.ARRAY, (gw.I32, types)),
          "tokenizer.ggml.scores": (gw.ARRAY, (gw.F32V, scores)), "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    md.update(overrides)
    gw.write_gguf(path, {k: v for k, v in md.items() if v is not None}, [])
    return read_gguf(path)


def llama_cpp_spm(text, tokens, scores, add_space_prefix=True):
    """llama.cpp's SentencePiece tokenization of raw text (add_special=False, no special tokens in the text).

    Prefix one space, write spaces as ▁, split into UTF-8 characters, then repeatedly merge the adjacent pair
    whose concatenation is a vocabulary token of highest score (leftmost among equals); a final symbol that is
    not a token is written as its UTF-8 bytes <0xXX>.
    """
    if not text:
        return []
    text = ((" " if add_space_prefix else "") + text).replace(" ", SP)
    ids = {t: i for i, t in enumerate(tokens)}
    syms = list(text)
    while True:
        best = None
        for i in range(len(syms) - 1):
            cand = syms[i] + syms[i + 1]
            if cand in ids and (best is None or scores[ids[cand]] > scores[ids[best[1]]]):
                best = (i, cand)
        if best is None:
            break
        i, cand = best
        syms[i:i + 2] = [cand]
    out = []
    for s in syms:
        if s in ids:
            out.append(ids[s])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return out


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    gf = write_spm(tmp_path_factory.mktemp("spm") / "spm.gguf")
    return hf_tokenizer(gf)


spm_text = st.text(alphabet=st.sampled_from(list("abcé ") + ["x", "\n", "ü", "€"]), max_size=24)


@given(text=spm_text)
@example(text="")
@example(text="aaaa")          # equal pairs: leftmost merges first -> "aaa" "a", not "a" "aaa"
@example(text="abcab")         # "ab" (-1) before "bc" (-2): a rank by length would give "abc" first
@example(text="bcab")          # whole-piece merge that needs "bc" then "ab" then "bcab"
@example(text=" a  b")         # spaces become ▁, runs of them merge to "▁▁"
@example(text="x€")            # characters outside the vocabulary: UTF-8 bytes
def test_spm_matches_llama_cpp_algorithm(spm, text):
    tokens, _, scores = spm_vocab()
    assert spm.encode(text, add_special_tokens=False).ids == llama_cpp_spm(text, tokens, scores)


@given(text=spm_text)
def test_spm_decode_round_trip(spm, text):
    ids = spm.encode(text, add_special_tokens=False).ids
    assert spm.decode(ids) == text


def test_spm_bos_special_tokens_and_no_space_prefix(tmp_path, spm):
    # llama.cpp's SentencePiece default is add_bos = true; "<s>" typed in text is the control token (special
    # parsing on, as slora's chat prompts need) and the text after it gets its own space prefix
    tokens, _, scores = spm_vocab()
    ids = spm.encode("ab<s>ab").ids
    assert ids == [1] + llama_cpp_spm("ab", tokens, scores) + [1] + llama_cpp_spm("ab", tokens, scores)
    no_bos = hf_tokenizer(write_spm(tmp_path / "nb.gguf", **{"tokenizer.ggml.add_bos_token": False}))
    assert no_bos.encode("ab").ids == llama_cpp_spm("ab", tokens, scores)
    plain = hf_tokenizer(write_spm(tmp_path / "np.gguf", **{"tokenizer.ggml.add_space_prefix": False}))
    assert plain.encode("ab c", add_special_tokens=False).ids == llama_cpp_spm("ab c", tokens, scores, False)
    assert plain.decode(plain.encode("ab c").ids) == "ab c"


def test_spm_bad_vocabularies_are_named(tmp_path):
    tokens, types, scores = spm_vocab()
    with pytest.raises(GGUFError, match=r"s\.gguf: tokenizer\.ggml\.scores has 3 entries for 275 tokens"):
        hf_tokenizer(write_spm(tmp_path / "s.gguf", **{"tokenizer.ggml.scores": (gw.ARRAY, (gw.F32V, [0.0] * 3))}))
    with pytest.raises(GGUFError, match=r"metadata key 'tokenizer\.ggml\.scores' is missing"):
        hf_tokenizer(write_spm(tmp_path / "m.gguf", **{"tokenizer.ggml.scores": None}))
    no_bytes = [t if t != "<0x41>" else "A" for t in tokens]
    with pytest.raises(GGUFError, match=r"lacks byte tokens \['<0x41>'\] \(1 of 256 missing\)"):
        hf_tokenizer(write_spm(tmp_path / "b.gguf", **{"tokenizer.ggml.tokens": no_bytes}))
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.model = 'bert'"):
        hf_tokenizer(write_spm(tmp_path / "w.gguf", **{"tokenizer.ggml.model": "bert"}))


# -----------------------------------------------------------------------------
# LLaMA-3 byte-level BPE (`llama-bpe`) on the tiny vocabulary of tests/support/gguf_writer.py

def write_llama_bpe(path, extra_tokens=()):
    tokens, types, merges = gw.tiny_vocab()
    tokens, types = tokens + list(extra_tokens), types + [1] * len(extra_tokens)
    md = gw.llama_metadata(dict(layers=1, dim=64, heads=4, kv_heads=2, ffn=96), len(tokens),
                           **{"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
                              "tokenizer.ggml.token_type": (gw.ARRAY, (gw.I32, types))})
    gw.write_gguf(path, md, [])
    return read_gguf(path)


def test_llama_bpe_split(tmp_path):
    # LLaMA-3's regex, worked by hand: letters take one leading non-letter (the space), contractions split off,
    # a space before digits stands alone, digits go in runs of at most 3, punctuation keeps its trailing
    # newlines, and of two spaces before a word the first stands alone (\s+(?!\S)).
    tok = hf_tokenizer(write_llama_bpe(tmp_path / "b.gguf"))
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello world's 12345!!\n\n  x")]
    assert pieces == ["Hello", "Ġworld", "'s", "Ġ", "123", "45", "!!ĊĊ", "Ġ", "Ġx"]


def test_llama_bpe_ignore_merges_takes_whole_vocabulary_words(tmp_path):
    # "Ġworld" is in the vocabulary but no merge reaches it: llama.cpp (ignore_merges) emits it whole,
    # merging alone would stop at "Ġwor" "l" "d"
    tokens, _, _ = gw.tiny_vocab()
    tok = hf_tokenizer(write_llama_bpe(tmp_path / "b.gguf", extra_tokens=["Ġworld"]))
    assert tok.encode(" world", add_special_tokens=False).ids == [len(tokens)]
    assert [tokens[i] for i in tok.encode(" worlds", add_special_tokens=False).ids] == ["Ġwor", "l", "d", "s"]
    assert tok.encode("hi").ids[0] == 1  # llama.cpp's default for llama-bpe: bos prepended


# -----------------------------------------------------------------------------
# Slow tier: llama.cpp's own test vectors

def read_vectors(folder, name):
    """(text, ids) pairs as llama.cpp's tests/test-tokenizer-0.cpp reads them: .inp split on the separator
    line, .out one line of space-separated ids per input."""
    raw = (folder / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":  # the file ends with a separator
        texts.pop()
    lines = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    assert len(texts) == len(lines), f"{name}: {len(texts)} inputs, {len(lines)} outputs"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.mark.slow
@pytest.mark.parametrize("name, model", [("llama-spm", "llama"), ("llama-bpe", "gpt2")])
def test_llama_cpp_test_vectors(name, model):
    from slora.io.assets import data_dir
    try:
        folder = data_dir("vocab")
    except FileNotFoundError as e:  # an optional asset (like mpnet): absent means not fetched, say how
        pytest.skip(f"optional asset absent: {e}")
    gf = read_gguf(folder / f"ggml-vocab-{name}.gguf")
    assert gf.metadata["tokenizer.ggml.model"] == model
    tok = hf_tokenizer(gf)
    vectors = read_vectors(folder, name)
    assert len(vectors) == 46  # as shipped in llama-cpp-python 0.3.36
    # add_special=False, as test-tokenizer-0 runs them: no bos
    wrong = [(t, ids, tok.encode(t, add_special_tokens=False).ids) for t, ids in vectors
             if tok.encode(t, add_special_tokens=False).ids != ids]
    assert not wrong, f"{len(wrong)} of {len(vectors)} strings differ, first: {wrong[0]}"
