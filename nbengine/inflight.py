"""InFlightStep: a step whose sampled ids are still on the device (overlap scheduling).

The engine launches step N, samples it on the device, starts one non-blocking copy of the ids
into pinned host memory and records an event; it then schedules and launches step N+1 (whose
decodes feed N's ids on the device, see ``ModelRunner.run``) before it reads N's ids — so the
host's bookkeeping runs while the GPU computes. ``HostIds`` holds the two pinned buffers the
copies alternate between: a step's buffer is read before the step after next reuses it.
"""

from __future__ import annotations

import time

import torch

from .sequence import Sequence


class HostIds:
    def __init__(self, max_rows: int, device: torch.device) -> None:
        pin = device.type == "cuda"
        self._bufs = [torch.empty(max_rows, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._turn = 0
        self.device = device

    def start(self, seqs: list[Sequence], ids: torch.Tensor) -> "InFlightStep":
        buf = self._bufs[self._turn]
        self._turn ^= 1
        return InFlightStep(seqs, ids, buf, self.device)


class InFlightStep:
    def __init__(self, seqs: list[Sequence], ids: torch.Tensor, buf: torch.Tensor, device: torch.device) -> None:
        self.seqs = seqs
        self.launched = time.perf_counter()
        self.ids = ids  # [len(seqs)] on the device; the next step's placeholders index it
        self.host = buf[: len(seqs)]
        self.host.copy_(ids, non_blocking=True)
        self.event = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()
            self.event.record()
        for row, seq in enumerate(seqs):
            seq.num_pending += 1
            seq.pending_row = row

    def read(self) -> list[int]:
        """The sampled ids (waits for this step's copy only); the sequences stop counting them as pending."""
        if self.event is not None:
            self.event.synchronize()
        for seq in self.seqs:
            seq.num_pending -= 1
        return self.host.tolist()
