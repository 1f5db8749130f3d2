"""The adversarial corpus of bad input, part 1: what a new user types and brings to `python -m slora.finetune`
(flags, data files, model folders) and to slora.assets / slora.bench. Shared parts: tests/support/corpus.py.
"""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from slora.cli import assets as assets_cmd, bench, finetune
from slora.io.adapter import PREFIX, WEIGHTS
from slora.cli.runner import run_cli
from tests.support.corpus import Case, base, expect_one_line, ft, jsonl, run_case  # noqa: F401 (base: a fixture)


# -----------------------------------------------------------------------------
# python -m slora.finetune: flags (exit 2, before anything loads)

def ft(tmp, b, *extra, model=None, train=None, dev=None, kind="classification"):
    return ["--model", model or b["enc"], "--task", "jsonl", "--jsonl-kind", kind, "--train-file",
            train or b["train"], "--dev-file", dev or b["dev"], "--batch-size", 8, "--calib-n", 8,
            "--max-steps", 1, "--threads", 1, "--out", tmp / "run", *extra]


def flag(name, value, culprit=None):
    return Case(f"{name}={value}", lambda t, b: ft(t, b, name, value), 2, culprit or name)


FLAGS = [flag(*c) for c in [
    ("--max-train", -5), ("--max-train", 0), ("--max-eval", 0), ("--max-steps", 0), ("--max-steps", -1),
    ("--calib-n", 0), ("--calib-len", 1), ("--batch-size", 0), ("--grad-accum", 0), ("--gen-tokens", 0),
    ("--threads", 0), ("--log-every", 0), ("--pra-groups", 0), ("--r-min", -1), ("--r-max", 0),
    ("--num-labels", 1), ("--seed", -1), ("--max-len", 1),
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", 0), ("--lr", -1e-3), ("--grad-clip", "nan"), ("--grad-clip", -1),
    ("--lora-dropout", 1.5), ("--lora-dropout", 1), ("--lora-dropout", "nan"), ("--k-frac", 0),
    ("--k-frac", 1.5), ("--er-alpha", 0), ("--warmup", 1), ("--warmup", -0.1), ("--epochs", 0),
    ("--epochs", "inf"), ("--weight-decay", -1), ("--r-avg", 0), ("--r-avg", "nan"), ("--lora-alpha", 0),
    ("--lora-alpha", "inf"), ("--device", "cuda:99"), ("--device", "gpu"), ("--lr", "fast"),
    ("--alloc", "best"), ("--model", "/no/such/model"), ("--task", "imdb"), ("--calib", "/no/such/calib.txt"),
    ("--seed", 2 ** 63)]] + [
    Case("r-max-below-r-min", lambda t, b: ft(t, b, "--r-min", 3, "--r-max", 2), 2, "--r-max"),
    Case("unknown-flag", lambda t, b: ft(t, b, "--learning-rate", 1), 2, "--learning-rate"),
    Case("glue-without-dir", lambda t, b: ["--task", "sst2", "--out", t / "run"], 2, "--glue-dir"),
    Case("glue-dir-missing", lambda t, b: ["--task", "sst2", "--glue-dir", t / "glue", "--out", t / "run"], 2,
         "--glue-dir"),
    Case("jsonl-without-train", lambda t, b: ["--task", "jsonl", "--out", t / "run"], 2, "--train-file"),
    Case("train-file-missing", lambda t, b: ft(t, b, train=t / "none.jsonl"), 2, "none.jsonl"),
    Case("dev-file-missing", lambda t, b: ft(t, b, dev=t / "none.jsonl"), 2, "--dev-file"),
    Case("train-file-for-named-task", lambda t, b: ["--task", "rt-polarity", "--train-file", b["train"]], 2,
         "--train-file"),
    # checked against the model's positions once its config is read (tiny encoder: 64, tiny decoder: 128)
    Case("max-len-beyond-positions", lambda t, b: ft(t, b, "--max-len", 1000), 2, "--max-len"),
    Case("calib-len-beyond-positions", lambda t, b: ft(t, b, "--calib-len", 65), 2, "--calib-len"),
    Case("gen-tokens-beyond-positions", lambda t, b: ft(t, b, "--gen-tokens", 100000, model=b["dec"],
                                                        train=b["gtrain"], dev=b["gdev"], kind="instructions"),
         2, "--gen-tokens"),
    Case("bf16-base-fp32-compute", lambda t, b: ft(t, b, "--dtype", "bf16", "--precision", "fp32"), 2,
         "--precision"),
    Case("num-labels-for-instructions", lambda t, b: ft(t, b, "--num-labels", 3, kind="instructions"), 2,
         "--num-labels"),
]


