"""Check that slora's adapters load in PEFT onto transformers models and give slora's outputs.

    PYTHONPATH=. python tests/comparisons/peft_compat.py [--tol 1e-4]

Needs transformers and peft >= 0.14 (fully qualified rank_pattern keys; with accelerate) beside slora's own
dependencies; no assets, no network. Not collected by pytest (no `test_` prefix): it imports transformers and
peft, which slora never does. For each case it builds a tiny random model with
slora's test helpers, saves it with `slora.models.save_model`, applies LoRA with unequal ranks (a rank-0 module
among the listed ones, non-integer "scale" alphas or rsLoRA, dropout), gives B random non-zero values, saves the
adapter with `slora.io.adapter.save_adapter`, then loads the base with transformers' Auto class and the adapter with
`PeftModel.from_pretrained`, and compares:
  - base:    slora's base model vs transformers' (before any LoRA), to tell model mismatches from adapter ones;
  - adapter: slora with LoRA vs transformers + PEFT;
  - effect:  how much the adapter moves slora's output (so the comparison is not vacuous);
  - that PEFT built LoRA on exactly slora's modules with slora's r, alpha and scaling.
A last case goes the other way: an adapter made by PEFT loads into slora with `load_adapter`.
Prints one line per case and exits 1 when any max |diff| exceeds --tol, or PEFT's layers differ.
"""
import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: E402

from slora.io.adapter import load_adapter, save_adapter  # noqa: E402
from slora.models.lora import apply_lora, lora_modules  # noqa: E402
from slora.models import for_sequence_classification  # noqa: E402
from slora.io.model_folder import load_model, save_model  # noqa: E402
from tests.support.tiny import randomize_lora, tiny_bert, tiny_llama, tiny_mpnet  # noqa: E402

NUM_LABELS = 3


def load_hf(auto_cls, folder, **kw):
    # transformers >= 4.56 calls the dtype argument `dtype`; older versions `torch_dtype`.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return auto_cls.from_pretrained(str(folder), **{key: torch.float32}, **kw).eval()


def peft_layers(peft_model):
    """{module name relative to the task model: (r, alpha, scaling)} of PEFT's LoRA layers."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, m in peft_model.named_modules():
        if isinstance(m, LoraLayer):
            out[name.removeprefix("base_model.model.")] = (m.r["default"], m.lora_alpha["default"],
                                                           m.scaling["default"])
    return out


def compare(label, slora_base, make_hf, slora_fn, hf_fn, ranks, task_type, tmp, **lora_kw):
    """Save base + adapter, reload with transformers + PEFT, return (ok, summary line)."""
    base_dir, adapter_dir = tmp / f"{label}-base", tmp / f"{label}-adapter"
    vocab = slora_base.config.vocab_size
    x = torch.randint(3, vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, -3:] = 0  # one padded row: masks must agree too

    body = next((getattr(slora_base, n) for n in ("bert", "roberta", "mpnet") if hasattr(slora_base, n)), slora_base)
    save_model(body, base_dir)
    hf = make_hf(base_dir)
    # A classification head is not in the base checkpoint: transformers draws its own until PEFT's
    # modules_to_save brings slora's, so there the base difference is expected to be large.
    has_head = hasattr(slora_base, "classifier")
    with torch.no_grad():
        before = slora_fn(slora_base, x, mask)
        base_diff = (before - hf_fn(hf, x, mask)).abs().max().item()
    apply_lora(slora_base, ranks, **lora_kw)
    randomize_lora(slora_base, seed=7, std=0.2)
    save_adapter(slora_base, adapter_dir, str(base_dir), task_type)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(hf, str(adapter_dir)).eval()
    with torch.no_grad():
        ours = slora_fn(slora_base, x, mask)
        theirs = hf_fn(pm, x, mask)
    diff = (ours - theirs).abs().max().item()
    effect = (ours - before).abs().max().item()
    want = {n: (m.r, m.alpha, m.scaling) for n, m in lora_modules(slora_base).items()}
    got = peft_layers(pm)
    same_layers = set(got) == set(want) and all(
        got[n][0] == want[n][0] and float(got[n][1]) == want[n][1] and got[n][2] == want[n][2] for n in want)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    notes = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    line = (f"{label:<22} base max|diff| {base_diff:.2e}{' (random HF head)' if has_head else ''}  "
            f"adapter max|diff| {diff:.2e}  "
            f"(LoRA moves output by {effect:.2e})  PEFT layers {len(got)}/{len(want)} "
            f"{'match' if same_layers else 'DIFFER'}  ranks {sorted(set(cfg['rank_pattern'].values()))} "
            f"rslora={cfg['use_rslora']}")
    if not same_layers:
        line += f"\n    slora {want}\n    peft  {got}"
    for n in notes:
        line += f"\n    warning: {n}"
    ok = same_layers and diff <= ARGS.tol and (has_head or base_diff <= ARGS.tol) and effect > 10 * diff
    return ok, line


def peft_to_slora(tmp):
    """The other direction: an adapter made and saved by PEFT (short target names, partial patterns) loads into
    slora with `load_adapter` and gives PEFT's outputs."""
    from peft import LoraConfig, get_peft_model
    base_dir, adapter_dir = tmp / "p2s-base", tmp / "p2s-adapter"
    save_model(tiny_llama(seed=15), base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.05,
                     rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3},
                     task_type="CAUSAL_LM")
    pm = get_peft_model(load_hf(AutoModelForCausalLM, base_dir), cfg)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(adapter_dir))
    pm.eval()
    ours = load_adapter(load_model(base_dir), adapter_dir).eval()
    x = torch.randint(3, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x) - pm(input_ids=x).logits).abs().max().item()
    got = {n: (m.r, m.alpha, m.scaling) for n, m in lora_modules(ours).items()}
    same_layers = got == peft_layers(pm)
    line = (f"{'peft -> slora llama':<22} adapter max|diff| {diff:.2e}  slora layers {len(got)} "
            f"{'match' if same_layers else 'DIFFER'} PEFT's r/alpha/scaling")
    return same_layers and diff <= ARGS.tol, line


