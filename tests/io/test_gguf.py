"""slora.gguf on GGUF files written by the tests themselves (tests/support/gguf_writer.py); nothing downloaded."""
import json
import math
import os
import re
import threading

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from slora.io.files import OutputError
from slora.io.gguf import GGUFError, convert_gguf_to_hf, permute_qk, read_gguf, unpermute_qk
from slora.io.model_folder import load_model
from tests.support import gguf_writer as gw

FP16_REL = 2.0 ** -11  # relative rounding error of storing a scale as fp16 (10-bit mantissa)
FP16_ABS = 2.0 ** -25  # absolute rounding error near zero: half of fp16's smallest subnormal, 2^-24
TINY = dict(layers=2, dim=64, heads=4, kv_heads=2, ffn=96)  # head size 16; GQA with 2 queries per kv head


# -----------------------------------------------------------------------------
# Quantized blocks read back within the format's error

def _write_one(tmp_path, x, type_name, **kw):
    raw, expect = gw.encode(x, type_name)
    path = tmp_path / f"{type_name}.gguf"
    gw.write_gguf(path, {"general.architecture": "llama"}, [("w", x.shape, type_name, raw)], **kw)
    return read_gguf(path).tensor("w"), expect


def _error_bound(x, type_name):
    """Largest |w − ŵ| the block format allows for each weight of x (shape (n, 32)), from ggml's quantizers.

    Q8_0: d = amax/127, q = round(w/d): rounding costs d/2, and storing d in fp16 costs |q|·d·2^-11 ≤ 127·d·2^-11.
    Q4_0: d = vmax/−8, q = min(15, ⌊w/d + 8.5⌋): d/2 from rounding, but the clamp at 15 (w/d ≥ 7.5, only the
          side opposite vmax) can cost a full |d|; fp16 storage of d adds |q − 8|·|d|·2^-11 ≤ 8·|d|·2^-11.
    Q4_1: d = (max − min)/15, m = min, q = round((w − m)/d) ≤ 15: d/2 from rounding; fp16 storage of d and m
          adds 15·d·2^-11 + |m|·2^-11.
    fp16 storage error of a value v is max(|v|·2^-11, 2^-25): relative, or absolute where v is subnormal in fp16.
    A few fp32 ulps of the block's magnitude cover the float arithmetic itself.
    """
    def fp16_err(v):
        return np.maximum(np.abs(v) * FP16_REL, FP16_ABS)

    b = x.reshape(-1, gw.QK).astype(np.float64)
    amax = np.abs(b).max(axis=1, keepdims=True)
    ulps = 8 * np.finfo(np.float32).eps * amax
    if type_name == "Q8_0":
        d = amax / 127
        return d / 2 + 127 * fp16_err(d) + ulps
    if type_name == "Q4_0":
        vmax = b[np.arange(len(b)), np.abs(b).argmax(axis=1)][:, None]
        d = np.abs(vmax) / 8
        clamped = b / (vmax / -8 + (vmax == 0)) >= 7.5
        return np.where(clamped, d, d / 2) + 8 * fp16_err(d) + ulps
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / 15
    return d / 2 + 15 * fp16_err(d) + fp16_err(lo) + ulps


def blocks_of_weights(n_blocks=st.integers(1, 6)):
    """(n·32,) float32 weights of ordinary sizes; anchors include an all-zero block and exact-grid values."""
    return n_blocks.flatmap(lambda n: st.lists(
        st.floats(-4.0, 4.0, allow_nan=False, width=32), min_size=32 * n, max_size=32 * n)
    ).map(lambda v: np.array(v, dtype=np.float32))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