@pytest.mark.parametrize("case", [c.param() for c in FLAGS])
def test_flags(case, tmp_path, base, capsys):
    run_case(finetune.main, case, tmp_path, base, capsys)
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# python -m slora.finetune: data files (exit 1, before training)

def data_case(id, rows, culprit, which="train", kind="classification", extra=(), code=1):
    def make(t, b):
        f = jsonl(t / f"{which}.jsonl", rows)
        files = {"train": f} if which == "train" else {which: f}
        return ft(t, b, *extra, kind=kind, **files)
    return Case(id, make, code, culprit)


TWO = [{"text": "good movie", "label": 0}, {"text": "bad movie", "label": 1}] * 4
DATA = [
    data_case("bad-json", TWO + ['{"text": "x", "label": '], "{tmp}/train.jsonl:9"),
    data_case("not-utf8", TWO + [b'{"text": "caf\xe9", "label": 0}'], "{tmp}/train.jsonl:9"),
    data_case("not-an-object", TWO + ["[1, 2]"], "{tmp}/train.jsonl:9"),
    data_case("missing-text", TWO + [{"label": 0}], "{tmp}/train.jsonl:9"),
    data_case("label-string", TWO + [{"text": "x", "label": "pos"}], "{tmp}/train.jsonl:9"),
    data_case("label-bool", TWO + [{"text": "x", "label": True}], "{tmp}/train.jsonl:9"),
    data_case("label-float", TWO + [{"text": "x", "label": 1.5}], "{tmp}/train.jsonl:9"),
    data_case("text-pair-int", TWO + [{"text": "x", "text_pair": 3, "label": 0}], "{tmp}/train.jsonl:9"),
    data_case("empty-file", [], "{tmp}/train.jsonl"),
    data_case("blank-lines-only", ["", "  "], "{tmp}/train.jsonl"),
    data_case("single-class", [{"text": "good movie", "label": 0}] * 8, "{tmp}/train.jsonl"),
    data_case("label-gap-1000", TWO + [{"text": "x", "label": 1000}], "{tmp}/train.jsonl:9"),
    data_case("negative-label", TWO + [{"text": "x", "label": -1}], "{tmp}/train.jsonl:9"),
    data_case("dev-label-unseen", [{"text": "x", "label": 2}], "{tmp}/dev.jsonl:1", which="dev"),
    data_case("dev-label-above-num-labels", [{"text": "x", "label": 2}], "{tmp}/dev.jsonl:1", which="dev",
              extra=("--num-labels", 2)),
    data_case("train-label-above-num-labels", TWO + [{"text": "x", "label": 2}], "{tmp}/train.jsonl:9",
              extra=("--num-labels", 2)),
    data_case("max-train-one-class", TWO, "{tmp}/train.jsonl", extra=("--max-train", 1)),
    data_case("instructions-missing-response", [{"prompt": "what"}], "{tmp}/train.jsonl:1", kind="instructions"),
    data_case("instructions-prompt-int", [{"prompt": 3, "response": "x"}], "{tmp}/train.jsonl:1",
              kind="instructions"),
    data_case("classification-file-as-instructions", TWO, "{tmp}/train.jsonl:1", kind="instructions"),
    data_case("dev-bad-json", ["{"], "{tmp}/dev.jsonl:1", which="dev"),
    data_case("dev-empty", [], "{tmp}/dev.jsonl", which="dev"),
    Case("calib-file-not-utf8", lambda t, b: ft(t, b, "--calib", jsonl(t / "c.txt", [b"ok", b"\xff\xfe"])), 1,
         "{tmp}/c.txt:2"),
    Case("calib-file-empty", lambda t, b: ft(t, b, "--calib", jsonl(t / "c.txt", [])), 1, "{tmp}/c.txt: has 0"),
    Case("calib-file-too-short", lambda t, b: ft(t, b, "--calib", jsonl(t / "c.txt", ["one line"])), 1,
         "{tmp}/c.txt: has 1"),
    Case("decoder-for-classification", lambda t, b: ft(t, b, model=b["dec"]), 1, "{dec}: is a decoder"),
    Case("encoder-for-instructions", lambda t, b: ft(t, b, train=b["gtrain"], dev=b["gdev"],
                                                     kind="instructions"), 1, "{enc}: is an encoder"),
]


