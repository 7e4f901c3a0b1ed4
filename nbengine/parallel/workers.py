"""TPWorkers: rank 0's handle on the other tensor-parallel ranks (spawn, rendezvous, watch, stop).

Rank 0 is the engine thread itself (it schedules, samples and detokenizes); ranks ``1..N-1`` of
this node are processes started with torch.multiprocessing's ``spawn``. Each worker runs
:func:`nbengine.parallel.worker.worker_main`: it builds the same ``ModelRunner`` on its shard,
then runs every step rank 0 broadcasts. Workers run in their own session with SIGINT ignored
(a Jupyter interrupt goes to the kernel's whole process group), and exit when their parent dies.
A worker that dies makes :attr:`on_failure` fire (the engine then fails every waiter with
``EngineDeadError``) and the other workers are terminated, so nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing.connection
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from ..config import EngineConfig, parse_dist_addr
from .comm import TPComm

logger = logging.getLogger("nbengine")

_RENDEZVOUS_S = 300.0  # how long rank 0 waits for every rank to reach the store
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # a rank still loading its weights is not dead


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs (plain data: it crosses the spawn boundary)."""

    config: EngineConfig
    model_dir: Path
    host: str
    port: int
    world: int
    timeout_s: float = _COLLECTIVE_TIMEOUT.total_seconds()


def _first_gpu(config: EngineConfig) -> int | None:
    """The engine's own GPU index (ranks and replicas take the next ones); None on CPU."""
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return None
    return torch.device(config.device).index or 0 if config.device.startswith("cuda") else 0


def rank_device(config: EngineConfig, local_rank: int) -> str:
    """The device of the ``local_rank``-th rank on this node: consecutive GPUs from the engine's own."""
    base = _first_gpu(config)
    return "cpu" if base is None else f"cuda:{base + local_rank}"


def check_launch(config: EngineConfig) -> None:
    """``ValueError`` before any process starts: more ranks on this node than GPUs (on CPU: cores)."""
    per_node = config.tp_size // config.nnodes * config.dp_size
    what = f"tp_size={config.tp_size} x dp_size={config.dp_size} over nnodes={config.nnodes}"
    base = _first_gpu(config)
    if base is None:
        cores = os.cpu_count() or 1
        if per_node > cores:
            raise ValueError(f"{what} runs {per_node} ranks on this host's {cores} CPU cores; each needs a core. "
                             "Lower tp_size or dp_size.")
        return
    have = torch.cuda.device_count()
    if base + per_node > have:
        raise ValueError(f"{what} needs {per_node} GPUs on this node from cuda:{base}, but {have} are visible; "
                         "lower tp_size or dp_size, or set CUDA_VISIBLE_DEVICES.")


def spawn_workers(spec: WorkerSpec, ranks: range, first_rank: int) -> list:
    """Start one spawned process per rank (``first_rank`` is this node's first: device offsets count from it)."""
    from .worker import worker_main

    ctx = torch.multiprocessing.get_context("spawn")
    procs = []
    # the children inherit a blocked SIGINT, so an interrupt cannot hit them before they ignore it
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        for rank in ranks:
            cfg = dataclasses.replace(spec.config, device=rank_device(spec.config, rank - first_rank))
            p = ctx.Process(target=worker_main, args=(rank, dataclasses.replace(spec, config=cfg)),
                            name=f"nbengine-tp{rank}", daemon=True)
            p.start()
            procs.append(p)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return procs


