"""Launch N copies of a Python command as torchrun would (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set),
without torchrun's agent: a test then sees what each rank does on its own, e.g. that a failure on one rank ends
the others through slora.dist.guard rather than through the agent killing them."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, argv: list[str], *, timeout: float = 300, env: dict | None = None
           ) -> list[tuple[int, str, float]]:
    """Run `python *argv` as ranks 0..world-1; return [(returncode, stdout+stderr, seconds)] per rank.
    A rank still running after `timeout` seconds is killed and reported with returncode None."""
    port = free_port()
    procs, t0 = [], time.time()
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                 LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
        procs.append(subprocess.Popen([sys.executable, *argv], env=e, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
            out.append((p.returncode, text, time.time() - t0))
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            out.append((None, text, time.time() - t0))
    return out
