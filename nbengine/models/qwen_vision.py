"""Qwen2.5-VL's (and Qwen2-VL's) vision tower: patches -> ViT blocks (window / full attention, 2-D
rotary) -> merger.

Reads top to bottom for one image of ``grid = (t, h, w)`` patches (``N = t*h*w`` rows of
``3 * temporal_patch * patch * patch`` pixels, as the image processor lays them out, each
``merge x merge`` block of patches contiguous):

patch embedding (a linear map: the conv's kernel equals its stride) -> rows reordered so each
attention window is contiguous -> blocks (RMSNorm, attention inside a window, or inside the whole
frame for the ``fullatt_block_indexes``, RMSNorm, SwiGLU MLP) -> merger (RMSNorm, each
``merge x merge`` block concatenated, MLP to the decoder's width) -> rows back in raster order.
Output: ``N / merge^2`` embeddings of the decoder's hidden size, one per image token.

Qwen2-VL's older tower (``legacy=True``) differs only in its parts: LayerNorm instead of RMSNorm, a
``fc1 -> quick_gelu -> fc2`` MLP, full attention in every block, and its config names the width
``embed_dim`` (its ``hidden_size`` is the decoder's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class VisionNorm(nn.Module):
    """RMSNorm (Qwen2.5-VL) or LayerNorm with a bias (Qwen2-VL), eps 1e-6."""

    def __init__(self, dim: int, layer_norm: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(dim), requires_grad=False) if layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-6)
        return _rms(x, self.weight)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``x`` ``[N, dim]``; rows attend to the rows of their own group (``groups`` ``[N]``, contiguous runs)."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.heads, self.head_dim).unbind(1)
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(x.dtype)  # rotate-half layout, as trained
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(x.dtype)
        mask = groups[:, None] == groups[None, :]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, inter), nn.Linear(dim, inter)
        self.down_proj = nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LegacyVisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> quick_gelu -> fc2."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inter), nn.Linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int, legacy: bool = False) -> None:
        super().__init__()
        self.norm1, self.norm2 = VisionNorm(dim, legacy), VisionNorm(dim, legacy)
        self.attn = VisionAttention(dim, heads)
        self.mlp = LegacyVisionMLP(dim, inter) if legacy else VisionMLP(dim, inter)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, dim: int, out_dim: int, merge: int, legacy: bool = False) -> None:
        super().__init__()
        self.wide = dim * merge * merge
        self.ln_q = VisionNorm(dim, legacy)
        self.mlp = nn.Sequential(nn.Linear(self.wide, self.wide), nn.GELU(), nn.Linear(self.wide, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.wide))


class QwenVisionTower(nn.Module):
    def __init__(self, vc: dict, legacy: bool = False) -> None:
        """``legacy``: Qwen2-VL's tower (see the module docstring)."""
        super().__init__()
        self.heads = vc["num_heads"]
        self.dim = vc["embed_dim"] if legacy else vc["hidden_size"]
        out = vc["hidden_size"] if legacy else vc["out_hidden_size"]
        inter = int(self.dim * vc.get("mlp_ratio", 4)) if legacy else vc["intermediate_size"]
        self.patch, self.tpatch = vc.get("patch_size", 14), vc.get("temporal_patch_size", 2)
        self.merge = vc.get("spatial_merge_size", 2)
        if legacy:  # one window holding the whole frame; every block attends over it
            self.window, self.full_blocks = 1 << 20, set(range(vc["depth"]))
        else:
            self.window = vc.get("window_size", 112) // self.merge // self.patch  # in merged units
            self.full_blocks = set(vc.get("fullatt_block_indexes", []))
        theta = (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(3 * self.tpatch * self.patch * self.patch, self.dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(self.dim, self.heads, inter, legacy) for _ in range(vc["depth"]))
        self.merger = Merger(self.dim, out, self.merge, legacy)
        half = self.dim // self.heads // 2  # rows turn one half of the head's pairs, columns the other
        # a plain float32 tensor, not a buffer: the model's dtype cast must not round it
        self.inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float) / half)

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """``name`` relative to the tower (``blocks.0.attn.qkv.weight``); the patch conv becomes a matrix."""
        if name == "patch_embed.proj.weight":
            tensor = tensor.reshape(tensor.shape[0], -1)
        param = self.get_parameter(name)
        if param.shape != tensor.shape:
            raise ValueError(f"shape mismatch for visual.{name}: checkpoint {tuple(tensor.shape)}, "
                             f"model {tuple(param.shape)}")
        param.data.copy_(tensor)

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``pixels`` ``[sum N_i, 3*tp*p*p]`` of the images with ``grids`` -> ``[sum N_i / merge^2, out]``."""
        outs, at = [], 0
        for grid in grids:
            n = grid[0] * grid[1] * grid[2]
            outs.append(self._one(pixels[at:at + n], grid))
            at += n
        return torch.cat(outs)

    def _one(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        m, unit = self.merge, self.merge * self.merge
        order, windows, frames = self._layout(t, h // m, w // m, pixels.device)  # per merged unit
        x = self.patch_embed.proj(pixels.to(self.dtype))
        x = x.view(-1, unit, self.dim)[order].reshape(-1, self.dim)
        cos, sin = self._rotary(t, h, w, pixels.device)
        cos = cos.view(-1, unit, cos.shape[-1])[order].reshape(-1, 1, cos.shape[-1])
        sin = sin.view(-1, unit, sin.shape[-1])[order].reshape(-1, 1, sin.shape[-1])
        windows, frames = windows.repeat_interleave(unit), frames.repeat_interleave(unit)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, frames if i in self.full_blocks else windows)
        out = self.merger(x)
        return out[torch.argsort(order)]

    def _layout(self, t: int, gh: int, gw: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the ``t x gh x gw`` merged units in raster order: the order that makes every window
        (``window x window`` units of one frame) contiguous, and each reordered unit's window and frame ids."""
        ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        ti, hi, wi = ti.flatten(), hi.flatten(), wi.flatten()
        s = self.window
        nwh, nww = -(-gh // s), -(-gw // s)
        window = (ti * nwh + hi // s) * nww + wi // s
        key = (window * s + hi % s) * s + wi % s  # window first, then raster inside it
        order = torch.argsort(key)
        return order.to(device), window[order].to(device), ti[order].to(device)

    def _rotary(self, t: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / sin ``[t*h*w, head_dim]`` of each patch's (row, column), patches in the processor's order
        (``merge x merge`` blocks contiguous)."""
        m = self.merge
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        hh = hh.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
        ww = ww.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
        inv = self.inv_freq.to(device)
        freqs = torch.cat([hh.to(device)[:, None] * inv, ww.to(device)[:, None] * inv], dim=-1).repeat(t, 1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()