def causal_lm(m, x, mask):
    return m(x, mask) if not hasattr(m, "base_model") else m(input_ids=x, attention_mask=mask).logits


def encoder(m, x, mask):
    out = m(x, mask) if not hasattr(m, "base_model") else m(input_ids=x, attention_mask=mask).last_hidden_state
    return out * mask[..., None]  # padded positions are not defined to agree


def classifier(m, x, mask):
    return m(x, mask) if not hasattr(m, "base_model") else m(input_ids=x, attention_mask=mask).logits


def main():
    cases = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        llama_ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2,
                       "model.layers.1.self_attn.q_proj": 1, "model.layers.1.self_attn.k_proj": 0,
                       "model.layers.1.self_attn.o_proj": 3, "model.layers.1.mlp.down_proj": 5,
                       "model.layers.0.mlp.gate_proj": 2}
        cases.append(compare("llama causal-lm scale", tiny_llama(seed=11),
                             lambda p: load_hf(AutoModelForCausalLM, p), causal_lm, causal_lm, llama_ranks,
                             "CAUSAL_LM", tmp, alpha=12, alpha_policy="scale", dropout=0.05))
        cases.append(compare("llama causal-lm rslora", tiny_llama(seed=12),
                             lambda p: load_hf(AutoModelForCausalLM, p), causal_lm, causal_lm, llama_ranks,
                             "CAUSAL_LM", tmp, alpha=6, alpha_policy="rslora"))
        for mt, pad, body in (("bert", 0, "bert"), ("roberta", 1, "roberta")):
            ranks = {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.attention.self.value": 1,
                     "encoder.layer.1.attention.self.query": 0, "encoder.layer.1.attention.self.value": 4,
                     "encoder.layer.1.output.dense": 2}
            cases.append(compare(f"{mt} encoder", tiny_bert(seed=13, model_type=mt, pad_token_id=pad),
                                 lambda p: load_hf(AutoModel, p), encoder, encoder, ranks,
                                 "FEATURE_EXTRACTION", tmp, alpha=8, alpha_policy="scale", r_ref=2))
            task = for_sequence_classification(tiny_bert(seed=14, model_type=mt, pad_token_id=pad),
                                               NUM_LABELS, seed=3).eval()
            cases.append(compare(f"{mt} seq-cls", task,
                                 lambda p: load_hf(AutoModelForSequenceClassification, p, num_labels=NUM_LABELS),
                                 classifier, classifier, {f"{body}.{k}": r for k, r in ranks.items()},
                                 "SEQ_CLS", tmp, alpha=8, alpha_policy="constant", dropout=0.1))
        # MPNet: attention.attn.q/v names, the shared relative-position bias, MPNetForSequenceClassification's head
        ranks = {"encoder.layer.0.attention.attn.q": 3, "encoder.layer.0.attention.attn.v": 1,
                 "encoder.layer.1.attention.attn.q": 0, "encoder.layer.1.attention.attn.v": 4,
                 "encoder.layer.1.attention.attn.o": 2, "encoder.layer.0.output.dense": 2}
        cases.append(compare("mpnet encoder", tiny_mpnet(seed=16), lambda p: load_hf(AutoModel, p), encoder,
                             encoder, ranks, "FEATURE_EXTRACTION", tmp, alpha=8, alpha_policy="scale", r_ref=2))
        task = for_sequence_classification(tiny_mpnet(seed=17), NUM_LABELS, seed=3).eval()
        cases.append(compare("mpnet seq-cls", task,
                             lambda p: load_hf(AutoModelForSequenceClassification, p, num_labels=NUM_LABELS),
                             classifier, classifier, {f"mpnet.{k}": r for k, r in ranks.items()},
                             "SEQ_CLS", tmp, alpha=8, alpha_policy="constant", dropout=0.1))
        cases.append(peft_to_slora(tmp))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"tolerance {ARGS.tol:g}")
    for _, line in cases:
        print(line)
    bad = sum(not ok for ok, _ in cases)
    print(f"{len(cases) - bad} passed, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |slora − PEFT| per output (absolute)")
    ARGS = parser.parse_args()
    sys.exit(main())
