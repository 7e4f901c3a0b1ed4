"""nbengine's GPU kernels (Triton), installed as ``nbengine.kernels``.

Each kernel has a plain-torch twin in :mod:`nbengine.kernels.reference`: the CPU path runs the
references and the tests compare the kernels against them. Importing this package does not
import Triton; the kernel modules (``norm``, ``activation``, ``rope_store``,
``decode_attention``, ``extend_attention``) do, when first used.
"""

from __future__ import annotations

import importlib.util
import os


def triton_available() -> bool:
    """Triton is installed (it ships with CUDA builds of torch on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
