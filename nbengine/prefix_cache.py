"""PrefixCache: full KV pages found again by the token ids they hold (a page-granular hash chain).

A page is known by the pair ``(parent, tokens)``: the id of the node for the page before it
(``ROOT`` for a sequence's first page) and the ``page_size`` token ids it holds. The pair is the
dict key itself, so two different prefixes never collide, and a lookup walks a prompt page by
page. Only full pages are shared: a prompt that shares part of a page reuses the full pages
before it and computes the rest (the partial page is never shared, so nobody writes into a page
someone else reads).

Pages are registered as soon as every slot holds computed K/V (prompt or generated tokens), so a
preempted request, a follow-up chat turn or a request that arrives while another still decodes
finds them. The cache holds no page reference: a cached page nobody holds sits in the
allocator's LRU set and is evicted (forgotten here through ``on_evict``) when pages run short.
Only the engine thread touches this object.
"""

from __future__ import annotations

from .page_allocator import PageAllocator

ROOT = 0  # the parent id of a sequence's first page

Key = tuple[int, tuple]  # (parent node, the page's token ids; an image token is (pixel hash, offset))


class PrefixCache:
    def __init__(self, allocator: PageAllocator) -> None:
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._nodes: dict[Key, tuple[int, int]] = {}  # key -> (node id, page)
        self._page_key: dict[int, Key] = {}
        self._next_id = ROOT + 1
        allocator.is_cached = self._page_key.__contains__
        allocator.on_evict = self._forget

    def __len__(self) -> int:
        return len(self._nodes)

    def key(self, parent: int, tokens: list) -> Key:
        return parent, tuple(tokens)

    def match(self, tokens: list) -> tuple[list[int], list[int]]:
        """The cached pages holding the longest run of full pages at the start of ``tokens``, and their node ids."""
        ps = self.page_size
        pages: list[int] = []
        ids: list[int] = []
        parent = ROOT
        for start in range(0, len(tokens) - ps + 1, ps):
            node = self._nodes.get((parent, tuple(tokens[start : start + ps])))
            if node is None:
                break
            parent, page = node
            ids.append(parent)
            pages.append(page)
        return pages, ids

    def insert(self, parent: int, tokens: list, page: int) -> int:
        """Register ``page`` (computed K/V of ``tokens`` after node ``parent``); returns the node id.

        When another page already holds this prefix (two requests computed it in the same step),
        that page stays the cached one and ``page`` is left to its owner."""
        key = (parent, tuple(tokens))
        node = self._nodes.get(key)
        if node is not None:
            return node[0]
        node_id = self._next_id
        self._next_id += 1
        self._nodes[key] = (node_id, page)
        self._page_key[page] = key
        return node_id

    def flush(self) -> int:
        """Forget every page; those nobody holds become free. Returns how many pages were forgotten."""
        pages = list(self._page_key)
        self._nodes.clear()
        self._page_key.clear()
        for page in pages:
            self.allocator.uncache(page)
        return len(pages)

    def _forget(self, page: int) -> None:
        key = self._page_key.pop(page, None)
        if key is not None:
            del self._nodes[key]
