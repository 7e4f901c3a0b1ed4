"""Attention over the paged KV pool.

``TorchPagedAttention`` is plain PyTorch: the CPU path (its results agree with
``nbengine.kernels.reference.paged_attention``, which the Triton kernels are tested against).
Backends implement ``prepare(batch)`` once per step and ``forward(q, kv_layer, batch)`` per
layer; the new tokens' K/V are already in ``kv_layer`` when ``forward`` runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..forward_batch import ForwardBatch
from .cpu_threads import omp_team


def _sdpa_has_gqa() -> bool:
    try:
        q, k = torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4)
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


_GQA = _sdpa_has_gqa()


@dataclass
class _ExtendGroup:
    """Prefill chunks attended together, padded to ``[G, Lq]`` queries and ``[G, Lc]`` keys."""

    q_rows: torch.Tensor  # [G * Lq] row of each padded query (padding -> row 0)
    ctx_slots: torch.Tensor  # [G * Lc] KV slot of each padded key (padding -> scratch slot 0)
    mask: torch.Tensor  # [G, 1, Lq, Lc] additive
    valid: torch.Tensor  # [R] positions in the padded G * Lq grid that are real queries
    out_rows: torch.Tensor  # [R] their rows in the step's output
    size: tuple[int, int, int]  # G, Lq, Lc


@dataclass
class _TorchMeta:
    dec_slots: torch.Tensor | None  # [Bd * L] flat KV slots of every decode's context
    dec_mask: torch.Tensor | None  # [Bd, 1, 1, L] additive (None when no decode is padded)
    dec_len: int
    groups: list[_ExtendGroup]


def context_slots(page_table: torch.Tensor, length: int, page_size: int) -> torch.Tensor:
    """Flat KV slots of positions ``0..length-1`` for each row of ``page_table`` -> [B, length]."""
    pos = torch.arange(length, device=page_table.device)
    pages = page_table[:, pos // page_size].long()
    return pages * page_size + pos % page_size


def _group_extends(items: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Split (row0, q_len, ctx_len) prefill chunks into groups whose padding wastes at most ~2x."""
    groups: list[list[tuple[int, int, int]]] = []
    for it in sorted(items, key=lambda x: x[2]):
        if groups:
            g = groups[-1] + [it]
            padded = len(g) * max(x[1] for x in g) * max(x[2] for x in g)
            if padded <= 2 * sum(x[1] * x[2] for x in g) + 4096:
                groups[-1] = g
                continue
        groups.append([it])
    return groups


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
        dev = fb.page_table.device
        dec_slots = dec_mask = None
        dec_len = 0
        if bd:
            lens = fb.seq_lens_host[:bd]
            dec_len = max(lens)
            slots = context_slots(fb.page_table[:bd], dec_len, fb.page_size)
            if min(lens) != dec_len:
                real = torch.arange(dec_len, device=dev)[None, :] < fb.seq_lens[:bd, None]
                slots = slots.masked_fill(~real, 0)  # padding reads the zeroed scratch page
                # an additive float mask is faster than a boolean one in the CPU SDPA kernel
                dec_mask = torch.zeros(bd, 1, 1, dec_len, dtype=fb.dtype, device=dev)
                dec_mask.masked_fill_(~real.view(bd, 1, 1, dec_len), float("-inf"))
            dec_slots = slots.reshape(-1)
        fb.attn = _TorchMeta(dec_slots, dec_mask, dec_len, self._plan_extends(fb))

    def _plan_extends(self, fb: ForwardBatch) -> list[_ExtendGroup]:
        bd, dev = fb.num_decodes, fb.page_table.device
        extends = [(fb.q_starts_host[i], fb.q_lens_host[i], fb.seq_lens_host[i]) for i in range(bd, fb.batch_size)]
        index_of = {fb.q_starts_host[i]: i for i in range(bd, fb.batch_size)}
        return [self._prepare_group(fb, g, [index_of[r0] for r0, _, _ in g], dev) for g in _group_extends(extends)]

    def _prepare_group(self, fb: ForwardBatch, group: list[tuple[int, int, int]], seq_idx: list[int],
                       dev: torch.device) -> _ExtendGroup:
        n, lq, lc = len(group), max(x[1] for x in group), max(x[2] for x in group)
        q_len = torch.tensor([x[1] for x in group], device=dev)
        ctx_len = torch.tensor([x[2] for x in group], device=dev)
        row0 = torch.tensor([x[0] for x in group], device=dev)
        qi = torch.arange(lq, device=dev)[None, :]  # [1, Lq]
        kj = torch.arange(lc, device=dev)[None, None, :]  # [1, 1, Lc]
        q_real = qi < q_len[:, None]  # [G, Lq]
        q_rows = torch.where(q_real, row0[:, None] + qi, 0)
        slots = context_slots(fb.page_table[seq_idx], lc, fb.page_size)
        slots = slots.masked_fill(torch.arange(lc, device=dev)[None, :] >= ctx_len[:, None], 0)
        prefix = (ctx_len - q_len)[:, None, None]
        allowed = (kj <= prefix + qi[:, :, None]) & (kj < ctx_len[:, None, None])  # causal, within the context
        allowed |= ~q_real[:, :, None] & (kj == 0)  # padded queries look at one key, so no row is all -inf
        mask = torch.zeros(n, 1, lq, lc, dtype=fb.dtype, device=dev)
        mask.masked_fill_(~allowed[:, None], float("-inf"))
        valid = q_real.reshape(-1).nonzero().view(-1)
        return _ExtendGroup(q_rows.reshape(-1), slots.reshape(-1), mask, valid, q_rows.reshape(-1)[valid], (n, lq, lc))

    # ----------------------------------------------------------- per layer
    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """q: [T, H*D] (rotated); kv_layer: [S, 2, Hkv, D], holding this step's K/V already.

        Returns [T, H*D].
        """
        meta: _TorchMeta = fb.attn
        t = q.shape[0]
        h, hk, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        bd = fb.num_decodes
        dec_out = None
        if bd:
            ctx = omp_team.wide(kv_layer.index_select, 0, meta.dec_slots).view(bd, meta.dec_len, 2, hk, d)
            k = ctx[:, :, 0].transpose(1, 2)  # [Bd, Hkv, L, D]
            v = ctx[:, :, 1].transpose(1, 2)
            qd = q[:bd].view(bd, hk, g, d)  # the group's query heads act as rows: no K/V repeat
            dec_out = omp_team.wide(F.scaled_dot_product_attention, qd, k, v, attn_mask=meta.dec_mask, scale=self.scale)
            dec_out = dec_out.reshape(bd, h * d)
            if bd == t:
                return dec_out
        out = torch.empty(t, h * d, dtype=q.dtype, device=q.device)
        if dec_out is not None:
            out[:bd] = dec_out
        self._extend(q, kv_layer, meta.groups, out)
        return out

    def _extend(self, q: torch.Tensor, kv_layer: torch.Tensor, groups: list[_ExtendGroup], out: torch.Tensor) -> None:
        """Attend the prefill chunks (grouped and padded by :meth:`_plan_extends`) into their rows of ``out``."""
        h, hk, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.group
        for grp in groups:
            n, lq, lc = grp.size
            ctx = kv_layer.index_select(0, grp.ctx_slots).view(n, lc, 2, hk, d)
            k = ctx[:, :, 0].transpose(1, 2)  # [G, Hkv, Lc, D]
            v = ctx[:, :, 1].transpose(1, 2)
            qg = q.index_select(0, grp.q_rows).view(n, lq, h, d).transpose(1, 2)  # [G, H, Lq, D]
            if _GQA:
                o = omp_team.wide(F.scaled_dot_product_attention, qg, k, v, attn_mask=grp.mask, scale=self.scale,
                                  enable_gqa=g > 1)
            else:
                o = omp_team.wide(F.scaled_dot_product_attention, qg, k.repeat_interleave(g, 1),
                                  v.repeat_interleave(g, 1), attn_mask=grp.mask, scale=self.scale)
            o = o.transpose(1, 2).reshape(n * lq, h * d)
            out.index_copy_(0, grp.out_rows, o.index_select(0, grp.valid))