@given(x=blocks_of_weights())
@example(x=np.zeros(32, dtype=np.float32))
@example(x=np.arange(-16, 16, dtype=np.float32))  # Q4_1 grid: step 31/15, every value off-grid but one
@example(x=np.linspace(-1, 1, 64, dtype=np.float32))
@example(x=np.array([0.0] * 31 + [1.1754943508222875e-38], dtype=np.float32))  # scale below fp16's range: d16 = 0
def test_quantized_blocks_read_back_within_format_error(tmp_path_factory, type_name, x):
    got, expect = _write_one(tmp_path_factory.mktemp("q"), x, type_name)
    # exact: the reader decodes the very codes the writer packed (nibble order, scale, offset)
    np.testing.assert_array_equal(got, expect)
    # and those codes sit within the format's quantization error of the original weights
    err = np.abs(got.astype(np.float64) - x.astype(np.float64)).reshape(-1, gw.QK)
    assert np.all(err <= _error_bound(x, type_name)), f"{type_name}: max error {err.max()}"


def test_q4_nibble_order_low_then_high(tmp_path):
    # weights 0..15 of a block live in the low nibbles, 16..31 in the high ones (ggml-common.h)
    x = np.concatenate([np.zeros(16), np.full(16, 15.0)]).astype(np.float32)  # Q4_1: d = 1, m = 0
    got, _ = _write_one(tmp_path, x, "Q4_1")
    np.testing.assert_array_equal(got, x)


@pytest.mark.parametrize("type_name", ["F32", "F16"])
def test_float_tensors_keep_shape_and_values(tmp_path, type_name):
    x = np.random.default_rng(0).standard_normal((3, 5, 7)).astype(np.float32)
    got, expect = _write_one(tmp_path, x, type_name)
    assert got.shape == (3, 5, 7) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("alignment", [32, 64, None])  # None: key absent, the default 32 applies
def test_alignment_and_version_2(tmp_path, alignment):
    md = {"general.architecture": "llama"}
    if alignment:
        md["general.alignment"] = alignment
    a, b = np.arange(3, dtype=np.float32), np.arange(40, dtype=np.float32).reshape(5, 8)
    path = tmp_path / "a.gguf"
    gw.write_gguf(path, md, [("a", a.shape, "F32", a.tobytes()), ("b", b.shape, "F32", b.tobytes())],
                  version=2, alignment=alignment or 32)
    gf = read_gguf(path)
    assert gf.version == 2 and gf.tensors["b"].shape == (5, 8)
    np.testing.assert_array_equal(gf.tensor("a"), a)
    np.testing.assert_array_equal(gf.tensor("b"), b)


def test_metadata_of_every_value_type(tmp_path):
    md = {"u8": (gw.U8, 255), "i8": (gw.I8, -128), "u16": (gw.U16, 65535), "i16": (gw.I16, -32768),
          "u32": (gw.U32, 2 ** 32 - 1), "i32": (gw.I32, -2 ** 31), "f32": (gw.F32V, 0.5),
          "bool": (gw.BOOL, True), "str": (gw.STRING, "héllo ✓"), "u64": (gw.U64, 2 ** 64 - 1),
          "i64": (gw.I64, -2 ** 63), "f64": (gw.F64, 1e-300),
          "arr_f32": (gw.ARRAY, (gw.F32V, [1.5, -2.0])), "arr_str": (gw.ARRAY, (gw.STRING, ["a", "", "ü"])),
          "arr_bool": (gw.ARRAY, (gw.BOOL, [True, False])),
          "arr_arr": (gw.ARRAY, (gw.ARRAY, [(gw.U8, [1, 2]), (gw.U8, [])]))}
    path = tmp_path / "m.gguf"
    gw.write_gguf(path, md, [])
    got = read_gguf(path).metadata
    assert got == {"u8": 255, "i8": -128, "u16": 65535, "i16": -32768, "u32": 2 ** 32 - 1, "i32": -2 ** 31,
                   "f32": 0.5, "bool": True, "str": "héllo ✓", "u64": 2 ** 64 - 1, "i64": -2 ** 63,
                   "f64": 1e-300, "arr_f32": [1.5, -2.0], "arr_str": ["a", "", "ü"],
                   "arr_bool": [True, False], "arr_arr": [[1, 2], []]}


# -----------------------------------------------------------------------------
# q/k permutation

