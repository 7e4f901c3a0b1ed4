"""The progress bar ``llm.generate(list)`` shows in a notebook cell (registered by the extension).

The engine calls its batch observers (``nbengine.hooks``) around a non-streaming batch; this one
shows a ``tqdm.auto`` bar (a widget where ipywidgets is installed) that goes away when done.
Only on the kernel's main thread, where a cell is running; ``NBENGINE_PROGRESS=0`` turns it off.
"""

from __future__ import annotations

import os
import threading
from typing import Any


def progress_enabled() -> bool:
    return os.environ.get("NBENGINE_PROGRESS", "1").strip().lower() not in ("0", "false", "no", "off")


class _Bar:
    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="generate", unit="req", leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def batch_progress(total: int) -> Any:
    """Batch observer factory: a bar for batches called from the notebook's main thread."""
    if total < 2 or not progress_enabled() or threading.current_thread() is not threading.main_thread():
        return None
    return _Bar(total)
