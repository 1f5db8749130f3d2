"""python -m slora.bench --small: the CI smoke test of the benchmark (tiny shapes, CPU, seconds)."""
from slora import bench

KEYS = {"forward_s", "forward_s_transformers", "calib_diag_s", "calib_full_s", "peak_mem_gb_diag",
        "peak_mem_gb_full", "weights_gb", "train_step_s_slora", "train_step_s_peft", "tokens", "device", "torch"}


def test_bench_small_runs_and_writes_result(tmp_path, capsys):
    res = bench.main(["--small", "--out", str(tmp_path)])
    assert KEYS <= set(res)
    assert res["tokens"] == 2 * 2 * 32 and res["device"] == "cpu"
    assert res["forward_s"] > 0 and res["calib_diag_s"] > 0 and res["calib_full_s"] > 0
    assert res["train_step_s_slora"] > 0
    # full mode reads the same diag(H) as diag mode, and float64 accumulation gives the same ranks
    assert res["ranks_full_equal_diag"] and res["ranks_fp32_equal_fp64"]
    assert all(a["diag_rel_err"] < 1e-5 for a in res["accuracy"].values())  # fp32 path on CPU: ~eps·N
    assert (tmp_path / "result.json").is_file() and (tmp_path / "output.txt").is_file()
    assert "ratio to forward" in capsys.readouterr().out
