"""Check a slora chat run against transformers and PEFT: the adapter, the merged export, and the chat rendering.

    python -m slora.wiki_chat /tmp/chat
    python -m slora.finetune --model smollm2 --task jsonl --jsonl-kind chat --train-file /tmp/chat/train.jsonl \\
        --dev-file /tmp/chat/dev.jsonl --max-steps 6 --batch-size 8 --max-len 192 --calib-n 32 --max-eval 8 \\
        --lr 5e-3 --gen-tokens 12 --alpha-policy constant --fold-scaling --out /tmp/chat-run
    python -m slora.merge /tmp/chat-run /tmp/chat-merged
    PYTHONPATH=. python tests/comparisons/serve_compat.py /tmp/chat-run /tmp/chat-merged --chat /tmp/chat/*.jsonl

The first three commands need only slora (and the default assets, `python -m slora.assets`); this script needs
transformers and peft (with accelerate) beside slora's own dependencies, and for its LLaMA-3 rendering check the
optional `vocab` asset (`python -m slora.assets --only vocab`; skipped when absent). It runs on CPU; vLLM itself is
not needed (its one-scaling rule is emulated in slora). On that SmolLM2 run the fp32 rows sit at the fp32 rounding
floor that the float64 oracle rows show (about 1e-4 over 30 layers, logits up to ~47), so they exceed the default
--tol 1e-4; `--tol 2e-4` is the bound that separates rounding from a real disagreement there.
Not collected by pytest (no `test_` prefix): it imports transformers and peft, which slora never does. On the run's
dev conversations (rendered by slora, right-padded) it reports max |Δ| of the logits over real tokens between
  - slora's base + LoRA (unmerged; `load_adapter` on the run's adapter folder), the reference;
  - transformers' base + PEFT's `PeftModel.from_pretrained(adapter)`;
  - transformers' AutoModelForCausalLM on the merged folder, and slora's `load_model` on it;
  - a one-global-scaling loader as vLLM is (lora_alpha/r on every module), emulated in slora;
and how far LoRA moves the logits (so that the comparisons are not vacuous), and how far the fp32 unmerged and
merged models each are from the same LoRA model evaluated in float64 (the fp32 rounding floor). Then tiny BERT,
RoBERTa and MPNet task models merged by `slora.merge` and read by AutoModelForSequenceClassification (max |Δ| of the
logits against slora's unmerged task model). Then the chat rendering: slora's ids against `apply_chat_template`
(full conversation; context + generation prompt) for the run's tokenizer on every record of --chat, and for LLaMA-3
on the same records with the vocabulary of `ggml-vocab-llama-bpe.gguf` (assets, data/llama-vocab) and
Meta-Llama-3-8B-Instruct's public template. Exits 1 when a figure exceeds --tol or an id differs.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from slora.data import chat, tasks, text  # noqa: E402
from slora.io.adapter import load_adapter  # noqa: E402
from slora.models.lora import lora_modules, module_alphas  # noqa: E402
from slora.io.merge import base_path  # noqa: E402
from slora.io.model_folder import load_model, load_tokenizer  # noqa: E402

# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template (public; also vLLM's and TRL's llama3 template)
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                   "<|end_header_id|>\n\n' }}{% endif %}")
# LLaMA-3's pre-tokenizer pattern (tiktoken cl100k-style, as in Meta's tokenizer.py)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def load_hf(folder, auto_cls=AutoModelForCausalLM):
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return auto_cls.from_pretrained(str(folder), **{key: torch.float32}).eval()


def batch_of(tok, examples, max_len):
    feats = text.encode_lm(tok, examples, max_len)
    return next(text.iterate_batches(feats, len(feats), pad_id=0))


def max_diff(a, b, mask):
    return ((a - b).abs() * mask[..., None]).max().item()


def logits_report(run, merged, n, max_len):
    args = json.loads((run / "args.json").read_text())
    base = base_path(run, None)
    tok = load_tokenizer(base)
    spec, splits = tasks.load_jsonl("chat", args["train_file"], args["dev_file"])
    system = chat.default_system(base, tok)
    from dataclasses import replace
    dev = [replace(e, text=chat.with_default_system(e.text, system)) for e in splits["dev"][:n]]
    b = batch_of(tok, dev, max_len)
    x, mask = b["input_ids"], b["attention_mask"]
    rows = []
    with torch.no_grad():
        plain = load_model(base)(x, mask)
        ours_model = load_adapter(load_model(base), run / "adapter").eval()
        ours = ours_model(x, mask)
        rows.append(("LoRA effect (slora LoRA vs base)", max_diff(ours, plain, mask), None))
        rows.append(("base only: transformers vs slora (no LoRA)",
                     max_diff(load_hf(base)(input_ids=x, attention_mask=mask).logits, plain, mask), None))
        pm = PeftModel.from_pretrained(load_hf(base), str(run / "adapter")).eval()
        rows.append(("transformers + PEFT adapter", max_diff(pm(input_ids=x, attention_mask=mask).logits, ours, mask),
                     "tol"))
        rows.append(("transformers merged folder", max_diff(load_hf(merged)(input_ids=x, attention_mask=mask).logits,
                                                            ours, mask), "tol"))
        merged_logits = load_model(merged)(x, mask)
        rows.append(("slora load_model(merged)", max_diff(merged_logits, ours, mask), "tol"))
        # the fp32 floor: both the unmerged and the merged model against the same LoRA model run in float64
        r64 = load_adapter(load_model(base, dtype=torch.float64), run / "adapter").eval()(x, mask)
        rows.append(("float64 oracle vs slora LoRA (unmerged, fp32)", max_diff(ours.double(), r64, mask), None))
        rows.append(("float64 oracle vs slora merged (fp32)", max_diff(merged_logits.double(), r64, mask), None))
        cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
        layers = lora_modules(ours_model)
        per_module = {m.scaling for m in layers.values()}
        # the run's own per-module scalings, before any folding (lora.module_alphas with the run's policy; for
        # "scale" r_ref is the mean of the live ranks here, which differs from the run's when it has rank-0 modules)
        res = args | args.get("resolved", {})
        ranks = {n: m.r for n, m in layers.items()}
        policy = res["alpha_policy"]
        alphas = module_alphas(ranks, res["lora_alpha"], policy, use_rslora=policy == "rslora")
        trained = {n: alphas[n] / (ranks[n] ** 0.5 if policy == "rslora" else ranks[n]) for n in ranks}
        folded = bool(res.get("fold_scaling"))
        for n, m in layers.items():
            m.scaling = s  # what vLLM does: one lora_alpha/r for every module
        rows.append((f"one global lora_alpha/r = {cfg['lora_alpha']}/{cfg['r']} (vLLM-style)",
                     max_diff(ours_model(x, mask), ours, mask), "tol"))
        if folded:  # the same adapter written without --fold-scaling: B unfolded, still one global scaling
            for n, m in layers.items():
                m.scaling = s * s / trained[n]  # s on the unfolded B = B_folded·s/s_w
            rows.append(("  same, adapter written without --fold-scaling", max_diff(ours_model(x, mask), ours, mask),
                         None))
    top = (ours.abs() * mask[..., None]).max().item()
    info = (f"{len(dev)} dev conversations, {int(mask.sum())} tokens, max |logit| {top:.2f}; "
            f"ranks {sorted(set(cfg['rank_pattern'].values()))}, per-module scalings {sorted(per_module)}")
    return rows, info


def llama3_tokenizer(gguf_path):
    """LLaMA-3's byte-level BPE rebuilt from a vocab-only GGUF (tokens, merges, control tokens as specials)."""
    from slora.io.gguf import read_gguf
    gf = read_gguf(gguf_path)
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    types = gf.metadata["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in gf.metadata["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(tokens, types) if ty == 3])  # 3 = CONTROL
    return tok


