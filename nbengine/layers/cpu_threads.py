"""OpenMP team size on the engine thread (CPU only).

On the engine's background thread, GNU OpenMP wakes its workers more slowly than on the main
thread, so the many small element-wise ops of a decode step (norms, adds, activations on a few
dozen rows) cost ~3x more when they run parallel. In steps of few tokens the engine thread
therefore runs with one OpenMP thread and widens to the full count only around the big kernels
(GEMMs, attention): +5-13 % at 64 decoding requests, neutral for one. Steps with many tokens
(prefill) keep the full team throughout. This uses libgomp's ``omp_set_num_threads``, which only
changes the calling thread; where torch does not ship libgomp (macOS, Windows) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Callable

import torch

logger = logging.getLogger("nbengine")


WIDE_STEP_TOKENS = 256  # steps with at least this many tokens run everything on the full team


class _OmpTeam:
    def __init__(self) -> None:
        self._set = None
        self._local = threading.local()
        self.wide_threads = torch.get_num_threads()
        path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
        if os.path.exists(path) and self.wide_threads > 1:
            try:
                self._set = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                self._set = None

    def manage_this_thread(self) -> None:
        """Let :meth:`begin_step` narrow the calling thread (the engine thread calls it once)."""
        if self._set is not None:
            # torch initialises a thread's OpenMP count on its first parallel call (to the count
            # set by torch.set_num_threads, if any); do that now so our settings are not undone
            self.wide_threads = torch.get_num_threads()
            self._local.base = self.wide_threads

    def keep_narrow(self) -> None:
        """Run torch on one OpenMP thread on the calling (managed) thread, for every op.

        For engines whose big kernels bring their own thread pool (the quantized CPU kernels):
        two runtimes' spinning workers on the same cores slow each other down many times over.
        """
        if getattr(self._local, "base", None) is not None:
            self._set(1)
            self._local.base = 1
            self._local.narrow = True

    def begin_step(self, num_tokens: int) -> None:
        """Pick this step's team size for element-wise ops on a managed thread."""
        base = getattr(self._local, "base", None)
        if base is None or getattr(self._local, "narrow", False):
            return
        new = self.wide_threads if num_tokens >= WIDE_STEP_TOKENS else 1
        if new != base:
            self._set(new)
            self._local.base = new

    def wide(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` with the full OpenMP team (a plain call where the team is already full)."""
        base = getattr(self._local, "base", None)
        if base is None or base == self.wide_threads or getattr(self._local, "narrow", False):
            return fn(*args, **kwargs)
        self._set(self.wide_threads)
        try:
            return fn(*args, **kwargs)
        finally:
            self._set(base)


omp_team = _OmpTeam()
