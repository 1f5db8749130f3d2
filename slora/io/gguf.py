"""Read GGUF files (llama.cpp's format) and convert a llama GGUF into a Hugging Face-format folder
(the command is `python -m slora.gguf MODEL.gguf OUT_DIR`, slora.cli.gguf).

References: the GGUF spec (ggml-org/ggml docs/gguf.md), ggml's block layouts (ggml-common.h: block_q4_0,
block_q4_1, block_q8_0) and llama.cpp's convert_hf_to_gguf.py (tensor names, the q/k row permutation).
No `gguf` package and no pickle: the header is parsed with `struct`, the tensor data is a numpy memmap.

Legend for shape comments: n blocks of 32 weights, H heads, hs head size.
"""
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from slora.io.files import LOCK, atomic_folder, check_apart, locked, writing
from slora.models import build_config
from slora.io.gguf_tokenizer import GGUFError, hf_tokenizer, hf_tokenizer_config

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long gone; v2 and v3 share one layout
DEFAULT_ALIGNMENT = 32  # used when `general.alignment` is absent (GGUF spec)
QK = 32  # weights per quantization block for Q4_0, Q4_1 and Q8_0


# -----------------------------------------------------------------------------
# Header and metadata

# GGUF metadata value types: id -> struct format of a scalar (STRING=8 and ARRAY=9 are handled apart).
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                  10: "<Q", 11: "<q", 12: "<d"}
VALUE_STRING, VALUE_ARRAY = 8, 9

# ggml tensor types: id -> name (the ids are fixed by ggml.h; names make the errors readable).
GGML_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
                   10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
                   17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
                   23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                   30: "BF16", 34: "TQ1_0", 35: "TQ2_0"}
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8
# bytes per block of QK weights: Q4_0 {fp16 d, 16 B nibbles}, Q4_1 {fp16 d, fp16 m, 16 B}, Q8_0 {fp16 d, 32 int8}
BLOCK_BYTES = {Q4_0: 2 + QK // 2, Q4_1: 4 + QK // 2, Q8_0: 2 + QK}


@dataclass
class TensorInfo:
    name: str
    shape: tuple  # row-major (numpy/torch) shape: the GGUF dims in reverse order
    type_id: int
    offset: int  # absolute byte offset in the file

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.type_id, f"type id {self.type_id}")


