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


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def paged_decode_attention(q, kv, page_table, seq_lens, page_size, scale, out):
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


class CpuPagedAttention(TorchPagedAttention):
    name = "cpu"

    def prepare(self, fb: ForwardBatch) -> None:
        bd = fb.num_decodes
        # decodes need only their page-table rows and lengths; the torch planner groups the prefill chunks
        fb.attn = _CpuMeta(fb.page_table[:bd].numpy(), fb.seq_lens[:bd].numpy(), self._plan_extends(fb))

    def forward(self, q: torch.Tensor, kv_new: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        meta: _CpuMeta = fb.attn
        t, bd = q.shape[0], fb.num_decodes
        h, d = self.num_heads, self.head_dim
        kv_layer.view(kv_layer.shape[0], -1).index_copy_(0, fb.out_slots, kv_new)
        out = torch.empty(t, h * d, dtype=q.dtype)
        if bd:
            paged_decode_attention(q[:bd].contiguous().numpy().reshape(bd, h, d), kv_layer.numpy(), meta.page_table,
                                   meta.seq_lens, fb.page_size, np.float32(self.scale), out.numpy()[:bd].reshape(bd, h, d))
        if bd < t:
            self._extend(q, kv_layer, meta.groups, out)
        return out


@dataclass
class _CpuMeta:
    page_table: np.ndarray  # [Bd, W] int32: the decodes' rows
    seq_lens: np.ndarray  # [Bd] int64
    groups: list[_ExtendGroup]


def warm_up() -> None:
    """Load (or compile) the decode kernel before the first request."""
    q = np.zeros((1, 2, 8), np.float32)
    paged_decode_attention(q, np.zeros((4, 2, 1, 8), np.float32), np.zeros((1, 1), np.int32), np.ones(1, np.int64),
                           4, np.float32(1.0), np.zeros_like(q))
