"""python -m slora.bench --small: the CI smoke test of the benchmark (tiny shapes, CPU, seconds)."""
from slora.cli import bench
from tests.support.bounds import EPS32

KEYS = {"forward_s", "forward_s_transformers", "calib_diag_s", "calib_full_s", "peak_mem_gb_diag",
        "peak_mem_gb_full", "weights_gb", "train_step_s_slora", "train_step_s_peft", "tokens", "device", "torch",
        "train8b_tokens_per_s_slora", "peak_mem_gb_train8b_slora", "train8b_step_s_peft", "decode_eager_answers_per_s",
        "decode_fast_answers_per_s", "decode_speedup", "decode_same_answers"}


def test_bench_small_runs_and_writes_result(tmp_path, capsys):
    res = bench.main(["--small", "--out", str(tmp_path)])
    assert KEYS <= set(res)
    assert res["tokens"] == 2 * 2 * 32 and res["device"] == "cpu"
    assert res["forward_s"] > 0 and res["calib_diag_s"] > 0 and res["calib_full_s"] > 0
    assert res["train_step_s_slora"] > 0
    assert res["train8b_tokens_per_s_slora"] > 0 and res["train8b_checkpointing"] is True
    assert res["train8b_shape"] == "2x32"
    # full mode reads the same diag(H) as diag mode, and float64 accumulation gives the same ranks
    assert res["ranks_full_equal_diag"] and res["ranks_fp32_equal_fp64"]
    # one sequence of T = 32 tokens accumulated in fp32 against float64 sums of the same activations: a sum of T
    # positive terms and one update, (T + 3)·eps relative (tests/method/test_hessian.py's accumulation bound)
    assert all(a["diag_rel_err"] <= (32 + 3) * EPS32 for a in res["accuracy"].values())
    assert (tmp_path / "result.json").is_file() and (tmp_path / "output.txt").is_file()
    assert "ratio to forward" in capsys.readouterr().out


def test_bench_only_one_case_keeps_the_other_results(tmp_path, capsys):
    first = bench.main(["--small", "--only", "calibration", "--out", str(tmp_path)])
    assert "train8b_tokens_per_s_slora" not in first and "train_step_s_slora" not in first
    res = bench.main(["--small", "--only", "train8b", "--out", str(tmp_path)])
    assert res["calib_diag_s"] == first["calib_diag_s"] and res["train8b_tokens_per_s_slora"] > 0
    assert "train_step_s_slora" not in res  # the 1B case ran in neither
    assert res["command"].endswith("--only calibration --out " + str(tmp_path) + "; python -m slora.bench --small "
                                   "--only train8b --out " + str(tmp_path))
    assert "LoRA training at tiny shape (2x32 tokens per step" in capsys.readouterr().out


def test_bench_nlg_small_runs_both_paths(tmp_path, capsys):
    res = bench.main(["--small", "--only", "nlg", "--out", str(tmp_path)])
    for path in ("old", "new"):
        assert res[f"nlg_{path}_tokens_per_s"] > 0 and res[f"nlg_{path}_eval_examples_per_s"] > 0, path
        assert res[f"nlg_{path}_timed_steps"] >= 1 and res[f"nlg_{path}_eval_examples"] == 2 * 8  # dev + test
    assert (res["nlg_old_batch_size"], res["nlg_new_batch_size"]) == (8, 32)
    # synthetic prompts of exponential length: measured 42 % padding in random batches of 8, 11 % in grouped ones
    # of 32; random batches of 32 pad more than those of 8, so grouping must be what lowers it
    assert res["nlg_new_padding_fraction"] < res["nlg_old_padding_fraction"] / 2
    assert "--group-by-length" in res["nlg_new_flags"] and "--fused-optim" in res["nlg_new_flags"]
    assert "NLG fine-tuning (tiny, 200 training examples" in capsys.readouterr().out
    assert "new / old: training" in (tmp_path / "output.txt").read_text()
