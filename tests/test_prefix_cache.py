"""Prefix caching: page reference counts, the evictable LRU set, cached_tokens, and identical outputs."""

from __future__ import annotations

import pytest
import torch

from nbengine.engine import Engine
from nbengine.page_allocator import PageAllocator
from nbengine.prefix_cache import PrefixCache
from nbengine.sampling_params import SamplingParams
from nbengine.scheduler import Scheduler
from nbengine.sequence import Sequence

PS = 4  # page size of every test here


def _sched(capacity_pages: int) -> Scheduler:
    pool = PageAllocator(capacity_pages + 1, PS)
    return Scheduler(pool, max_running=8, token_budget=256, prefix_cache=PrefixCache(pool))


def _seq(rid: str, ids: list[int], max_new_tokens: int = 2) -> Sequence:
    return Sequence(rid=rid, prompt_ids=list(ids), params=SamplingParams(max_new_tokens=max_new_tokens),
                    emit=lambda out: None)


def _run(sched: Scheduler, seq: Sequence) -> None:
    """Run ``seq`` alone to the end as the engine would (the model's work is not needed here)."""
    sched.add(seq)
    while not seq.finished:
        items = sched.schedule()
        sched.advance(items)
        for it in items:
            if it.samples:
                it.seq.output_ids.append(7)
                if len(it.seq.output_ids) >= it.seq.params.max_new_tokens:
                    sched.remove(it.seq)


# ---------------------------------------------------------------- the allocator and the cache alone
def test_allocator_hands_out_free_pages_before_it_evicts_cached_ones_least_recently_used_first():
    pool = PageAllocator(5, PS)  # 4 usable pages
    cache = PrefixCache(pool)
    a = pool.allocate(2)
    cache.insert(cache.insert(0, [1, 2, 3, 4], a[0]), [5, 6, 7, 8], a[1])
    pool.free(list(a))
    assert pool.num_evictable_pages == 2 and pool.num_free_pages == 4 and pool.num_used_pages == 0
    fresh = pool.allocate(2)
    assert not set(fresh) & set(a) and len(cache) == 2  # the free list first: nothing evicted yet
    third = pool.allocate(1)
    assert third == [a[1]] and len(cache) == 1  # then the deepest (oldest released) cached page
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8])[0] == [a[0]]


def test_a_page_a_running_request_holds_is_never_evicted():
    pool = PageAllocator(4, PS)
    cache = PrefixCache(pool)
    held = pool.allocate(1)
    cache.insert(0, [1, 2, 3, 4], held[0])
    assert pool.num_free_pages == 2
    with pytest.raises(RuntimeError, match="out of pages"):
        pool.allocate(3)
    assert cache.match([1, 2, 3, 4, 9]) == ([held[0]], [1])


def test_a_prompt_sharing_part_of_a_page_reuses_only_the_full_pages_before_it():
    sched = _sched(32)
    _run(sched, _seq("a", range(100, 110)))  # pages [100..103] [104..107] and a partial one
    b = _seq("b", [*range(100, 106), 55, 56, 57])  # shares 6 tokens: one full page and half of the next
    _run(sched, b)
    assert b.cached_tokens == 4
    c = _seq("c", [*range(100, 110), 1])  # a's whole prompt and one more token: its two full pages
    _run(sched, c)
    assert c.cached_tokens == 8
    assert sched.pool.num_used_pages == 0 and sched.cached_tokens_total == 12 and sched.prompt_tokens_total == 30


def test_a_cached_prompt_still_computes_its_last_token_and_the_prompt_logprobs_it_asks_for():
    sched = _sched(32)
    _run(sched, _seq("a", range(100, 112)))  # three full pages
    again = _seq("again", range(100, 112))
    _run(sched, again)
    assert again.cached_tokens == 8  # the last token's logits are needed: its page is recomputed
    lp = _seq("lp", range(100, 112))
    lp.logprob.return_logprob, lp.logprob.logprob_start_len = True, 6
    _run(sched, lp)
    assert lp.cached_tokens == 4  # positions 5.. score the tokens from 6 on


def test_flush_forgets_every_cached_page():
    sched = _sched(32)
    _run(sched, _seq("a", range(100, 112)))
    assert sched.pool.num_evictable_pages > 0
    assert sched.flush_cache() > 0
    assert sched.pool.num_evictable_pages == 0 and sched.pool.num_free_pages == sched.pool.capacity_pages
    b = _seq("b", range(100, 112))
    _run(sched, b)
    assert b.cached_tokens == 0


