"""The adversarial corpus of bad input, part 2: run folders (data loss, concurrency, divergence), GGUF conversion,
adapters from strangers, and signals (slow tier, real processes). Shared parts: tests/support/corpus.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slora.cli import finetune, gguf as gguf_cmd
from slora.io.adapter import CONFIG, PREFIX, WEIGHTS, load_adapter, save_adapter
from slora.cli.runner import run_cli
from slora.models.lora import apply_lora, lora_modules
from tests.support.corpus import ROOT, Case, base, expect_one_line, ft, run_case, snapshot  # noqa: F401 (base: a fixture)
from tests.support.gguf_writer import encode
from tests.io.test_gguf import build_tiny_llama
from tests.support.tiny import randomize_lora, tiny_llama


# -----------------------------------------------------------------------------
# python -m slora.finetune: run folders that hold something (data loss, concurrency, divergence)

def quick(t, b, *extra):
    return ft(t, b, "--allocate-only", *extra)


def complete_run(t, b):
    finetune.main([str(a) for a in quick(t, b)])
    (t / "run" / "NOTES.md").write_text("the user's notes")
    (t / "run" / "plots").mkdir()
    return quick(t, b, "--seed", 1)


def with_file(name, content="mine"):
    def make(t, b):
        (t / "run").mkdir()
        (t / "run" / name).write_text(content)
        return quick(t, b)
    return make


def lock_of(pid, host=None):
    def make(t, b):
        import socket
        (t / "run").mkdir()
        (t / "run" / ".slora-lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                           "started": "earlier"}))
        return quick(t, b)
    return make


def damaged_manifest(t, b):
    finetune.main([str(a) for a in quick(t, b)])
    (t / "run" / ".slora-run.json").write_text("{")
    return quick(t, b)


def diverging(t, b):
    (t / "run").mkdir()
    (t / "run" / "NOTES.md").write_text("kept")
    return ft(t, b, "--lr", 1e30, "--max-steps", 3)


RUNS = [
    Case("complete-run-again", complete_run, 1, "{tmp}/run: already holds a complete run"),
    Case("out-is-a-file", lambda t, b: quick(t, b) if (t / "run").write_text("x") else [], 1, "{tmp}/run"),
    Case("user-args-json", with_file("args.json"), 1, "{tmp}/run: holds args.json"),
    Case("user-adapter-folder", lambda t, b: (t / "run" / "adapter").mkdir(parents=True) or quick(t, b), 1,
         "{tmp}/run"),
    Case("live-lock", lock_of(os.getppid()), 1, f"pid {os.getppid()}"),
    Case("lock-of-other-host", lock_of(1, "elsewhere"), 1, "host elsewhere"),
    Case("damaged-lock", with_file(".slora-lock", "{"), 1, "{tmp}/run/.slora-lock: lock file without a process id"),
    Case("damaged-manifest", damaged_manifest, 1, "{tmp}/run/.slora-run.json"),
    Case("resume-nothing", lambda t, b: ["--resume", t / "never"], 1, "{tmp}/never"),
    Case("resume-complete-run", lambda t, b: finetune.main([str(a) for a in quick(t, b)]) and
         ["--resume", t / "run"], 1, "{tmp}/run: holds a complete run"),
    Case("resume-with-flags", lambda t, b: ["--resume", t / "run", "--lr", 1], 2, "--resume"),
    Case("diverging-lr", diverging, 1, "step 2: loss nan is not finite"),
]


@pytest.mark.parametrize("case", [c.param() for c in RUNS])
def test_run_folders(case, tmp_path, base, capsys):
    run_case(finetune.main, case, tmp_path, base, capsys)


def test_replace_removes_only_slora_files(tmp_path, base):
    argv = complete_run(tmp_path, base)
    finetune.main([str(a) for a in argv + ["--replace"]])
    assert (tmp_path / "run" / "NOTES.md").read_text() == "the user's notes" and (tmp_path / "run" / "plots").is_dir()
    assert json.loads((tmp_path / "run" / "args.json").read_text())["seed"] == 1


# -----------------------------------------------------------------------------
# python -m slora.gguf

def gguf_file(fn=None, **kw):
    def make(t, b):
        build_tiny_llama(t / "m.gguf", **kw)
        if fn:
            fn(t / "m.gguf")
        return [t / "m.gguf", t / "hf"]
    return make


def nan_tensor():
    w = np.zeros(64, np.float32)
    w[1] = np.nan
    return [("output_norm.weight", (64,), "F32", encode(w, "F32")[0])]


def existing_out(t, b):
    build_tiny_llama(t / "m.gguf")
    (t / "hf").mkdir()
    (t / "hf" / "NOTES.md").write_text("mine")
    return [t / "m.gguf", t / "hf"]


GGUF = [
    Case("missing-file", lambda t, b: [t / "none.gguf", t / "hf"], 2, "none.gguf"),
    Case("a-folder", lambda t, b: [t, t / "hf"], 2, "{tmp}: is a folder"),
    Case("no-arguments", lambda t, b: [], 2, "gguf"),
    Case("empty-file", gguf_file(lambda p: p.write_bytes(b"")), 1, "m.gguf"),
    Case("bad-magic", gguf_file(lambda p: p.write_bytes(b"GGUX" + p.read_bytes()[4:])), 1, "m.gguf"),
    Case("truncated", gguf_file(lambda p: p.write_bytes(p.read_bytes()[:2000])), 1, "m.gguf"),
    Case("truncated-data", gguf_file(lambda p: p.write_bytes(p.read_bytes()[:-100])), 1, "m.gguf"),
    Case("version-99", gguf_file(lambda p: p.write_bytes(p.read_bytes()[:4] + (99).to_bytes(4, "little")
                                                         + p.read_bytes()[8:])), 1, "m.gguf"),
    Case("not-llama", gguf_file(**{"general.architecture": "falcon"}), 1, "falcon"),
    Case("missing-tensor", gguf_file(drop=("blk.1.ffn_up.weight",)), 1, "m.gguf"),
    Case("nan-tensor", gguf_file(drop=("output_norm.weight",), extra_tensors=nan_tensor()), 1,
         "model.norm.weight"),
    Case("out-exists", existing_out, 1, "{tmp}/hf"),
    Case("bad-pre-tokenizer", gguf_file(**{"tokenizer.ggml.pre": "qwen9"}), 1, "qwen9"),
    Case("spm-vocab", gguf_file(**{"tokenizer.ggml.model": "bert"}), 1, "m.gguf"),
]
@pytest.mark.parametrize("case", [c.param() for c in GGUF])
def test_gguf(case, tmp_path, base, capsys):
    run_case(gguf_cmd.main, case, tmp_path, base, capsys)
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_gguf_stale_partial_is_reported_and_removed(tmp_path, capsys):
    build_tiny_llama(tmp_path / "m.gguf")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the conversion it names was killed
    stale = tmp_path / f".hf.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 1000)
    old = tmp_path / ".hf.partial-k2j3h4"  # the older unnamed form
    old.mkdir()
    assert run_cli(gguf_cmd.main, [str(tmp_path / "m.gguf"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and not old.exists() and (tmp_path / "hf" / "config.json").is_file()
    assert f"note: removed {stale}" in err and f"note: removed {old}" in err


def test_gguf_live_partial_is_refused(tmp_path, base, capsys):
    # a conversion still running (its process alive) owns the temporary folder: a second one refuses at once
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        build_tiny_llama(tmp_path / "m.gguf")
        (tmp_path / f".hf.partial-{live.pid}-xyz").mkdir()
        case = Case("live-partial", lambda t, b: [t / "m.gguf", t / "hf"], 1, f"process {live.pid}")
        run_case(gguf_cmd.main, case, tmp_path, base, capsys)
    finally:
        live.kill()
        live.wait()


# -----------------------------------------------------------------------------
# Adapters: load_adapter on a model that must stay unchanged when the adapter is refused

@pytest.fixture
def adapter(tmp_path):
    model = tiny_llama(seed=5)
    ranks = {f"model.layers.{i}.self_attn.{p}": 2 for i in range(2) for p in ("q_proj", "v_proj")}
    apply_lora(model, ranks, alpha=4, alpha_policy="scale")
    randomize_lora(model)
    return save_adapter(model, tmp_path / "adapter", "tiny-llama", "CAUSAL_LM")


def edit_adapter(config=None, tensors=None, raw=None):
    def fn(folder):
        if config is not None:
            cfg = json.loads((folder / CONFIG).read_text())
            cfg.update(config(cfg) if callable(config) else config)
            (folder / CONFIG).write_text(json.dumps(cfg))
        if raw is not None:
            (folder / raw[0]).write_bytes(raw[1])
        if tensors is not None:
            t = load_file(str(folder / WEIGHTS))
            tensors(t)
            save_file(t, str(folder / WEIGHTS))
    return fn


V1 = "model.layers.1.self_attn.v_proj"
EVIL = "(([a-z0-9]|\\.)+)+X"
ADAPTERS = [
    ("use-rslora-string", edit_adapter({"use_rslora": "false"}), "use_rslora"),
    ("inference-mode-string", edit_adapter({"inference_mode": "true"}), "inference_mode"),
    ("fan-in-fan-out-string", edit_adapter({"fan_in_fan_out": "false"}), "fan_in_fan_out"),
    ("r-string", edit_adapter({"r": "2"}), "r = '2'"),
    ("r-zero", edit_adapter({"r": 0}), "r = 0"),
    ("r-bool", edit_adapter({"r": True}), "r = True"),
    ("r-float", edit_adapter({"r": 1.5}), "r = 1.5"),
    ("r-missing", edit_adapter(lambda c: {k: v for k, v in c.items() if k != "r"} | {"r": None}), "r"),
    ("alpha-string", edit_adapter({"lora_alpha": "4"}), "lora_alpha"),
    ("alpha-nan", edit_adapter(raw=None, config={"lora_alpha": float("nan")}), "lora_alpha"),
    ("last-alpha-invalid", edit_adapter(lambda c: {"alpha_pattern": {**c["alpha_pattern"],
                                                                      V1.replace(".", "\\."): "x"}}),
     "alpha_pattern"),
    ("last-alpha-inf", edit_adapter(lambda c: {"alpha_pattern": {**c["alpha_pattern"],
                                                                  V1.replace(".", "\\."): float("inf")}}),
     "alpha_pattern"),
    ("rank-pattern-negative", edit_adapter({"rank_pattern": {"q_proj": -1}}), "rank_pattern"),
    ("rank-pattern-bool", edit_adapter({"rank_pattern": {"q_proj": True}}), "rank_pattern"),
    ("rank-pattern-a-list", edit_adapter({"rank_pattern": ["q_proj"]}), "rank_pattern"),
    ("rank-pattern-catastrophic", edit_adapter({"rank_pattern": {EVIL: 2}}), "nested quantifier"),
    ("alpha-pattern-catastrophic", edit_adapter({"alpha_pattern": {"(a*)*b": 2}}), "nested quantifier"),
    ("target-modules-catastrophic", edit_adapter({"target_modules": EVIL}), "target_modules"),
    ("target-modules-lookahead", edit_adapter({"target_modules": "(?=q).*"}), "target_modules"),
    ("rank-pattern-backreference", edit_adapter({"rank_pattern": {"(q)\\1": 2}}), "rank_pattern"),
    ("rank-pattern-unbalanced", edit_adapter({"rank_pattern": {"q_proj)": 2}}), "rank_pattern"),
    ("target-modules-int-entry", edit_adapter({"target_modules": ["q_proj", 7]}), "target_modules"),
    ("target-modules-number", edit_adapter({"target_modules": 5}), "target_modules"),
    ("target-modules-none-match", edit_adapter({"target_modules": ["nothing"], "rank_pattern": {},
                                                "alpha_pattern": {}}), "match no module"),
    ("modules-to-save-string", edit_adapter({"modules_to_save": "lm_head"}), "modules_to_save"),
    ("modules-to-save-catastrophic", edit_adapter({"modules_to_save": ["(x+)+y"]}), "modules_to_save"),
    ("dropout-1.5", edit_adapter({"lora_dropout": 1.5}), "lora_dropout"),
    ("dropout-string", edit_adapter({"lora_dropout": "0.1"}), "lora_dropout"),
    ("use-dora", edit_adapter({"use_dora": True}), "use_dora"),
    ("peft-type-ia3", edit_adapter({"peft_type": "IA3"}), "peft_type"),
    ("init-pissa", edit_adapter({"init_lora_weights": "pissa"}), "pissa"),
    ("config-a-list", edit_adapter(raw=(CONFIG, b"[]")), CONFIG),
    ("config-bad-json", edit_adapter(raw=(CONFIG, b"{")), CONFIG),
    ("config-not-utf8", edit_adapter(raw=(CONFIG, b'{"r": "\xff"}')), CONFIG),
    ("weights-garbage", edit_adapter(raw=(WEIGHTS, b"\x00" * 40)), WEIGHTS),
    ("weights-missing", lambda f: (f / WEIGHTS).unlink(), WEIGHTS),
    ("lora-b-nan", edit_adapter(tensors=lambda t: t[f"{PREFIX}{V1}.lora_B.weight"].fill_(float("nan"))),
     f"{V1}.lora_B.weight"),
    ("tensor-int", edit_adapter(tensors=lambda t: t.update(
        {f"{PREFIX}{V1}.lora_A.weight": t[f"{PREFIX}{V1}.lora_A.weight"].to(torch.int32)})), f"{V1}.lora_A"),
    ("tensor-missing", edit_adapter(tensors=lambda t: t.pop(f"{PREFIX}{V1}.lora_A.weight")), f"{V1}.lora_A"),
    ("tensor-misshaped", edit_adapter(tensors=lambda t: t.update(
        {f"{PREFIX}{V1}.lora_A.weight": torch.zeros(3, 32)})), f"{V1}.lora_A"),
]


@pytest.mark.parametrize("id,edit,culprit", ADAPTERS, ids=[a[0] for a in ADAPTERS])
def test_adapters(id, edit, culprit, adapter, tmp_path, capsys):
    edit(adapter)
    model = tiny_llama(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = snapshot(tmp_path)
    t0 = time.perf_counter()
    code = run_cli(lambda argv: load_adapter(model, adapter), [])
    elapsed = time.perf_counter() - t0
    expect_one_line(code, 1, capsys.readouterr().err, culprit)
    assert elapsed < 5, f"refusing took {elapsed:.1f} s"  # bounded: a hostile pattern is refused, not run
    assert not lora_modules(model), "a refused adapter left LoRA layers installed"
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert snapshot(tmp_path) == files


def test_all_linear_is_resolved_as_peft_does(adapter):
    # PEFT's _maybe_include_all_linear_layers: every nn.Linear except the output head (lm_head)
    cfg = json.loads((adapter / CONFIG).read_text())
    cfg.update(target_modules="all-linear", rank_pattern={}, alpha_pattern={}, r=2, lora_alpha=4)
    (adapter / CONFIG).write_text(json.dumps(cfg))
    t = load_file(str(adapter / WEIGHTS))
    model = tiny_llama(seed=5)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for n in names:
        lin = model.get_submodule(n)
        t.setdefault(f"{PREFIX}{n}.lora_A.weight", torch.zeros(2, lin.in_features))
        t.setdefault(f"{PREFIX}{n}.lora_B.weight", torch.zeros(lin.out_features, 2))
    save_file(t, str(adapter / WEIGHTS))
    load_adapter(model, adapter)
    assert sorted(lora_modules(model)) == sorted(names) and "lm_head" not in lora_modules(model)


# -----------------------------------------------------------------------------
# Signals (slow tier: real processes, as a user's shell sends them)

def _start(tmp_path, base, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [str(a) for a in ft(tmp_path, base, "--max-steps", 100000, "--epochs", 100000, "--log-every", 1,
                               *extra)]
    # the child gets SIGINT's default disposition: a shell starts background jobs (`make test &`) with SIGINT
    # ignored, Python then installs no KeyboardInterrupt handler, and a Ctrl-C test would wait for ever
    return subprocess.Popen([sys.executable, "-m", "slora.finetune", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_sigterm_inside_an_atomic_folder_removes_it(tmp_path):
    # slora.gguf, save_adapter and write_folder write through checkpoint.atomic_folder: SIGTERM unwinds as Ctrl-C
    from slora.io.files import atomic_folder
    from slora.errors import Terminated
    with pytest.raises(Terminated):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"\x00" * 100)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was only there for the block


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_during_training_leaves_nothing(sig, code, tmp_path, base):
    proc = _start(tmp_path, base)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / ".slora-partial").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(3)  # inside training by now on the tiny model
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    expect_one_line(proc.returncode, code, err, "temporary files were removed")
    assert not (tmp_path / "run").exists()  # no checkpoint was written: nothing to resume, nothing kept


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path, base):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", SLORA_DEBUG="1")
    p = subprocess.run([sys.executable, "-m", "slora.finetune", "--lr", "inf"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.rstrip().splitlines()[-1].startswith(
        "error: --lr:")


def test_adapter_failing_midway_is_undone(adapter, monkeypatch):
    # the last line of defence: should the change itself fail after some layers were swapped, they are put back
    import slora.io.adapter as ad
    real = ad.apply_lora

    def apply_then_fail(model, *a, **kw):
        real(model, *a, **kw)
        assert lora_modules(model)  # the layers are in: the failure comes after the change began
        raise RuntimeError("simulated failure after the layers were swapped")
    monkeypatch.setattr(ad, "apply_lora", apply_then_fail)
    model = tiny_llama(seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(model, adapter)
    assert not lora_modules(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_two_runs_on_one_out_one_refuses(tmp_path, base):
    # started together with different seeds: one finishes, the other refuses at once naming the first's pid
    procs = [_start(tmp_path, base, "--seed", s) for s in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=20))
        except subprocess.TimeoutExpired:
            outs.append(None)
    refused = [(p, o) for p, o in zip(procs, outs) if o is not None and p.returncode == 1]
    try:
        assert len(refused) == 1, [(p.returncode, o) for p, o in zip(procs, outs)]
        (p, (_, err)), = refused
        other = next(q for q in procs if q is not p)
        # usually "in use by another slora run (pid N ...)"; in the instant the lock is being written the
        # lock file itself is named: either way the run folder is the culprit
        expect_one_line(p.returncode, 1, err, str(tmp_path / "run"))
        assert f"pid {other.pid}" in err or "lock file" in err
        assert other.poll() is None  # the first keeps running, untouched
    finally:
        for q in procs:
            if q.poll() is None:
                q.send_signal(signal.SIGTERM)
                q.communicate(timeout=60)
    assert not (tmp_path / "run").exists()  # the survivor, stopped before a checkpoint, left nothing
