"""Check slora's GGUF conversion (llama3 `rope_freqs` included) against transformers' own GGUF loader.

    PYTHONPATH=. python tests/comparisons/gguf_compat.py [--tol 1e-4]

Needs transformers and the `gguf` package (which transformers' GGUF loader needs) beside slora's own
dependencies. Not collected by pytest: it imports both, neither of which slora uses. Cases, on the tiny 2-layer llama GGUF of tests/io/test_gguf.py (mixed Q8_0, Q4_0,
Q4_1, F16, F32 tensors, q/k rows in llama.cpp's order):
  - plain: slora's converted folder vs `from_pretrained(..., gguf_file=...)` (dequantization, un-permutation);
  - llama3: the same with a `rope_freqs` tensor (theta 5e5, factor 8, original context 64, every band used).
    transformers' loader reads no llama3 scaling from a llama GGUF (it maps `rope_freqs` to nothing), so it is
    compared twice: as transformers loads it, and with slora's config.json (its recovered rope_scaling) passed
    as `config=`. The second must agree; the first shows what ignoring rope_freqs costs.
Logits on 2 × 48 tokens, fp32. Exits 1 when a case that must agree differs by more than --tol.
When the optional asset `vocab` is built (python -m slora.assets --only vocab), it also counts, on llama.cpp's
test vectors, the strings that transformers' GGUF tokenizer conversion and slora's get wrong (for information:
only slora's count must be 0).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import transformers  # noqa: E402

from slora.io.gguf import convert_gguf_to_hf  # noqa: E402
from slora.io.model_folder import load_model  # noqa: E402
from tests.io.test_gguf import ROPE31, build_tiny_llama, converter_rope_factors  # noqa: E402


def hf_logits(folder, name, ids, config=None):
    kw = {"config": config} if config is not None else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32, **kw)
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def compare_tokenizers() -> bool:
    from slora.io.assets import data_dir
    from slora.io.gguf import read_gguf
    from slora.io.gguf_tokenizer import hf_tokenizer
    from tests.io.test_gguf_tokenizer import read_vectors
    try:
        folder = data_dir("vocab")
    except FileNotFoundError as e:
        print(f"tokenizers: skipped ({e})")
        return True
    ok = True
    for name in ("llama-spm", "llama-bpe"):
        theirs = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=f"ggml-vocab-{name}.gguf")
        ours = hf_tokenizer(read_gguf(folder / f"ggml-vocab-{name}.gguf"))
        vectors = read_vectors(folder, name)
        bad_theirs = sum(theirs.encode(t, add_special_tokens=False) != ids for t, ids in vectors)
        bad_ours = sum(ours.encode(t, add_special_tokens=False).ids != ids for t, ids in vectors)
        print(f"tokenizer {name}: llama.cpp test strings tokenized wrongly: slora {bad_ours} of {len(vectors)}, "
              f"transformers' GGUF conversion {bad_theirs} of {len(vectors)}")
        ok &= bad_ours == 0
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted max |Δ| of fp32 logits")
    args = ap.parse_args(argv)
    from importlib.metadata import version
    print(f"transformers {transformers.__version__}, gguf {version('gguf')}, torch {torch.__version__}")
    ids = torch.randint(3, 264, (2, 48), generator=torch.Generator().manual_seed(0))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_tiny_llama(tmp / "plain.gguf")
        ours = load_model(convert_gguf_to_hf(tmp / "plain.gguf", tmp / "plain"))
        with torch.no_grad():
            mine = ours(ids)
        d = (mine - hf_logits(tmp, "plain.gguf", ids)).abs().max().item()
        print(f"plain GGUF:  slora vs transformers' GGUF loader, logits max|Δ| {d:.2e} (max |logit| "
              f"{mine.abs().max().item():.2f})")
        ok &= d <= args.tol

        div = converter_rope_factors(**ROPE31)
        raw = np.asarray(div, dtype=np.float32)
        build_tiny_llama(tmp / "llama3.gguf", extra_tensors=[("rope_freqs.weight", raw.shape, "F32", raw.tobytes())],
                         **{"llama.rope.freq_base": 500000.0, "llama.rope.scaling.original_context_length": 64})
        out = convert_gguf_to_hf(tmp / "llama3.gguf", tmp / "llama3")
        ours = load_model(out)
        with torch.no_grad():
            mine = ours(ids)
        cfg = transformers.LlamaConfig.from_dict(json.loads((out / "config.json").read_text()))
        with_cfg = (mine - hf_logits(tmp, "llama3.gguf", ids, cfg)).abs().max().item()
        as_loaded = (mine - hf_logits(tmp, "llama3.gguf", ids)).abs().max().item()
        print(f"llama3 GGUF: rope_scaling recovered by slora: {json.loads((out / 'config.json').read_text())['rope_scaling']}")
        print(f"llama3 GGUF: slora vs transformers with slora's config.json, logits max|Δ| {with_cfg:.2e}")
        print(f"llama3 GGUF: slora vs transformers' GGUF loader as is (no llama3 scaling), max|Δ| {as_loaded:.2e}")
        ok &= with_cfg <= args.tol
    ok &= compare_tokenizers()
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