class _Cursor:
    """Sequential little-endian reads over the file's bytes; running off the end is a 'truncated' error."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated GGUF (needed {n} bytes at offset {self.pos}, "
                            f"file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.scalar("<Q")))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.path}: string at offset {self.pos - len(raw)} is not UTF-8: {e}") from e

    def value(self, type_id: int, key: str):
        if type_id in SCALAR_FORMATS:
            return self.scalar(SCALAR_FORMATS[type_id])
        if type_id == VALUE_STRING:
            return self.string()
        if type_id == VALUE_ARRAY:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if item_type in SCALAR_FORMATS and item_type != 7:
                # numeric arrays (token types, scores) can hold ~10^5 items: read them in one go
                dtype = np.dtype(SCALAR_FORMATS[item_type])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).tolist()
            return [self.value(item_type, key) for _ in range(count)]
        raise GGUFError(f"{self.path}: metadata key {key!r} has unknown value type {type_id}")


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata dict, tensor infos by name, and the memory-mapped bytes."""
    path: Path
    version: int
    metadata: dict
    tensors: dict  # name -> TensorInfo, in file order
    data: np.ndarray  # uint8 memmap of the whole file

    def tensor(self, name: str) -> np.ndarray:
        """Dequantize tensor `name` to a float32 array of its row-major shape."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor named {name!r}")
        return dequantize(self, self.tensors[name])


def read_gguf(path) -> GGUFFile:
    """Parse the header, metadata and tensor infos of a GGUF file; tensor data stays on disk until asked for.

    Layout (GGUF spec): magic "GGUF", u32 version, u64 tensor count, u64 metadata count, then metadata
    (string key, u32 value type, value), then tensor infos (string name, u32 n_dims, n_dims × u64 dims,
    u32 ggml type, u64 offset), then padding up to `general.alignment`, then the tensor data.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise GGUFError(f"{path}: empty file, not a GGUF")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(data), path)
    magic = bytes(cur.take(4))
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    version = cur.scalar("<I")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        hint = " (this looks like a big-endian GGUF)" if swapped in SUPPORTED_VERSIONS else ""
        raise GGUFError(f"{path}: unsupported GGUF version {version}{hint}; slora reads versions "
                        f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")

    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"), key)

    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        type_id, offset = cur.scalar("<I"), cur.scalar("<Q")
        infos.append((name, tuple(reversed(dims)), type_id, offset))  # GGUF lists ne0 (fastest) first

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
        raise GGUFError(f"{path}: general.alignment = {alignment!r} is not a positive multiple of 8")
    data_start = -(-cur.pos // alignment) * alignment  # round up to the alignment
    tensors = {}
    for name, shape, type_id, offset in infos:
        if name in tensors:
            raise GGUFError(f"{path}: tensor {name!r} is listed twice")
        if offset % alignment:
            raise GGUFError(f"{path}: tensor {name!r} offset {offset} is not aligned to {alignment}")
        tensors[name] = TensorInfo(name, shape, type_id, data_start + offset)
    return GGUFFile(path, version, metadata, tensors, data)


# -----------------------------------------------------------------------------
# Dequantization (ggml-common.h block layouts; every block covers QK consecutive weights of one row)

def _nbytes(info: TensorInfo) -> int:
    n = int(np.prod(info.shape, dtype=np.int64))
    if info.type_id == F32:
        return 4 * n
    if info.type_id == F16:
        return 2 * n
    return n // QK * BLOCK_BYTES[info.type_id]


def dequantize(gf: GGUFFile, info: TensorInfo) -> np.ndarray:
    """Return tensor `info` of `gf` as float32 with shape info.shape.

    Q8_0: w = d·q, q int8.  Q4_0: w = d·(q − 8), q a nibble.  Q4_1: w = d·q + m, q a nibble.
    In the 4-bit blocks byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    d and m are fp16; the products are taken in fp32, as ggml's reference dequantizers do.
    """
    if info.type_id not in (F32, F16, Q4_0, Q4_1, Q8_0):
        raise GGUFError(f"{gf.path}: unsupported GGUF tensor type {info.type_name} for tensor {info.name!r} "
                        f"(slora reads F32, F16, Q4_0, Q4_1, Q8_0)")
    if info.type_id in BLOCK_BYTES and (not info.shape or info.shape[-1] % QK):
        raise GGUFError(f"{gf.path}: tensor {info.name!r} of type {info.type_name} has rows of "
                        f"{info.shape[-1] if info.shape else 0} weights, not a multiple of the block size {QK}")
    nbytes = _nbytes(info)
    if info.offset + nbytes > len(gf.data):
        raise GGUFError(f"{gf.path}: truncated GGUF: tensor {info.name!r} needs bytes {info.offset}.."
                        f"{info.offset + nbytes}, file has {len(gf.data)}")
    raw = gf.data[info.offset:info.offset + nbytes]
    if info.type_id == F32:
        return raw.view(np.float32).reshape(info.shape).copy()
    if info.type_id == F16:
        return raw.view(np.float16).astype(np.float32).reshape(info.shape)

    blocks = raw.reshape(-1, BLOCK_BYTES[info.type_id])  # (n, bytes per block)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n, 1) scale
    if info.type_id == Q8_0:
        q = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
        w = d * q
    else:
        nib = blocks[:, 4:] if info.type_id == Q4_1 else blocks[:, 2:]  # (n, 16) packed nibbles
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.float32)  # (n, 32) weights 0..15, 16..31
        if info.type_id == Q4_0:
            w = d * (q - 8.0)
        else:
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)  # (n, 1) offset
            w = d * q + m
    return w.reshape(info.shape)


