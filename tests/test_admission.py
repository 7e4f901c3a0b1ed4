"""Every admitted request can finish when it runs alone: admission caps or rejects it against
min(context length, KV pool), and the scheduler cannot livelock on one that does not fit."""

from __future__ import annotations

import threading

import pytest

from nbengine.engine import Engine
from nbengine.page_allocator import PageAllocator
from nbengine.sampling_params import SamplingParams
from nbengine.scheduler import Scheduler
from nbengine.sequence import Sequence, SeqStatus

GREEDY = {"temperature": 0, "ignore_eos": True}


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in a daemon thread so that a livelocked call fails the test instead of hanging it."""
    box: dict = {}

    def run():
        try:
            box["out"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


@pytest.fixture(scope="module")
def small_pool(tiny_llama):
    """KV pool of 200 tokens (page 4) on a model whose context length is 1024."""
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=200, page_size=4) as llm:
        assert llm.get_server_info()["max_total_num_tokens"] == 200
        assert llm.get_server_info()["context_length"] == 1024
        yield llm


def test_unlimited_max_new_tokens_is_capped_to_the_pool_and_finishes(small_pool):
    # before: the request outgrew the pool, preempted itself, re-prefilled, and preempted again forever
    t, box = _in_thread(small_pool.generate, input_ids=[5] * 20, sampling_params={**GREEDY, "max_new_tokens": None})
    t.join(120)
    assert not t.is_alive(), f"the request never finished: {small_pool.get_server_info()}"
    out = box["out"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 180}
    assert out["meta_info"]["completion_tokens"] == 180  # 20 + 180 = the pool's 200 tokens
    info = small_pool.get_server_info()
    assert info["num_preemptions"] == 0 and info["kv_pages_used"] == 0


def test_unlimited_max_new_tokens_is_capped_to_the_context_length(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, context_length=48) as llm:
        out = llm.generate(input_ids=[5] * 8, sampling_params={**GREEDY, "max_new_tokens": None})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 40}


def test_max_new_tokens_beyond_the_pool_is_rejected_with_the_numbers(small_pool):
    with pytest.raises(ValueError) as info:
        small_pool.generate(input_ids=[5] * 20, sampling_params={"max_new_tokens": 500})
    msg = str(info.value)
    for part in ("200 tokens", "max_total_tokens", "1024", "520", "20 tokens from the input", "500 tokens"):
        assert part in msg, (part, msg)
    with pytest.raises(ValueError, match=r"input \(230 tokens\).*KV pool's capacity of 200 tokens"):
        small_pool.generate(input_ids=[5] * 230, sampling_params={"max_new_tokens": 1})
    assert small_pool.get_server_info()["num_waiting_reqs"] == 0


def test_auto_truncate_caps_to_the_pool(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=64, page_size=4, allow_auto_truncate=True) as llm:
        out = llm.generate(input_ids=[5] * 100, sampling_params={**GREEDY, "max_new_tokens": 50})
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 63 and meta["completion_tokens"] == 1


def test_several_capped_requests_share_a_small_pool_and_all_finish(small_pool):
    # each fits alone; together they preempt each other, and every one still finishes
    prompts = [[5 + i] * (10 + 7 * i) for i in range(4)]
    t, box = _in_thread(small_pool.generate, input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": None})
    t.join(300)
    assert not t.is_alive(), f"livelock: {small_pool.get_server_info()}"
    outs = box["out"]
    for p, out in zip(prompts, outs):
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 200 - len(p)}
    assert small_pool.get_server_info()["kv_pages_used"] == 0


# ---------------------------------------------------------------- the scheduler alone
def _pool(capacity_pages: int, page_size: int) -> PageAllocator:
    return PageAllocator(capacity_pages + 1, page_size)


def _seq(rid: str, prompt_len: int, max_new_tokens: int) -> Sequence:
    return Sequence(rid=rid, prompt_ids=list(range(10, 10 + prompt_len)),
                    params=SamplingParams(max_new_tokens=max_new_tokens), emit=lambda out: None)


def _drive(sched: Scheduler, max_steps: int) -> tuple[int, list[Sequence]]:
    """The engine's bookkeeping around ``schedule()``; returns the steps taken and the dropped sequences."""
    dropped: list[Sequence] = []
    for step in range(max_steps):
        if not sched.has_work():
            return step, dropped
        items = sched.schedule()
        dropped += sched.take_dropped()
        for it in items:
            it.seq.num_computed += it.num_tokens
            if it.samples:
                it.seq.output_ids.append(7)
                if len(it.seq.output_ids) >= it.seq.params.max_new_tokens:
                    sched.remove(it.seq)
    raise AssertionError(f"no end after {max_steps} steps: {sched.num_preemptions} preemptions")


def test_a_sequence_that_outgrows_the_whole_pool_is_dropped_not_preempted_forever():
    pool = _pool(6, 4)  # 24 token slots
    sched = Scheduler(pool, max_running=4, token_budget=64)
    big, small = _seq("big", 10, 100), _seq("small", 4, 3)
    sched.add(big)
    sched.add(small)
    steps, dropped = _drive(sched, max_steps=200)
    assert dropped == [big]
    assert big.status is SeqStatus.FINISHED and big.pages == []
    assert len(big.output_ids) == 24 - 10 + 1  # it ran until all 24 slots held computed tokens
    assert len(small.output_ids) == 3
    assert pool.num_free_pages == pool.capacity_pages


def test_a_waiting_sequence_larger_than_the_pool_is_dropped_at_admission():
    pool = _pool(4, 4)
    sched = Scheduler(pool, max_running=4, token_budget=8)
    huge = _seq("huge", 40, 1)  # a prompt of 40 tokens in a 16-token pool
    sched.add(huge)
    steps, dropped = _drive(sched, max_steps=50)
    assert dropped == [huge] and steps <= 2


def test_a_request_made_by_hand_past_the_pool_ends_at_the_pool_instead_of_spinning(tiny_llama):
    """Belt and braces: a sequence that reaches the core without admission's cap still ends."""
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=32, page_size=4) as llm:
        done = threading.Event()
        outs: list = []

        def emit(out):
            outs.append(out)
            if out.finish_reason is not None:
                done.set()

        seq = Sequence(rid="by-hand", prompt_ids=[5] * 10, emit=emit,
                       params=SamplingParams(max_new_tokens=100, ignore_eos=True, temperature=0))
        core = llm._thread.core
        llm._thread.call(lambda: core.add([seq]))
        assert done.wait(60), llm.get_server_info()
        assert outs[-1].finish_reason == {"type": "length", "length": 22}  # 10 + 22 = the pool's 32 tokens
        assert llm.get_server_info()["kv_pages_used"] == 0
        assert llm.generate(input_ids=[5] * 4, sampling_params={**GREEDY, "max_new_tokens": 3})["output_ids"]
