"""Linear layer with fused-shard loading and the fastest CPU matmul torch offers."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_threads import omp_team

logger = logging.getLogger("nbengine")


def _probe_onednn() -> bool:
    """oneDNN's linear is ~1.5x faster than F.linear for fp32 on x86 CPUs; use it when it works."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        return bool(torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5))
    except Exception:  # noqa: BLE001 - any failure means "not available on this build"
        return False


_ONEDNN_OK: bool | None = None


def onednn_available() -> bool:
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        _ONEDNN_OK = _probe_onednn()
        logger.debug("oneDNN linear available: %s", _ONEDNN_OK)
    return _ONEDNN_OK


class Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored ``[out_features, in_features]``.

    ``shards`` names the checkpoint tensors fused into this one along the output dim, e.g.
    ``{"q_proj": 576, "k_proj": 192, "v_proj": 192}``; :meth:`load_shard` copies each in.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool = False,
                 weight: nn.Parameter | None = None) -> None:
        """``weight``: use this existing parameter (tied embeddings) instead of allocating one."""
        super().__init__()
        self.in_features = in_features
        self.shards = dict(shards)
        self.out_features = sum(shards.values())
        if weight is None:
            weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        elif tuple(weight.shape) != (self.out_features, in_features):
            raise ValueError(f"a shared weight of shape {tuple(weight.shape)} cannot serve as "
                             f"[{self.out_features}, {in_features}]")
        self.weight = weight
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.use_onednn = False

    def shard_slice(self, shard: str) -> slice:
        start = 0
        for name, size in self.shards.items():
            if name == shard:
                return slice(start, start + size)
            start += size
        raise KeyError(shard)

    def load_shard(self, shard: str, tensor: torch.Tensor, is_bias: bool = False) -> None:
        target = (self.bias if is_bias else self.weight)[self.shard_slice(shard)]
        if target.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {shard}: checkpoint {tuple(tensor.shape)}, model {tuple(target.shape)}")
        target.copy_(tensor)

    def finalize(self) -> None:
        """Pick the matmul backend once weights are on their device and dtype."""
        w = self.weight
        self.use_onednn = w.device.type == "cpu" and w.dtype == torch.float32 and onednn_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_onednn and x.dim() == 2:
            return omp_team.wide(torch.ops.mkldnn._linear_pointwise, x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
