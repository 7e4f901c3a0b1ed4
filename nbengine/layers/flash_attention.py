"""FlashAttention: an optional attention backend over flash-attn's paged-KV API.

Used only when ``attention_backend="flash_attn"`` and the ``flash-attn`` package imports (it has
no binary wheel on the package index; build it where it fits). flash-attn 2 reads paged K/V in
pages of a multiple of 256 tokens and takes the page table's stride at launch, so the runner lays
the page table out at full width for it. Decode rows use ``flash_attn_with_kvcache`` (lengths on
the device: CUDA-graph safe), the rest ``flash_attn_varlen_func`` with the page table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..forward_batch import ForwardBatch


def flash_attn_available() -> bool:
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:  # noqa: BLE001 - a broken install (missing CUDA symbols) counts as absent
        return False


@dataclass
class _FlashMeta:
    cu_q: torch.Tensor | None  # extend rows: [E + 1] cumulative new tokens, from 0
    cu_k: torch.Tensor | None  # [E + 1] cumulative context lengths
    max_q: int
    max_k: int


class FlashAttention:
    name = "flash_attn"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        fa = importlib.import_module("flash_attn")
        self._with_kvcache = fa.flash_attn_with_kvcache
        self._varlen = fa.flash_attn_varlen_func
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    def prepare(self, fb: ForwardBatch) -> None:
        bd, b = fb.num_decodes, fb.batch_size
        if bd == b:
            fb.attn = _FlashMeta(None, None, 0, 0)
            return
        cu_q = fb.q_starts[bd:] - fb.q_starts[bd]
        cu_k = F.pad(torch.cumsum(fb.seq_lens[bd:b], 0, dtype=torch.int32), (1, 0))
        fb.attn = _FlashMeta(cu_q, cu_k, max(fb.q_lens_host[bd:]), max(fb.seq_lens_host[bd:]))

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        meta: _FlashMeta = fb.attn
        h, hk, d, ps = self.num_heads, self.num_kv_heads, self.head_dim, fb.page_size
        paged = kv_layer.view(-1, ps, 2, hk, d)
        k_cache, v_cache = paged[:, :, 0], paged[:, :, 1]  # [pages, page_size, Hkv, D], last dim contiguous
        t, bd = q.shape[0], fb.num_decodes
        q3 = q.reshape(t, h, d)
        out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
        if bd:
            o = self._with_kvcache(q3[:bd].unsqueeze(1), k_cache, v_cache, cache_seqlens=fb.seq_lens[:bd],
                                   block_table=fb.page_table[:bd], softmax_scale=self.scale, causal=True)
            out[:bd] = o.squeeze(1)
        if meta.cu_q is not None:
            b = fb.batch_size
            out[bd:] = self._varlen(q3[bd:], k_cache, v_cache, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                    softmax_scale=self.scale, causal=True, block_table=fb.page_table[bd:b])
        return out.view(t, h * d)
