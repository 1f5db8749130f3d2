"""Check slora's qwen2 and mistral decoders against checkpoints that transformers itself writes.

    PYTHONPATH=. python tests/comparisons/families_compat.py [--tol 1e-4]

Needs transformers (with Qwen2 and Mistral) beside slora's own dependencies; no assets, no network.
Not collected by pytest (no `test_` prefix): it imports transformers, which slora never does. For each case it
builds a tiny random Qwen2ForCausalLM / MistralForCausalLM with transformers (weights N(0, 0.2²) from a fixed
seed so that logits are far from ties), writes it with `save_pretrained` (config.json + model.safetensors),
loads the folder with `slora.models.load_model`, and compares in fp32:
  - logits on a full batch (T = 40, longer than every window) and on a left-padded batch with an attention mask;
  - how much slora's logits move when the window is switched off (so the window comparison is not vacuous);
  - greedy generation (transformers' `generate`, do_sample=False, with its own cache) against slora's `generate`.
Prints one line per case and exits 1 when a max |Δ| exceeds --tol or a generated token differs.
"""
import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import transformers  # noqa: E402

from slora.io.model_folder import load_model  # noqa: E402

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
CASES = [
    ("qwen2, tied", transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
     dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    ("qwen2, untied", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    ("mistral, window 8", transformers.MistralConfig, transformers.MistralForCausalLM,
     dict(sliding_window=8, head_dim=16)),
    ("mistral, no window", transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=None)),
]


def build_hf(config_cls, model_cls, kw, seed=0):
    torch.manual_seed(seed)
    cfg = config_cls(**BASE, **kw)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + noise * 0.05 if "norm" in name else noise * 0.2)
    return model


def compare(name, config_cls, model_cls, kw, folder):
    hf = build_hf(config_cls, model_cls, kw)
    hf.save_pretrained(folder, safe_serialization=True)
    ours = load_model(folder)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, BASE["vocab_size"], (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # second row left-padded by 7
    with torch.no_grad():
        full = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
        real = mask.bool()
        padded = (ours(ids, mask) - hf(input_ids=ids, attention_mask=mask).logits)[real].abs().max().item()
        scale = hf(input_ids=ids).logits.abs().max().item()
        window, ours.config.sliding_window = ours.config.sliding_window, None  # what the window changes
        effect = (ours(ids) - hf(input_ids=ids).logits).abs().max().item()
        ours.config.sliding_window = window
    prompt, pmask = ids[:, :20], mask[:, :20]
    want = hf.generate(input_ids=prompt, attention_mask=pmask, max_new_tokens=16, do_sample=False,
                       eos_token_id=None, pad_token_id=0, min_new_tokens=16)
    got = ours.generate(prompt, pmask, max_new_tokens=16, eos_token_id=-1)
    same = torch.equal(want, got)
    print(f"{name:20s} logits max|Δ| full {full:.2e}, left-padded {padded:.2e} (max |logit| {scale:.1f}); "
          f"greedy 2×16 tokens {'equal' if same else 'DIFFER'}; window {window} (without it: max|Δ| {effect:.2e}), "
          f"q bias {ours.model.layers[0].self_attn.q_proj.bias is not None}, "
          f"o bias {ours.model.layers[0].self_attn.o_proj.bias is not None}")
    return max(full, padded), same


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tol", type=float, default=1e-4, help="largest accepted max |Δ| of fp32 logits")
    args = ap.parse_args(argv)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config_cls, model_cls, kw) in enumerate(CASES):
            diff, same = compare(name, config_cls, model_cls, kw, Path(tmp) / str(i))
            ok &= diff <= args.tol and same
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
