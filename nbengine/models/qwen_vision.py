"""Qwen2.5-VL's vision tower: patches -> ViT blocks (window / full attention, 2-D rotary) -> merger.

Reads top to bottom for one image of ``grid = (t, h, w)`` patches (``N = t*h*w`` rows of
``3 * temporal_patch * patch * patch`` pixels, as the image processor lays them out, each
``merge x merge`` block of patches contiguous):

patch embedding (a linear map: the conv's kernel equals its stride) -> rows reordered so each
attention window is contiguous -> blocks (RMSNorm, attention inside a window, or inside the whole
frame for the ``fullatt_block_indexes``, RMSNorm, SwiGLU MLP) -> merger (RMSNorm, each
``merge x merge`` block concatenated, MLP to the decoder's width) -> rows back in raster order.
Output: ``N / merge^2`` embeddings of the decoder's hidden size, one per image token.
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


class NormWeight(nn.Module):
    """An RMSNorm's weight (the norm is :func:`_rms`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)


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


class VisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, inter: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = NormWeight(dim), NormWeight(dim)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionMLP(dim, inter)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_rms(x, self.norm1.weight), cos, sin, groups)
        return x + self.mlp(_rms(x, self.norm2.weight))


class Merger(nn.Module):
    def __init__(self, dim: int, out_dim: int, merge: int) -> None:
        super().__init__()
        self.wide = dim * merge * merge
        self.ln_q = NormWeight(dim)
        self.mlp = nn.Sequential(nn.Linear(self.wide, self.wide), nn.GELU(), nn.Linear(self.wide, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(_rms(x, self.ln_q.weight).view(-1, self.wide))


class QwenVisionTower(nn.Module):
    def __init__(self, vc: dict) -> None:
        super().__init__()
        self.dim, self.heads = vc["hidden_size"], vc["num_heads"]
        self.patch, self.tpatch = vc.get("patch_size", 14), vc.get("temporal_patch_size", 2)
        self.merge = vc.get("spatial_merge_size", 2)
        self.window = vc.get("window_size", 112) // self.merge // self.patch  # in merged units
        self.full_blocks = set(vc.get("fullatt_block_indexes", []))
        theta = (vc.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(3 * self.tpatch * self.patch * self.patch, self.dim, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(self.dim, self.heads, vc["intermediate_size"]) for _ in range(vc["depth"]))
        self.merger = Merger(self.dim, vc["out_hidden_size"], self.merge)
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
