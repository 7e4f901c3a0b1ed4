"""CPU attention backend for the quantized path: decodes attend straight from the paged pool.

``TorchPagedAttention`` gathers every decode's K/V into a padded tensor and calls SDPA (a copy of
the whole context per layer, plus masks); here a numba kernel reads each K/V row where it lives
(page table -> slot), one work item per (sequence, KV head) whose query heads share the reads.
Prefill chunks still go through the torch path. Used with the quantized linear layers, whose
numba thread pool it shares (torch then runs on one thread: see ``cpu_threads.keep_narrow``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numba import njit, prange

from ..forward_batch import ForwardBatch
from .attention import TorchPagedAttention, _ExtendGroup


def _paged_decode_attention(q, kv, page_table, seq_lens, page_size, scale, out):
    """``q``, ``out``: ``[B, H, D]``; ``kv``: ``[S, 2, Hkv, D]``; ``page_table``: ``[B, W]``; ``seq_lens``: ``[B]``."""
    nseq, nh, dim = q.shape
    nkv = kv.shape[2]
    group = nh // nkv
    for item in prange(nseq * nkv):
        b = item // nkv
        hk = item % nkv
        length = seq_lens[b]
        scores = np.empty((group, length), dtype=np.float32)
        for t in range(length):
            slot = page_table[b, t // page_size] * page_size + t % page_size
            for g in range(group):
                h = hk * group + g
                s = np.float32(0.0)
                for i in range(dim):
                    s += q[b, h, i] * kv[slot, 0, hk, i]
                scores[g, t] = s * scale
        for g in range(group):
            h = hk * group + g
            mx = scores[g, 0]
            for t in range(1, length):
                mx = max(mx, scores[g, t])
            total = np.float32(0.0)
            for t in range(length):
                e = np.exp(scores[g, t] - mx)
                scores[g, t] = e
                total += e
            for i in range(dim):
                out[b, h, i] = 0.0
            for t in range(length):
                slot = page_table[b, t // page_size] * page_size + t % page_size
                p = scores[g, t] / total
                for i in range(dim):
                    out[b, h, i] += p * kv[slot, 1, hk, i]


paged_decode_attention = njit(parallel=True, fastmath=True, nogil=True, cache=True)(_paged_decode_attention)
# the same kernel on the calling thread: for a few short contexts a parallel region costs more than the work
paged_decode_attention_serial = njit(fastmath=True, nogil=True, cache=True)(_paged_decode_attention)
SERIAL_MAX_KEYS = 4096  # total keys x KV heads of a step below which the serial kernel runs


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def prepare(self, fb: ForwardBatch) -> None:
        bd = fb.num_decodes
        # decodes need only their page-table rows and lengths; the torch planner groups the prefill chunks
        keys = sum(fb.seq_lens_host[:bd]) * self.num_kv_heads
        fb.attn = _CpuMeta(fb.page_table[:bd].numpy(), fb.seq_lens[:bd].numpy(), keys, self._plan_extends(fb))

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """q: [T, H*D] (rotated); kv_layer: [S, 2, Hkv, D], holding this step's K/V already."""
        meta: _CpuMeta = fb.attn
        t, bd = q.shape[0], fb.num_decodes
        h, d = self.num_heads, self.head_dim
        out = torch.empty(t, h * d, dtype=q.dtype)
        if bd:
            kernel = paged_decode_attention_serial if meta.keys < SERIAL_MAX_KEYS else paged_decode_attention
            kernel(q[:bd].contiguous().numpy().reshape(bd, h, d), kv_layer.numpy(), meta.page_table,
                                   meta.seq_lens, fb.page_size, np.float32(self.scale), out.numpy()[:bd].reshape(bd, h, d))
        if bd < t:
            self._extend(q, kv_layer, meta.groups, out)
        return out


@dataclass
class _CpuMeta:
    page_table: np.ndarray  # [Bd, W] int32: the decodes' rows
    seq_lens: np.ndarray  # [Bd] int64
    keys: int  # sum of the decodes' context lengths x KV heads (the kernel's work)
    groups: list[_ExtendGroup]


def warm_up() -> None:
    """Load (or compile) the decode kernel before the first request."""
    q = np.zeros((1, 2, 8), np.float32)
    for kernel in (paged_decode_attention, paged_decode_attention_serial):
        kernel(q, np.zeros((4, 2, 1, 8), np.float32), np.zeros((1, 1), np.int32), np.ones(1, np.int64), 4,
               np.float32(1.0), np.zeros_like(q))
