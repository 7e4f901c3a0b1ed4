"""Continuous batching: the Scheduler + PageAllocator on fake sequences, and preemption end to end."""

from __future__ import annotations

import asyncio

import pytest
import torch

from nbengine.engine import Engine
from nbengine.page_allocator import PageAllocator
from nbengine.sampling_params import SamplingParams
from nbengine.scheduler import ScheduledSeq, Scheduler
from nbengine.sequence import Sequence, SeqStatus


# ---------------------------------------------------------------- helpers
def _pool(capacity_pages: int, page_size: int) -> PageAllocator:
    return PageAllocator(capacity_pages + 1, page_size)


def _seq(rid: str, prompt_len: int, max_new_tokens: int = 8) -> Sequence:
    return Sequence(rid=rid, prompt_ids=list(range(10, 10 + prompt_len)),
                    params=SamplingParams(max_new_tokens=max_new_tokens), emit=lambda out: None)


def _advance(sched: Scheduler, items: list[ScheduledSeq], finish: bool = True) -> None:
    """Do what the engine does after the model ran: count the computed tokens, append a sampled
    token to each sequence whose chunk reached its end, and remove finished sequences."""
    for it in items:
        samples = it.samples
        assert it.start == it.seq.num_computed
        it.seq.num_computed += it.num_tokens
        if samples:
            it.seq.output_ids.append(7)
            if finish and len(it.seq.output_ids) >= it.seq.params.max_new_tokens:
                sched.remove(it.seq)


def _check_pages(sched: Scheduler) -> None:
    """Every running sequence holds exactly the pages its tokens need after this step's growth;
    no page is owned twice, and free + owned == capacity."""
    pool = sched.pool
    owned = [p for s in sched.running for p in s.pages]
    assert len(owned) == len(set(owned))
    assert 0 not in owned  # the scratch page is never handed out
    assert all(not s.pages for s in sched.waiting)
    assert len(owned) + pool.num_free_pages == pool.capacity_pages


def _run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[list[ScheduledSeq]]:
    steps = []
    while sched.has_work():
        items = sched.schedule()
        assert items, "the scheduler stalled with work left"
        _check_pages(sched)
        steps.append([(it.seq, it.start, it.num_tokens) for it in items])
        _advance(sched, items)
        assert len(steps) < max_steps
    return steps


# ---------------------------------------------------------------- unit tests
def test_decodes_are_scheduled_before_prefills():
    sched = Scheduler(_pool(64, 4), max_running=8, token_budget=64)
    a = _seq("a", 10)
    sched.add(a)
    first = sched.schedule()
    assert [(it.seq, it.num_tokens) for it in first] == [(a, 10)]
    _advance(sched, first)
    b = _seq("b", 20)
    sched.add(b)
    items = sched.schedule()
    assert [(it.seq.rid, it.start, it.num_tokens) for it in items] == [("a", 10, 1), ("b", 0, 20)]


def test_token_budget_is_respected_and_long_prompts_are_chunked():
    budget = 16
    sched = Scheduler(_pool(64, 4), max_running=8, token_budget=budget)
    a, b, c = _seq("a", 40, 3), _seq("b", 5, 3), _seq("c", 33, 3)
    for s in (a, b, c):
        sched.add(s)
    steps = _run_to_completion(sched)
    for step in steps:
        assert sum(n for _, _, n in step) <= budget
    # a's prompt is cut into budget-sized chunks, in order, without gaps
    a_chunks = [(start, n) for step in steps for s, start, n in step if s is a and start < 40]
    assert a_chunks == [(0, 16), (16, 16), (32, 8)]
    assert all(len(s.output_ids) == 3 for s in (a, b, c))
    assert sched.pool.num_free_pages == sched.pool.capacity_pages


