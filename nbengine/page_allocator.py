"""PageAllocator: which KV pages are free, which are held (and by how many), which are cached.

Pages are ids ``1 .. num_pages - 1`` (page 0 is the storage's scratch page). Every page is in
exactly one of three states:

- **held**: one or more sequences reference it (``refcount > 0``); never evicted.
- **cached**: no sequence holds it but the prefix cache can still hand its K/V to a later
  request; kept in least-recently-used order and taken back (evicted) only when the free
  list runs dry.
- **free**: holds nothing anyone will read.

The free list stops handing out warm cached pages first: a released page that the prefix
cache knows goes to the LRU set, not to the free list, and allocation takes free pages before
it evicts any cached one. Only the engine thread touches this object.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 2:
            raise ValueError(f"the KV pool needs at least 2 pages, got {num_pages}; raise max_total_tokens.")
        self.num_pages = num_pages
        self.page_size = page_size
        self.refcount = [0] * num_pages
        # a stack: the most recently freed (already faulted-in) pages are reused first
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced cached pages, oldest first
        self.is_cached: Callable[[int], bool] = lambda page: False  # set by the prefix cache
        self.on_evict: Callable[[int], None] = lambda page: None  # the prefix cache forgets the page

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
        """Pages an allocation can get: free ones plus cached ones nobody holds (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_evictable_pages(self) -> int:
        return len(self._cached)

    @property
    def num_used_pages(self) -> int:
        """Pages held by running sequences."""
        return self.capacity_pages - self.num_free_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free_pages:
            raise RuntimeError(f"KV pool out of pages: asked for {n}, {self.num_free_pages} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:  # evict the least recently used cached page
                page, _ = self._cached.popitem(last=False)
                self.on_evict(page)
            self.refcount[page] = 1
            pages.append(page)
        return pages

    def grow(self, pages: list[int], num_tokens: int) -> bool:
        """Extend ``pages`` in place to hold ``num_tokens`` tokens; False if the pool is short."""
        need = self.pages_needed(num_tokens) - len(pages)
        if need <= 0:
            return True
        if need > self.num_free_pages:
            return False
        pages.extend(self.allocate(need))
        return True

    def share(self, pages: list[int]) -> None:
        """One more reference to each of ``pages`` (a cache hit or a fork); a cached page leaves the LRU set."""
        for page in pages:
            if self.refcount[page] == 0:
                del self._cached[page]
            self.refcount[page] += 1

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page (the sequence's own); empties ``pages``.

        Released last page first, so that the deeper pages of a prefix are older in the LRU order
        and evicted before the pages they extend."""
        for page in reversed(pages):
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if self.is_cached(page):
                    self._cached[page] = None
                else:
                    self._free.append(page)
        pages.clear()

    def uncache(self, page: int) -> None:
        """The prefix cache forgot ``page`` (a flush): if nobody holds it, it is free now."""
        if page in self._cached:
            del self._cached[page]
            self._free.append(page)