@pytest.mark.parametrize("case", [c.param() for c in DATA])
def test_data(case, tmp_path, base, capsys):
    run_case(finetune.main, case, tmp_path, base, capsys)
    assert not (tmp_path / "run").exists()


def test_counts_that_cannot_be_met_are_recorded_as_used(tmp_path, base, capsys):
    # the run succeeds; args.json keeps what was asked under its flag and what was used under "resolved"
    out = finetune.main([str(a) for a in ft(tmp_path, base, "--calib-n", 100000, "--max-train", 500,
                                            "--allocate-only")])
    args = json.loads((out / "args.json").read_text())
    assert (args["calib_n"], args["max_train"]) == (100000, 500)
    assert (args["resolved"]["calib_n"], args["resolved"]["max_train"]) == (16, 16)


def test_num_labels_states_classes_absent_from_training(tmp_path, base):
    dev = jsonl(tmp_path / "dev.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": 0}])
    out = finetune.main([str(a) for a in ft(tmp_path, base, "--num-labels", 3, dev=dev)])
    assert load_file(str(out / "adapter" / WEIGHTS))[f"{PREFIX}classifier.weight"].shape[0] == 3


# -----------------------------------------------------------------------------
# python -m slora.finetune: damaged model folders (exit 1, at load)

def damaged(id, fn, culprit, kind="enc"):
    """A copy of a tiny model folder changed by fn(folder); the run must fail (exit 1) naming the culprit."""
    def make(t, b):
        folder = t / "model"
        shutil.copytree(b[kind], folder)
        fn(folder)
        return ft(t, b, model=folder) if kind == "enc" else ft(t, b, model=folder, train=b["gtrain"],
                                                                   dev=b["gdev"], kind="instructions")
    return Case(id, make, 1, culprit)


def edit_config(**changes):
    def fn(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))
    return fn


def edit_weights(fn_sd):
    def fn(folder):
        sd = load_file(str(folder / "model.safetensors"))
        fn_sd(sd)
        save_file(sd, str(folder / "model.safetensors"))
    return fn


def poison(name, value):
    def fn(sd):
        sd[name] = sd[name].clone()
        sd[name].view(-1)[3] = value
    return edit_weights(fn)


