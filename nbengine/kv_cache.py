"""The paged KV pool: a fixed set of pages, a free list, and the K/V storage tensors."""

from __future__ import annotations

import logging
import torch

logger = logging.getLogger("nbengine")


class KVPool:
    """``num_pages`` pages of ``page_size`` token slots each, for every layer.

    Storage is one tensor per layer of shape ``[num_pages * page_size, 2, num_kv_heads, head_dim]``
    (K at ``[:, 0]``, V at ``[:, 1]``); token slot ``s`` of a sequence lives at
    ``page_table[s // page_size] * page_size + s % page_size``. Page 0 is reserved as a scratch
    page that padded rows point at, so real pages are ``1 .. num_pages - 1``.
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
        # a stack: the most recently freed (cache-warm, already faulted-in) pages are reused first
        self._free: list[int] = list(range(num_pages - 1, 0, -1))

    # -------------------------------------------------------------- accounting
    @property
    def capacity_pages(self) -> int:
        """Pages a request may use (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_pages * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.capacity_pages - len(self._free)

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    # ----------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"KV pool out of pages: asked for {n}, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)
        pages.clear()

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Extend ``pages`` in place to hold ``num_tokens`` tokens; False if the pool is short."""
        need = self.pages_needed(num_tokens) - len(pages)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        pages.extend(self.allocate(need))
        return True

    def release(self) -> None:
        """Drop the storage (shutdown)."""
        self.kv = []
        self._free.clear()
