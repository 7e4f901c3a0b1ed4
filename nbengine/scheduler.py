"""Continuous batching: which sequences run this step, and how many of their tokens.

Each step takes every running decode (one token each), then continues chunked prefills,
then admits waiting requests first-come-first-served, all under one token budget
(``chunked_prefill_size``). When pages run out the newest running request is preempted:
its pages are freed and it goes back to the front of the queue to be recomputed later.

Progress is guaranteed: the oldest running request is never the victim while another runs,
and a request that cannot grow even with the whole pool to itself is taken out (``dropped``)
instead of preempting itself forever. The engine's admission caps every request to the
pool, so that only happens to sequences made by hand.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from .kv_cache import KVPool
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
    def __init__(self, pool: KVPool, max_running: int, token_budget: int) -> None:
        self.pool = pool
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
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
        self.pool.free(seq.pages)
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
        # (the pages it freed are for the running decodes: re-admitting the victim would thrash)
        admit = self.num_preemptions == preemptions_before
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
            n = self._fit(seq, budget, reserve=headroom)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, seq.num_computed, n))
            budget -= n

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
        self.pool.free(seq.pages)
        seq.num_computed = 0
        seq.status = SeqStatus.FINISHED
        self.dropped.append(seq)
        logger.warning("request %s needs %d KV slots but the pool holds %d; ending it", seq.rid,
                       seq.num_tokens + 1, self.pool.capacity_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.pool.free(seq.pages)
        seq.release_images()
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.info("preempted request %s (%d tokens) to free KV pages", seq.rid, seq.num_tokens)
