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


def deferrable(items: list, input_rows: list[tuple[int, int, int]]) -> bool:
    """True when nothing in a step needs the host between sampling and the next step, so its sampled ids
    may stay on the device until the next step is launched (overlap scheduling)."""
    for it, (_, n, _) in zip(items, input_rows):
        seq, p = it.seq, it.seq.params
        if n or seq.logprob.return_logprob or p.has_penalties or len(seq.output_ids) < p.min_new_tokens:
            return False
        # grammar masks, custom processors, score labels and hidden states all work on the host each step
        if seq.grammar is not None or seq.logit_processor is not None or seq.label_ids is not None \
                or seq.hidden is not None:
            return False
    return True
