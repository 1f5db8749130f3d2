"""python -m slora.merge on tiny run folders: merged logits vs the unmerged LoRA model, folder layout, task heads,
an adapter that does not fit; OUT_DIR apart from the inputs, replaced only where slora wrote it, locked, write errors
named. Kills at every point: tests/io/test_files_crash.py. transformers' side: tests/comparisons/serve_compat.py."""
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slora.cli import finetune, merge as merge_cmd
from slora.cli.runner import run_cli
from slora.io import merge as merge_io
from slora.io.files import OutputError
from slora.io.merge import MANIFEST
from tests.io.test_files import file_size_limit
from slora.io.adapter import load_adapter
from slora.models import for_sequence_classification
from slora.io.model_folder import load_model, load_sequence_classifier, save_model
from tests.support.tiny import WORDS, fixed_init, tiny_bert, tiny_llama, tiny_model_dir, tiny_mpnet, write_jsonl

# The merge's promise (README, Merging): on these 2-layer models, fp32 logits of the merged W + s·BA within 1e-5 of
# the unmerged x Wᵀ + s·(x Aᵀ) Bᵀ. A requirement, not a rounding bound: the two differ by the merge's rounding of
# W + s·BA (u = 2^-24 relative per entry) and by kernels of another order: a few ulps of logits of a few units
# per layer, far below 1e-5 on any SIMD path (at SmolLM2's depth and logit range it does not hold)
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One decoder and one encoder run (3 steps, a high lr so that LoRA moves the logits), with their bases."""
    d = tmp_path_factory.mktemp("runs")
    gen = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
    cls = [{"text": f"the movie was {WORDS[i % 8]}", "label": int(i % 8 < 4)} for i in range(40)]
    out = {}
    for kind, rows, jk in (("decoder", gen, "instructions"), ("encoder", cls, "classification")):
        base = tiny_model_dir(d / f"{kind}-base", kind)
        train, dev = write_jsonl(d / f"{kind}-train.jsonl", rows[:-4]), write_jsonl(d / f"{kind}-dev.jsonl", rows[-4:])
        run = finetune.main(["--model", str(base), "--task", "jsonl", "--jsonl-kind", jk, "--train-file", str(train),
                             "--dev-file", str(dev), "--batch-size", "8", "--calib-n", "16", "--max-steps", "3",
                             "--lr", "5e-2", "--lora-dropout", "0", "--gen-tokens", "2", "--alpha-policy",
                             "constant", "--out", str(d / f"{kind}-run")])
        out[kind] = (base, run)
    return out


def ids(vocab=30, seed=0):
    return torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(seed))


def test_decoder_merge_matches_unmerged_lora(runs, tmp_path):
    base, run = runs["decoder"]
    out = merge_cmd.main([str(run), str(tmp_path / "merged"), "--max-shard-size", "20KB"])
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and {s for s in names if s.endswith(".safetensors")} == set(shards)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    lora = load_adapter(load_model(base), run / "adapter").eval()
    merged = load_model(out)
    x = ids()
    with torch.no_grad():
        want, got, before = lora(x), merged(x), load_model(base)(x)
    assert (got - want).abs().max() <= TOL
    assert (want - before).abs().max() > 100 * TOL  # the adapter moves the logits: the check is not vacuous


def test_encoder_merge_writes_the_task_model(runs, tmp_path):
    base, run = runs["encoder"]
    out = merge_cmd.main([str(run), str(tmp_path / "merged")])
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["num_labels"] == 2
    assert config["id2label"] == {"0": "LABEL_0", "1": "LABEL_1"}
    lora = load_adapter(for_sequence_classification(load_model(base), 2), run / "adapter").eval()
    merged = load_sequence_classifier(out)
    x = ids()
    with torch.no_grad():
        assert (merged(x) - lora(x)).abs().max() <= TOL


def test_bf16_and_a_base_given_by_path_or_flag(runs, tmp_path):
    base, run = runs["decoder"]
    out = merge_cmd.main([str(run), str(tmp_path / "bf16"), "--dtype", "bf16", "--base", str(base)])
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    args = json.loads((run / "args.json").read_text())
    assert args["model"] == str(base) and args["resolved"]["model_path"] == str(base)  # the path that merge reads


def test_refuses_an_adapter_that_does_not_fit(runs, tmp_path):
    base, run = runs["decoder"]
    other = tmp_path / "other"
    # same module names, other shapes: the error names the base and the tensors that differ
    hidden = fixed_init(tiny_llama(hidden_size=16, num_attention_heads=2, num_key_value_heads=1))
    save_model(hidden, other, tokenizer=base / "tokenizer.json")
    with pytest.raises(ValueError, match=rf"adapter does not fit the base model {other}: .*mis-shaped tensor\(s\): "
                                         r"base_model\.model\.model\.layers\.\d\.self_attn\.\w_proj\.lora_A"):
        merge_cmd.main([str(run), str(tmp_path / "merged"), "--base", str(other)])
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_refuses_a_base_of_the_other_family(runs, tmp_path):
    enc_base, _ = runs["encoder"]
    _, dec_run = runs["decoder"]
    with pytest.raises(ValueError, match=r"task_type CAUSAL_LM does not fit the base model .* an encoder \(bert\)"):
        merge_cmd.main([str(dec_run), str(tmp_path / "m"), "--base", str(enc_base)])


def test_missing_adapter_and_a_folder_of_other_files(runs, tmp_path):
    _, run = runs["decoder"]
    with pytest.raises(FileNotFoundError, match="the run has no adapter"):
        merge_cmd.main([str(tmp_path), str(tmp_path / "m")])
    other = tmp_path / "notes"  # files of the user's whose names a merge does not write: the merge goes beside them
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    merge_cmd.main([str(run), str(other)])
    assert (other / "todo.txt").read_text() == "keep me" and (other / "config.json").is_file()
    assert "todo.txt" not in json.loads((other / MANIFEST).read_text())["files"]


# -----------------------------------------------------------------------------
# OUT_DIR: apart from the inputs, replaced only where slora wrote it, one merge at a time, write errors named

def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_dir_may_not_be_contain_or_lie_inside_an_input(runs, tmp_path):
    base, run = runs["decoder"]
    before = files_of(base.parent) | files_of(run)
    for out, how, what in ((base, "is", "the base model folder"), (base / "merged", "lies inside", "the base model "
                           "folder"), (base.parent, "contains", "the base model folder"), (run, "is", "the run folder"),
                           (run / "merged", "lies inside", "the run folder"), (tmp_path.parent, "contains", "the ")):
        with pytest.raises(OutputError, match=rf"^{out}: {how} {what}.*which this command reads"):
            merge_cmd.main([str(run), str(out), "--base", str(base)])
    assert files_of(base.parent) | files_of(run) == before and not (base / "merged").exists()


def test_a_model_folder_that_slora_did_not_write_is_refused_whole(runs, tmp_path):
    base, run = runs["decoder"]
    out = tmp_path / "hf"
    shutil.copytree(base, out)  # someone's model folder, with their notes beside it
    (out / "NOTES.md").write_text("mine")
    before = files_of(out)
    with pytest.raises(OutputError, match=rf"^{out}: holds config.json, model.safetensors, tokenizer.json, which this "
                                          rf"command writes, and no {MANIFEST} lists them"):
        merge_cmd.main([str(run), str(out)])
    assert files_of(out) == before and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_later_merge_replaces_only_the_files_the_earlier_one_wrote(runs, tmp_path):
    base, run = runs["decoder"]
    out = tmp_path / "merged"
    merge_cmd.main([str(run), str(out), "--max-shard-size", "20KB"])
    shards = [p.name for p in out.glob("model-*.safetensors")]
    assert len(shards) > 1
    (out / "NOTES.md").write_text("mine")
    merge_cmd.main([str(run), str(out), "--dtype", "bf16"])  # one file: the shards and their index go
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(listed + ["NOTES.md", MANIFEST])
    assert (out / "NOTES.md").read_text() == "mine"
    (out / MANIFEST).write_text(json.dumps({"files": ["../x", "config.json"]}))  # edited by hand: nothing is removed
    with pytest.raises(OutputError, match=rf"^{out / MANIFEST}: entry '\.\./x' is not a plain file name"):
        merge_cmd.main([str(run), str(out)])
    assert sorted(p.name for p in out.iterdir()) == sorted(listed + ["NOTES.md", MANIFEST])


def test_a_second_merge_into_the_folder_refuses_while_the_first_runs(runs, tmp_path, monkeypatch):
    base, run = runs["decoder"]
    out, loading, go, done = tmp_path / "merged", threading.Event(), threading.Event(), []
    real = merge_io.load_model

    def load(path, *a, **kw):  # the first merge (a thread) holds OUT_DIR while it loads the base
        if threading.current_thread() is not threading.main_thread():
            loading.set()
            go.wait(60)
        return real(path, *a, **kw)
    monkeypatch.setattr(merge_io, "load_model", load)
    first = threading.Thread(target=lambda: done.append(merge_cmd.main([str(run), str(out)])))
    first.start()
    try:
        assert loading.wait(60)
        with pytest.raises(OutputError, match=rf"^{out}: in use by another slora run \(pid {os.getpid()}, "):
            merge_cmd.main([str(run), str(out), "--dtype", "bf16"])
    finally:
        go.set()
        first.join(60)
    assert done == [out]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:  # the first merge's result, whole
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


def test_a_failed_write_names_the_file_and_leaves_nothing(runs, tmp_path, capsys):
    _, run = runs["decoder"]
    out = tmp_path / "merged"
    with file_size_limit(16_384):  # config.json and the tokenizer fit, the weights (73 kB) do not
        assert run_cli(merge_cmd.main, [str(run), str(out)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(rf"error: {out}/\.slora-partial/\.files\.partial-\d+-\w+/model\.safetensors: cannot write it: "
                        rf"File too large; .*; temporary files were removed \({out}/\.slora-partial\)\n", err), err
    assert not out.exists()


@pytest.mark.parametrize("model_type,pad", [("bert", 0), ("roberta", 1), ("mpnet", 1)])
def test_save_model_of_a_task_model_round_trips(tmp_path, model_type, pad):
    body = tiny_mpnet(seed=3) if model_type == "mpnet" else tiny_bert(seed=3, model_type=model_type, pad_token_id=pad)
    task = for_sequence_classification(body, 3, seed=4).eval()
    save_model(task, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    want = {"bert": "BertForSequenceClassification", "roberta": "RobertaForSequenceClassification",
            "mpnet": "MPNetForSequenceClassification"}[model_type]
    assert config["architectures"] == [want] and config["num_labels"] == 3
    back = load_sequence_classifier(tmp_path / "m")
    x = ids(53)
    with torch.no_grad():
        assert torch.equal(back(x), task(x))
    with pytest.raises(ValueError, match="is not a sequence classifier"):
        load_sequence_classifier(tiny_model_dir(tmp_path / "plain", "encoder"))