def shard(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


WORD = "embeddings.word_embeddings.weight"
MODELS = [damaged(*c) for c in [
    ("no-config", lambda f: (f / "config.json").unlink(), "config.json"),
    ("config-bad-json", lambda f: (f / "config.json").write_text("{"), "{tmp}/model/config.json:1"),
    ("config-not-utf8", lambda f: (f / "config.json").write_bytes(b'{"a": "\xff"}'), "{tmp}/model/config.json"),
    ("config-a-list", lambda f: (f / "config.json").write_text("[]"), "{tmp}/model/config.json"),
    ("model-type-unknown", edit_config(model_type="mamba"), "{tmp}/model/config.json"),
    ("hidden-size-null", edit_config(hidden_size=None), "hidden_size is null"),
    ("hidden-size-absent", lambda f: (f / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "config.json").read_text()).items() if k != "hidden_size"})),
     "hidden_size"),
    ("hidden-size-string", edit_config(hidden_size="32"), "hidden_size"),
    ("hidden-size-zero", edit_config(hidden_size=0), "hidden_size"),
    ("heads-zero", edit_config(num_attention_heads=0), "num_attention_heads"),
    ("heads-not-dividing", edit_config(num_attention_heads=5), "num_attention_heads"),
    ("layer-norm-eps-negative", edit_config(layer_norm_eps=-1), "layer_norm_eps"),
    ("vocab-mismatch", edit_config(vocab_size=99), WORD),
    ("no-weights", lambda f: (f / "model.safetensors").unlink(), "{tmp}/model"),
    ("weights-truncated", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:500]), "{tmp}/model/model.safetensors"),
    ("weights-garbage", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64), "model.safetensors"),
    ("weight-nan", poison(WORD, float("nan")), WORD),
    ("weight-inf", poison("encoder.layer.1.attention.self.query.weight", float("inf")), "attention.self.query"),
    ("extra-tensor", edit_weights(lambda sd: sd.update(extra=torch.zeros(2))), "extra"),
    ("missing-tensor", edit_weights(lambda sd: sd.pop("encoder.layer.0.output.dense.weight")),
     "encoder.layer.0.output.dense.weight"),
    ("index-bad-json", lambda f: (f / "model.safetensors.index.json").write_text("{x"), "index.json"),
    ("index-no-weight-map", lambda f: (f / "model.safetensors.index.json").write_text("{}"), "weight_map"),
    ("index-shard-missing", lambda f: shard(f, {WORD: "model-00002.safetensors"}), "model-00002.safetensors"),
    ("index-shard-path", lambda f: shard(f, {WORD: "../../etc/passwd"}), "../../etc/passwd"),
    ("tokenizer-missing", lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json"),
    ("tokenizer-corrupt", lambda f: (f / "tokenizer.json").write_text('{"model": 3}'), "tokenizer.json"),
    ("tokenizer-not-utf8", lambda f: (f / "tokenizer.json").write_bytes(b"\xff\xfe\x00"), "tokenizer.json"),
    ("empty-folder", lambda f: [p.unlink() for p in list(f.iterdir())], "config.json"),
    ("decoder-nan", poison("model.layers.0.self_attn.q_proj.weight", float("nan")), "q_proj", "dec"),
    ("decoder-rms-eps-zero", edit_config(rms_norm_eps=0), "rms_norm_eps", "dec"),
    ("decoder-kv-heads-not-dividing", edit_config(num_key_value_heads=3), "num_key_value_heads", "dec"),
]]


@pytest.mark.parametrize("case", [c.param() for c in MODELS])
def test_models(case, tmp_path, base, capsys):
    run_case(finetune.main, case, tmp_path, base, capsys)
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# python -m slora.assets and python -m slora.bench

OTHER_COMMANDS = [
    (assets_cmd.main, ["--only", "nope"], "--only"),
    (assets_cmd.main, ["--lst"], "--lst"),
    (bench.main, ["--batches", "0"], "--batches"),
    (bench.main, ["--seq-len", "-1"], "--seq-len"),
    (bench.main, ["--train-steps", "0"], "--train-steps"),
    (bench.main, ["--device", "cuda:99"], "--device"),
]


@pytest.mark.parametrize("main,argv,culprit", OTHER_COMMANDS, ids=[" ".join(c[1]) for c in OTHER_COMMANDS])
def test_assets_and_bench_arguments(main, argv, culprit, tmp_path, capsys):
    expect_one_line(run_cli(main, argv), 2, capsys.readouterr().err, culprit)
