"""`--model org/name`: a model folder found in the local Hugging Face cache, never on the network.

The cache is the folder the hub client (huggingface_hub) downloads into: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`. The client lays a model out as

    models--org--name/blobs/<sha>                   the files' contents, named by their hash
    models--org--name/snapshots/<commit>/<file>     one folder per commit, each file a symlink into blobs/
    models--org--name/refs/<branch>                 a text file holding the commit the branch pointed at

so `org/name` at branch `main` is `snapshots/<the commit in refs/main>/`, a model folder like any other (its files
are read through the symlinks). `--revision` picks another branch under refs/ or a commit of snapshots/.

Which folder a `--model` value names, in this order (`locate_model`): a preset (slora's offline assets), a local
folder of that name (which wins over the cache, and says so when the cache holds the name too), the cache. A name
found in none of them is an error that names the folder slora looked in.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from slora.errors import UsageError
from slora.io.assets import MODEL_DIRS, model_dir

# A repository id as the hub spells it: `name` or `org/name`, letters, digits, '-', '_' and '.'
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A revision: a branch (or tag) name, which may hold '/' (refs/pr/1), or a commit hash
REVISION = re.compile(r"[\w.-]+(/[\w.-]+)*")
COMMIT = re.compile(r"[0-9a-f]{40}")


def cache_root() -> Path:
    """The hub cache folder: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub (the hub client's own
    order, `huggingface_hub.constants`)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def repo_folder(repo_id: str) -> Path:
    """`models--org--name` in the cache: the hub client's folder name for a model repository."""
    return cache_root() / ("models--" + repo_id.replace("/", "--"))


def snapshot(repo_id: str, revision: str | None = None, flag: str = "--model") -> Path:
    """The snapshot folder of `repo_id` at `revision` (default main): a branch under refs/, or a commit that has a
    folder under snapshots/. Every miss is an error (naming `flag`) that names the path looked at."""
    neither = f"{repo_id!r} is neither a preset ({', '.join(MODEL_DIRS)}) nor a folder"
    if not REPO_ID.fullmatch(repo_id):
        raise UsageError(flag, f"{neither}, nor a Hugging Face name (org/name) to look up in the cache")
    repo = repo_folder(repo_id)
    if not repo.is_dir():
        raise UsageError(flag, f"{neither}, nor in the Hugging Face cache (looked for {repo}); slora never "
                               f"downloads: fetch it with `hf download {repo_id}` (huggingface_hub), or point "
                               f"HF_HUB_CACHE or HF_HOME at the cache that holds it")
    revision = "main" if revision is None else revision
    if not REVISION.fullmatch(revision) or ".." in revision.split("/"):
        raise UsageError("--revision", f"{revision!r} is not a branch name or a commit hash")
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text().strip()
        if not COMMIT.fullmatch(commit):
            raise UsageError("--revision", f"{ref} holds {commit[:60]!r}, not a commit hash; the cache is damaged")
    elif COMMIT.fullmatch(revision):
        commit = revision
    else:
        branches = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file())
        raise UsageError("--revision", f"{revision!r} is neither a branch under {repo / 'refs'} (there: "
                                       f"{', '.join(branches) or 'none'}) nor a commit hash")
    folder = repo / "snapshots" / commit
    if not folder.is_dir():
        raise UsageError("--revision" if revision != "main" else flag,
                         f"{repo_id} at {revision}: no snapshot {folder} in the cache (not downloaded at that "
                         f"revision, or the download is incomplete)")
    return folder


def locate_model(name: str, revision: str | None = None, flag: str = "--model") -> tuple[Path, str | None]:
    """(the model folder `--model name` means, a note to log or None): a preset (resolved on this machine), a local
    folder (absolute; it wins over a cache entry of the same name, and the note says so), else the cache's snapshot
    of `name` at `revision`. `revision` applies to the cache only; `flag` is the option errors name."""
    if name in MODEL_DIRS:
        if revision is not None:
            raise UsageError("--revision", f"applies to a model from the Hugging Face cache; {name} is a preset")
        return Path(model_dir(name)), None
    if Path(name).is_dir():
        in_cache = REPO_ID.fullmatch(name) is not None and repo_folder(name).is_dir()
        if revision is not None:
            raise UsageError("--revision", f"applies to a model from the Hugging Face cache, but {name} is a local "
                                           f"folder, which wins; rename it or leave out --revision")
        note = (f"{flag} {name}: the local folder {Path(name).resolve()} is used, not the Hugging Face cache's "
                f"{repo_folder(name)}" if in_cache else None)
        return Path(name).resolve(), note
    return snapshot(name, revision, flag), None
