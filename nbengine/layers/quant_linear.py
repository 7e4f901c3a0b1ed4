"""Block-quantized linear layers for the CPU, and the pass that puts them into a loaded model.

``QuantLinear`` holds a weight in llama.cpp's ``q4_1`` or ``q8_0`` block format (see
``quant_kernels``) and multiplies it with float32 activations quantized per row and block of 32
to int8. ``quantize_linears`` swaps every :class:`~nbengine.layers.linear.Linear` of a loaded
model for one, choosing each layer's format with a callback (the LM head gets ``q8_0``).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .linear import Linear

logger = logging.getLogger("nbengine")

QUANT_FORMATS = ("q8_0", "q4_1")
QK = 32
_ROWS_PER_CHUNK = 4096  # rows quantized at a time (bounds the temporaries for large LM heads)


# ------------------------------------------------------------------ weight formats
def quantize_q8_0(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w [N, K]`` -> ``qs`` int8 ``[N, K]`` and scale ``d [N, K/32]`` (``w ~ d * q``, round to nearest)."""
    n, k = w.shape
    qs = torch.empty(n, k, dtype=torch.int8)
    d = torch.empty(n, k // QK)
    for r0 in range(0, n, _ROWS_PER_CHUNK):
        blocks = w[r0 : r0 + _ROWS_PER_CHUNK].float().reshape(-1, k // QK, QK)
        amax = blocks.abs().amax(-1)
        scale = amax / 127
        inv = torch.where(amax > 0, 1.0 / scale, torch.zeros_like(scale))
        qs[r0 : r0 + _ROWS_PER_CHUNK] = torch.round(blocks * inv[..., None]).to(torch.int8).reshape(-1, k)
        d[r0 : r0 + _ROWS_PER_CHUNK] = scale
    return {"qs": qs, "d": d}


def quantize_q4_1(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w [N, K]`` -> nibbles ``qs`` uint8 ``[N, K/2]``, scale ``d`` and minimum ``m`` ``[N, K/32]``.

    llama.cpp's reference rounding (``q = floor((w - min) / d + 0.5)``, ``d = (max - min) / 15``), so a
    float copy of a Q4_1 checkpoint whose blocks span 0..15 quantizes back to the same integers.
    """
    n, k = w.shape
    qs = torch.empty(n, k // 2, dtype=torch.uint8)
    d = torch.empty(n, k // QK)
    m = torch.empty(n, k // QK)
    for r0 in range(0, n, _ROWS_PER_CHUNK):
        blocks = w[r0 : r0 + _ROWS_PER_CHUNK].float().reshape(-1, k // QK, QK)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        scale = (hi - lo) / 15
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = ((blocks - lo[..., None]) * inv[..., None] + 0.5).floor_().clamp_(0, 15).to(torch.uint8)
        qs[r0 : r0 + _ROWS_PER_CHUNK] = (q[..., :16] | (q[..., 16:] << 4)).reshape(-1, k // 2)
        d[r0 : r0 + _ROWS_PER_CHUNK] = scale
        m[r0 : r0 + _ROWS_PER_CHUNK] = lo
    return {"qs": qs, "d": d, "m": m}


def dequantize(fmt: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight a quantized one stands for (tests and references)."""
    n, nb = t["d"].shape
    if fmt == "q8_0":
        return (t["qs"].float().view(n, nb, QK) * t["d"][..., None]).view(n, nb * QK)
    nib = t["qs"].view(n, nb, QK // 2)
    q = torch.cat([nib & 15, nib >> 4], dim=-1).float()
    return (q * t["d"][..., None] + t["m"][..., None]).view(n, nb * QK)


_QUANTIZERS = {"q8_0": quantize_q8_0, "q4_1": quantize_q4_1}


def pack_for_kernels(fmt: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Row-block tensors (as quantized above) -> the kernels' column groups of 8 outputs (``quant_kernels``)."""
    n, nb = t["d"].shape
    k = nb * QK
    scales = {name: t[name].view(n // 8, 8, nb).transpose(1, 2).contiguous() for name in ("d", "m") if name in t}
    if fmt == "q8_0":
        qs = t["qs"].view(n // 8, 8, k // 2, 2).transpose(1, 2)  # [group, 2 inputs, out, 2]
    else:
        nib = t["qs"].view(n, nb, QK // 2)
        q = torch.cat([nib & 15, nib >> 4], dim=-1).view(n // 8, 8, k // 8, 2, 4)  # [group, out, 8 inputs]
        qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).transpose(1, 2)  # inputs 0-3 low nibbles, 4-7 high
    return {"qs": qs.reshape(n // 8, -1).contiguous(), **scales}


# ------------------------------------------------------------------ the layer
class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` block-quantized (packed by :func:`pack_for_kernels`); ``x`` float32 ``[T, K]``."""

    def __init__(self, fmt: str, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None) -> None:
        super().__init__()
        from . import quant_kernels as qk

        if fmt not in QUANT_FORMATS:
            raise ValueError(f"unknown quantized format {fmt!r}; known: {QUANT_FORMATS}")
        self.fmt = fmt
        groups, nb, _ = tensors["d"].shape
        self.out_features, self.in_features = groups * 8, nb * QK
        for name, t in tensors.items():
            self.register_buffer(name, t.contiguous(), persistent=False)
        self.bias = bias
        self._kernel = qk.linear_q4_1 if fmt == "q4_1" else qk.linear_q8_0
        self._weights = tuple(getattr(self, name).numpy() for name in ("qs", "d", "m") if name in tensors)

    @classmethod
    def from_weight(cls, fmt: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "QuantLinear":
        bias = None if bias is None else bias.detach().float().clone()
        return cls(fmt, pack_for_kernels(fmt, _QUANTIZERS[fmt](weight.detach())), bias)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.empty(x2.shape[0], self.out_features)
        self._kernel(x2.numpy(), *self._weights, out.numpy())
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features)


# ------------------------------------------------------------------ the pass
def quantize_linears(model: nn.Module, choose: Callable[[str, Linear], str | None],
                     stored: dict[str, tuple[str, dict[str, torch.Tensor]]] | None = None
                     ) -> tuple[dict[str, int], dict[str, tuple[str, dict[str, torch.Tensor]]]]:
    """Replace each :class:`Linear` of ``model`` by a :class:`QuantLinear` in the format ``choose(name, linear)``
    returns (``None`` keeps it float). ``stored`` maps layer names to ``(format, tensors)`` quantized
    earlier (a disk cache); layers found there are not quantized again. A layer registered under
    several names (a tied or aliased head) is quantized once.

    Returns how many layers got each format, and every layer's ``(format, tensors)`` (for the cache).
    """
    stored = stored or {}
    done: dict[int, nn.Module] = {}
    counts: dict[str, int] = {}
    result: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, Linear):
                continue
            if id(child) not in done:
                full = f"{parent_name}.{name}" if parent_name else name
                fmt = choose(full, child) if child.in_features % QK == 0 and child.out_features % 8 == 0 else None
                if fmt is None:
                    done[id(child)] = child
                else:
                    prev = stored.get(full)
                    tensors = (prev[1] if prev is not None and prev[0] == fmt
                               else pack_for_kernels(fmt, _QUANTIZERS[fmt](child.weight.detach())))
                    bias = None if child.bias is None else child.bias.detach().float().clone()
                    done[id(child)] = QuantLinear(fmt, tensors, bias)
                    result[full] = (fmt, tensors)
                counts[fmt or "float"] = counts.get(fmt or "float", 0) + 1
            setattr(parent, name, done[id(child)])
    return counts, result