def llama_cpp_permute_by_loops(w, n_heads):
    """convert_hf_to_gguf.py's permute written row by row: HF row h·hs + a·hs/2 + i -> GGUF row h·hs + 2i + a."""
    hs = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for a in range(2):
            for i in range(hs // 2):
                out[h * hs + 2 * i + a] = w[h * hs + a * hs // 2 + i]
    return out


def test_permute_direction_on_one_head():
    rows = np.arange(8)[:, None]  # one head of size 8: HF pairs (0,4) (1,5) (2,6) (3,7); llama.cpp adjacent rows
    np.testing.assert_array_equal(permute_qk(rows, 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(unpermute_qk(rows, 1)[:, 0], [0, 2, 4, 6, 1, 3, 5, 7])


@given(n_heads=st.integers(1, 6), half=st.integers(1, 8), cols=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
@example(n_heads=9, half=32, cols=3, seed=0)  # SmolLM2's q: 9 heads of 64
def test_unpermute_inverts_llama_cpp_permute(n_heads, half, cols, seed):
    w = np.random.default_rng(seed).standard_normal((n_heads * 2 * half, cols)).astype(np.float32)
    permuted = llama_cpp_permute_by_loops(w, n_heads)
    np.testing.assert_array_equal(permute_qk(w, n_heads), permuted)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_heads), n_heads), w)


# -----------------------------------------------------------------------------
# Conversion of a tiny llama GGUF

def build_tiny_llama(path, untied=False, extra_tensors=(), drop=(), **md_overrides):
    """Write a 2-layer llama GGUF with mixed tensor types; return the HF state dict a correct converter gives."""
    c, rng = TINY, np.random.default_rng(0)
    tokens, _, _ = gw.tiny_vocab()
    V, D, F, hs = len(tokens), c["dim"], c["ffn"], c["dim"] // c["heads"]
    tensors, expect = [], {}

    def add(gguf_name, hf_name, shape, type_name, permute_heads=None):
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        if type_name == "F16":
            w = w.astype(np.float16).astype(np.float32)  # so the HF expectation is exact
        stored = llama_cpp_permute_by_loops(w, permute_heads) if permute_heads else w
        raw, dq = gw.encode(stored, type_name)
        if gguf_name not in drop:
            tensors.append((gguf_name, shape, type_name, raw))
        expect[hf_name] = w if permute_heads else dq

    add("token_embd.weight", "model.embed_tokens.weight", (V, D), "Q8_0")
    for i in range(c["layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (D,), "F32")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (D, D), "F32", permute_heads=c["heads"])
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (c["kv_heads"] * hs, D), "F16",
            permute_heads=c["kv_heads"])
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (c["kv_heads"] * hs, D), "Q4_0")
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (D, D), "Q4_1")
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (D,), "F32")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (F, D), "Q4_1")
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (F, D), "Q4_1")
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (D, F), "Q8_0")
    add("output_norm.weight", "model.norm.weight", (D,), "F32")
    if untied:
        add("output.weight", "lm_head.weight", (V, D), "Q8_0")
    tensors.extend(extra_tensors)
    gw.write_gguf(path, gw.llama_metadata(c, V, **md_overrides), tensors)
    return expect


def test_convert_tiny_llama(tmp_path):
    expect = build_tiny_llama(tmp_path / "tiny.gguf")
    out = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer_config.json"]
    sd = load_file(out / "model.safetensors")
    assert sorted(sd) == sorted(expect) and "lm_head.weight" not in sd
    for name, w in expect.items():
        assert sd[name].dtype == np.float32, name
        np.testing.assert_array_equal(sd[name], w, err_msg=name)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg == {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                   "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
                   "rope_scaling": None, "max_position_embeddings": 128, "vocab_size": 264,
                   "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
                   "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32"}

    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tc["chat_template"].startswith("{% for m in messages %}")