def test_admission_is_first_come_first_served():
    sched = Scheduler(_pool(64, 4), max_running=2, token_budget=64)
    seqs = [_seq(f"r{i}", 6, 2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    admitted: list[str] = []
    while sched.has_work():
        items = sched.schedule()
        for it in items:
            if it.start == 0:
                admitted.append(it.seq.rid)
        _advance(sched, items)
    assert admitted == [s.rid for s in seqs]


def test_head_of_queue_is_not_overtaken_by_a_later_request():
    # b is first in the queue but its prompt is larger than the remaining budget: it gets a
    # partial chunk, and c (which would fit whole) is not admitted ahead of it
    sched = Scheduler(_pool(64, 4), max_running=8, token_budget=20)
    a, b, c = _seq("a", 4), _seq("b", 40), _seq("c", 2)
    for s in (a, b, c):
        sched.add(s)
    items = sched.schedule()
    assert [(it.seq.rid, it.num_tokens) for it in items] == [("a", 4), ("b", 16)]
    assert list(sched.waiting) == [c]


def test_max_running_requests_is_respected():
    sched = Scheduler(_pool(256, 4), max_running=3, token_budget=512)
    seqs = [_seq(f"r{i}", 5 + i, 4) for i in range(7)]
    for s in seqs:
        sched.add(s)
    peak = 0
    while sched.has_work():
        items = sched.schedule()
        assert len(sched.running) <= 3
        assert len(items) <= 3
        peak = max(peak, len(sched.running))
        _advance(sched, items)
    assert peak == 3
    assert all(len(s.output_ids) == 4 for s in seqs)


def test_preemption_picks_the_newest_running_request_and_puts_it_first_in_the_queue():
    pool = _pool(6, 4)  # 24 token slots: each request fits alone (prompt + max_new_tokens <= 24)
    sched = Scheduler(pool, max_running=8, token_budget=64)
    a, b, c = _seq("a", 8, 16), _seq("b", 8, 16), _seq("c", 4, 16)
    for s in (a, b, c):
        sched.add(s)
    preempted_at = None
    for _ in range(20):
        running_before = list(sched.running)
        items = sched.schedule()
        _check_pages(sched)
        if sched.num_preemptions:
            preempted_at = running_before
            break
        _advance(sched, items, finish=False)
    assert preempted_at is not None, "the pool never ran out"
    victim = preempted_at[-1]
    assert victim is b  # the newest running request, not the oldest (a)
    assert victim.status is SeqStatus.WAITING
    assert victim.pages == [] and victim.num_computed == 0 and victim.num_preemptions == 1
    assert list(sched.waiting)[0] is victim
    assert list(sched.waiting) == [b, c]  # ahead of the never-admitted c
    assert sched.running == [a]
    assert [(it.seq, it.num_tokens) for it in items] == [(a, 1)]
    # b keeps its generated tokens and recomputes them later; everything completes
    assert len(b.output_ids) > 0
    _advance(sched, items)
    _run_to_completion(sched)
    assert all(len(s.output_ids) == 16 for s in (a, b, c))
    assert pool.num_free_pages == pool.capacity_pages


def test_remove_returns_all_pages_of_running_and_waiting_requests():
    pool = _pool(32, 4)
    sched = Scheduler(pool, max_running=8, token_budget=64)
    a, b, c = _seq("a", 30), _seq("b", 30), _seq("c", 30)
    for s in (a, b, c):
        sched.add(s)
    items = sched.schedule()
    _advance(sched, items, finish=False)
    assert pool.num_free_pages < pool.capacity_pages
    for s in (c, a, b):  # in any order, running or waiting
        sched.remove(s)
        assert s.pages == [] and s.status is SeqStatus.FINISHED
    assert not sched.has_work()
    assert pool.num_free_pages == pool.capacity_pages
    assert sorted(pool._free) == list(range(1, pool.num_pages))


def test_chunked_prefill_interleaves_with_running_decodes():
    sched = Scheduler(_pool(256, 4), max_running=8, token_budget=32)
    a, b = _seq("a", 5, 100), _seq("b", 7, 100)
    sched.add(a)
    sched.add(b)
    _advance(sched, sched.schedule())  # both prefilled, now decoding
    long = _seq("long", 300, 2)
    sched.add(long)
    prefill_steps = 0
    while long.num_computed < 300:
        items = sched.schedule()
        by_seq = {it.seq.rid: it.num_tokens for it in items}
        # the decodes get their token every step while the long prompt is prefilled in chunks
        assert by_seq["a"] == 1 and by_seq["b"] == 1
        assert 0 < by_seq["long"] <= 30
        assert [it.seq.rid for it in items][:2] == ["a", "b"]
        _advance(sched, items)
        prefill_steps += 1
    assert prefill_steps == 10  # ceil(300 / 30)
    assert len(a.output_ids) == 1 + prefill_steps and len(b.output_ids) == 1 + prefill_steps


def test_kv_pool_grow_and_free_account_pages():
    pool = _pool(5, 4)
    pages: list[int] = []
    assert pool.grow(pages, 1) and len(pages) == 1
    assert pool.grow(pages, 4) and len(pages) == 1
    assert pool.grow(pages, 5) and len(pages) == 2
    assert pool.num_used_pages == 2 and pool.num_free_pages == 3
    assert not pool.grow(pages, 21)  # needs 6 pages, only 5 exist
    assert len(pages) == 2  # a failed grow takes nothing
    assert pool.grow(pages, 20) and len(pages) == 5 and pool.num_free_pages == 0
    pool.free(pages)
    assert pages == [] and pool.num_free_pages == 5


# ---------------------------------------------------------------- end to end
PREEMPT_PARAMS = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
LOGPROBS = {"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0}


def _preempt_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49)]


@pytest.fixture(scope="module")
def big_pool_results(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as llm:
        outs = llm.generate(input_ids=_preempt_prompts(), sampling_params=PREEMPT_PARAMS, **LOGPROBS)
        assert llm.get_server_info()["num_preemptions"] == 0
    return outs


def test_tiny_pool_preempts_and_still_gives_the_same_greedy_text(tiny_llama, big_pool_results):
    prompts = _preempt_prompts()
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=200, page_size=4,
                max_running_requests=16) as llm:
        assert llm.get_server_info()["max_total_num_tokens"] <= 204
        outs = llm.generate(input_ids=prompts, sampling_params=PREEMPT_PARAMS, **LOGPROBS)
        info = llm.get_server_info()
    assert info["num_preemptions"] > 0
    assert info["kv_pages_used"] == 0
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
    for i, (got, want) in enumerate(zip(outs, big_pool_results)):
        assert got["output_ids"] == want["output_ids"], f"prompt {i}"
        assert got["text"] == want["text"], f"prompt {i}"
        assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 40}
        # logprobs survive the recompute: no entry lost or repeated, same values
        for key in ("input_token_logprobs", "output_token_logprobs"):
            g, w = got["meta_info"][key], want["meta_info"][key]
            assert len(g) == len(w) == (len(prompts[i]) if key.startswith("input") else 40), (key, i)
            assert [t for _, t, _ in g] == [t for _, t, _ in w]
            assert [v for v, _, _ in g[1:] if v is not None] == pytest.approx(
                [v for v, _, _ in w[1:] if v is not None], abs=1e-4)
        assert len(got["meta_info"]["output_top_logprobs"]) == 40
    assert any(o["meta_info"].get("num_retractions", 0) > 0 for o in outs)


