"""RMSNorm weights; the norm itself (fused with the residual add) is one of the step's ``Ops``."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ops) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual = x + residual`` (``x`` when None), normalised; returns ``(normed, residual)``."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
