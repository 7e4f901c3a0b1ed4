"""Element-wise kernels of the quantized CPU path (numba): the ``Ops`` bundle's add+RMSNorm, SiLU-and-mul
and rotary+KV store, each one pass over its rows on the calling thread.

The torch references (``kernels/reference.py``) take 2-5 small torch ops each (a dozen per layer at
batch 1, each with its own dispatch and allocation); here each is one numba call. Same semantics as
the Triton kernels: ``add_rms_norm`` adds ``x`` into ``residual`` in place, ``rope_store`` rotates q
in place inside ``qkv`` and writes the rotated K and V to their cache slots. Results match the
references to float32 rounding (sums in another order). Models with per-head q/k norms (Qwen3) take
the reference rope path.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from .rotary import StepRope


@njit(fastmath=True, nogil=True, cache=True)
def _add_rms_norm(x, res, w, eps, out):
    """``res += x`` (rows of ``[T, N]``), ``out = res / rms(res) * w``."""
    t, n = x.shape
    for r in range(t):
        ss = np.float32(0.0)
        for j in range(n):
            v = x[r, j] + res[r, j]
            res[r, j] = v
            ss += v * v
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for j in range(n):
            out[r, j] = res[r, j] * inv * w[j]


@njit(fastmath=True, nogil=True, cache=True)
def _rms_norm(x, w, eps, out):
    t, n = x.shape
    for r in range(t):
        ss = np.float32(0.0)
        for j in range(n):
            ss += x[r, j] * x[r, j]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for j in range(n):
            out[r, j] = x[r, j] * inv * w[j]


@njit(fastmath=True, nogil=True, cache=True)
def _silu_and_mul(gate_up, out):
    t, n = out.shape
    for r in range(t):
        for j in range(n):
            g = gate_up[r, j]
            out[r, j] = g / (np.float32(1.0) + np.exp(-g)) * gate_up[r, n + j]


@njit(fastmath=True, nogil=True, cache=True)
def _rope_store(qkv, positions, cos_sin, kv, slots, heads, kv_heads, dim):
    """Rotate the q and k heads of each row of ``qkv`` (interleaved pairs) in place; copy K|V to ``kv[slot]``."""
    half = dim // 2
    q_end = heads * dim
    kv_width = 2 * kv_heads * dim
    for r in range(qkv.shape[0]):
        p = positions[r]
        for h in range(heads + kv_heads):
            base = h * dim
            for i in range(half):
                c, s = cos_sin[p, i], cos_sin[p, half + i]
                x0, x1 = qkv[r, base + 2 * i], qkv[r, base + 2 * i + 1]
                qkv[r, base + 2 * i] = x0 * c - x1 * s
                qkv[r, base + 2 * i + 1] = x0 * s + x1 * c
        slot = slots[r]
        for j in range(kv_width):
            kv[slot, j] = qkv[r, q_end + j]


def _rows(t: torch.Tensor) -> np.ndarray:
    """A ``[T, N]`` float32 tensor as a numpy view (copied only when not contiguous)."""
    return t.reshape(-1, t.shape[-1]).contiguous().numpy()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` in place (``residual = x`` when None), then RMSNorm of it; returns both."""
    out = torch.empty(x.shape)
    if residual is None:
        _rms_norm(_rows(x), weight.numpy(), np.float32(eps), out.numpy().reshape(-1, x.shape[-1]))
        return out, x
    _add_rms_norm(_rows(x), residual.numpy().reshape(-1, x.shape[-1]), weight.numpy(), np.float32(eps),
                  out.numpy().reshape(-1, x.shape[-1]))
    return out, residual


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) -> ``silu(gate) * up``, ``[T, I]``."""
    out = torch.empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _silu_and_mul(_rows(gate_up), out.numpy())
    return out


def rope_store(qkv: torch.Tensor, rope: StepRope, kv_layer: torch.Tensor, slots: torch.Tensor, h: int, hk: int,
               d: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, eps: float) -> None:
    """Rotary on q and k (q in place inside ``qkv``) and K/V into ``kv_layer`` (``[S, 2, Hkv, D]``) at ``slots``."""
    if q_norm is not None:  # per-head q/k norms (Qwen3): the reference
        from ..kernels import reference as ref

        ref.rope_store(qkv, rope.cis, kv_layer, slots, h, hk, d, q_norm, k_norm, eps)
        return
    _rope_store(qkv.numpy(), rope.positions.numpy(), rope.cos_sin.numpy(),
                kv_layer.numpy().reshape(kv_layer.shape[0], -1), slots.numpy(), h, hk, d)


def warm_up() -> None:
    """Load (or compile) the kernels before the first request."""
    x = torch.ones(1, 64)
    add_rms_norm(x, None, torch.ones(64), 1e-6)
    add_rms_norm(x.clone(), x.clone(), torch.ones(64), 1e-6)
    silu_and_mul(torch.ones(1, 64))
    _rope_store(np.ones((1, 24), np.float32), np.zeros(1, np.int64), np.ones((2, 8), np.float32),
                np.zeros((2, 16), np.float32), np.zeros(1, np.int64), 1, 1, 8)
