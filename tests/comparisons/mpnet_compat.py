"""Check slora's MPNet against transformers' on the real all-mpnet-base-v2 weights, and its adapters in PEFT.

    PYTHONPATH=. python tests/comparisons/mpnet_compat.py [--model ~/.cache/slora/models/mpnet-base] [--adapter RUN/adapter]

Needs transformers and peft (with accelerate) beside slora's own dependencies, and the optional `mpnet` asset
(`python -m slora.assets --only mpnet`). Not collected by pytest (no `test_` prefix): it imports transformers
and peft, which slora never does. tests/comparisons/peft_compat.py does the same on tiny
random MPNets; this script adds what only the real checkpoint shows (trained bias table, 12 layers, long inputs).
  1. hidden states: slora's MPNetModel vs transformers' MPNetModel on real sentences of the rt-polarity stand-in
     (a right-padded batch) and on one 400-token text, so offsets beyond max distance 128 and every bucket occur;
     compared at real tokens, and the mean-pooled sentence embeddings too;
  2. a SEQ_CLS adapter saved by slora (unequal ranks, one at 0, random non-zero B, the seeded classifier head
     in modules_to_save), loaded with PEFT on AutoModelForSequenceClassification: logits against slora's.
     With --adapter, a slora run's trained adapter is checked the same way instead.
Prints one line per check and exits 1 when any max |diff| exceeds --tol.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModel, AutoModelForSequenceClassification  # noqa: E402

from slora.data import tasks  # noqa: E402
from slora.io.adapter import load_adapter, save_adapter  # noqa: E402
from slora.models.lora import apply_lora  # noqa: E402
from slora.models import for_sequence_classification  # noqa: E402
from slora.io.model_folder import load_model, load_tokenizer  # noqa: E402
from slora.models.bert import mean_pool  # noqa: E402
from tests.comparisons.peft_compat import load_hf  # noqa: E402
from tests.support.tiny import randomize_lora  # noqa: E402


def batch(tok, texts, pad_id):
    """Right-padded input_ids and attention_mask (B, T) of `texts` through the model's own tokenizer."""
    enc = tok.encode_batch(texts)
    T = max(len(e.ids) for e in enc)
    ids = torch.full((len(enc), T), pad_id)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
    return ids, mask


def inputs(tok, pad_id, n):
    """[(label, ids, mask)]: n real sentences as one padded batch, and one long text cut at 400 tokens."""
    train = tasks.load_task("rt-polarity", seed=0)["train"]
    short = batch(tok, [e.text for e in train[:n]], pad_id)
    long_text = " ".join(e.text for e in train[n:n + 40])
    ids = torch.tensor([tok.encode(long_text).ids[:400]])
    return [(f"rt-polarity batch {tuple(short[0].shape)}", *short), (f"long text {tuple(ids.shape)}", ids,
                                                                      torch.ones_like(ids))]


def check_hidden(path, tok, pad_id, n):
    ours, theirs = load_model(path), load_hf(AutoModel, path)
    lines, worst = [], 0.0
    for label, ids, mask in inputs(tok, pad_id, n):
        with torch.no_grad():
            a = ours(ids, mask)
            b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        d_hidden = (a[real] - b[real]).abs().max().item()
        d_pooled = (mean_pool(a, mask) - mean_pool(b, mask)).abs().max().item()
        worst = max(worst, d_hidden, d_pooled)
        lines.append(f"hidden states, {label}: max|diff| {d_hidden:.2e} (max |h| {b[real].abs().max():.2f}); "
                     f"mean-pooled max|diff| {d_pooled:.2e}")
    return worst, lines


def slora_adapter(path, folder, num_labels):
    """A SEQ_CLS adapter made by slora on the real model: unequal ranks on q and v (layer 5's q at 0)."""
    model = for_sequence_classification(load_model(path), num_labels, seed=0).eval()
    ranks = {f"mpnet.encoder.layer.{i}.attention.attn.{p}": (i + (p == "v")) % 6 + 1 for i in range(12)
             for p in ("q", "v")}
    ranks["mpnet.encoder.layer.5.attention.attn.q"] = 0
    apply_lora(model, ranks, alpha=8, alpha_policy="scale", dropout=0.1, generator=torch.Generator().manual_seed(1))
    randomize_lora(model, seed=2, std=0.05)
    save_adapter(model, folder, str(path), "SEQ_CLS")
    return folder


def check_adapter(path, tok, pad_id, n, adapter):
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    if cfg["task_type"] != "SEQ_CLS":
        raise ValueError(f"{adapter}: task_type {cfg['task_type']!r}, expected SEQ_CLS")
    from safetensors.torch import load_file
    out_proj = [v for k, v in load_file(Path(adapter) / "adapter_model.safetensors").items()
                if k.endswith("classifier.out_proj.weight")]
    num_labels = out_proj[0].shape[0]
    ours = load_adapter(for_sequence_classification(load_model(path), num_labels, seed=123), adapter).eval()
    base = for_sequence_classification(load_model(path), num_labels, seed=123).eval()
    theirs = PeftModel.from_pretrained(load_hf(AutoModelForSequenceClassification, path, num_labels=num_labels),
                                       str(adapter)).eval()
    lines, worst = [], 0.0
    for label, ids, mask in inputs(tok, pad_id, n):
        with torch.no_grad():
            a = ours(ids, mask)
            b = theirs(input_ids=ids, attention_mask=mask).logits
            moved = (a - base(ids, mask)).abs().max().item()  # how far the adapter (LoRA and its head) moves them
        d = (a - b).abs().max().item()
        worst = max(worst, d)
        lines.append(f"SEQ_CLS adapter in PEFT, {label}: logits max|diff| {d:.2e} (max |logit| {b.abs().max():.2f}; "
                     f"the adapter moves logits by {moved:.2e}; ranks {sorted(set(cfg['rank_pattern'].values()))})")
    return worst, lines


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="MPNet folder (default: the `mpnet` asset)")
    p.add_argument("--adapter", default=None, help="a slora SEQ_CLS adapter folder to check (default: make one)")
    p.add_argument("--n", type=int, default=16, help="sentences in the padded batch (count)")
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |slora − transformers| (absolute)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from slora.io.assets import model_dir
        args.model = model_dir("mpnet")
    path = Path(args.model)
    tok = load_tokenizer(path)
    pad_id = json.loads((path / "config.json").read_text())["pad_token_id"]
    worst_h, lines = check_hidden(path, tok, pad_id, args.n)
    with tempfile.TemporaryDirectory() as d:
        adapter = args.adapter or slora_adapter(path, Path(d) / "adapter", num_labels=2)
        worst_a, more = check_adapter(path, tok, pad_id, args.n, adapter)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"{path}; tolerance {args.tol:g}")
    for line in lines + more:
        print(line)
    bad = worst_h > args.tol or worst_a > args.tol
    print("FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
