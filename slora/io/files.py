"""Writing files so that nothing a user owns is ever lost and nothing is left half written; reading JSON with
errors that name the file.

    read_json(path)              a JSON file's value; bad UTF-8 or JSON names the file and line
    writing(path)                a failed write (disk full, no permission, file-size limit) names the path written
    write_atomic(path, text)     a small file written under a temporary name and renamed into place
    locked(lock, folder)         one writer per output folder: a lock file {pid, host, started}, held with flock
    check_apart(out, inputs)     an output that is, contains or lies inside one of the command's inputs is refused
    output_folder(out, ...)      an output folder filled file by file under the protocol below (slora.merge)
    atomic_folder(folder)        a new folder written under a temporary name beside it and renamed into place;
                                 an interrupted write leaves only its temporary folder, which names its process
    partial_folders(folder)      those leftovers, split into stale (their process is gone) and live ones
    process_alive(pid)           whether a process still runs (lock files and leftovers record their pid)

The protocol of an output folder OUT that slora fills file by file (a run folder, a merged model):

    OUT/.slora-lock        held while a command writes OUT; a second writer refuses at once, naming the first
    OUT/.slora-partial/    the output being written; OUT itself is untouched until it is complete
    OUT/<manifest>         the names of the files slora moved into OUT (.slora-run.json, .slora-merge.json): the
                           only files a later command may replace
Completion is journaled: `.slora-partial/.slora-commit.json` (the files to move in, the previous output's files to
remove, the manifest) is written first, under a temporary name and renamed; then the previous files go, the new ones
are moved in, the manifest is written, and the in-progress folder is renamed to OUT/.slora-trash and deleted. Every
step can be repeated: a process killed at any point (SIGKILL, the out-of-memory killer) leaves a journal that the
next command on OUT finishes before anything else (`recover`), and says so. Ctrl-C and SIGTERM wait until such a
sequence is done (`deferred_signals`). What is guarded against is the death of the process, not of the machine:
nothing is fsynced.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from safetensors import SafetensorError

from slora.errors import SloraError, sigterm_as_interrupt

LOCK = ".slora-lock"
PARTIAL = ".slora-partial"
JOURNAL = ".slora-commit.json"  # inside PARTIAL
TRASH = ".slora-trash"


class OutputError(SloraError):
    """An output folder in a state that the requested action may not touch; the message says what to do."""


class Busy(OutputError):
    """An output folder whose lock another process holds."""


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


# -----------------------------------------------------------------------------
# Write errors that name the path

WRITE_HINTS = {errno.ENOSPC: "free some space there or write elsewhere",
               errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
               errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to",
               errno.EROFS: "the filesystem is read-only; write elsewhere",
               errno.EFBIG: "the file is larger than a file may be here (ulimit -f, or the filesystem's limit)"}


def write_error(path, code: int | None, text: str | None = None) -> SloraError:
    text = text or (os.strerror(code) if code else "write failed")
    hint = WRITE_HINTS.get(code)
    return SloraError(path, f"cannot write it: {text}" + (f"; {hint}" if hint else ""))


@contextmanager
def writing(path) -> Iterator[None]:
    """Turn a failed write of `path` inside the block into an error naming it: Python's `[Errno 28] No space left
    on device` and safetensors' `SafetensorError ... (os error 13)` carry no path."""
    try:
        yield
    except OSError as e:
        if e.filename is not None and Path(e.filename) != Path(path):
            raise  # about another file (a copy's source): its own error names it
        raise write_error(path, e.errno, e.strerror) from None
    except Exception as e:  # safetensors' and tokenizers' errors from Rust end in "(os error N)"
        m = re.search(r"os error (\d+)", str(e))
        if m:
            raise write_error(path, int(m.group(1))) from None
        if isinstance(e, SafetensorError):
            raise SloraError(path, f"cannot write it: {e}") from None
        raise


def write_atomic(path: Path, text: str):
    """Write a small file under a temporary name beside it and rename it into place: readers see the old file or
    the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# Processes, locks and signals

def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (the owner test of partial folders and locks)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _lock_content(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace")


def acquire(lock: Path, folder: Path, other: str) -> int:
    """Take the lock file `lock` of `folder`; return its descriptor (see `locked`)."""
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        except OSError:  # a filesystem without flock: the pid in the file decides alone
            free = True
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if free and not same:  # its holder finished and removed it after we opened it: take the new one
            os.close(fd)
            continue
        text = _lock_content(fd)
        try:
            held = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            held = None
        if not isinstance(held, dict) or (held and not isinstance(held.get("pid"), int)):
            held = None
        if not held and not free:
            os.close(fd)
            raise Busy(folder, f"in use by another slora run (its lock file {lock} is being written this "
                                      f"instant); wait for it or choose another {other}")
        if held is None:
            os.close(fd)
            raise OutputError(lock, f"lock file without a process id (being written this instant, or damaged); if "
                                    f"no slora run is using {folder}, remove it")
        pid, host, started = held.get("pid"), held.get("host"), held.get("started")
        busy = f"in use by another slora run (pid {pid}, host {host}, started {started}); wait for it or choose " \
               f"another {other}"
        if not free:
            os.close(fd)
            raise Busy(folder, busy)
        if held and host != me["host"]:  # its pid means nothing here; flock may not reach across hosts either
            os.close(fd)
            raise Busy(folder, f"{busy} (if that run is gone, delete {lock})")
        if held and process_alive(pid):  # names a live process that does not hold it: pid reused, or an older slora
            os.close(fd)
            raise Busy(folder, f"{busy} (if no slora command is writing {folder}, delete {lock})")
        if held:
            print(f"{lock}: stale lock of process {pid} (started {started}, no longer running): taken over",
                  flush=True)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        with writing(lock):
            os.write(fd, (json.dumps(me) + "\n").encode())
        return fd


def release(lock: Path, fd: int):
    Path(lock).unlink(missing_ok=True)  # while still held: a waiting process then finds the file gone and retries
    os.close(fd)


@contextmanager
def locked(lock, folder, other: str = "output folder") -> Iterator[None]:
    """Hold the lock file `lock` (JSON {pid, host, started}) while `folder` is written.

    The lock is an flock on the file, which the kernel drops when its process dies, however it dies. A file left by
    a killed process is stale and taken over, which is said; a file naming a process that still runs on this host,
    or a process on another host, is refused with the holder named (`other` names what to choose instead); an empty
    file (a process killed as it took the lock) is taken over silently.
    """
    lock, folder = Path(lock), Path(folder)
    fd = acquire(lock, folder, other)
    try:
        yield
    finally:
        release(lock, fd)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive inside the block are handled when it ends: a short sequence of moves is
    never cut in the middle by them (a SIGKILL can be; the journal covers that). Their handlers are swapped for one
    that notes the signal, and the signal is raised again once the old handlers are back (a blocked signal mask
    would not do: the kernel hands a process signal to any thread that does not block it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def check_apart(out, inputs: dict, other: str = "output folder"):
    """Refuse an output that is, contains or lies inside an input ({what: path}; None and missing paths skipped),
    naming both: writing it would change or delete what the command reads."""
    out = Path(out)
    o = out.resolve()
    for what, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        p = Path(path).resolve()
        how = "is" if o == p else "contains" if o in p.parents else "lies inside" if p in o.parents else None
        if how:
            raise OutputError(out, f"{how} {what} {path}, which this command reads; choose another {other}")


# -----------------------------------------------------------------------------
# Output folders filled file by file: manifest, journal, recovery

def _plain(n) -> bool:
    return isinstance(n, str) and n not in ("", ".", "..") and not any(c in n for c in "/\\\0")


def plain_names(names, source: Path) -> list[str]:
    """`names` (from a manifest or journal at `source`) checked as plain names of entries of OUT: a path, '.',
    '..' or a name of slora's own bookkeeping would make a removal reach outside OUT or OUT itself."""
    if not isinstance(names, list):
        raise OutputError(source, f"must list file names, not {type(names).__name__}; the file is damaged")
    for n in names:
        if not _plain(n) or n.startswith(".slora-"):
            raise OutputError(source, f"entry {n!r} is not a plain file name; the file is damaged or was edited, "
                                      f"and slora removes nothing on its word: check the folder, then delete the "
                                      f"file and the entries it lists yourself")
    if len(set(names)) != len(names):
        raise OutputError(source, "lists a file twice; the file is damaged or was edited")
    return names


def read_manifest(out: Path, manifest: str) -> list[str] | None:
    """The names of the files slora wrote into OUT (its manifest), None without a manifest."""
    path = Path(out) / manifest
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict) or "files" not in data:
        raise OutputError(path, 'must hold {"files": [names]}; the file is damaged or was edited')
    return plain_names(data["files"], path)


def completing(out) -> dict | None:
    """The journal of a completion of OUT that was cut short, or None."""
    path = Path(out) / PARTIAL / JOURNAL
    if not path.is_file():
        return None
    journal = read_json(path)
    if not isinstance(journal, dict) or not {"manifest", "source", "files", "remove", "finish"} <= set(journal):
        raise OutputError(path, "is not a completion journal of slora's; the file is damaged")
    manifest, source = journal["manifest"], journal["source"]
    if not (isinstance(manifest, str) and manifest.startswith(".slora-") and _plain(manifest[len(".slora-"):])):
        raise OutputError(path, f"names the manifest {manifest!r}, not a .slora- file name; the file is damaged")
    if source != "":
        plain_names([source], path)
    plain_names(journal["files"], path)
    plain_names(journal["remove"], path)
    return journal


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def discard(folder: Path):
    """Delete a folder of slora's inside OUT in one visible step: renamed to OUT/.slora-trash, then deleted (a
    kill midway leaves the trash, which `recover` deletes, never a folder that looks like a resume point)."""
    trash = folder.parent / TRASH
    _remove(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def _finish(out: Path, journal: dict):
    """Carry out a completion journal. Each step is checked against the folder first, so it can be repeated."""
    partial = out / PARTIAL
    source = partial / journal["source"] if journal["source"] else partial
    names, old = journal["files"], set(journal["remove"])
    pending = [n for n in names if os.path.lexists(source / n)]  # not moved yet
    clash = [n for n in pending if os.path.lexists(out / n) and n not in old]
    if clash:  # a file of the user's where a new one goes: never overwritten
        raise OutputError(out, f"holds {', '.join(clash)}, not slora's, where the finished output's files go; "
                               f"nothing was changed: move them away, then {journal['finish']} to finish")
    for n in sorted(old):
        if n not in names or n in pending:  # the previous output's file (a moved-in one of that name is new)
            _remove(out / n)
    for n in pending:
        os.replace(source / n, out / n)
    write_atomic(out / journal["manifest"], json.dumps({"files": names}, indent=2) + "\n")
    discard(partial)


def commit(out: Path, names: list[str], source: Path, manifest: str, remove: list[str], finish: str):
    """Complete OUT: move `names` from `source` (OUT/.slora-partial or a folder inside it) into OUT, in place of
    the previous output's files `remove`, and list them in `manifest`; journaled (see the module docstring).
    `finish` says how to complete it should a file of the user's be in the way ("run `...`")."""
    out, partial = Path(out), Path(out) / PARTIAL
    rel = Path(source).relative_to(partial).as_posix()
    journal = {"manifest": manifest, "source": "" if rel == "." else rel, "files": names, "remove": remove,
               "finish": finish}
    with deferred_signals():
        write_atomic(partial / JOURNAL, json.dumps(journal, indent=1) + "\n")
        _finish(out, journal)


def recover(out) -> list[str]:
    """Finish a completion of OUT that was cut short and delete a trash folder left by a killed process, saying
    each on stderr; return what was said. Call with OUT's lock held, before anything else looks at OUT."""
    out, notes = Path(out), []
    with deferred_signals():
        journal = completing(out)
        if journal is not None:
            _finish(out, journal)
            notes.append(f"{out}: finished moving the completed output into place (a process was killed while "
                         f"moving it); the files are listed in {out / journal['manifest']}")
        if os.path.lexists(out / TRASH):
            _remove(out / TRASH)
            notes.append(f"removed {out / TRASH}: files of slora's that a killed process was deleting")
    for n in notes:
        print(f"note: {n}", file=sys.stderr, flush=True)
    return notes


@contextmanager
def output_folder(out, manifest: str, ours: Callable[[str], bool], finish: str, other: str = "output folder"
                  ) -> Iterator[Path]:
    """Fill the output folder OUT under the protocol: yield the folder to write the output's files into
    (OUT/.slora-partial/files, not yet created); when the block ends they replace the files of the previous output
    slora wrote into OUT (its `manifest`). Files of the user's in OUT stay; one that has a name `ours` says the
    output could write, and that no manifest lists, is refused before anything is done. On an error the in-progress
    folder is removed (and OUT, if this call created it and it is empty), and the exception's note says so.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(out, f"exists and is not a folder; choose another {other}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL
    try:
        with locked(out / LOCK, out, other), sigterm_as_interrupt():
            recover(out)
            if os.path.lexists(partial):  # no journal, no live owner (the lock was free): a killed writer's
                with deferred_signals():
                    discard(partial)
                print(f"note: removed {partial}: an unfinished output left by a process that was killed",
                      file=sys.stderr, flush=True)
            old = read_manifest(out, manifest) or []
            clash = sorted(n for n in os.listdir(out) if ours(n) and n not in old)
            if clash:
                raise OutputError(out, f"holds {', '.join(clash)}, which this command writes, and no {manifest} "
                                       f"lists them as written by slora: they are not replaced; move them away or "
                                       f"choose another {other}")
            partial.mkdir()
            files = partial / "files"
            try:
                yield files
                commit(out, sorted(os.listdir(files)), files, manifest, old, finish)
            except BaseException as e:
                if not partial.exists():  # Ctrl-C or SIGTERM handled once the journaled moves were done
                    e.add_note(f"the output had completed: {out}")
                elif completing(out) is None:
                    with deferred_signals():
                        discard(partial)
                    e.add_note(f"temporary files were removed ({partial})")
                raise
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


# -----------------------------------------------------------------------------
# Folders written whole under a temporary name (model folders, adapters, GGUF conversions)

def _partial_prefix(folder: Path) -> str:
    return f".{folder.name}.partial-"


def _owner(partial: Path, prefix: str) -> int | None:
    """The pid in a temporary folder's name `.<name>.partial-<pid>-<random>`; None for older unnamed ones."""
    head = partial.name[len(prefix):].split("-")[0]
    return int(head) if head.isdigit() else None


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
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                e.add_note(f"temporary files were removed ({tmp})")
            raise