async def test_long_prompt_arriving_mid_decode_leaves_the_running_streams_correct(tiny_llama, big_pool_results):
    prompts = _preempt_prompts()
    g = torch.Generator().manual_seed(9)
    long_prompt = torch.randint(3, 49152, (700,), generator=g).tolist()
    params = PREEMPT_PARAMS
    with Engine(str(tiny_llama), random_seed=0, chunked_prefill_size=32) as llm:
        ref_long = llm.generate(input_ids=long_prompt, sampling_params={**params, "max_new_tokens": 4})
        stream = await llm.async_generate(input_ids=prompts[:2], sampling_params=params, stream=True)
        chunks = {0: [], 1: []}
        long_task = None
        async for chunk in stream:
            chunks[chunk["index"]].append(chunk)
            if long_task is None and len(chunks[0]) == 3:
                long_task = asyncio.ensure_future(
                    llm.async_generate(input_ids=long_prompt, sampling_params={**params, "max_new_tokens": 4}))
        long_out = await long_task
        assert llm.get_server_info()["kv_pages_used"] == 0
    assert long_out["output_ids"] == ref_long["output_ids"]
    for i in (0, 1):
        final = chunks[i][-1]
        assert final["output_ids"] == big_pool_results[i]["output_ids"]
        # the stream kept producing one token per chunk (stream_interval 1) while the long prompt ran
        assert [len(c["output_ids"]) for c in chunks[i]] == list(range(1, 41))
