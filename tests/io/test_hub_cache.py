"""slora/io/hub_cache.py: `--model org/name` from a local Hugging Face cache, never the network; the same lookup in
`python -m slora.merge`'s base. The caches are built in tmp_path as the hub client lays them out: file contents in
blobs/, one folder per commit in snapshots/ whose files are relative symlinks into blobs/, and refs/<branch>
holding a commit hash."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from slora.cli import finetune, merge as merge_cmd
from slora.cli.runner import run_cli
from slora.errors import UsageError
from slora.io import hub_cache
from slora.io.hub_cache import cache_root, locate_model
from slora.io.model_folder import load_model
from tests.support.corpus import Case, base, expect_one_line, ft, run_case  # noqa: F401 (base: a fixture)
from tests.support.tiny import tiny_model_dir


def add_snapshot(cache: Path, repo_id: str, folder: Path, branch: str | None = "main") -> str:
    """Put the files of model folder `folder` into `cache` as the hub client does; return the commit hash. The
    commit is derived from the files' hashes, so two different folders get two commits."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    shas = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    commit = hashlib.sha1("".join(shas.values()).encode()).hexdigest()
    for p, sha in shas.items():
        blob = repo / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, blob)
        link = repo / "snapshots" / commit / p.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)  # ../../blobs/<sha>, as the client writes it
    if branch is not None:
        (repo / "refs" / branch).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)  # no newline, as the client writes it
    return commit


@pytest.fixture
def cache(tmp_path, base, monkeypatch):
    """An HF_HUB_CACHE holding org/tiny (the tiny encoder at main) and nothing else."""
    root = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    commit = add_snapshot(root, "org/tiny", base["enc"])
    return root, commit


# -----------------------------------------------------------------------------
# Where the cache is, and what a name resolves to

def test_cache_root_follows_the_hub_clients_order(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert cache_root() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"


def test_a_name_resolves_to_its_snapshot_through_the_symlinks(cache, base):
    root, commit = cache
    path, note = locate_model("org/tiny")
    assert path == root / "models--org--tiny" / "snapshots" / commit and note is None
    assert (path / "model.safetensors").is_symlink()  # read through the link into blobs/
    assert (path / "model.safetensors").resolve().parent == root / "models--org--tiny" / "blobs"
    got, want = load_model(path).state_dict(), load_model(base["enc"]).state_dict()
    assert all((got[k] == want[k]).all() for k in want)


@pytest.mark.parametrize("home", ["HF_HOME", "HOME"])
def test_the_cache_is_found_without_hf_hub_cache(tmp_path, base, monkeypatch, home):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv(home, str(tmp_path / "h"))
    root = tmp_path / "h" / ("hub" if home == "HF_HOME" else ".cache/huggingface/hub")
    commit = add_snapshot(root, "org/tiny", base["enc"])
    assert locate_model("org/tiny")[0] == root / "models--org--tiny" / "snapshots" / commit


def test_revision_is_a_branch_or_a_commit(cache, base, tmp_path):
    root, main = cache
    dev = add_snapshot(root, "org/tiny", base["dec"], branch="dev")
    pr = add_snapshot(root, "org/tiny", tiny_model_dir(tmp_path / "m2", "encoder", seed=2), branch="refs/pr/1")
    snaps = root / "models--org--tiny" / "snapshots"
    assert locate_model("org/tiny")[0] == snaps / main
    assert locate_model("org/tiny", "dev")[0] == snaps / dev
    assert locate_model("org/tiny", "refs/pr/1")[0] == snaps / pr
    assert locate_model("org/tiny", dev)[0] == snaps / dev  # a commit hash
    with pytest.raises(UsageError, match=r"--revision: 'v2' is neither a branch under .*models--org--tiny/refs "
                                         r"\(there: dev, main, refs/pr/1\) nor a commit hash"):
        locate_model("org/tiny", "v2")
    with pytest.raises(UsageError, match=r"--revision: org/tiny at 0{40}: no snapshot .*snapshots/0{40} in the "
                                         r"cache \(not downloaded at that revision"):
        locate_model("org/tiny", "0" * 40)  # a commit hash the cache has no snapshot of
    with pytest.raises(UsageError, match=r"--revision: '\.\./\.\./x' is not a branch name"):
        locate_model("org/tiny", "../../x")


def test_an_incomplete_download_names_the_missing_snapshot(cache):
    root, commit = cache
    shutil.rmtree(root / "models--org--tiny" / "snapshots" / commit)
    with pytest.raises(UsageError, match=rf"--model: org/tiny at main: no snapshot .*snapshots/{commit} in the cache"):
        locate_model("org/tiny")


def test_presets_keep_precedence(cache, monkeypatch, tmp_path):
    root, _ = cache
    add_snapshot(root, "minilm", tiny_model_dir(tmp_path / "fake", "encoder"))
    monkeypatch.setattr(hub_cache, "model_dir", lambda name: tmp_path / "assets" / name)
    assert locate_model("minilm") == (tmp_path / "assets" / "minilm", None)
    with pytest.raises(UsageError, match="--revision: applies to a model from the Hugging Face cache; minilm is a "
                                         "preset"):
        locate_model("minilm", "main")


# -----------------------------------------------------------------------------
# python -m slora.finetune --model org/name

def test_finetune_from_the_cache(cache, tmp_path, base):
    root, commit = cache
    out = finetune.main([str(a) for a in ft(tmp_path, base, model="org/tiny")])
    args = json.loads((out / "args.json").read_text())
    assert args["model"] == "org/tiny" and args["revision"] is None
    assert args["resolved"]["model_path"] == str(root / "models--org--tiny" / "snapshots" / commit)


def test_a_name_not_in_the_cache_fails_in_one_line_naming_where_slora_looked(cache, tmp_path, base, capsys):
    root, _ = cache
    run_case(finetune.main, Case("not-cached", lambda t, b: ft(t, b, model="org/absent"), 2,
                                 f"looked for {root / 'models--org--absent'}"), tmp_path, base, capsys)
    run_case(finetune.main, Case("bad-revision", lambda t, b: ft(t, b, "--revision", "v9", model="org/tiny"), 2,
                                 "--revision"), tmp_path, base, capsys)


def test_a_local_folder_of_the_same_name_wins_and_says_so(cache, tmp_path, base, monkeypatch, capsys):
    root, _ = cache
    local = tmp_path / "cwd" / "org" / "tiny"
    shutil.copytree(tiny_model_dir(tmp_path / "other", "encoder", seed=3), local)
    monkeypatch.chdir(tmp_path / "cwd")
    out = finetune.main([str(a) for a in ft(tmp_path, base, model="org/tiny")])
    stdout = capsys.readouterr().out
    note = f"--model org/tiny: the local folder {local} is used, not the Hugging Face cache's {root / 'models--org--tiny'}"
    assert stdout.count(note) == 1
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("model") == 1
    args = json.loads((out / "args.json").read_text())
    assert args["model"] == args["resolved"]["model_path"] == str(local)
    with pytest.raises(UsageError, match="--revision: applies to a model from the Hugging Face cache, but org/tiny "
                                         "is a local folder"):
        locate_model("org/tiny", "main")


def test_resume_keeps_the_snapshot_it_started_on(cache, tmp_path, base, monkeypatch, capsys):
    from slora.train import resume
    root, commit = cache
    argv = [str(a) for a in ft(tmp_path, base, "--save-every", 1, model="org/tiny")]
    argv[argv.index("--max-steps") + 1] = "4"  # 16 examples, batch 8, two epochs
    reference = finetune.main(argv + ["--epochs", "2", "--out", str(tmp_path / "ref")])  # the last --out wins
    due = resume.Checkpointer.due
    with monkeypatch.context() as m:
        m.setattr(resume.Checkpointer, "due", lambda self, s: (_ for _ in ()).throw(KeyboardInterrupt())
                  if s == 2 else due(self, s))
        with pytest.raises(KeyboardInterrupt):
            finetune.main(argv + ["--epochs", "2"])
    add_snapshot(root, "org/tiny", tiny_model_dir(tmp_path / "newer", "encoder", seed=5))  # main moves on
    assert locate_model("org/tiny")[0].name != commit
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    finetune.main(["--resume", str(tmp_path / "run")])
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "run" / adapter).read_bytes() == (reference / adapter).read_bytes()
    # the snapshot it started on pruned from the cache: refused, naming it
    started = root / "models--org--tiny" / "snapshots" / commit
    shutil.rmtree(started)
    code = run_cli(finetune.main, ["--resume", str(tmp_path / "copy")])
    expect_one_line(code, 1, capsys.readouterr().err, f"{started}: the model folder the run started on is gone")


