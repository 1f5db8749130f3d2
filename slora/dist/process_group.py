"""Process-group helpers for `torchrun --nproc-per-node N -m slora.finetune ...`: the only module that reads
torchrun's environment.

    env (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) --init()--> Dist (rank, world, device)
    shard(n)            contiguous, disjoint slice of range(n) for this rank (nothing repeated, nothing padded)
    all_reduce_sum(t)   in-place SUM over ranks
    broadcast_json(x)   rank 0's JSON-able object on every rank
    all_gather_json(x)  every rank's JSON-able object, in rank order
    check_same(x, what) error on every rank when ranks disagree (never a hang)
    guard()             a failure on one rank ends every rank within ~1 s, with that rank's error

Without torchrun's environment everything degrades to one process with no process group: shard(n) is
range(n) and the collectives return their input. Backend: nccl on CUDA (device cuda:LOCAL_RANK), gloo on CPU.
Objects cross ranks as JSON text in a uint8 tensor, never as pickles.

Sources: the rank partition without DistributedSampler's padding is llm-compressor's get_rank_partition
(datasets/utils.py); sharding uses the global rank, not the local one (the multi-node trap of PEFT's EVA example).
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as tdist

DONE_KEY = "slora/teardown"  # teardown(): ranks other than 0 that have left the process group
ERROR_KEY = "slora/error"  # the first failing rank writes "rank R: <error>" here
POLL_S = 0.2  # how often each rank looks for another rank's error


@dataclass
class Dist:
    """This process's place in the job. world 1 and backend None: a plain single process."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_state = Dist()
_store = None
_watch: tuple[threading.Thread, threading.Event] | None = None


def get() -> Dist:
    return _state