def test_converted_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    build_tiny_llama(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_file(str(convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf") / "tokenizer.json"))
    tokens, _, _ = gw.tiny_vocab()
    ids = tok.encode("<|im_start|>hi world 123<|im_end|>").ids
    # control tokens stay whole; "Ġhi" and "Ġwor" come from the merges; every digit is its own piece
    assert [tokens[i] for i in ids] == ["<|im_start|>", "hi", "Ġwor", "l", "d", "Ġ", "1", "2", "3", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi world 123<|im_end|>"
    assert tok.padding is None and tok.truncation is None and tok.normalizer is None


def test_add_bos_token_is_kept(tmp_path):
    from tokenizers import Tokenizer
    build_tiny_llama(tmp_path / "tiny.gguf", **{"tokenizer.ggml.add_bos_token": True})
    out = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("hi").ids[0] == 1  # <|im_start|>, the bos
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_convert_untied_has_lm_head(tmp_path):
    expect = build_tiny_llama(tmp_path / "tiny.gguf", untied=True)
    out = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    np.testing.assert_array_equal(load_file(out / "model.safetensors")["lm_head.weight"], expect["lm_head.weight"])


# -----------------------------------------------------------------------------
# Bad input: each error names the file and the culprit; nothing half written

def test_wrong_magic(tmp_path):
    gw.write_gguf(tmp_path / "x.gguf", {}, [], magic=b"GGML")
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file \(magic b'GGML'"):
        read_gguf(tmp_path / "x.gguf")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(tmp_path, version):
    gw.write_gguf(tmp_path / "x.gguf", {}, [], version=version)
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}") as e:
        read_gguf(tmp_path / "x.gguf")
    assert ("big-endian" in str(e.value)) == (version == 0x03000000)


def test_truncated_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"empty\.gguf: empty file"):
        read_gguf(tmp_path / "empty.gguf")
    build_tiny_llama(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    gf = read_gguf(tmp_path / "cut.gguf")  # the header is intact; the last tensor's bytes are not
    with pytest.raises(GGUFError, match=r"truncated GGUF: tensor 'output_norm\.weight'"):
        gf.tensor("output_norm.weight")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(GGUFError, match=r"head\.gguf: truncated GGUF"):
        read_gguf(tmp_path / "head.gguf")


def test_non_llama_architecture(tmp_path):
    build_tiny_llama(tmp_path / "g.gguf", **{"general.architecture": "gpt2"})
    with pytest.raises(GGUFError, match=r"g\.gguf: general\.architecture is 'gpt2'; slora converts only 'llama'"):
        convert_gguf_to_hf(tmp_path / "g.gguf", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [tmp_path / "g.gguf"]


def test_unknown_tensor_type_names_tensor_and_type(tmp_path):
    raw = bytes(210 * 4)  # four Q6_K blocks of 256 weights, 210 bytes each
    build_tiny_llama(tmp_path / "u.gguf", drop=("blk.1.ffn_up.weight",),
                     extra_tensors=[("blk.1.ffn_up.weight", (4, 256), "Q6_K", raw)])
    with pytest.raises(GGUFError, match=r"unsupported GGUF tensor type Q6_K for tensor 'blk\.1\.ffn_up\.weight'"):
        read_gguf(tmp_path / "u.gguf").tensor("blk.1.ffn_up.weight")
    with pytest.raises(GGUFError, match="unsupported GGUF tensor type Q6_K"):
        convert_gguf_to_hf(tmp_path / "u.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.gguf"]  # no output, no leftover temp folder


def test_unexpected_and_missing_tensors(tmp_path):
    bias = np.zeros(64, dtype=np.float32)
    build_tiny_llama(tmp_path / "b.gguf", extra_tensors=[("blk.0.attn_q.bias", (64,), "F32", bias.tobytes())])
    with pytest.raises(GGUFError, match=r"unexpected tensor 'blk\.0\.attn_q\.bias'"):
        convert_gguf_to_hf(tmp_path / "b.gguf", tmp_path / "hf")
    build_tiny_llama(tmp_path / "m.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFError, match=r"missing tensors for \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")


def test_refuses_existing_output_and_unknown_pre_tokenizer(tmp_path):
    build_tiny_llama(tmp_path / "t.gguf", **{"tokenizer.ggml.pre": "qwen2"})
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="exists already|already exists"):
        convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "exists")
    with pytest.raises(GGUFError, match=r"tokenizer\.ggml\.pre = 'qwen2' is not supported"):
        convert_gguf_to_hf(tmp_path / "t.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# -----------------------------------------------------------------------------
# llama3 RoPE scaling stored as the rope_freqs tensor (LLaMA-3.1 / 3.2 GGUFs)

def converter_rope_factors(theta, head_dim, factor, low, high, old_ctx):
    """llama.cpp's conversion/llama.py loop, written out in plain float arithmetic: one divisor per frequency."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / theta ** (i / head_dim))
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


# theta 5e5 and original context 64 put the 8 frequencies of a 16-wide head in all three bands (wavelengths
# 6.3 .. 6.1e5 against band edges 16 and 64)
ROPE31 = dict(theta=500000.0, head_dim=16, factor=8.0, low=1.0, high=4.0, old_ctx=64)


def _rope_gguf(tmp_path, divisors, **md):
    raw = np.asarray(divisors, dtype=np.float32)
    md = {"llama.rope.freq_base": 500000.0, "llama.rope.scaling.original_context_length": 64, **md}
    path = tmp_path / "r.gguf"
    build_tiny_llama(path, extra_tensors=[("rope_freqs.weight", raw.shape, "F32", raw.tobytes())], **md)
    return path


def test_rope_freqs_become_llama3_rope_scaling(tmp_path):
    div = converter_rope_factors(**ROPE31)
    assert (div == 1).any() and (div == 8).any() and ((div > 1) & (div < 8)).any()  # every band is exercised
    out = convert_gguf_to_hf(_rope_gguf(tmp_path, div), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    assert "rope_freqs.weight" not in load_file(out / "model.safetensors")
    # the model slora builds from that config rotates with exactly the frequencies llama.cpp would use
    from slora.models.llama import LlamaConfig, rope_inv_freq
    got = rope_inv_freq(LlamaConfig.from_hf_config(cfg)).double().numpy()
    want = (1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)) / div.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6)  # fp32 inv_freq (~1e-7) plus fp32 divisors (6e-8)


def test_rope_freqs_factor_from_tensor_and_default_context(tmp_path):
    # LLaMA-3.2 style: factor 32, original context 8192, neither in the metadata (as llama.cpp writes them)
    div = converter_rope_factors(500000.0, 16, 32.0, 1.0, 4.0, 8192)
    path = _rope_gguf(tmp_path, div, **{"llama.rope.scaling.original_context_length": None})
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    sc = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert (sc["factor"], sc["original_max_position_embeddings"]) == (32.0, 8192)


def test_rope_freqs_mismatch_is_an_error_naming_the_tensor(tmp_path):
    div = converter_rope_factors(**{**ROPE31, "high": 2.0})  # a different band edge than the defaults
    path = _rope_gguf(tmp_path, div)
    with pytest.raises(GGUFError, match=r"r\.gguf: tensor 'rope_freqs\.weight' does not match llama3 RoPE scaling"):
        convert_gguf_to_hf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    with pytest.raises(GGUFError, match=r"'rope_freqs\.weight' has shape \(7,\), expected \(8,\)"):
        convert_gguf_to_hf(_rope_gguf(tmp_path, converter_rope_factors(**ROPE31)[:7]), tmp_path / "hf")
    with pytest.raises(GGUFError, match="two RoPE scalings"):
        convert_gguf_to_hf(_rope_gguf(tmp_path, converter_rope_factors(**ROPE31), **{
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}), tmp_path / "hf")


def test_rope_freqs_within_stated_tolerance(tmp_path):
    div = converter_rope_factors(**ROPE31).astype(np.float64)
    mid = int(np.flatnonzero((div > 1) & (div < 8))[0])
    for rel, ok in ((2e-6, True), (1e-4, False)):  # ROPE_FREQS_RTOL is 1e-5
        bumped = div.copy()
        bumped[mid] *= 1 + rel
        out = tmp_path / f"hf{rel}"
        if ok:
            convert_gguf_to_hf(_rope_gguf(tmp_path, bumped), out)
        else:
            with pytest.raises(GGUFError, match=f"divisor {mid} is"):
                convert_gguf_to_hf(_rope_gguf(tmp_path, bumped), out)


# -----------------------------------------------------------------------------
# Metadata checked before anything is converted; OUT_DIR locked and apart from the GGUF; write errors named

BAD_METADATA = [  # (key, value written, what the error says); every one of them once converted into a folder that
    # load_model refuses, or that failed deep in the model code
    ("llama.context_length", (gw.I32, -5), "llama.context_length = -5 must be a positive integer"),
    ("llama.context_length", 0, "llama.context_length = 0 must be a positive integer"),
    ("llama.attention.head_count_kv", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "layer_norm_rms_epsilon = nan must be a positive"),
    ("llama.rope.freq_base", float("inf"), "llama.rope.freq_base = inf must be a positive finite number"),
    ("llama.block_count", (gw.I64, -2), "llama.block_count = -2 must be a positive integer"),
    ("llama.embedding_length", "64", "llama.embedding_length = '64' must be a positive integer"),
    ("tokenizer.ggml.bos_token_id", 10_000, "tokenizer.ggml.bos_token_id = 10000 is not a token id"),
    ("llama.rope.scaling.type", "linear", "rope_scaling type 'linear' is not supported"),
]


@pytest.mark.parametrize("key,value,message", BAD_METADATA, ids=[f"{k}={v}" for k, v, _ in BAD_METADATA])
def test_invalid_metadata_is_refused_before_converting(tmp_path, key, value, message):
    extra = {"llama.rope.scaling.factor": 2.0} if key == "llama.rope.scaling.type" else {}
    build_tiny_llama(tmp_path / "m.gguf", **{key: value}, **extra)
    with pytest.raises(GGUFError, match=rf"^{tmp_path / 'm.gguf'}: .*{re.escape(message)}"):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_every_converted_folder_loads(tmp_path):
    # the other side of the check: what it lets through, load_model reads
    build_tiny_llama(tmp_path / "m.gguf", **{"llama.context_length": (gw.I32, 7)})
    assert load_model(convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")).config.max_position_embeddings == 7


def test_out_dir_that_is_the_gguf_is_refused_naming_both(tmp_path):
    gguf = tmp_path / "m.gguf"
    build_tiny_llama(gguf)
    data = gguf.read_bytes()
    with pytest.raises(OutputError, match=rf"^{gguf}: is the GGUF file {gguf}, which this command reads"):
        convert_gguf_to_hf(gguf, gguf)
    assert gguf.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_second_conversion_into_the_folder_refuses_while_the_first_runs(tmp_path, monkeypatch):
    import slora.io.gguf as gguf_io
    build_tiny_llama(tmp_path / "m.gguf")
    reading, go, done = threading.Event(), threading.Event(), []
    real = gguf_io.read_gguf

    def read(path):  # the first conversion (a thread) holds OUT_DIR while it reads the GGUF
        if threading.current_thread() is not threading.main_thread():
            reading.set()
            go.wait(60)
        return real(path)
    monkeypatch.setattr(gguf_io, "read_gguf", read)
    first = threading.Thread(target=lambda: done.append(convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")))
    first.start()
    try:
        assert reading.wait(60)
        with pytest.raises(OutputError, match=rf"^{tmp_path / 'hf'}: in use by another slora run \(pid {os.getpid()}"):
            convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    finally:
        go.set()
        first.join(60)
    assert done == [tmp_path / "hf"] and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


def test_a_failed_write_names_the_file(tmp_path, capsys):
    from slora.cli import gguf as gguf_cmd
    from slora.cli.runner import run_cli
    from tests.io.test_files import file_size_limit
    build_tiny_llama(tmp_path / "m.gguf")
    with file_size_limit(64 * 1024):  # the GGUF (read, not written) is larger; the fp32 weights do not fit
        assert run_cli(gguf_cmd.main, [str(tmp_path / "m.gguf"), str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {tmp_path}/\.hf\.partial-\d+-\w+/model\.safetensors: cannot write it: File too "
                        rf"large; .*; temporary files were removed \({tmp_path}/\.hf\.partial-\d+-\w+\)\n", err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