# -----------------------------------------------------------------------------
# python -m slora.merge: the base looked up as --model is

@pytest.fixture
def cached_run(cache, tmp_path, base):
    return finetune.main([str(a) for a in ft(tmp_path, base, model="org/tiny")])


def test_merge_finds_the_base_of_a_run_from_the_cache(cached_run, cache, tmp_path, base):
    args_file = cached_run / "args.json"
    args = json.loads(args_file.read_text())
    args["resolved"]["model_path"] = "/the/other/machine/snapshots/x"  # recorded where the run was made
    args_file.write_text(json.dumps(args))
    merged = merge_cmd.main([str(cached_run), str(tmp_path / "merged")])
    by_flag = merge_cmd.main([str(cached_run), str(tmp_path / "merged-flag"), "--base", "org/tiny"])
    assert (merged / "model.safetensors").read_bytes() == (by_flag / "model.safetensors").read_bytes()


def test_merge_names_where_it_looked(cached_run, cache, tmp_path, capsys):
    root, _ = cache
    code = run_cli(merge_cmd.main, [str(cached_run), str(tmp_path / "m"), "--base", "org/absent"])
    expect_one_line(code, 2, capsys.readouterr().err, f"--base: 'org/absent' is neither")
    args_file = cached_run / "args.json"
    args = json.loads(args_file.read_text())
    args["model"], args["resolved"]["model_path"] = "org/gone", "/the/other/machine/snapshots/x"
    args_file.write_text(json.dumps(args))
    code = run_cli(merge_cmd.main, [str(cached_run), str(tmp_path / "m")])
    err = capsys.readouterr().err
    expect_one_line(code, 1, err, f"{args_file}: the run's model /the/other/machine/snapshots/x is not here")
    assert str(root / "models--org--gone") in err
    assert not (tmp_path / "m").exists()
