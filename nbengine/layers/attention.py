"""Attention over the paged KV pool.

``TorchPagedAttention`` is plain PyTorch: the CPU path, and the reference that GPU kernels
are tested against. Backends implement ``prepare(batch)`` once per step and
``forward(q, kv_new, kv_layer, batch)`` per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..forward_batch import ForwardBatch



@dataclass
class _TorchMeta:
    dec_slots: torch.Tensor | None  # [Bd * L] flat KV slots of every decode's context
    dec_mask: torch.Tensor | None  # [Bd, 1, 1, L] additive: 0 where the key is real, -inf for padding
    dec_len: int
    extends: list[tuple[int, int, int, torch.Tensor | None]]  # (row0, q_len, prefix_len, ctx slots)


def context_slots(page_table: torch.Tensor, length: int, page_size: int) -> torch.Tensor:
    """Flat KV slots of positions ``0..length-1`` for each row of ``page_table`` -> [B, length]."""
    pos = torch.arange(length, device=page_table.device)
    pages = page_table[:, pos // page_size].long()
    return pages * page_size + pos % page_size


class TorchPagedAttention:
    name = "torch"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim ** -0.5

    # ----------------------------------------------------------- per step
    def prepare(self, fb: ForwardBatch) -> None:
        bd = fb.num_decodes
        dec_slots = dec_mask = None
        dec_len = 0
        if bd:
            dec_len = max(fb.seq_lens_host[:bd])
            slots = context_slots(fb.page_table[:bd], dec_len, fb.page_size)
            pos = torch.arange(dec_len, device=slots.device)
            real = pos[None, :] < fb.seq_lens[:bd, None]
            dec_slots = slots.masked_fill(~real, 0).reshape(-1)  # padding reads the zeroed scratch page
            # an additive float mask is faster than a boolean one in the CPU SDPA kernel
            dec_mask = torch.zeros(bd, 1, 1, dec_len, dtype=fb.dtype, device=slots.device)
            dec_mask.masked_fill_(~real.view(bd, 1, 1, dec_len), float("-inf"))
        extends = []
        for i in range(bd, fb.batch_size):
            q_len, seq_len = fb.q_lens_host[i], fb.seq_lens_host[i]
            prefix = seq_len - q_len
            ctx = context_slots(fb.page_table[i : i + 1], seq_len, fb.page_size)[0] if prefix else None
            extends.append((fb.q_starts_host[i], q_len, prefix, ctx))
        fb.attn = _TorchMeta(dec_slots, dec_mask, dec_len, extends)

    # ----------------------------------------------------------- per layer
    def forward(self, q: torch.Tensor, kv_new: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """q: [T, H*D]; kv_new: [T, 2*Hkv*D] (K then V, rotated); kv_layer: [S, 2, Hkv, D].

        Writes the new K/V to their slots, then attends. Returns [T, H*D].
        """
        meta: _TorchMeta = fb.attn
        t = q.shape[0]
        h, hk, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        kv_layer.view(kv_layer.shape[0], -1).index_copy_(0, fb.out_slots, kv_new)
        out = torch.empty(t, h * d, dtype=q.dtype, device=q.device)
        bd = fb.num_decodes
        if bd:
            ctx = kv_layer.index_select(0, meta.dec_slots).view(bd, meta.dec_len, 2, hk, d)
            k = ctx[:, :, 0].transpose(1, 2)  # [Bd, Hkv, L, D]
            v = ctx[:, :, 1].transpose(1, 2)
            qd = q[:bd].view(bd, hk, g, d)  # the group's query heads act as rows
            o = F.scaled_dot_product_attention(qd, k, v, attn_mask=meta.dec_mask, scale=self.scale)
            out[:bd] = o.reshape(bd, h * d)
        for row0, n, prefix, slots in meta.extends:
            qe = q[row0 : row0 + n].view(n, h, d).transpose(0, 1)  # [H, n, D]
            if prefix == 0:
                kv = kv_new[row0 : row0 + n].view(n, 2, hk, d)
                mask, causal = None, True
            else:
                kv = kv_layer.index_select(0, slots)
                pos_q = torch.arange(prefix, prefix + n, device=q.device)
                mask = torch.arange(prefix + n, device=q.device)[None, :] <= pos_q[:, None]
                causal = False
            k = kv[:, 0].transpose(0, 1)  # [Hkv, L, D]
            v = kv[:, 1].transpose(0, 1)
            if g > 1:
                k = k.repeat_interleave(g, dim=0)
                v = v.repeat_interleave(g, dim=0)
            o = F.scaled_dot_product_attention(qe, k, v, attn_mask=mask, is_causal=causal, scale=self.scale)
            out[row0 : row0 + n] = o.transpose(0, 1).reshape(n, h * d)
        return out
