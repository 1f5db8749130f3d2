"""python -m slora.finetune end to end on tiny seeded models: the run folder, determinism, bad input."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from slora.cli import finetune
from slora.train import run_folder
from slora.io.adapter import load_adapter
from slora.io.model_folder import load_model
from slora.train.run_folder import RunFolderError
from tests.support.bounds import assert_within, measured_bound
from tests.support.tiny import sentiment_rows, tiny_model_dir, write_jsonl

# the manifest (.slora-run.json) marks a complete run; no lock or in-progress folder is left
RUN_FILES = {"args.json", "sensitivity.json", "ranks.json", "ranks.svg", "metrics.json", "log.jsonl", "adapter",
             ".slora-run.json"}


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("cls")
    rows = sentiment_rows(48)
    return write_jsonl(d / "train.jsonl", rows[:40]), write_jsonl(d / "dev.jsonl", rows[40:])


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    rows = [{"prompt": "what is the capital of france", "response": "paris"}] * 12
    return write_jsonl(d / "train.jsonl", rows[:10]), write_jsonl(d / "dev.jsonl", rows[10:])


def run(tmp_path, model, data, *extra, kind="classification", out="run"):
    train, dev = data
    argv = ["--model", str(model), "--task", "jsonl", "--jsonl-kind", kind, "--train-file", str(train),
            "--dev-file", str(dev), "--batch-size", "8", "--calib-n", "16", "--max-steps", "3", "--log-every", "1",
            "--gen-tokens", "3", "--out", str(tmp_path / out), *extra]
    return finetune.main(argv)


def test_encoder_run_folder(tmp_path, cls_data):
    model = tiny_model_dir(tmp_path / "m", "encoder")
    out = run(tmp_path, model, cls_data, "--r-avg", "2")
    assert {p.name for p in out.iterdir()} == RUN_FILES
    ranks = json.loads((out / "ranks.json").read_text())
    assert set(ranks) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")}
    assert sum(ranks.values()) == 2 * len(ranks)  # r_avg 2, exact budget in rank units
    sens = json.loads((out / "sensitivity.json").read_text())
    assert set(sens) == {"modules", "weights", "config"} and set(sens["modules"]) == set(ranks)
    assert set(next(iter(sens["modules"].values()))) == {"d_in", "d_out", "tokens", "trace", "topk",
                                                         "effective_rank", "s_global", "s_local", "theta"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and "accuracy" in metrics["final"]["dev"]
    assert metrics["lora_params"] == sum(r * (32 + 32) for r in ranks.values())
    assert metrics["trainable_params"] == metrics["lora_params"] + 32 * 2 + 2  # + the classifier head
    assert {"load_s", "calibrate_allocate_s", "train_s"} <= set(metrics["times"])
    events = [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert events.count("step") == 3 and "eval" in events
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert not list(tmp_path.glob(".run.partial-*"))  # nothing half written is left behind


def test_adapter_reloads_with_the_trained_weights(tmp_path, cls_data):
    from slora.models.bert import for_sequence_classification
    model = tiny_model_dir(tmp_path / "m", "encoder")
    out = run(tmp_path, model, cls_data)
    m = load_adapter(for_sequence_classification(load_model(model), 2, seed=123), out / "adapter")
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    state = m.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k.removeprefix("base_model.model.")], v), k


def test_decoder_run_folder(tmp_path, gen_data):
    model = tiny_model_dir(tmp_path / "m", "decoder")
    out = run(tmp_path, model, gen_data, kind="instructions")
    assert {p.name for p in out.iterdir()} == RUN_FILES
    ranks = json.loads((out / "ranks.json").read_text())
    assert set(ranks) == {f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkvo"}
    assert sum(ranks.values()) == 8 * len(ranks)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["final"]["dev"]) == {"bleu4", "rouge1", "rougeL"}
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


def test_serving_note_and_fold_scaling(tmp_path, gen_data):
    # "constant" alphas give each module its own α/r: the run warns, and --fold-scaling makes one global α/r exact
    model = tiny_model_dir(tmp_path / "m", "decoder")
    records = {}
    for fold in (False, True):
        out = run(tmp_path, model, gen_data, "--alpha-policy", "constant", "--r-min", "1", "--lora-dropout", "0",
                  *(["--fold-scaling"] if fold else []), kind="instructions", out=f"run{fold}")
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        records[fold] = {r["event"]: r for r in log}
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        ranks = json.loads((out / "ranks.json").read_text())
        assert records[fold]["serving"]["max_rank"] == max(ranks.values())
        assert records[fold]["serving"]["folded"] == fold
        if fold:  # every module resolves to the global scaling (up to the rounding of s·r_w / r_w)
            assert [a / r for a, r in zip(cfg["alpha_pattern"].values(), cfg["rank_pattern"].values())] == \
                pytest.approx([cfg["lora_alpha"] / cfg["r"]] * len(ranks), rel=1e-12)
    if len(set(ranks.values())) > 1:  # the tiny allocation is unequal, so the unfolded adapter is mis-scaled
        assert records[False]["serving"]["mis_scaled"] and "warning" in records[False]
    assert records[True]["serving"]["mis_scaled"] == [] and "warning" not in records[True]


def test_allocate_only(tmp_path, cls_data):
    model = tiny_model_dir(tmp_path / "m", "encoder")
    out = run(tmp_path, model, cls_data, "--allocate-only", "--alloc", "pra", "--targets", "all-linear")
    assert {p.name for p in out.iterdir()} == RUN_FILES - {"adapter"}
    ranks = json.loads((out / "ranks.json").read_text())
    assert len(ranks) == 2 * 6 and sum(ranks.values()) == 4 * len(ranks)  # 6 linears per layer, r_avg 4


def test_same_seed_same_ranks_and_adapter(tmp_path, cls_data):
    model = tiny_model_dir(tmp_path / "m", "encoder")
    a = run(tmp_path, model, cls_data, out="a")
    b = run(tmp_path, model, cls_data, out="b")
    assert (a / "ranks.json").read_text() == (b / "ranks.json").read_text()
    ta, tb = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_bad_input_errors(tmp_path, cls_data):
    model = tiny_model_dir(tmp_path / "m", "encoder")
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        finetune.main(["--model", str(model), "--task", "sst3", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="target pattern 'nope' matches no nn.Linear"):
        run(tmp_path, model, cls_data, "--targets", "nope", out="y")
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        finetune.main(["--model", str(model), "--task", "sst2", "--glue-dir", str(tmp_path), "--out",
                       str(tmp_path / "z")])
    first = run(tmp_path, model, cls_data, out="taken")
    with pytest.raises(RunFolderError, match=r"already holds a complete run; pass --replace"):
        run(tmp_path, model, cls_data, "--r-avg", "3", out="taken")
    assert (first / "adapter").is_dir()  # the earlier run is left intact
    assert not list(tmp_path.glob("**/.slora-partial")) and not list(tmp_path.glob("**/.slora-lock"))


def test_undefined_scores_are_written_as_null(tmp_path):
    run_folder.write_json(tmp_path / "m.json", {"dev": {"pearson": float("nan"), "acc": 0.5}, "xs": [float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text()) == {"dev": {"pearson": None, "acc": 0.5}, "xs": [None]}


def test_decoder_full_mode_streams_layers_and_matches_one_pass(tmp_path, gen_data):
    # --hessian full on a decoder streams the Hessians layer by layer; the ranks equal the one-pass diag mode's
    # (both read the same diag(H)), and full mode adds the damping and dominance diagnostics.
    model = tiny_model_dir(tmp_path / "m", "decoder")
    full = run(tmp_path, model, gen_data, "--allocate-only", "--hessian", "full", kind="instructions", out="full")
    diag = run(tmp_path, model, gen_data, "--allocate-only", kind="instructions", out="diag")
    assert (full / "ranks.json").read_text() == (diag / "ranks.json").read_text()
    hess = json.loads((full / "sensitivity.json").read_text())["config"]["hessian"]
    assert all("dominant_rows" in v and v["damping"] > 0 for v in hess.values())


def test_epoch_sensitivity_remeasures_the_merged_weights(tmp_path, cls_data):
    # --epoch-sensitivity (paper Table 6): epoch 0 is the run's own allocation; after each epoch θ and ranks are
    # re-measured on the fine-tuned weights. The oracle for the last epoch is independent of the training loop:
    # the saved adapter loaded onto a fresh model, merged into plain layers, and calibrated on the same batches.
    from slora.data import tasks, text
    from slora.models.lora import merged_copy
    from slora.io.model_folder import load_tokenizer
    from slora.models.bert import for_sequence_classification
    from slora.method.sensitivity import SensitivityConfig
    from tests.support.tiny import compute_files
    from slora.method.stability import stability
    model = tiny_model_dir(tmp_path / "m", "encoder")
    out = run(tmp_path, model, cls_data, "--targets", "all-linear", "--epochs", "2", "--max-steps", "1000",
              "--lr", "2e-2", "--lora-dropout", "0", "--epoch-sensitivity")
    epochs = json.loads((out / "epoch_sensitivity.json").read_text())["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    sens = json.loads((out / "sensitivity.json").read_text())
    assert epochs[0]["ranks"] == json.loads((out / "ranks.json").read_text())
    assert epochs[0]["theta"] == {k: v["theta"] for k, v in sens["modules"].items()}
    assert epochs[2]["theta"] != epochs[0]["theta"]  # training moved the layer inputs, so H moved

    train, dev = cls_data
    _, splits = tasks.load_jsonl("classification", train, dev, seed=0)
    tok = load_tokenizer(model)
    calib = tasks.calibration_examples("task", 16, train=splits["train"], seed=0)
    batches = text.calibration_batches(tok, calib, decoder=False, max_len=128, batch_size=8, pad_id=0)
    fields = set(SensitivityConfig.__dataclass_fields__)
    cfg = SensitivityConfig(**{k: v for k, v in sens["config"].items() if k in fields})
    m = load_adapter(for_sequence_classification(load_model(model), 2, seed=7), out / "adapter")
    oracle, oracle_ranks = compute_files(merged_copy(m).eval(), batches, cfg, sens["config"]["targets"])
    in64, _ = compute_files(merged_copy(m).eval().double(), batches, replace(cfg, dtype="float64"),
                            sens["config"]["targets"])
    assert epochs[2]["ranks"] == oracle_ranks
    names = list(oracle["modules"])
    want, want64 = ([s["modules"][n]["theta"] for n in names] for s in (oracle, in64))
    # the run measured the same merged model on the same batches, by kernels the run chose: within MARGIN times
    # this recomputation's own fp32 error against float64 (bounds.measured_bound)
    assert_within([epochs[2]["theta"][n] for n in names], want, measured_bound(want, want64), "θ at epoch 2")

    history = json.loads((out / "metrics.json").read_text())["epochs"]
    for h, e in zip(history, epochs[1:]):
        tau = stability(epochs[0], e)
        assert h["sensitivity"] == {"tau_theta": tau["tau_theta"], "tau_ranks": tau["tau_ranks"]}


def test_epoch_sensitivity_does_not_change_the_training(tmp_path, cls_data):
    # The re-measurement after each epoch must draw nothing from the RNG that dropout uses: the same run with and
    # without it logs the same losses and saves the same adapter. (merged_copy once built its layers with
    # nn.Linear's random init, which shifted every later dropout mask.)
    model = tiny_model_dir(tmp_path / "m", "encoder")
    common = ("--targets", "all-linear", "--epochs", "3", "--max-steps", "1000", "--lora-dropout", "0.3")
    a = run(tmp_path, model, cls_data, *common, out="plain")
    b = run(tmp_path, model, cls_data, *common, "--epoch-sensitivity", out="tracked")
    losses = [[json.loads(line).get("loss") for line in (o / "log.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "step"] for o in (a, b)]
    assert losses[0] == losses[1] and len(losses[0]) == 15
    wa, wb = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
