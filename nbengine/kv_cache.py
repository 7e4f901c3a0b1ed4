"""KVCache: the K/V storage tensors of the paged pool (which pages are free is ``PageAllocator``'s job)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("nbengine")


class KVCache:
    """``num_pages`` pages of ``page_size`` token slots each, for every layer.

    Storage is one tensor per layer of shape ``[num_pages * page_size, 2, num_kv_heads, head_dim]``
    (K at ``[:, 0]``, V at ``[:, 1]``); token slot ``s`` of a sequence lives at
    ``page_table[s // page_size] * page_size + s % page_size``. Page 0 is a zeroed scratch page
    that padded rows point at, so real pages are ``1 .. num_pages - 1``.
    Only the engine thread touches this object.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_pages}; raise max_total_tokens.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_layers = num_layers
        self.dtype = dtype
        self.device = device
        # Only the scratch page must be initialised: masked (padding) reads point at it, and every
        # other slot is written before it is read.
        self.kv = [
            torch.empty(num_pages * page_size, 2, num_kv_heads, head_dim, dtype=dtype, device=device)
            for _ in range(num_layers)
        ]
        for layer in self.kv:
            layer[:page_size].zero_()

    @property
    def capacity_tokens(self) -> int:
        """Token slots a request may use (all but the scratch page's)."""
        return (self.num_pages - 1) * self.page_size

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    def copy_page(self, src: int, dst: int) -> None:
        """Copy page ``src``'s K/V into page ``dst`` in every layer (copy-on-write of a shared partial page)."""
        ps = self.page_size
        for layer in self.kv:
            layer[dst * ps : (dst + 1) * ps].copy_(layer[src * ps : (src + 1) * ps])

    def release(self) -> None:
        """Drop the storage (shutdown)."""
        self.kv = []
