"""Writing files so that nothing is ever half written, and reading JSON with errors that name the file.

    read_json(path)              a JSON file's value; bad UTF-8 or JSON names the file and line
    atomic_folder(folder)        write a folder under a temporary name beside it, renamed into place at the end;
                                 an interrupted write leaves only its temporary folder, which names its process
    partial_folders(folder)      those leftovers, split into stale (their process is gone) and live ones
    process_alive(pid)           whether a process still runs (lock files and leftovers record their pid)
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from slora.errors import SloraError, sigterm_as_interrupt


def read_json(path, what: str | None = None):
    """A JSON file's value; bad UTF-8 or bad JSON is an error naming the file (and the line)."""
    path = Path(path)
    what = what or path.name
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SloraError(path, f"{what} is not UTF-8 text (byte {e.start}); the file is damaged") from None
    except json.JSONDecodeError as e:
        raise SloraError(f"{path}:{e.lineno}", f"{what} is not valid JSON ({e.msg}, column {e.colno})") from None


def _partial_prefix(folder: Path) -> str:
    return f".{folder.name}.partial-"


def _owner(partial: Path, prefix: str) -> int | None:
    """The pid in a temporary folder's name `.<name>.partial-<pid>-<random>`; None for older unnamed ones."""
    head = partial.name[len(prefix):].split("-")[0]
    return int(head) if head.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (the owner test of partial folders and run-folder locks)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def partial_folders(folder) -> tuple[list[Path], list[tuple[Path, int]]]:
    """(stale, live) temporary folders of `folder`: stale ones were left by a process that no longer runs (killed,
    out of memory, power loss) or carry no pid (written before the pid was put in the name); live ones belong to a
    running process, given with its pid."""
    folder = Path(folder)
    prefix = _partial_prefix(folder)
    stale, live = [], []
    if folder.parent.is_dir():
        for p in sorted(folder.parent.iterdir()):
            if p.name.startswith(prefix) and p.is_dir():
                pid = _owner(p, prefix)
                if pid is not None and process_alive(pid):
                    live.append((p, pid))
                else:
                    stale.append(p)
    return stale, live


def remove_stale_partials(folder) -> list[Path]:
    """Remove the stale temporary folders of `folder`, saying so on stderr; return them."""
    stale, _ = partial_folders(folder)
    for p in stale:
        shutil.rmtree(p)
        print(f"note: removed {p}: an incomplete copy of {Path(folder).name} left by a process that was killed",
              file=sys.stderr)
    return stale


@contextmanager
def atomic_folder(folder, replace: bool = True, clean_stale: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside `folder`; when the block succeeds it becomes `folder`, when it raises (or
    Ctrl-C or SIGTERM arrives) it is removed. Readers never see a half-written folder.

    replace: an existing `folder` is replaced (callers decide beforehand whether that is allowed); with False a
    `folder` that appeared meanwhile (another process) is an error and is left as it is.
    clean_stale: first remove temporary folders of `folder` left by killed processes, saying so. A temporary
    folder of a process still running is an error naming that process: two writers of one folder would race.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if clean_stale:
        remove_stale_partials(folder)
    _, live = partial_folders(folder)
    if live:
        p, pid = live[0]
        raise SloraError(folder, f"is being written by process {pid} (temporary folder {p.name}); wait for it to "
                                 f"finish, or remove {p} if no such slora process runs")
    with sigterm_as_interrupt():
        tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(folder)}{os.getpid()}-", dir=folder.parent))
        try:
            yield tmp
            if folder.exists() and replace:
                shutil.rmtree(folder)
            try:
                os.rename(tmp, folder)  # refuses a non-empty existing folder: nothing of another writer is lost
            except OSError as e:
                raise SloraError(folder, f"cannot move the finished folder into place ({e.strerror}); another "
                                         f"process may have created it meanwhile") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
