"""BatchBuffers: a step's metadata in one int32 device buffer, filled by one copy from pinned memory.

Layout for ``T`` token rows, ``B`` sequences, ``R`` logits rows and page-table width ``W``:
``ids[T] positions[T] slots[T] seq_lens[B] q_starts[B+1] logits_rows[R] width[1] page_table[B*W]``.
The offsets depend only on ``(T, B, R)``, so a CUDA graph captured for a padded decode batch of
``bs`` rows (``T = B = bs``, ``R = 0``) reads the same addresses at every replay; the page table
comes last and the kernels read its width from the device, so only ``B * W`` entries travel.

Two pinned host buffers alternate: the one being filled was last copied two steps ago, and its
copy is waited for (an event) before it is overwritten.
"""

from __future__ import annotations

import numpy as np
import torch

from .batch_plan import BatchPlan
from .forward_batch import ForwardBatch


def _offsets(t: int, b: int, r: int) -> tuple[int, int, int, int, int, int, int, int]:
    """ids, positions, slots, seq_lens, q_starts, logits_rows, width, page_table: each section
    starts on a 64-byte boundary, so Triton sees the same pointer alignment at every step (it
    compiles a kernel variant per alignment)."""
    offsets, at = [], 0
    for size in (t, t, t, b, b + 1, r, 1):
        offsets.append(at)
        at += -(-size // _ALIGN) * _ALIGN
    return (*offsets, at)


_ALIGN = 16  # int32 elements: 64 bytes


class BatchBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_pages: int, page_size: int, dtype: torch.dtype,
                 device: torch.device, fixed_width: bool = False) -> None:
        """``fixed_width``: always lay the page table out ``max_pages`` wide (for kernels that take its
        stride at launch, e.g. flash-attn's, so a captured graph stays valid)."""
        self.max_tokens, self.max_seqs, self.max_pages = max_tokens, max_seqs, max_pages
        self.page_size, self.dtype, self.device = page_size, dtype, device
        self.fixed_width = fixed_width
        size = _offsets(max_tokens, max_seqs, max_tokens)[-1] + max_seqs * max_pages
        self.device_buf = torch.zeros(size, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._host = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._events = [torch.cuda.Event() if pin else None for _ in range(2)]
        self._turn = 0

    def load(self, plan: BatchPlan, pad_to: int | None = None) -> ForwardBatch:
        """Copy ``plan`` to the device and return the ForwardBatch viewing it (see :meth:`write`)."""
        t, bb, r, width, offsets = self.write(plan, pad_to)
        o_ids, o_pos, o_slot, o_len, o_qs, o_rows, o_w, o_pt = offsets
        n, b = len(plan.ids), plan.batch_size
        d = self.device_buf
        return ForwardBatch(
            input_ids=d[o_ids:o_ids + t], positions=d[o_pos:o_pos + t], out_slots=d[o_slot:o_slot + t],
            page_table=d[o_pt:o_pt + bb * width].view(bb, width), seq_lens=d[o_len:o_len + bb],
            q_starts=d[o_qs:o_qs + bb + 1], logits_rows=d[o_rows:o_rows + r], page_size=self.page_size,
            num_decodes=t if pad_to else plan.num_decodes, dtype=self.dtype,
            seq_lens_host=plan.seq_lens + [0] * (bb - b), q_lens_host=plan.q_lens + [1] * (bb - b),
            q_starts_host=plan.q_starts[:-1] + list(range(n, t)) if pad_to else plan.q_starts[:-1],
            page_table_width=d[o_w:o_w + 1])

    def write(self, plan: BatchPlan, pad_to: int | None = None) -> tuple[int, int, int, int, tuple[int, ...]]:
        """Fill a pinned buffer from ``plan`` and start its copy to the device (one copy).

        ``pad_to``: a decode batch padded to that many rows, laid out as a CUDA graph captured for
        that size reads it (no logits rows: a graph computes every row's logits); padded rows write
        no KV and see no context. Returns (rows, sequences, logits rows, page-table width, offsets).
        """
        n, b = len(plan.ids), plan.batch_size
        t, bb = (pad_to, pad_to) if pad_to is not None else (n, b)
        r = 0 if pad_to is not None else len(plan.logits_rows)
        if t > self.max_tokens or bb > self.max_seqs:
            raise RuntimeError(f"step of {t} tokens / {bb} sequences exceeds the buffers "
                               f"({self.max_tokens} / {self.max_seqs})")
        width = self.max_pages if self.fixed_width else max((len(p) for p in plan.tables), default=1)
        offsets = _offsets(t, bb, r)
        o_ids, o_pos, o_slot, o_len, o_qs, o_rows, o_w, o_pt = offsets
        turn = self._turn
        self._turn ^= 1
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # its previous copy (two steps ago) has finished
        h = self._host_np[turn]
        h[o_ids:o_ids + n] = plan.ids
        h[o_pos:o_pos + n] = plan.positions
        h[o_slot:o_slot + n] = plan.slots
        h[o_len:o_len + b] = plan.seq_lens
        h[o_qs:o_qs + b + 1] = plan.q_starts
        if t > n:
            h[o_ids + n:o_ids + t] = 0
            h[o_pos + n:o_pos + t] = 0
            h[o_slot + n:o_slot + t] = -1
            h[o_len + b:o_len + bb] = 0
            h[o_qs + b + 1:o_qs + bb + 1] = np.arange(n + 1, t + 1)
        if r:
            h[o_rows:o_rows + r] = plan.logits_rows
        h[o_w] = width
        for i, pages in enumerate(plan.tables):
            h[o_pt + i * width:o_pt + i * width + len(pages)] = pages
        return self._send(turn, o_pt + bb * width, (t, bb, r, width, offsets))

    def _send(self, turn: int, used: int, result: tuple) -> tuple:
        self.device_buf[:used].copy_(self._host[turn][:used], non_blocking=True)
        if self._events[turn] is not None:
            self._events[turn].record()
        return result