# -----------------------------------------------------------------------------
# The q/k row permutation

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation of q_proj/k_proj rows, Hugging Face layout -> GGUF layout.

    HF's RoPE (rotate_half) pairs dimension i of a head with i + hs/2; llama.cpp rotates adjacent pairs
    (2i, 2i + 1). convert_hf_to_gguf.py therefore views the rows as (H, 2, hs/2) and swaps the last two
    axes: row h·hs + a·hs/2 + i moves to row h·hs + 2i + a (a in {0, 1}, i < hs/2).
    """
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, hs // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (H, hs/2, 2, ...)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo `permute_qk`: GGUF layout -> Hugging Face layout.

    View the rows as (H, hs/2, 2) and swap the last two axes, so row h·hs + 2i + a goes back to
    h·hs + a·hs/2 + i. That is the exact inverse of the map in `permute_qk`: both are the transpose of
    a 2 × hs/2 grid of row indices inside each head, taken in opposite directions.
    """
    if w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise GGUFError(f"cannot un-permute {w.shape[0]} rows into {n_heads} heads of even size")
    hs = w.shape[0] // n_heads
    return w.reshape(n_heads, hs // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # (H, 2, hs/2, ...)


# -----------------------------------------------------------------------------
# llama GGUF -> Hugging Face folder

# One literal map, GGUF tensor name -> HF name ("{}" is the block index). lm_head only for untied models.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def hf_name(gguf_name: str, path) -> str:
    """Map one GGUF tensor name to its HF name; an unknown name is an error that names it."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        key = ".".join(["blk", "{}", *parts[2:]])
        if key in GGUF_TO_HF:
            return GGUF_TO_HF[key].format(parts[1])
    elif gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    if gguf_name == ROPE_FREQS:
        return None  # checked against config.json's rope_scaling in hf_config, then dropped (see llama3_rope_scaling)
    raise GGUFError(f"{path}: unexpected tensor {gguf_name!r} for a llama model")


# The llama.* metadata config.json is built from, checked before anything is converted: a value the model cannot use
# (a negative context length, 0 heads, a NaN epsilon) is refused naming its key, never written into a folder that
# slora's own loader refuses (hf_config then checks the whole config as load_model does).
POSITIVE_INTS = ("llama.embedding_length", "llama.feed_forward_length", "llama.block_count",
                 "llama.attention.head_count", "llama.attention.head_count_kv", "llama.attention.key_length",
                 "llama.rope.dimension_count", "llama.context_length", "llama.vocab_size")
POSITIVE_REALS = ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.scaling.factor")
TOKEN_IDS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")


def check_metadata(gf: GGUFFile):
    """Types and ranges of the metadata values hf_config reads (those present); an error names key and value."""
    for key in (k for k in POSITIVE_INTS + POSITIVE_REALS if k in gf.metadata):
        v, whole = gf.metadata[key], key in POSITIVE_INTS
        if isinstance(v, bool) or not isinstance(v, int if whole else (int, float)) or not 0 < v < math.inf:
            raise GGUFError(f"{gf.path}: metadata {key} = {v!r} must be a positive "
                            f"{'integer' if whole else 'finite number'}")
    vocab = gf.metadata.get("llama.vocab_size", len(gf.metadata.get("tokenizer.ggml.tokens") or ()))
    for key in (k for k in TOKEN_IDS if gf.metadata.get(k) is not None):
        v = gf.metadata[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab:
            raise GGUFError(f"{gf.path}: metadata {key} = {v!r} is not a token id of the {vocab}-token vocabulary")


def _meta(gf: GGUFFile, key: str):
    if key not in gf.metadata:
        raise GGUFError(f"{gf.path}: metadata key {key!r} is missing")
    return gf.metadata[key]


def _f32(x) -> float:
    """GGUF floats are float32: print them with float32 precision (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


# -----------------------------------------------------------------------------
# llama3 RoPE scaling: the `rope_freqs` tensor

ROPE_FREQS = "rope_freqs.weight"
# llama.cpp's converter (conversion/llama.py, generate_extra_tensors) writes llama3 scaling only as this tensor,
# with no metadata keys for it; where a parameter is absent from the model's config.json it falls back to these
# values, which are also LLaMA-3.1's and LLaMA-3.2's. GGUF has no keys for the two frequency factors.
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The converter takes base^(2i/hs) with float32 torch.pow: for base 5e5 that is ~13 float32 ulps of relative
# error (ln 5e5 ≈ 13.1 times the exponent's rounding), ≈ 1e-6 in the divisor; 1e-5 leaves a 10x margin.
ROPE_FREQS_RTOL = 1e-5


def llama3_divisors(theta: float, head_dim: int, rope_scaling: dict) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling, float64: inv_freq_scaled = inv_freq / divisor.

    1 for wavelengths shorter than original_context / high_freq_factor, `factor` for those longer than
    original_context / low_freq_factor, and 1 / ((1 - s)/factor + s), s = (original_context/wavelength - low) /
    (high - low), between (transformers `_compute_llama3_parameters`; llama.cpp stores these as rope_freqs).
    """
    factor, low, high = rope_scaling["factor"], rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
    ctx = rope_scaling["original_max_position_embeddings"]
    inv_freq = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (hs/2,)
    wavelen = 2 * np.pi / inv_freq
    smooth = (ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < ctx / high, 1.0, np.where(wavelen > ctx / low, factor, mid))


def llama3_rope_scaling(gf: GGUFFile, head_dim: int, theta: float) -> dict:
    """config.json's llama3 `rope_scaling` for a GGUF that carries `rope_freqs`, checked against that tensor.

    Decision: slora does not load the tensor into the model; it recovers the parameters and lets the model
    compute the same divisors from config.json (as transformers does), after checking that they reproduce the
    stored ones within ROPE_FREQS_RTOL. `factor` is `llama.rope.scaling.factor` when present, else the largest
    stored divisor (the long-wavelength band is divided by exactly `factor`); the original context is
    `llama.rope.scaling.original_context_length` when present; the rest are LLAMA3_DEFAULTS. Parameters that do
    not reproduce the tensor are an error naming it, never a silent approximation.
    """
    info = gf.tensors[ROPE_FREQS]
    if info.shape != (head_dim // 2,):
        raise GGUFError(f"{gf.path}: tensor {ROPE_FREQS!r} has shape {info.shape}, expected ({head_dim // 2},) "
                        f"(one divisor per rotary frequency of a head of {head_dim})")
    stored = gf.tensor(ROPE_FREQS).astype(np.float64)
    if not np.all(np.isfinite(stored)) or stored.min() < 1.0:
        raise GGUFError(f"{gf.path}: tensor {ROPE_FREQS!r} holds divisors outside [1, inf) "
                        f"(min {stored.min()}); that is not llama3 RoPE scaling")
    sc = dict(LLAMA3_DEFAULTS, rope_type="llama3",
              factor=_f32(gf.metadata.get("llama.rope.scaling.factor", stored.max())))
    if "llama.rope.scaling.original_context_length" in gf.metadata:
        sc["original_max_position_embeddings"] = int(gf.metadata["llama.rope.scaling.original_context_length"])
    expected = llama3_divisors(theta, head_dim, sc)
    rel = np.abs(stored - expected) / expected
    if rel.max() > ROPE_FREQS_RTOL:
        i = int(rel.argmax())
        raise GGUFError(f"{gf.path}: tensor {ROPE_FREQS!r} does not match llama3 RoPE scaling {sc} with "
                        f"rope_theta {theta}: divisor {i} is {stored[i]:.7g}, expected {expected[i]:.7g} "
                        f"(relative error {rel.max():.2e} > {ROPE_FREQS_RTOL:g})")
    return {"rope_type": "llama3", "factor": sc["factor"], "low_freq_factor": sc["low_freq_factor"],
            "high_freq_factor": sc["high_freq_factor"],
            "original_max_position_embeddings": sc["original_max_position_embeddings"]}


# -----------------------------------------------------------------------------
# config.json and state dict

def hf_config(gf: GGUFFile) -> dict:
    """Build a transformers-style LlamaForCausalLM config.json dict from the `llama.*` metadata."""
    arch = gf.metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{gf.path}: general.architecture is {arch!r}; slora converts only 'llama' GGUFs")
    check_metadata(gf)
    hidden, n_heads = _meta(gf, "llama.embedding_length"), _meta(gf, "llama.attention.head_count")
    # llama.cpp's own defaults when a key is absent: n_kv = n_heads, head size = hidden / heads, theta 10^4
    n_kv = gf.metadata.get("llama.attention.head_count_kv", n_heads)
    head_dim = gf.metadata.get("llama.attention.key_length", hidden // n_heads)
    rot = gf.metadata.get("llama.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise GGUFError(f"{gf.path}: llama.rope.dimension_count = {rot} but head size is {head_dim}; "
                        "partial rotary embeddings are not supported")
    scaling_type = gf.metadata.get("llama.rope.scaling.type", "none")
    theta = _f32(gf.metadata.get("llama.rope.freq_base", 10000.0))
    if ROPE_FREQS in gf.tensors:
        if scaling_type != "none":
            raise GGUFError(f"{gf.path}: tensor {ROPE_FREQS!r} (llama3 scaling) together with "
                            f"llama.rope.scaling.type = {scaling_type!r}: two RoPE scalings")
        rope_scaling = llama3_rope_scaling(gf, head_dim, theta)
    elif scaling_type == "none":
        rope_scaling = None
    elif scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(_meta(gf, "llama.rope.scaling.factor"))}
    else:
        raise GGUFError(f"{gf.path}: llama.rope.scaling.type = {scaling_type!r} is not supported (none, linear)")
    tokens = _meta(gf, "tokenizer.ggml.tokens")
    vocab = gf.metadata.get("llama.vocab_size", len(tokens))
    # grouped: sizes, attention, positions, vocabulary and special ids, then the fixed llama choices
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": _meta(gf, "llama.feed_forward_length"),
        "num_hidden_layers": _meta(gf, "llama.block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": head_dim,
        "rms_norm_eps": _f32(_meta(gf, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": _meta(gf, "llama.context_length"),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in gf.tensors,
        "bos_token_id": gf.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gf.metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": gf.metadata.get("tokenizer.ggml.padding_token_id"),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    try:  # the checks slora's loader makes on config.json, made here, before a folder it would refuse is written
        build_config(config, gf.path)
    except (ValueError, KeyError, TypeError) as e:
        raise GGUFError(f"{gf.path}: its metadata gives a config.json that slora cannot load: "
                        f"{str(e).removeprefix(f'{gf.path}: ')}") from None
    return config


def hf_state_dict(gf: GGUFFile, config: dict) -> dict:
    """Dequantize every tensor to fp32 under its HF name, q/k rows un-permuted; shapes checked against config."""
    D, F, hs = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    Hq, Hkv, V, L = (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"],
                     config["num_hidden_layers"])
    expected = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        expected.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                         p + "self_attn.q_proj.weight": (Hq * hs, D), p + "self_attn.k_proj.weight": (Hkv * hs, D),
                         p + "self_attn.v_proj.weight": (Hkv * hs, D), p + "self_attn.o_proj.weight": (D, Hq * hs),
                         p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                         p + "mlp.down_proj.weight": (D, F)})
    sd = {}
    for name in gf.tensors:
        hf = hf_name(name, gf.path)
        if hf is None:  # rope_freqs: already checked and folded into config["rope_scaling"]
            continue
        if hf not in expected:  # e.g. blk.30.* in a 30-block model
            raise GGUFError(f"{gf.path}: tensor {name!r} ({hf}) does not fit a {L}-layer llama config")
        w = gf.tensor(name)
        if tuple(w.shape) != expected[hf]:
            raise GGUFError(f"{gf.path}: tensor {name!r} has shape {tuple(w.shape)}, expected {expected[hf]} "
                            f"for {hf}")
        if hf.endswith("q_proj.weight"):
            w = unpermute_qk(w, Hq)
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, Hkv)
        sd[hf] = np.ascontiguousarray(w, dtype=np.float32)
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise GGUFError(f"{gf.path}: missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return sd


def convert_gguf_to_hf(gguf_path, out_dir) -> Path:
    """Convert a llama GGUF into an HF folder: model.safetensors (fp32), config.json, tokenizer.json,
    tokenizer_config.json. Everything is written to a sibling temp folder renamed at the end, so `out_dir`
    either does not exist or is complete. An existing `out_dir` is an error (remove it first). The conversion
    holds the lock `.OUT_DIR.slora-lock` beside `out_dir` from the start: a second conversion into it refuses."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    check_apart(out_dir, {"the GGUF file": gguf_path})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir.parent / f".{out_dir.name}{LOCK}", out_dir):
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} already exists; remove it before converting {gguf_path} into it")
        gf = read_gguf(gguf_path)
        config = hf_config(gf)
        try:
            tokenizer = hf_tokenizer(gf)
        except GGUFError:
            raise
        except Exception as e:  # the tokenizers library raises plain Exceptions on a vocabulary it cannot build
            raise GGUFError(f"{gguf_path}: cannot rebuild the tokenizer from tokenizer.ggml.*: {e}") from None
        # replace=False: a folder another conversion finished meanwhile is an error, never silently replaced
        with atomic_folder(out_dir, replace=False) as tmp:
            sd = hf_state_dict(gf, config)
            for name, w in sd.items():
                if not np.isfinite(w).all():
                    raise GGUFError(f"{gguf_path}: tensor {name!r} holds NaN or inf values; the GGUF is damaged")
            with writing(tmp / "model.safetensors"):
                save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
            with writing(tmp / "tokenizer.json"):
                tokenizer.save(str(tmp / "tokenizer.json"))
            for name, d in (("config.json", config), ("tokenizer_config.json", hf_tokenizer_config(gf, config))):
                with writing(tmp / name):
                    (tmp / name).write_text(json.dumps(d, indent=2) + "\n")
    return out_dir