# Conversations that stress the header/content boundary: surrounding whitespace and newlines, empty content,
# non-ASCII text, a system turn in the middle, several assistant turns in a row.
EDGE = [tasks.Example(f"edge:{i}", tuple(m[:-1]), None, m[-1][1]) for i, m in enumerate([
    [("user", "  leading spaces"), ("assistant", "trailing newlines\n\n")],
    [("system", ""), ("user", "\n\nstarts with newlines"), ("assistant", " one space")],
    [("user", "naïve café 東京 — ok?"), ("assistant", "sí 🙂"), ("system", "be brief"), ("user", "x"),
     ("assistant", "a"), ("assistant", "b")],
    [("user", "tabs\tand\r\nCRLF"), ("assistant", "\t")],
])]


def rendering_report(tok, hf_tok, records, system):
    """(conversations whose ids match exactly, total) for the full conversation and for context + prompt."""
    full = prompt = 0
    for e in records:
        messages = chat.with_default_system(e.text, system) + (("assistant", e.label),)
        ours = [i for ids, _ in chat.render_turns(tok, messages) for i in ids]
        # the records as given: the template itself adds its default system turn where it has one
        given = [{"role": r, "content": c} for r, c in e.text + (("assistant", e.label),)]
        ours = [i for ids, _ in chat.render_turns(tok, messages) for i in ids]
        full += ours == list(hf_tok.apply_chat_template(given, tokenize=True, return_dict=False))
        ours_p = [i for ids, _ in chat.render_turns(tok, messages[:-1]) for i in ids] + chat.generation_prompt(tok)
        prompt += ours_p == list(hf_tok.apply_chat_template(given[:-1], tokenize=True, add_generation_prompt=True,
                                                            return_dict=False))
    return full, prompt, len(records)