def env_world() -> int:
    """WORLD_SIZE from torchrun's environment (1 when absent), readable before init()."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: str | torch.device) -> Dist:
    """Join the process group described by torchrun's environment, or stay a single process without one.

    `device` is the user's --device: its type picks the backend; with several ranks on CUDA each rank takes
    cuda:LOCAL_RANK (an explicit index other than LOCAL_RANK is an error: two ranks would share one GPU).
    """
    global _state, _store
    device = torch.device(device)
    world = env_world()
    if world == 1:
        _state = Dist(device=device)
        return _state
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None and device.index != local:
            raise ValueError(f"--device {device} with torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"--device {device}: torchrun runs support cpu (gloo) and cuda (nccl) only")
    # the env:// rendezvous is done here rather than inside init_process_group so the store is ours to use
    # for the error channel of guard()
    _store, rank, world = next(tdist.rendezvous("env://", rank=rank, world_size=world))
    tdist.init_process_group(backend, store=_store, rank=rank, world_size=world,
                             device_id=device if backend == "nccl" else None)
    _state = Dist(rank, world, local, device, backend)
    return _state


def teardown() -> None:
    """Stop the error watcher, wait for every rank, leave the process group (no-op for one process)."""
    global _state, _store
    _stop_watch()
    if _state.world > 1 and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
        # Without torchrun's agent (a launcher that sets its environment), rank 0 hosts the store: it stays until
        # every other rank has left its process group, or a rank still tearing down could lose the store under it
        # (once, in CI: rank 1 aborted in teardown). Under torchrun the agent hosts the store; this costs a round trip.
        if _store is not None:
            try:
                if _state.rank == 0:
                    deadline = time.time() + 30
                    while _store.add(DONE_KEY, 0) < _state.world - 1 and time.time() < deadline:
                        time.sleep(POLL_S / 10)
                else:
                    _store.add(DONE_KEY, 1)
            except Exception as e:  # noqa: BLE001  the store is best effort here: the work is done and saved
                print(f"slora: rank {_state.rank}: store unreachable at teardown ({e})", file=sys.stderr)
    _state, _store = Dist(), None


# -----------------------------------------------------------------------------
# Sharding

def shard_range(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous slice of range(n): the first n % world ranks get one item more.

    Disjoint, covering, in order, never padded (DistributedSampler with drop_last=False repeats items to even
    out ranks, which would count calibration tokens twice). A rank may get nothing when n < world.
    """
    if n < 0 or not 0 <= rank < world:
        raise ValueError(f"shard_range: need n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def shard(items: list) -> list:
    """This rank's contiguous slice of `items` (all of it for one process)."""
    return [items[i] for i in shard_range(len(items), _state.rank, _state.world)]


# -----------------------------------------------------------------------------
# Collectives (identity for one process)

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place SUM of `t` over ranks; returns `t`."""
    if _state.world > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def reduce_sum(t: torch.Tensor, dst: int) -> torch.Tensor:
    """SUM of `t` over ranks into rank `dst`'s `t` (the others' `t` is left undefined); returns `t`."""
    if _state.world > 1:
        tdist.reduce(t, dst=dst, op=tdist.ReduceOp.SUM)
    return t


def _encode(obj) -> torch.Tensor:
    # JSON keeps Python floats exactly (repr round-trips) and writes inf/nan as Infinity/NaN
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(comm_device())


def _decode(t: torch.Tensor):
    return json.loads(bytes(t.cpu().tolist()).decode())


def comm_device() -> torch.device:
    return _state.device if _state.backend == "nccl" else torch.device("cpu")


def broadcast_json(obj=None):
    """Rank 0's `obj` (JSON-able) on every rank; other ranks' argument is ignored."""
    if _state.world == 1:
        return obj
    payload = _encode(obj) if _state.is_main else None
    size = torch.tensor([payload.numel() if payload is not None else 0], device=comm_device())
    tdist.broadcast(size, src=0)
    if payload is None:
        payload = torch.empty(int(size), dtype=torch.uint8, device=comm_device())
    tdist.broadcast(payload, src=0)
    return obj if _state.is_main else _decode(payload)


def all_gather_json(obj) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if _state.world == 1:
        return [obj]
    payload = _encode(obj)
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device()) for _ in range(_state.world)]
    tdist.all_gather(sizes, torch.tensor([payload.numel()], device=comm_device()))
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=comm_device())
    padded[:payload.numel()] = payload
    bufs = [torch.empty(longest, dtype=torch.uint8, device=comm_device()) for _ in range(_state.world)]
    tdist.all_gather(bufs, padded)
    return [_decode(b[:int(s)]) for b, s in zip(bufs, sizes)]


def check_same(obj, what: str) -> None:
    """Raise on every rank when ranks hold different `obj` (e.g. LoRA shapes): an error, never a hang in a
    later collective whose shapes disagree (DDP's _verify_param_shape_across_processes, FSDP's all-gather)."""
    got = all_gather_json(obj)
    bad = [r for r, o in enumerate(got) if o != got[0]]
    if bad:
        diff = ""
        if isinstance(got[0], dict) and isinstance(got[bad[0]], dict):
            keys = sorted(k for k in set(got[0]) | set(got[bad[0]]) if got[0].get(k) != got[bad[0]].get(k))
            diff = f" (first difference: {keys[0]!r}: rank 0 {got[0].get(keys[0])!r}, rank {bad[0]} " \
                   f"{got[bad[0]].get(keys[0])!r})" if keys else ""
        raise RuntimeError(f"{what} differ across ranks: rank 0 and rank(s) {bad}{diff}")


# -----------------------------------------------------------------------------
# Failure: one rank's error ends every rank (not the NCCL/gloo timeout)

class guard:
    """Context manager around a rank's whole job. An exception inside it is written to the rendezvous store;
    every other rank polls the store every POLL_S seconds from a daemon thread and, on seeing it, prints
    "rank R failed: ..." and exits with status 1 (os._exit: the main thread may be blocked in a collective
    that will never complete). The failing rank itself re-raises as usual. Without a process group: no-op.

    A rank killed outright (SIGKILL, OOM killer) writes nothing; torchrun's agent then ends the others.
    """

    def __enter__(self):
        global _watch
        if _state.world > 1 and _store is not None:
            stop = threading.Event()
            thread = threading.Thread(target=_watch_errors, args=(stop,), daemon=True, name="slora-dist-watch")
            thread.start()
            _watch = (thread, stop)
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and _state.world > 1 and _store is not None:
            _stop_watch()
            msg = f"rank {_state.rank}: {kind.__name__}: {exc}"
            try:
                _store.compare_set(ERROR_KEY, "", msg)  # the first failure wins
            except Exception as e:  # noqa: BLE001  the store is best effort; the original error still raises
                print(f"slora: could not report the failure to the other ranks ({e})", file=sys.stderr)
            # rank 0 hosts the store outside torchrun: stay long enough for every watcher to read the error
            time.sleep(3 * POLL_S)
        return False


def _watch_errors(stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        try:
            if not _store.check([ERROR_KEY]):
                continue
            msg = _store.get(ERROR_KEY).decode()
        except Exception as e:  # noqa: BLE001  store gone: the rank hosting it died
            if stop.is_set():
                return
            msg = f"lost the rendezvous store ({type(e).__name__}: {e}); a rank probably died"
        if stop.is_set():
            return
        print(f"slora: rank {_state.rank} stops because {msg}", file=sys.stderr, flush=True)
        traceback.print_stack(sys._current_frames().get(threading.main_thread().ident), file=sys.stderr)
        sys.stderr.flush()
        time.sleep(3 * POLL_S)  # rank 0 hosts the store outside torchrun: let the other watchers read it first
        os._exit(1)


def _stop_watch() -> None:
    global _watch
    if _watch is not None:
        thread, stop = _watch
        stop.set()
        if thread is not threading.current_thread():
            thread.join()
        _watch = None
