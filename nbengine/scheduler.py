"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step takes every running decode (one token each), then continues chunked prefills,
then admits waiting requests first-come-first-served, all under one token budget
(``chunked_prefill_size``). When pages run out the newest running request is preempted:
its pages are freed and it goes back to the front of the queue to be recomputed later.

With the prefix cache on, a request admitted for the first time starts from the longest run
of cached full pages of its tokens (``cached_tokens``), and waits while another running request
is computing the very next page it would reuse (a batch sharing a long system prompt prefills it
once). The samples of one prompt (``n > 1``) wait for the first one's prompt and then fork it:
its full pages are shared and the partial page is copied (copy-on-write), so each sample computes
one token of its prompt. Pages are shared by reference count; releasing a sequence drops only its
own references.

Progress is guaranteed: the oldest running request is never the victim while another runs,
and a request that cannot grow even with the whole pool to itself is taken out (``dropped``)
instead of preempting itself forever. The engine's admission caps every request to the
pool, so that only happens to sequences made by hand.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from typing import Callable

from .page_allocator import PageAllocator
from .prefix_cache import ROOT, PrefixCache
from .sequence import Sequence, SeqStatus

logger = logging.getLogger("nbengine")


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # tokens already in the cache (== seq.num_computed when scheduled)
    num_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, pool: PageAllocator, max_running: int, token_budget: int,
                 prefix_cache: PrefixCache | None = None,
                 copy_page: Callable[[int, int], None] | None = None) -> None:
        """``copy_page(src, dst)`` copies a page's K/V (the copy-on-write of a forked sample's partial page)."""
        self.pool = pool
        self.cache = prefix_cache
        self.copy_page = copy_page
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # prefix-cache hit accounting over first admissions (get_server_info's cache_hit_rate)
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.dropped: list[Sequence] = []  # sequences that can never fit in the pool; the caller ends them

    # ------------------------------------------------------------ queue ops
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and give its pages back."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._release(seq)
        seq.release_images()
        seq.status = SeqStatus.FINISHED

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------- schedule
    def schedule(self) -> list[ScheduledSeq]:
        batch: list[ScheduledSeq] = []
        budget = self.token_budget

        # 1. decodes, oldest first; preempt from the newest end when pages run out
        preemptions_before = self.num_preemptions
        i = 0
        waiting_on_device = False  # a sequence whose last token is still being sampled
        while i < len(self.running):
            seq = self.running[i]
            if seq.is_prefilling or seq.final_token_pending:
                waiting_on_device |= seq.final_token_pending
                i += 1
                continue
            while not self.pool.grow(seq.pages, seq.num_computed + 1):
                if len(self.running) == 1:  # alone and still short of pages: it can never fit
                    self._drop(seq)
                    break
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                batch.append(ScheduledSeq(seq, seq.num_computed, 1))
                budget -= 1
                i += 1

        # 2. unfinished chunked prefills already running
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING or not seq.is_prefilling:
                continue
            n = self._fit(seq, budget)
            if n:
                batch.append(ScheduledSeq(seq, seq.num_computed, n))
                budget -= n

        # 3. admit waiting requests, first come first served; not in a step that had to preempt
        # (the pages it freed are for the running decodes: re-admitting the victim would thrash).
        # A request waiting for pages another one is computing right now is passed over this step.
        admit = self.num_preemptions == preemptions_before
        in_flight = self._pages_in_flight() if admit and self.waiting and self.cache is not None else set()
        passed: list[Sequence] = []
        while admit and self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.num_tokens > self.pool.capacity_tokens:
                self.waiting.popleft()
                self._drop(seq)
                continue
            # keep a page of headroom per running request so new decodes don't preempt at once
            headroom = len(self.running) if self.running else 0
            if self.pool.num_free_pages - headroom < 1:
                break
            start = self._start(seq, in_flight)
            if start is None:  # its prefix is being computed: pass it over this step
                passed.append(self.waiting.popleft())
                continue
            n = self._fit(seq, budget, reserve=headroom)
            if n == 0:
                self._release(seq)
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                self.prompt_tokens_total += len(seq.prompt_ids)
                self.cached_tokens_total += seq.cached_tokens
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n
            if self.cache is not None:
                in_flight.add(self._next_page_key(seq))
        self.waiting.extendleft(reversed(passed))

        # 4. nothing could run (prefills stuck on a full pool): free the newest and retry;
        # a prefill stuck with the pool to itself can never fit. Not while a step in flight may finish
        # sequences: that frees their pages.
        if not batch and waiting_on_device:
            return batch
        if not batch and len(self.running) > 1:
            self._preempt(self.running[-1])
            return self.schedule()
        if not batch and self.running:
            self._drop(self.running[0])
            return self.schedule()
        return batch

    def take_dropped(self) -> list[Sequence]:
        dropped, self.dropped = self.dropped, []
        return dropped

    def _fit(self, seq: Sequence, budget: int, reserve: int = 0) -> int:
        """Grow ``seq``'s pages for as many of its pending tokens as budget and pool allow."""
        want = min(seq.num_uncomputed, budget)
        have = len(seq.pages) * self.pool.page_size - seq.num_computed
        free_tokens = max(0, self.pool.num_free_pages - reserve) * self.pool.page_size
        n = min(want, have + free_tokens)
        if n <= 0 or not self.pool.grow(seq.pages, seq.num_computed + n):
            return 0
        return n

    def _drop(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED
        self.dropped.append(seq)
        logger.warning("request %s needs %d KV slots but the pool holds %d; ending it", seq.rid,
                       seq.num_tokens + 1, self.pool.capacity_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.release_images()
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.info("preempted request %s (%d tokens) to free KV pages", seq.rid, seq.num_tokens)

    # ------------------------------------------------------- prefix sharing
    def advance(self, items: list[ScheduledSeq]) -> None:
        """After the model ran: count the computed tokens and register every newly full page in the cache."""
        cache, ps = self.cache, self.pool.page_size
        for it in items:
            seq = it.seq
            seq.num_computed += it.num_tokens
            # (the cheap test first: most decode steps fill no page)
            if cache is not None and (len(seq.page_uids) + 1) * ps <= seq.num_computed and not seq.finished:
                self._register(seq)

    def flush_cache(self) -> int:
        """Empty the prefix cache (pages held by running requests stay theirs). Returns the pages forgotten."""
        if self.cache is None:
            return 0
        for seq in self.running:
            seq.page_uids.clear()
        return self.cache.flush()

    def _release(self, seq: Sequence) -> None:
        """Drop this sequence's own page references; it computes from scratch if it runs again."""
        self.pool.free(seq.pages)
        seq.page_uids.clear()
        seq.num_computed = 0

    def _register(self, seq: Sequence) -> None:
        ps, uids = self.pool.page_size, seq.page_uids
        while (len(uids) + 1) * ps <= seq.cacheable_tokens():
            r = len(uids)
            key_tokens = seq.key_tokens(r * ps, (r + 1) * ps)
            uids.append(self.cache.insert(uids[-1] if uids else ROOT, key_tokens, seq.pages[r]))

    def _next_page_key(self, seq: Sequence) -> tuple | None:
        """The cache key of the first full page ``seq`` has not registered yet (None: no such page)."""
        ps, r = self.pool.page_size, len(seq.page_uids)
        if (r + 1) * ps > seq.num_tokens:
            return None
        return self.cache.key(seq.page_uids[-1] if r else ROOT, seq.key_tokens(r * ps, (r + 1) * ps))

    def _pages_in_flight(self) -> set:
        """Keys of the pages running prefills compute next."""
        return {self._next_page_key(s) for s in self.running if s.is_prefilling} - {None}

    def _start(self, seq: Sequence, in_flight: set) -> int | None:
        """Give ``seq`` what it can reuse before it is admitted: a fork of its first sample's prompt, or its
        cached prefix. Returns the tokens it starts from, or None when it should wait for another request."""
        if seq.num_computed:
            return seq.num_computed
        leader = seq.fork_of
        if leader is not None and not seq.output_ids:
            if leader.status is SeqStatus.RUNNING and leader.num_computed >= len(seq.prompt_ids):
                self._fork(seq, leader)
                return seq.num_computed
            if not leader.finished:
                return None  # its prompt is not computed yet
        seq.fork_of = None
        if self.cache is None:
            return 0
        limit = seq.reuse_limit()
        pages, uids = self.cache.match(seq.key_tokens(0, limit))
        self.pool.share(pages)
        seq.pages, seq.page_uids = pages, uids
        seq.num_computed = len(pages) * self.pool.page_size
        if seq.num_preemptions == 0:
            seq.cached_tokens = seq.num_computed
        key = self._next_page_key(seq)
        if key in in_flight and (len(uids) + 1) * self.pool.page_size <= limit:
            self._release(seq)
            return None
        return seq.num_computed

    def _fork(self, seq: Sequence, leader: Sequence) -> None:
        """Start ``seq`` from the prompt ``leader`` computed (the same prompt): its full pages are shared, the
        page holding the last prompt token is copied, and only that token is computed again (for logits)."""
        ps, last = self.pool.page_size, len(seq.prompt_ids) - 1
        full = last // ps
        seq.pages = leader.pages[:full]
        self.pool.share(seq.pages)
        if last % ps and self.copy_page is not None and self.pool.num_free_pages:
            page = self.pool.allocate(1)[0]
            self.copy_page(leader.pages[full], page)
            seq.pages.append(page)
            seq.num_computed = last
        else:
            seq.num_computed = full * ps
        seq.page_uids = list(leader.page_uids[:full])
        seq.cached_tokens = seq.num_computed
        seq.fork_of = None
        seq.copy_prompt_results(leader)
