"""Re-launching compiled Triton kernels without Triton's dispatcher on every call.

Triton's JIT binds the arguments, works out their specialization and looks the kernel up on every
call: tens of microseconds of Python per launch, which is most of an eager (non-graph) step made of
many small launches. :func:`launch` goes through the dispatcher the first time a specialization is
seen and then calls the compiled kernel directly. The key mirrors what Triton specializes on: the
constexprs and launch options, every integer argument's value (except do-not-specialize ones),
every tensor's dtype and 16-byte alignment. ``NBENGINE_TRITON_FAST_LAUNCH=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from . import interpreting

logger = logging.getLogger("nbengine")

_compiled: dict[tuple, Any] = {}
_no_spec: dict[Any, frozenset[int]] = {}
_enabled = os.environ.get("NBENGINE_TRITON_FAST_LAUNCH", "1") != "0"


def _dns_positions(fn) -> frozenset[int]:
    """Positions of the arguments ``fn`` was told not to specialize on."""
    if fn not in _no_spec:
        names = list(fn.arg_names)
        marks = getattr(fn, "do_not_specialize", None) or []
        _no_spec[fn] = frozenset(names.index(m) if isinstance(m, str) else m for m in marks)
    return _no_spec[fn]


def _arg_key(args: tuple, dns: frozenset[int]) -> tuple:
    key = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and i not in dns:
            key.append(a)
        else:
            key.append(None)
    return tuple(key)


def launch(fn, grid: tuple[int, ...], args: tuple, constexprs: dict[str, Any], **options: Any) -> None:
    """``fn[grid](*args, **constexprs, **options)``; ``args`` are the leading non-constexpr
    parameters in order, ``constexprs`` the rest, in signature order."""
    global _enabled
    if not _enabled or interpreting():
        fn[grid](*args, **constexprs, **options)
        return
    key = (fn, tuple(constexprs.values()), tuple(options.items()), _arg_key(args, _dns_positions(fn)))
    kernel = _compiled.get(key)
    if kernel is not None:
        try:
            kernel[grid + (1,) * (3 - len(grid))](*args, *constexprs.values())  # it takes a 3-D grid
            return
        except Exception:  # noqa: BLE001 - an API this Triton lacks: use its dispatcher from now on
            logger.warning("fast Triton launch failed; using Triton's dispatcher", exc_info=True)
            _enabled = False
    kernel = fn[grid](*args, **constexprs, **options)
    if kernel is not None and _enabled:
        _compiled[key] = kernel