def test_requests_sharing_a_prefix_in_one_batch_compute_it_once():
    sched = _sched(64)
    shared = list(range(200, 240))  # 10 pages
    seqs = [_seq(f"r{i}", shared + [i, i + 1]) for i in range(4)]
    for s in seqs:
        sched.add(s)
    computed = 0
    while any(not s.finished for s in seqs):
        items = sched.schedule()
        computed += sum(it.num_tokens for it in items if it.seq.is_prefilling or not it.seq.output_ids)
        sched.advance(items)
        for it in items:
            if it.samples:
                it.seq.output_ids.append(7)
                if len(it.seq.output_ids) >= 2:
                    sched.remove(it.seq)
    assert [s.cached_tokens for s in seqs] == [0, 40, 40, 40]
    assert computed == 42 + 3 * 2


# ---------------------------------------------------------------- the engine end to end
PREFIX = [(37 * i) % 40000 + 100 for i in range(29)]
PROMPTS = [PREFIX + [11, 12, 13], PREFIX[:14] + [500, 501, 502, 503, 504], PREFIX + [11, 12, 13, 14, 15], PREFIX]


def _greedy(llm: Engine, prompts, **kw):
    sp = {"temperature": 0, "max_new_tokens": 6}
    return [llm.generate(input_ids=p, sampling_params=sp, **kw) for p in prompts]  # one after another


@pytest.fixture(scope="module")
def uncached(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, page_size=PS, disable_radix_cache=True) as llm:
        return _greedy(llm, PROMPTS, return_logprob=True, logprob_start_len=0)


def test_greedy_outputs_and_prompt_logprobs_are_identical_with_the_cache(tiny_llama, uncached):
    with Engine(str(tiny_llama), random_seed=0, page_size=PS) as llm:
        cached = _greedy(llm, PROMPTS, return_logprob=True, logprob_start_len=0)
        plain = _greedy(llm, PROMPTS)
        info = llm.get_server_info()
    for u, c, p in zip(uncached, cached, plain):
        assert c["output_ids"] == u["output_ids"] == p["output_ids"]
        lu, lc = u["meta_info"]["input_token_logprobs"], c["meta_info"]["input_token_logprobs"]
        assert [t for _, t, _ in lc] == [t for _, t, _ in lu]
        torch.testing.assert_close([x for x, _, _ in lc[1:]], [x for x, _, _ in lu[1:]], rtol=1e-4, atol=1e-4)
    assert [c["meta_info"]["cached_tokens"] for c in cached] == [0, 0, 0, 0]  # prompt logprobs from 0: computed
    # 28 of PREFIX + output pages of earlier requests; 12 of the 14-token share; the 29-token PREFIX itself
    assert [p["meta_info"]["cached_tokens"] for p in plain] == [28, 16, 32, 28]
    assert info["cached_tokens_total"] == 28 + 16 + 32 + 28 and info["prefix_cache"] is True
    assert info["cache_hit_rate"] == pytest.approx(104 / (2 * sum(map(len, PROMPTS))))
    assert info["kv_pages_used"] == 0 and info["kv_pages_cached"] > 0


def test_outputs_stay_identical_when_a_small_pool_evicts_cached_pages(tiny_llama, uncached):
    others = [[(53 * i + 7 * j) % 40000 + 300 for j in range(30)] for i in range(6)]
    with Engine(str(tiny_llama), random_seed=0, page_size=PS, max_total_tokens=64) as llm:  # 16 pages
        first = _greedy(llm, PROMPTS[:1])
        _greedy(llm, others)  # fills the pool: PREFIX's pages are evicted
        again = _greedy(llm, PROMPTS)
        info = llm.get_server_info()
    assert first[0]["output_ids"] == again[0]["output_ids"] == uncached[0]["output_ids"]
    assert [o["output_ids"] for o in again] == [u["output_ids"] for u in uncached]
    assert again[0]["meta_info"]["cached_tokens"] == 0
    assert info["kv_pages_used"] == 0 and info["kv_pages_free"] == info["kv_pages_total"]


