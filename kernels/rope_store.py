"""KV store by slot mapping, fused with the per-head q/k RMSNorm (Qwen3) and rotary embedding.

One program per (token, head): a q head is normalised and rotated in place inside ``qkv``; a kv
head's K is normalised and rotated and, with its V, written to the token's KV slot. A negative slot
(a padded row of a CUDA graph) writes nothing. Rotary is on the interleaved layout and reads a
``[positions, D]`` float32 table of ``cos | sin`` (any scaling, llama3 included, is in the table).

M-RoPE (Qwen2-VL / Qwen2.5-VL): with ``mrope_positions`` ``[3, T]`` (temporal, height, width) each
rotary pair ``j`` turns by the position of its section: pairs ``[0, s0)`` by the temporal row,
``[s0, s0 + s1)`` by the height row, the rest by the width row (``mrope_section = [s0, s1, s2]``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _norm_rope(e, o, w_ptr, cos, sin, half, half_mask, eps, head_dim, dtype: tl.constexpr,
               NORM: tl.constexpr, ROPE: tl.constexpr):
    """e, o: [HALF] float32 even / odd elements of one head. Returns them normed and rotated."""
    if NORM:
        rstd = 1.0 / tl.sqrt((tl.sum(e * e, axis=0) + tl.sum(o * o, axis=0)) / head_dim + eps)
        w_e = tl.load(w_ptr + 2 * half, mask=half_mask, other=0.0).to(tl.float32)
        w_o = tl.load(w_ptr + 2 * half + 1, mask=half_mask, other=0.0).to(tl.float32)
        # rounded as the reference rounds: normed.to(dtype) * weight, stored in dtype
        e = ((e * rstd).to(dtype).to(tl.float32) * w_e).to(dtype).to(tl.float32)
        o = ((o * rstd).to(dtype).to(tl.float32) * w_o).to(dtype).to(tl.float32)
    if ROPE:
        re = e * cos - o * sin
        ro = e * sin + o * cos
        e = re
        o = ro
    return e, o


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, slot_ptr, kv_ptr, q_norm_ptr, k_norm_ptr,
                       stride_q, stride_k, stride_v, stride_slot, v_offset, eps, stride_mrope, sec0, sec01,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       HALF: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr, MROPE: tl.constexpr):
    """Grid (tokens, NUM_HEADS + NUM_KV_HEADS): one head of one token per program."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = tl.arange(0, HALF)
    half_mask = half < HEAD_DIM // 2
    dtype = kv_ptr.dtype.element_ty
    cos = tl.zeros([HALF], tl.float32)
    sin = tl.zeros([HALF], tl.float32)
    if ROPE:
        if MROPE:  # pos_ptr is [3, T]: each pair takes the row of its section (sec0, sec01: section ends)
            p_t = tl.load(pos_ptr + t).to(tl.int64)
            p_h = tl.load(pos_ptr + stride_mrope + t).to(tl.int64)
            p_w = tl.load(pos_ptr + 2 * stride_mrope + t).to(tl.int64)
            pos = tl.where(half < sec0, p_t, tl.where(half < sec01, p_h, p_w))
        else:
            pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + half, mask=half_mask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + HEAD_DIM // 2 + half, mask=half_mask, other=0.0)
    if head < NUM_HEADS:  # a q head: normed and rotated in place
        ptr = q_ptr + t * stride_q + head * HEAD_DIM + 2 * half
        e = tl.load(ptr, mask=half_mask, other=0.0).to(tl.float32)
        o = tl.load(ptr + 1, mask=half_mask, other=0.0).to(tl.float32)
        e, o = _norm_rope(e, o, q_norm_ptr, cos, sin, half, half_mask, eps, HEAD_DIM, dtype, NORM, ROPE)
        tl.store(ptr, e.to(dtype), mask=half_mask)
        tl.store(ptr + 1, o.to(dtype), mask=half_mask)
    else:  # a kv head: K normed and rotated, K and V written to the token's slot
        kh = head - NUM_HEADS
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            src = k_ptr + t * stride_k + kh * HEAD_DIM + 2 * half
            ke = tl.load(src, mask=half_mask, other=0.0).to(tl.float32)
            ko = tl.load(src + 1, mask=half_mask, other=0.0).to(tl.float32)
            ke, ko = _norm_rope(ke, ko, k_norm_ptr, cos, sin, half, half_mask, eps, HEAD_DIM, dtype, NORM, ROPE)
            dst = kv_ptr + slot * stride_slot + kh * HEAD_DIM + 2 * half
            tl.store(dst, ke.to(dtype), mask=half_mask)
            tl.store(dst + 1, ko.to(dtype), mask=half_mask)
            d = tl.arange(0, 2 * HALF)
            v = tl.load(v_ptr + t * stride_v + kh * HEAD_DIM + d, mask=d < HEAD_DIM, other=0.0)
            tl.store(kv_ptr + slot * stride_slot + v_offset + kh * HEAD_DIM + d, v.to(dtype), mask=d < HEAD_DIM)


def _launch(q, k, v, positions, cos_sin, slots, kv_layer, num_heads, num_kv_heads, head_dim,
            q_norm, k_norm, eps, rope: bool, mrope_positions=None, mrope_section=None) -> None:
    t = k.shape[0]
    if t == 0:
        return
    norm = q_norm is not None
    mrope = rope and mrope_positions is not None
    if mrope:
        positions = mrope_positions
    sec0, sec01 = (mrope_section[0], mrope_section[0] + mrope_section[1]) if mrope else (0, 0)
    _rope_store_kernel[(t, num_heads + num_kv_heads)](
        q if q is not None else k, k, v, positions if rope else slots, cos_sin if rope else kv_layer, slots, kv_layer,
        q_norm if norm else kv_layer, k_norm if norm else kv_layer,
        q.stride(0) if q is not None else 0, k.stride(0), v.stride(0), kv_layer.stride(0), num_kv_heads * head_dim, eps,
        positions.stride(0) if mrope else 0, sec0, sec01,
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HALF=triton.next_power_of_2(head_dim // 2),
        ROPE=rope, NORM=norm, MROPE=mrope, num_warps=1)


def rope_store(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, kv_layer: torch.Tensor,
               slots: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
               q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6,
               mrope_positions: torch.Tensor | None = None, mrope_section: list[int] | None = None) -> None:
    """qkv ``[T, (H+2Hkv)*D]``: q normed/rotated in place; K (normed, rotated) and V stored at ``slots``.

    The k and v columns of ``qkv`` are left as they were. ``positions``, ``slots``: ``[T]`` int.
    ``mrope_positions`` ``[3, T]`` (with ``mrope_section``) replaces ``positions`` for M-RoPE.
    """
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    _launch(qkv[:, :q_end], qkv[:, q_end:k_end], qkv[:, k_end:], positions, cos_sin, slots, kv_layer,
            num_heads, num_kv_heads, head_dim, q_norm, k_norm, eps, rope=True, mrope_positions=mrope_positions,
            mrope_section=mrope_section)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``k``, ``v`` (``[T, Hkv*D]``) into ``kv_layer`` ``[S, 2, Hkv, D]`` at ``slots`` (negative: skipped)."""
    hk, d = kv_layer.shape[2], kv_layer.shape[3]
    _launch(None, k, v, None, None, slots, kv_layer, 0, hk, d, None, None, 0.0, rope=False)
