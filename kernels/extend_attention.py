"""Extend (prefill) attention: new tokens attend to their sequence's cached prefix and, causally,
to each other — one online softmax over both.

The new tokens' K/V are already in the cache (the rope/store kernel writes them first), so both
parts are read from the pages: tiles wholly before the query block's first position need no
mask (the cached prefix, and earlier new tokens), the tiles after it get the causal mask.
Grid ``(sequences, heads, query blocks)``; a block past its sequence's new tokens does nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .decode_attention import LOG2E


@triton.jit
def _attend_tile(q, acc, m_i, l_i, kv_base, pt_row, start, q_pos, seq_len, page_size, stride_slot, v_offset,
                 d, d_mask, scale_log2, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < seq_len
    page = tl.load(pt_row + n // page_size, mask=n_mask, other=0).to(tl.int64)
    slot = page * page_size + n % page_size
    k_t = tl.load(kv_base + slot[None, :] * stride_slot + d[:, None], mask=n_mask[None, :] & d_mask[:, None],
                  other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
    if CAUSAL:
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # a row with nothing visible yet stays empty
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(kv_base + v_offset + slot[:, None] * stride_slot + d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["first_seq"])  # varies per step: one compiled variant for all values
def _extend_kernel(q_ptr, kv_ptr, pt_ptr, pt_stride_ptr, seq_lens_ptr, q_starts_ptr, out_ptr, first_seq,
                   stride_q, stride_o, stride_slot, v_offset, page_size, scale_log2,
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    b = (first_seq + tl.program_id(0)).to(tl.int64)
    h = tl.program_id(1)
    block = tl.program_id(2)
    q0 = tl.load(q_starts_ptr + b)
    q_len = tl.load(q_starts_ptr + b + 1) - q0
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len
    pt_row = pt_ptr + b * tl.load(pt_stride_ptr)

    m = block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < q_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    rows = (q0 + m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_q + h * HEAD_DIM + d[None, :], mask=m_mask[:, None] & d_mask[None, :],
                other=0.0)
    q_pos = prefix + m

    # keys [0, first_q_pos] are visible to every row of the block; whole tiles of them need no mask
    active = block * BLOCK_M < q_len
    first_q_pos = prefix + block * BLOCK_M
    full_end = tl.where(active, (first_q_pos + 1) // BLOCK_N * BLOCK_N, 0)
    end = tl.where(active, tl.minimum(seq_len, first_q_pos + BLOCK_M), 0)

    kv_base = kv_ptr + (h // GROUP) * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kv_base, pt_row, start, q_pos, seq_len, page_size,
                                     stride_slot, v_offset, d, d_mask, scale_log2, BLOCK_N, False, PRECISION)
    for start in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, kv_base, pt_row, start, q_pos, seq_len, page_size,
                                     stride_slot, v_offset, d, d_mask, scale_log2, BLOCK_N, True, PRECISION)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_o + h * HEAD_DIM + d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & d_mask[None, :])


def _tiles(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head size, dtype and GPU."""
    if interpreting():
        return 16, 16, 4, 1  # small tiles: fast on CPU, and small test shapes still span several tiles
    if dtype == torch.float32 or torch.cuda.get_device_capability(device)[0] < 8:
        return 64, 32, 4, 1  # float32 (tests) and Turing (T4): less shared memory, quick to compile
    # 64-row query blocks: a 1,024-token prompt gives heads x 16 programs; with 128-row blocks (heads x 8,
    # under one wave on an H200) the causal loops were latency-bound at ~50 TFLOP/s
    return 64, 64, 4, 2


def extend_attention(q: torch.Tensor, kv_layer: torch.Tensor, page_table: torch.Tensor, pt_stride: torch.Tensor,
                     seq_lens: torch.Tensor, q_starts: torch.Tensor, out: torch.Tensor, page_size: int,
                     first_seq: int, num_seqs: int, max_q_len: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention for sequences ``first_seq .. first_seq+num_seqs-1`` of a ragged batch.

    q ``[T, H*D]`` (rows may be strided); sequence ``b``'s new tokens are rows
    ``q_starts[b]:q_starts[b+1]`` (int32 ``[B+1]``) and its context is ``seq_lens[b]`` tokens,
    already in the cache. ``max_q_len`` bounds the new tokens of one sequence (sizes the grid).
    Writes those rows of ``out`` ``[T, H*D]`` and returns it.
    """
    hk, d = kv_layer.shape[2], kv_layer.shape[3]
    h = q.shape[1] // d
    scale = d ** -0.5 if scale is None else scale
    block_m, block_n, warps, stages = _tiles(d, q.dtype, q.device)
    if num_seqs == 0 or max_q_len == 0:
        return out
    grid = (num_seqs, h, triton.cdiv(max_q_len, block_m))
    _extend_kernel[grid](
        q, kv_layer, page_table, pt_stride, seq_lens, q_starts, out, first_seq,
        q.stride(0), out.stride(0), kv_layer.stride(0), hk * d, page_size, scale * LOG2E,
        GROUP=h // hk, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages)
    return out
