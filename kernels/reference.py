"""Plain-torch references of every kernel in this package.

The CPU path runs these; the tests compare each Triton kernel against them. Layouts:

- ``qkv``: ``[T, (H + 2*Hkv) * D]``, one row per new token: q heads, then k heads, then v heads.
  Rotary works on the *interleaved* layout (pairs ``[x0, y0, x1, y1, ...]`` per head).
- ``kv_layer``: ``[S, 2, Hkv, D]``, one row per KV slot, K at ``[:, 0]`` and V at ``[:, 1]``;
  token ``p`` of a sequence lives at slot ``page_table[p // page_size] * page_size + p % page_size``.
- Batches are ragged: sequence ``b`` owns query rows ``q_starts[b]:q_starts[b+1]`` and has
  ``seq_lens[b]`` tokens in the cache (its cached prefix plus these new ones, already stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; in float32 for 16-bit inputs, rounded like HF's Llama."""
    if x.dtype == torch.float32:
        return torch.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual = x + residual`` (or ``x`` when None), then ``rms_norm(residual)``; returns both."""
    r = x if residual is None else x + residual
    return rms_norm(r, weight, eps), r


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) -> ``silu(gate) * up``, ``[T, I]``."""
    i = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :i]) * gate_up[:, i:]


def apply_rotary_(x: torch.Tensor, cis: torch.Tensor) -> None:
    """Rotate ``x`` (``[T, heads, D]``, interleaved pairs) in place by ``cis`` (``[T, 1, D/2]`` complex64)."""
    t, h, d = x.shape
    if x.dtype == torch.float32:
        torch.view_as_complex(x.view(t, h, d // 2, 2)).mul_(cis)
        return
    pairs = x.view(t, h, d // 2, 2)
    rot = torch.view_as_complex(pairs.float().contiguous()) * cis
    pairs.copy_(torch.view_as_real(rot).to(x.dtype))


def cis_from_cos_sin(cos_sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``[P, D]`` table of ``cos | sin`` -> the ``[T, 1, D/2]`` complex rotations at ``positions``."""
    cs = cos_sin.index_select(0, positions.long())
    half = cs.shape[1] // 2
    return torch.complex(cs[:, :half], cs[:, half:]).unsqueeze(1)


def mrope_cis_from_cos_sin(cos_sin: torch.Tensor, positions3: torch.Tensor, section: list[int]) -> torch.Tensor:
    """M-RoPE: ``positions3`` ``[3, T]`` (temporal, height, width) -> ``[T, 1, D/2]`` rotations, pair ``j``
    turned by the row of its section (``section = [s0, s1, s2]``, ``s0 + s1 + s2 = D/2``)."""
    rows = [cis_from_cos_sin(cos_sin, positions3[i]) for i in range(3)]  # 3 x [T, 1, D/2]
    return mrope_select(torch.stack(rows), section)


def mrope_select(cis3: torch.Tensor, section: list[int]) -> torch.Tensor:
    """``[3, T, 1, D/2]`` rotations at the three position rows -> ``[T, 1, D/2]``, each pair from its section's row."""
    return torch.cat([cis3[i, ..., sum(section[:i]):sum(section[: i + 1])] for i in range(3)], dim=-1)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``k``, ``v`` (``[T, Hkv*D]``) into ``kv_layer`` at ``slots`` (``[T]``, all valid)."""
    flat = kv_layer.view(kv_layer.shape[0], 2, -1)
    flat[:, 0].index_copy_(0, slots.long(), k)
    flat[:, 1].index_copy_(0, slots.long(), v)


def rope_store(qkv: torch.Tensor, cis: torch.Tensor, kv_layer: torch.Tensor, slots: torch.Tensor,
               num_heads: int, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None = None,
               k_norm: torch.Tensor | None = None, eps: float = 1e-6) -> None:
    """Per-head RMSNorm of q and k (when weights are given), rotary on q and k, K/V into the cache.

    q is rotated in place inside ``qkv`` (attention reads it from there); K and V go to their slots.
    """
    t = qkv.shape[0]
    q_end, k_end = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
    if q_norm is not None:
        q = qkv[:, :q_end].view(t, num_heads, head_dim)
        k = qkv[:, q_end:k_end].view(t, num_kv_heads, head_dim)
        q.copy_(rms_norm(q, q_norm, eps))
        k.copy_(rms_norm(k, k_norm, eps))
    apply_rotary_(qkv[:, :k_end].view(t, num_heads + num_kv_heads, head_dim), cis)
    kv_layer.view(kv_layer.shape[0], -1).index_copy_(0, slots.long(), qkv[:, q_end:])


def context_slots(page_row: torch.Tensor, length: int, page_size: int) -> torch.Tensor:
    """KV slots of positions ``0..length-1`` for one sequence's page-table row."""
    pos = torch.arange(length, device=page_row.device)
    return page_row[pos // page_size].long() * page_size + pos % page_size


def paged_attention(q: torch.Tensor, kv_layer: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
                    q_starts: torch.Tensor, page_size: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of ragged new tokens over their sequence's paged cache, one sequence at a time.

    q: ``[T, H, D]``; returns ``[T, H, D]`` in q's dtype. Query row ``i`` of sequence ``b`` sits at
    position ``seq_lens[b] - q_len + i`` and sees keys ``0 .. that position`` (decode: q_len 1).
    """
    t, h, d = q.shape
    hk = kv_layer.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros_like(q)
    starts, lens = q_starts.tolist(), seq_lens.tolist()
    for b, length in enumerate(lens):
        r0, r1 = starts[b], starts[b + 1]
        n = r1 - r0
        if n == 0:
            continue
        ctx = kv_layer.index_select(0, context_slots(page_table[b], length, page_size)).float()
        k = ctx[:, 0].repeat_interleave(h // hk, dim=1)  # [L, H, D]
        v = ctx[:, 1].repeat_interleave(h // hk, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[r0:r1].float(), k) * scale
        qpos = torch.arange(length - n, length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, float("-inf"))
        out[r0:r1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return out