class TPWorkers:
    """Starts this node's worker ranks and connects this process as rank ``node_rank * per_node``."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        world, per_node = config.tp_size, config.tp_size // config.nnodes
        self.first_rank = config.node_rank * per_node
        host, port = parse_dist_addr(config.dist_init_addr)
        self.store = dist.TCPStore(host, port, world, is_master=config.node_rank == 0, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=_RENDEZVOUS_S))
        spec = WorkerSpec(config, Path(model_dir), host, self.store.port, world)
        self.on_failure: Callable[[BaseException], None] | None = None
        self.failure: BaseException | None = None
        self._failed = threading.Event()
        self._stopping = False
        self._stop_r, self._stop_w = multiprocessing.Pipe(duplex=False)
        self.procs = spawn_workers(spec, range(self.first_rank + 1, self.first_rank + per_node), self.first_rank)
        try:
            self.store.set(f"joined/{self.first_rank}", "1")
            self._rendezvous(world)
            self.comm = TPComm(self.store, self.first_rank, world, torch.device(rank_device(config, 0)),
                               _COLLECTIVE_TIMEOUT)
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._watch, name="nbengine-tp-monitor", daemon=True).start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def _rendezvous(self, world: int) -> None:
        """Wait until every other rank reached the store (a local worker that died says why)."""
        deadline = time.monotonic() + _RENDEZVOUS_S
        others = [f"joined/{r}" for r in range(world) if r != self.first_rank]
        while not self.store.check(others):
            for p in self.procs:
                if not p.is_alive():
                    raise RuntimeError(f"tensor-parallel worker {p.name} exited during start-up: "
                                       f"{self.error_of(p)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every tensor-parallel rank reached the store within {_RENDEZVOUS_S:.0f}s "
                                   "(check dist_init_addr, nnodes and node_rank on every node)")
            time.sleep(0.05)

    def error_of(self, proc) -> str:
        rank = proc.name.removeprefix("nbengine-tp")
        try:
            if self.store.check([f"error/{rank}"]):
                return self.store.get(f"error/{rank}").decode(errors="replace").strip().splitlines()[-1]
        except Exception:  # noqa: BLE001 - the store may be gone with the process
            pass
        code = proc.exitcode
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return (f"exit code {code}, before it reached its own code (in a script, create the Engine under "
                "`if __name__ == '__main__':` - workers are started with spawn, which re-imports the main module)")

    def _watch(self) -> None:
        """Monitor thread: the first worker death (that no stop asked for) fails the engine."""
        ready = multiprocessing.connection.wait([p.sentinel for p in self.procs] + [self._stop_r])
        if self._stopping or self._stop_r in ready:
            return
        dead = next(p for p in self.procs if p.sentinel in ready)
        dead.join(1.0)
        self.failure = RuntimeError(f"tensor-parallel worker {dead.name} (pid {dead.pid}) died: {self.error_of(dead)}")
        self._failed.set()
        logger.error("%s; stopping the engine", self.failure)
        self._terminate()  # the engine thread's pending collective now fails instead of waiting
        if self.on_failure is not None:
            self.on_failure(self.failure)

    def raise_startup_failure(self, error: BaseException) -> None:
        """After a failed start (workers stopped): raise what a worker reported, if one failed first."""
        for p in self.procs:
            if p.exitcode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                raise RuntimeError(f"tensor-parallel worker {p.name} failed while starting: {self.error_of(p)}") \
                    from error

    def wait_failure(self, timeout: float) -> BaseException | None:
        """The worker death that explains a failed collective (the monitor may report it a moment later)."""
        self._failed.wait(timeout)
        return self.failure

    def watch_with(self, on_failure: Callable[[BaseException], None]) -> None:
        self.on_failure = on_failure
        if self.failure is not None:
            on_failure(self.failure)

    def stop(self, timeout: float = 10.0) -> None:
        """Tell the workers to exit, then make sure they did (terminate, kill). Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        try:
            self._stop_w.send(None)
        except (AttributeError, OSError):
            pass
        if self.failure is None and all(p.is_alive() for p in self.procs) and hasattr(self, "comm"):
            try:
                self.comm.send(None)
            except Exception:  # noqa: BLE001 - a worker died meanwhile; it is terminated below
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._terminate()

    def _terminate(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(3.0)
            if p.is_alive():
                p.kill()
                p.join(3.0)

