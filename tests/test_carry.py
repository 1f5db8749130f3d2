"""carry.py slim / unslim on a throwaway git repository: the recorded run folders leave the index and the travelling
tree, the files stay on disk, and unslim gives back exactly the index and exclude file it found."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference_runs"))
import carry  # noqa: E402


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True, text=True).stdout


@pytest.fixture
def repo(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@t")
    git(tmp_path, "config", "user.name", "t")
    for name in ("slora/a.py", "reference_runs/grid.py", "reference_runs/mpnet/rt/run-s0/metrics.json",
                 "reference_runs/nlu/rt/run-s0/env.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x" * 5000)
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "init")
    (tmp_path / ".git/info/exclude").write_text("# mine\n/.whl/\n")
    return tmp_path


def test_slim_takes_the_run_folders_out_and_unslim_restores_the_index(repo):
    before = carry.tracked_bytes(repo)
    carry.slim(repo)
    assert git(repo, "ls-files").split() == ["reference_runs/grid.py", "slora/a.py"]
    assert git(repo, "status", "--porcelain", "--untracked-files=all").split() == [
        "D", "reference_runs/mpnet/rt/run-s0/metrics.json", "D", "reference_runs/nlu/rt/run-s0/env.json"]
    assert (repo / "reference_runs/mpnet/rt/run-s0/metrics.json").is_file()  # still on disk
    assert carry.tracked_bytes(repo) < before
    with pytest.raises(SystemExit, match="already slim"):
        carry.slim(repo)
    carry.unslim(repo)
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert (repo / ".git/info/exclude").read_text() == "# mine\n/.whl/\n"
    assert carry.tracked_bytes(repo) == before


def test_tracked_bytes_counts_untracked_files_that_travel(repo):
    before = carry.tracked_bytes(repo)
    (repo / "reference_runs/nlg-full").mkdir()
    (repo / "reference_runs/nlg-full/new.json").write_text("y" * 9000)
    (repo / ".whl").mkdir()
    (repo / ".whl/big.whl").write_text("z" * 90000)  # ignored: does not travel
    assert carry.tracked_bytes(repo) - before >= 9000
    assert carry.tracked_bytes(repo) - before < 90000


def test_slim_refuses_staged_changes_and_unslim_refuses_when_not_slim(repo):
    with pytest.raises(SystemExit, match="not slim"):
        carry.unslim(repo)
    (repo / "slora/a.py").write_text("changed")
    git(repo, "add", "slora/a.py")
    with pytest.raises(SystemExit, match="staged changes"):
        carry.slim(repo)
    assert "carry.py slim" not in (repo / ".git/info/exclude").read_text()
