"""Rotary position embedding on the *interleaved* layout.

The model loaders permute each head's q/k rows from the HF "rotate half" order
``[x0..x{d/2-1}, y0..y{d/2-1}]`` to pairs ``[x0, y0, x1, y1, ...]``. Attention scores are
unchanged (q and k are permuted alike), and the rotation becomes one complex multiply. The
rotation itself runs in ``nbengine.kernels`` (``reference.apply_rotary_`` on the torch path, fused
with the KV store on the Triton path); this module holds the per-position table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "mrope")  # mrope: default frequencies, 3-D positions


def interleave_rows(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows (dim 0) from rotate-half order to interleaved pairs."""
    rest = w.shape[1:]
    w = w.reshape(num_heads, 2, head_dim // 2, *rest).transpose(1, 2)
    return w.reshape(num_heads * head_dim, *rest)


def rope_type(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    """Raise ``UnsupportedModelError`` for a rope scaling this module does not implement."""
    kind = rope_type(scaling)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported (positions would be rotated wrongly and the output "
            f"would be garbage); supported: {SUPPORTED_ROPE_TYPES}.")


def inv_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    check_rope_scaling(scaling)
    kind = rope_type(scaling)
    if kind in ("default", "mrope"):  # M-RoPE changes which position each pair turns by, not the frequencies
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    # llama3 (check_rope_scaling admitted no other type)
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(is_mid, mid, scaled)


class Rotary:
    """Holds the rotation table; :meth:`for_step` once per step gives what the kernels need."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device) -> None:
        inv = inv_frequencies(head_dim, theta, scaling)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv)
        self.cis = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(device)  # [P, d/2]
        self.max_positions = max_positions
        self._cos_sin: torch.Tensor | None = None

    @property
    def cos_sin(self) -> torch.Tensor:
        """``[P, head_dim]`` float32: cos of each pair's angle, then sin (the Triton kernels' table)."""
        if self._cos_sin is None:
            self._cos_sin = torch.cat([self.cis.real, self.cis.imag], dim=-1).contiguous()
        return self._cos_sin

    def for_step(self, positions: torch.Tensor, mrope_positions: torch.Tensor | None = None,
                 mrope_section: list[int] | None = None) -> "StepRope":
        """``mrope_positions`` ``[3, T]`` (M-RoPE models, steps with image tokens) replace ``positions``."""
        return StepRope(positions, self, mrope_positions, mrope_section)


@dataclass
class StepRope:
    """One step's rotary inputs: positions, and (for the torch path) their rotations, looked up once.

    M-RoPE (Qwen2-VL): ``mrope`` ``[3, T]`` temporal / height / width positions; pair ``j`` turns by the
    row of its section in ``mrope_section``. Steps without image tokens leave it None (the three rows
    would be equal, and ``positions`` already holds them)."""

    positions: torch.Tensor
    table: Rotary
    mrope: torch.Tensor | None = None
    mrope_section: list[int] | None = None
    _cis: torch.Tensor | None = field(default=None, repr=False)

    @property
    def cis(self) -> torch.Tensor:
        """``[T, 1, head_dim/2]`` complex64 rotations of this step's positions."""
        if self._cis is None:
            if self.mrope is not None:
                from ..kernels.reference import mrope_select

                rows = self.table.cis.index_select(0, self.mrope.reshape(-1).long())
                self._cis = mrope_select(rows.view(3, -1, 1, rows.shape[-1]), self.mrope_section)
            else:
                self._cis = self.table.cis.index_select(0, self.positions).unsqueeze(1)
        return self._cis

    @property
    def cos_sin(self) -> torch.Tensor:
        return self.table.cos_sin
