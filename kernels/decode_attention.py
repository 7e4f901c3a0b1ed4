"""Decode attention over the paged KV cache: one new token per sequence.

Grid ``(batch, kv_heads, splits)``. A program takes the whole GQA group of one KV head as the
rows of its tile (``BLOCK_H >= 16`` rows, so ``tl.dot`` runs on the tensor cores) and one slice
of the context. The number of splits is the grid's third dimension, fixed on the host per batch
size; where each split starts is computed on the device from the sequence length, so the launch
can be captured in a CUDA graph and replayed for any lengths. With more than one split, each
writes its partial output and log-sum-exp and a second kernel merges them.

The page table is read through a device-resident row stride (``pt_stride_ptr``), so one
captured launch serves page tables of any width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _decode_kernel(q_ptr, kv_ptr, pt_ptr, pt_stride_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
                   stride_q, stride_o, stride_slot, v_offset, page_size, scale_log2,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   DIRECT: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    seq_len = tl.load(seq_lens_ptr + b)
    pt_row = pt_ptr + b * tl.load(pt_stride_ptr)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_mask = h < GROUP
    d_mask = d < HEAD_DIM
    heads = kvh * GROUP + h
    q = tl.load(q_ptr + b * stride_q + heads[:, None] * HEAD_DIM + d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    k_base = kv_ptr + kvh * HEAD_DIM
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        page = tl.load(pt_row + n // page_size, mask=n_mask, other=0).to(tl.int64)
        slot = page * page_size + n % page_size
        k_t = tl.load(k_base + slot[None, :] * stride_slot + d[:, None], mask=n_mask[None, :] & d_mask[:, None],
                      other=0.0)  # [D, N]
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2  # [H, N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(k_base + v_offset + slot[:, None] * stride_slot + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0.0  # an empty split (or a padded row with no context) has no keys
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    hd_mask = h_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + b * stride_o + heads[:, None] * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=hd_mask)
    else:
        row = (b * NUM_HEADS + heads) * num_splits + split  # [H]
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=hd_mask)
        tl.store(part_lse_ptr + row, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=h_mask)


@triton.jit(do_not_specialize=["num_splits"])  # varies with the batch size
def _merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, stride_o, num_splits,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    row = (b * NUM_HEADS + h) * num_splits + s
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - top), 0.0)
    total = tl.sum(w, axis=0)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & (d[None, :] < HEAD_DIM),
                other=0.0)
    merged = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_o + h * HEAD_DIM + d, merged.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def num_splits_for(batch: int, num_kv_heads: int, num_sms: int, max_splits: int = 16) -> int:
    """Split the context when batch x kv-heads programs would leave SMs idle (aim: ~2 waves)."""
    return max(1, min(max_splits, triton.cdiv(2 * num_sms, max(1, batch * num_kv_heads))))


def decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, page_table: torch.Tensor, pt_stride: torch.Tensor,
                     seq_lens: torch.Tensor, out: torch.Tensor, page_size: int, num_splits: int,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query row per sequence over its paged context.

    q ``[B, H*D]`` (rows may be strided), kv_layer ``[S, 2, Hkv, D]``, page_table: int32, flat or
    ``[B, W]``, with its row stride in the int32 device scalar ``pt_stride``; seq_lens ``[B]`` int32
    (0 = a padded row: output zeros). Writes ``out`` ``[B, H*D]`` and returns it.
    """
    batch = q.shape[0]
    hk, d = kv_layer.shape[2], kv_layer.shape[3]
    h = q.shape[1] // d
    group = h // hk
    scale = d ** -0.5 if scale is None else scale
    block_d = triton.next_power_of_2(d)
    block_n = 16 if interpreting() else 64 if block_d <= 64 else 32
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out
    else:
        part_o = torch.empty(batch * h * num_splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch * h * num_splits, dtype=torch.float32, device=q.device)
    if batch == 0:
        return out
    _decode_kernel[(batch, hk, num_splits)](
        q, kv_layer, page_table, pt_stride, seq_lens, out, part_o, part_lse,
        q.stride(0), out.stride(0), kv_layer.stride(0), hk * d, page_size, scale * LOG2E,
        NUM_HEADS=h, GROUP=group, HEAD_DIM=d, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=block_n, DIRECT=direct, PRECISION=precision, num_warps=4, num_stages=2)
    if not direct:
        _merge_kernel[(batch, h)](part_o, part_lse, out, out.stride(0), num_splits, NUM_HEADS=h, HEAD_DIM=d,
                                  BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1)
    return out
