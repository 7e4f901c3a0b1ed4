"""SiLU-and-mul: ``silu(gate) * up`` from the fused gate/up projection, one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # torch's silu rounds to the tensor dtype
    tl.store(out_ptr + row * stride_o + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) -> ``[T, I]``."""
    t, two_i = gate_up.shape
    i = two_i // 2
    out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(i))
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(i, block))](gate_up, out, gate_up.stride(0), out.stride(0), i,
                                                         BLOCK=block, num_warps=4)
    return out