def test_flush_cache_makes_the_next_request_compute_its_whole_prompt(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, page_size=PS) as llm:
        _greedy(llm, PROMPTS[:1])
        assert _greedy(llm, PROMPTS[:1])[0]["meta_info"]["cached_tokens"] == 28
        assert llm.flush_cache() is True
        assert llm.get_server_info()["kv_pages_cached"] == 0
        assert _greedy(llm, PROMPTS[:1])[0]["meta_info"]["cached_tokens"] == 0


def test_a_batch_sharing_a_long_prefix_prefills_it_once(tiny_llama, uncached):
    with Engine(str(tiny_llama), random_seed=0, page_size=PS) as llm:
        outs = llm.generate(input_ids=[PROMPTS[0], PROMPTS[2]] * 2, sampling_params={"temperature": 0, "max_new_tokens": 6})
    assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 32, 28, 32]  # all but the last token
    assert [o["output_ids"] for o in outs] == [uncached[i]["output_ids"] for i in (0, 2, 0, 2)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_the_cuda_runner_reuses_cached_pages_through_its_page_table(tiny_llama):
    """The Triton extend kernel reads a cached prefix through the page table: outputs as without the cache,
    in CUDA graphs too, and under a pool small enough to evict."""
    outs = {}
    for disable in (True, False):
        with Engine(str(tiny_llama), random_seed=0, page_size=PS, device="cuda", dtype="float32",
                    max_total_tokens=128, disable_radix_cache=disable) as llm:
            outs[disable] = _greedy(llm, PROMPTS * 3)
            info = llm.get_server_info()
    assert [o["output_ids"] for o in outs[True]] == [o["output_ids"] for o in outs[False]]
    assert sum(o["meta_info"]["cached_tokens"] for o in outs[False]) > 0 == info["kv_pages_used"]
    assert info["cached_tokens_total"] == sum(o["meta_info"]["cached_tokens"] for o in outs[False])


# ---------------------------------------------------------------- n > 1: the samples share their prompt's pages
def test_samples_of_one_prompt_share_its_full_pages_and_copy_the_partial_one():
    copies = []
    pool = PageAllocator(65, PS)
    sched = Scheduler(pool, max_running=8, token_budget=256, copy_page=lambda s, d: copies.append((s, d)))
    prompt = list(range(300, 310))  # two full pages and two tokens of a third
    leader = _seq("s0", prompt)
    forks = [_seq(f"s{j}", prompt) for j in (1, 2)]
    for f in forks:
        f.fork_of = leader
    for s in (leader, *forks):
        sched.add(s)
    first = sched.schedule()
    assert [(it.seq.rid, it.num_tokens) for it in first] == [("s0", 10)]  # the samples wait for the prompt
    sched.advance(first)
    leader.output_ids.append(7)
    second = sched.schedule()
    assert [(it.seq.rid, it.start, it.num_tokens) for it in second] == [("s0", 10, 1), ("s1", 9, 1), ("s2", 9, 1)]
    assert all(f.pages[:2] == leader.pages[:2] and f.pages[2] != leader.pages[2] for f in forks)
    assert copies == [(leader.pages[2], f.pages[2]) for f in forks]
    assert [f.cached_tokens for f in forks] == [9, 9]
    assert pool.num_used_pages == 3 + 2  # not 3 * 3
    assert [pool.refcount[p] for p in leader.pages] == [3, 3, 1]


def test_n_samples_are_seeded_reproducibly_and_greedy_ones_equal_a_single_run(tiny_llama):
    prompt = PROMPTS[0][:10]
    with Engine(str(tiny_llama), random_seed=0, page_size=PS, disable_radix_cache=True) as llm:
        single = llm.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 6})
        greedy = llm.generate(input_ids=prompt, sampling_params={"temperature": 0, "max_new_tokens": 6, "n": 3})
        seeded = [llm.generate(input_ids=prompt, sampling_params={"temperature": 1.0, "max_new_tokens": 6, "n": 3,
                                                                  "seed": 11}) for _ in range(2)]
    assert [o["output_ids"] for o in greedy] == [single["output_ids"]] * 3
    assert [o["meta_info"]["cached_tokens"] for o in greedy] == [0, 9, 9]
    assert [o["output_ids"] for o in seeded[0]] == [o["output_ids"] for o in seeded[1]]
    assert len({tuple(o["output_ids"]) for o in seeded[0]}) > 1  # each sample has its own seed
