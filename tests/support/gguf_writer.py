"""A tiny GGUF writer for the tests, written from the GGUF spec independently of slora.gguf.

The quantizers follow ggml's reference ones (ggml-quants.c: quantize_row_q8_0_ref, quantize_row_q4_0_ref,
quantize_row_q4_1_ref), so the files look like llama.cpp's. Each returns the packed bytes and the values a
correct reader must give back (computed here from the integer codes, before packing).
"""
import struct

import numpy as np

QK = 32
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q6_K": 14}
# GGUF metadata value type ids
U8, I8, U16, I16, U32, I32, F32V, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FORMATS = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f", BOOL: "<?",
            U64: "<Q", I64: "<q", F64: "<d"}


# -----------------------------------------------------------------------------
# Quantizers: x is float32 with a last axis that is a multiple of 32; blocks run along it.

def _fp16(x):
    return x.astype(np.float16)


def _inverse(d):
    """1/d, 0 where d = 0 (as ggml). Taken in float64: for d below ~1e-38 float32's 1/d overflows to inf and
    ggml's codes become NaN casts; float64 keeps them defined, and the reader is tested on whatever codes result."""
    d = d.astype(np.float64)
    return np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)


def _round_away(x):
    """C's roundf: halves go away from zero (numpy's round goes to even)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_q8_0(x):
    b = x.reshape(-1, QK).astype(np.float32)  # (n, 32)
    d = np.abs(b).max(axis=1, keepdims=True) / 127.0  # fp32 scale, as ggml
    inv = _inverse(d)
    q = _round_away(b * inv).astype(np.int8)  # (n, 32) in [-127, 127]
    d16 = _fp16(d)
    raw = np.concatenate([d16.view(np.uint8), q.view(np.uint8)], axis=1)  # (n, 34)
    expect = d16.astype(np.float32) * q.astype(np.float32)
    return raw.tobytes(), expect.reshape(x.shape), d.reshape(-1)


def _pack_nibbles(q):
    """q: (n, 32) ints in [0, 15] -> (n, 16) bytes; byte j = q[j] | q[j + 16] << 4."""
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8)


def quantize_q4_0(x):
    b = x.reshape(-1, QK).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    vmax = b[np.arange(len(b)), idx][:, None]  # signed value of largest magnitude
    d = vmax / -8.0
    inv = _inverse(d)
    q = np.minimum(15, np.trunc(b * inv + 8.5)).astype(np.uint8)  # ggml: MIN(15, (int8_t)(x*id + 8.5f))
    d16 = _fp16(d)
    raw = np.concatenate([d16.view(np.uint8), _pack_nibbles(q)], axis=1)  # (n, 18)
    expect = d16.astype(np.float32) * (q.astype(np.float32) - 8.0)
    return raw.tobytes(), expect.reshape(x.shape), d.reshape(-1)


def quantize_q4_1(x):
    b = x.reshape(-1, QK).astype(np.float32)
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / 15.0
    inv = _inverse(d)
    q = np.minimum(15, np.trunc((b - lo) * inv + 0.5)).astype(np.uint8)
    d16, m16 = _fp16(d), _fp16(lo)
    raw = np.concatenate([d16.view(np.uint8), m16.view(np.uint8), _pack_nibbles(q)], axis=1)  # (n, 20)
    expect = d16.astype(np.float32) * q.astype(np.float32) + m16.astype(np.float32)
    return raw.tobytes(), expect.reshape(x.shape), d.reshape(-1)


def encode(x, type_name):
    """(raw bytes, values a reader must return) for float array x stored as type_name."""
    x = np.asarray(x, dtype=np.float32)
    if type_name == "F32":
        return x.tobytes(), x.copy()
    if type_name == "F16":
        return _fp16(x).tobytes(), _fp16(x).astype(np.float32)
    raw, expect, _ = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}[type_name](x)
    return raw, expect


# -----------------------------------------------------------------------------
# The file

def _string(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(type_id, v):
    if type_id == STRING:
        return _string(v)
    if type_id == ARRAY:
        item_type, items = v
        return struct.pack("<IQ", item_type, len(items)) + b"".join(_value(item_type, i) for i in items)
    return struct.pack(_FORMATS[type_id], v)


def _infer(v):
    """Value type for a plain Python value (explicit (type_id, value) tuples override it)."""
    if isinstance(v, bool):
        return BOOL, v
    if isinstance(v, int):
        return U32, v
    if isinstance(v, float):
        return F32V, v
    if isinstance(v, str):
        return STRING, v
    if isinstance(v, list):
        item = STRING if all(isinstance(i, str) for i in v) else I32
        return ARRAY, (item, v)
    raise TypeError(f"cannot infer a GGUF type for {v!r}")


def write_gguf(path, metadata, tensors, version=3, alignment=32, magic=b"GGUF"):
    """metadata: key -> value or (type_id, value); tensors: list of (name, row-major shape, type name, raw bytes).

    A type name not in TYPE_IDS may be given as an int id, to write types a reader must refuse.
    """
    out = bytearray(magic + struct.pack("<IQQ", version, len(tensors), len(metadata)))
    for key, v in metadata.items():
        type_id, v = v if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int) else _infer(v)
        out += _string(key) + struct.pack("<I", type_id) + _value(type_id, v)
    offset, blobs = 0, []
    for name, shape, type_name, raw in tensors:
        type_id = TYPE_IDS[type_name] if isinstance(type_name, str) else type_name
        dims = list(reversed(shape))  # GGUF lists the fastest-varying dimension first
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, offset)
        pad = -len(raw) % alignment
        blobs.append(raw + b"\0" * pad)
        offset += len(raw) + pad
    out += b"\0" * (-len(out) % alignment)
    for blob in blobs:
        out += blob
    with open(path, "wb") as f:
        f.write(out)


# -----------------------------------------------------------------------------
# A tiny byte-level BPE vocabulary and llama model

def bytes_to_unicode():
    """GPT-2's map from the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h i", "Ġ hi", "Ġ w", "o r", "Ġw or"]


def tiny_vocab():
    """(tokens, token types, merges): 3 control tokens, the 256 byte characters, then one token per merge."""
    byte_chars = list(bytes_to_unicode().values())
    merged = [m.replace(" ", "") for m in MERGES]
    tokens = SPECIALS + byte_chars + merged
    types = [3] * len(SPECIALS) + [1] * (len(byte_chars) + len(merged))
    return tokens, types, list(MERGES)


def llama_metadata(cfg, n_vocab, **overrides):
    tokens, types, merges = tiny_vocab()
    md = {
        "general.architecture": "llama",
        "general.alignment": 32,
        "llama.block_count": cfg["layers"],
        "llama.context_length": 128,
        "llama.embedding_length": cfg["dim"],
        "llama.feed_forward_length": cfg["ffn"],
        "llama.attention.head_count": cfg["heads"],
        "llama.attention.head_count_kv": cfg["kv_heads"],
        "llama.rope.freq_base": 100000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": cfg["dim"] // cfg["heads"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens[:n_vocab],
        "tokenizer.ggml.token_type": (ARRAY, (I32, types[:n_vocab])),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                   "<|im_end|>\n{% endfor %}",
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}  # an override of None removes the key
