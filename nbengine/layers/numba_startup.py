"""numba's start-up without its SciPy probe.

The first time numba types anything it imports its NumPy registry (``numba.np.arraymath``), which
probes for BLAS by importing ``scipy.linalg.cython_blas``; with SciPy installed that import (SciPy,
its array-API layer, ``numpy.f2py``) was about half of the quantized path's start-up CPU time
(~0.6 of ~1.1 s loading the cached kernels). Our kernels use no BLAS, so while the warm-up thread
loads them, SciPy imports *on that thread* fail; numba then records "no BLAS", which only picks
its own inner-product loop for ``np.correlate``/``np.convolve``. Afterwards the flag is set to what
the probe would have found, so other numba code in the process (``np.dot`` imports SciPy itself
when it is compiled) behaves as without us. Nothing changes when numba's registry or SciPy is
already imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class _NoSciPyOnThread(importlib.abc.MetaPathFinder):
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if (name == "scipy" or name.startswith("scipy.")) and threading.current_thread() is self.thread:
            raise ModuleNotFoundError(f"{name} is not imported while nbengine loads its numba kernels")
        return None


@contextmanager
def numba_without_scipy_probe() -> Iterator[None]:
    """Within: SciPy imports fail on the calling thread (numba's BLAS probe); see the module docstring."""
    if "numba.np.arraymath" in sys.modules or "scipy" in sys.modules:
        yield
        return
    finder = _NoSciPyOnThread(threading.current_thread())
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        arraymath = sys.modules.get("numba.np.arraymath")
        if arraymath is not None and importlib.util.find_spec("scipy") is not None:
            arraymath._HAVE_BLAS = True  # what numba's probe finds with SciPy installed
