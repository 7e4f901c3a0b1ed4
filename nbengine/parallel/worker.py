"""A tensor-parallel worker process: the same ModelRunner on its shard, running every step rank 0 sends.

Also :func:`serve_node`: on a node other than the first (``node_rank > 0``), ``Engine(...)`` runs
all of this node's ranks as workers and returns when the first node's engine shuts down.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import EngineConfig, parse_dist_addr
from ..errors import EngineShutdownError
from .workers import WorkerSpec, spawn_workers

logger = logging.getLogger("nbengine")


def worker_main(rank: int, spec: WorkerSpec) -> None:
    """Entry point of a spawned rank (module-level: spawn pickles it by name)."""
    _detach()
    store = dist.TCPStore(spec.host, spec.port, spec.world, is_master=False,
                          timeout=datetime.timedelta(seconds=spec.timeout_s))
    try:
        _serve(rank, spec, store)
    except BaseException:
        try:
            store.set(f"error/{rank}", traceback.format_exc())
        finally:
            os._exit(1)


def _serve(rank: int, spec: WorkerSpec, store: dist.TCPStore) -> None:
    from ..model_runner import ModelRunner  # after _detach: the import is the slow part
    from .comm import TPComm

    device = torch.device(spec.config.device if spec.config.device != "auto" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif spec.config.num_threads is None:  # this node's ranks share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // (spec.config.tp_size // spec.config.nnodes)))
    store.set(f"joined/{rank}", "1")
    comm = TPComm(store, rank, spec.world, device, datetime.timedelta(seconds=spec.timeout_s))
    runner = ModelRunner(spec.config, spec.model_dir, comm=comm)
    while (plan := comm.recv()) is not None:
        runner.execute(plan)
    runner.release()


def _detach() -> None:
    """Own session, SIGINT ignored (then unblocked: it was blocked across the spawn), and exit with the parent."""
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = multiprocessing.parent_process()
    if parent is not None:
        def watch() -> None:
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)  # the engine's process is gone: no orphan stays behind

        threading.Thread(target=watch, name="nbengine-parent-watch", daemon=True).start()


def serve_node(config: EngineConfig, model_dir: Path) -> None:
    """``node_rank > 0``: run this node's ranks until the first node's engine stops them."""
    host, port = parse_dist_addr(config.dist_init_addr)
    per_node = config.tp_size // config.nnodes
    first = config.node_rank * per_node
    spec = WorkerSpec(config, Path(model_dir), host, port, config.tp_size)
    procs = spawn_workers(spec, range(first, first + per_node), first)
    logger.info("node %d: running tensor-parallel ranks %d..%d", config.node_rank, first, first + per_node - 1)
    try:
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(3.0)
    failed = [p.name for p in procs if p.exitcode]
    if failed:
        raise RuntimeError(f"tensor-parallel ranks {failed} on node {config.node_rank} failed (see the log above)")


class FinishedNode:
    """The engine thread stand-in of an ``Engine(node_rank > 0)`` once its ranks exited: nothing to serve here."""

    dead = None
    core = None

    def check(self) -> None:
        raise EngineShutdownError("This engine ran tensor-parallel ranks for node 0's engine, which has shut down; "
                                  "send requests to the engine on node_rank=0.")

    def alive(self) -> bool:
        return False

    def live_core(self):
        self.check()

    def call(self, fn, timeout=None):
        self.check()

    def stop(self, timeout: float = 0.0) -> None:
        pass