def encoder_merge_report(tmp: Path) -> list[tuple[str, float, str]]:
    """Tiny BERT, RoBERTa and MPNet task models with LoRA (unequal ranks) and a trained-looking head, written as a
    run folder, merged with `slora.merge`, read back by transformers' AutoModelForSequenceClassification: max |Δ|
    of its logits against slora's unmerged task model (one padded row)."""
    from transformers import AutoModelForSequenceClassification
    from slora.io import merge
    from slora.io.adapter import save_adapter
    from slora.models.lora import apply_lora
    from slora.models import for_sequence_classification
    from slora.io.model_folder import save_model
    from tests.support.tiny import randomize_lora, tiny_bert, tiny_mpnet, tiny_tokenizer
    rows = []
    tok, _ = tiny_tokenizer("encoder")
    tok.save(str(tmp / "tok.json"))
    for mt in ("bert", "roberta", "mpnet"):
        body = (tiny_mpnet(seed=21) if mt == "mpnet"
                else tiny_bert(seed=21, model_type=mt, pad_token_id=int(mt != "bert")))
        base, run = tmp / f"{mt}-base", tmp / f"{mt}-run"
        save_model(body, base, tokenizer=tmp / "tok.json")
        task = for_sequence_classification(body, 3, seed=5).eval()
        prefix = {"bert": "bert", "roberta": "roberta", "mpnet": "mpnet"}[mt]
        names = [n for n, m in task.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)
                 and "pooler" not in n][:6]
        apply_lora(task, {n: 1 + i % 4 for i, n in enumerate(names)}, alpha=8, alpha_policy="constant")
        randomize_lora(task, seed=3, std=0.2)
        save_adapter(task, run / "adapter", str(base), "SEQ_CLS")
        (run / "args.json").write_text(json.dumps({"model": str(base), "resolved": {"model_path": str(base)}}))
        out = merge.merge(run, tmp / f"{mt}-merged")
        x = torch.randint(3, 30, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(x)
        mask[1, -3:] = 0
        with torch.no_grad():
            hf = load_hf(out, AutoModelForSequenceClassification)
            diff = (hf(input_ids=x, attention_mask=mask).logits - task(x, mask)).abs().max().item()
        rows.append((f"{mt} task model: transformers on the merged folder", diff, "tol"))
    return rows


def main():
    ok = True
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
          f"tolerance {ARGS.tol:g}")
    rows, info = logits_report(ARGS.run, ARGS.merged, ARGS.n, ARGS.max_len)
    print(info)
    for label, value, check in rows:
        bad = check is not None and value > ARGS.tol
        ok &= not bad
        print(f"  {label:<52} max|Δ logits| {value:.3e}{'  EXCEEDS' if bad else ''}")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        for label, value, check in encoder_merge_report(Path(d)):
            bad = value > ARGS.tol
            ok &= not bad
            print(f"  {label:<52} max|Δ logits| {value:.3e}{'  EXCEEDS' if bad else ''}")
    if ARGS.chat:
        records = [e for f in ARGS.chat for e in tasks.read_jsonl(f, "chat")] + EDGE
        base = base_path(ARGS.run, None)
        tok = load_tokenizer(base)
        full, prompt, n = rendering_report(tok, AutoTokenizer.from_pretrained(str(base)), records,
                                           chat.default_system(base, tok))
        print(f"  chat rendering, {base.name} (its own template): full {full}/{n}, context+prompt {prompt}/{n} exact")
        ok &= full == prompt == n
        vocab = ARGS.llama3_vocab
        if vocab.is_file():
            l3 = llama3_tokenizer(vocab)
            hf = PreTrainedTokenizerFast(tokenizer_object=l3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
            hf.chat_template = LLAMA3_TEMPLATE
            full, prompt, n = rendering_report(l3, hf, records, None)
            print(f"  chat rendering, LLaMA-3 vocabulary + Meta's template: full {full}/{n}, context+prompt "
                  f"{prompt}/{n} exact")
            ok &= full == prompt == n
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a slora run folder trained with --jsonl-kind chat")
    parser.add_argument("merged", type=Path, help="python -m slora.merge output of that run")
    parser.add_argument("--chat", type=Path, nargs="*", default=(), help="chat JSONL files whose rendering to compare")
    parser.add_argument("--llama3-vocab", type=Path,
                        default=Path.home() / ".cache/slora/data/llama-vocab/ggml-vocab-llama-bpe.gguf",
                        help="vocab-only LLaMA-3 GGUF (assets)")
    parser.add_argument("--n", type=int, default=8, help="dev conversations in the logits batch (count)")
    parser.add_argument("--max-len", type=int, default=192, help="tokens per conversation (the run's --max-len)")
    parser.add_argument("--tol", type=float, default=1e-4, help="max allowed |Δ logits| (absolute)")
    ARGS = parser.parse_args()
    sys.exit(main())
