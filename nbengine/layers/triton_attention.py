"""TritonPagedAttention: the CUDA path's attention backend over the paged KV pool.

Decode rows (one new token each, first in the batch) go to the split-KV decode kernel; the
prefill / chunked-prefill rows after them to the extend kernel. ``prepare`` plans on the host
only (split count from the batch size, the extend grid from the host lengths), so a decode step
it prepared can be captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..forward_batch import ForwardBatch


@dataclass
class _TritonMeta:
    num_splits: int  # decode: context splits per (sequence, kv head)
    max_extend: int  # extend: most new tokens of one sequence (0: no extend rows)


class TritonPagedAttention:
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        from ..kernels import decode_attention, extend_attention

        self._decode = decode_attention
        self._extend = extend_attention
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self._num_sms: int | None = None

    def _sms(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 4)
        return self._num_sms

    def prepare(self, fb: ForwardBatch) -> None:
        bd = fb.num_decodes
        splits = self._decode.num_splits_for(bd, self.num_kv_heads, self._sms(fb.seq_lens.device)) if bd else 1
        max_extend = max(fb.q_lens_host[bd:], default=0)
        fb.attn = _TritonMeta(splits, max_extend)

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """q: [T, H*D] (rotated; rows may be strided); kv_layer [S, 2, Hkv, D] holds this step's K/V."""
        meta: _TritonMeta = fb.attn
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        bd = fb.num_decodes
        if bd:
            self._decode.decode_attention(q[:bd], kv_layer, fb.page_table, fb.page_table_width, fb.seq_lens,
                                          out[:bd], fb.page_size, meta.num_splits, self.scale)
        if meta.max_extend:
            self._extend.extend_attention(q, kv_layer, fb.page_table, fb.page_table_width, fb.seq_lens, fb.q_starts,
                                          out, fb.page_size, bd, fb.batch_size - bd, meta.max_extend, self.scale)
        return out
