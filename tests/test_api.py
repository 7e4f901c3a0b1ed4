"""The public Engine contract (DESIGN.md §3): call modes, output shapes, batching, streaming,
abort, concurrency from threads and loops, shutdown, engine-thread death, server info.

Runs on the tiny random Llama unless a test says otherwise; the four call modes are also
checked end to end on the default model (SmolLM2-135M-Instruct) with a chat prompt.
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import gc
import threading
import time
import uuid
from contextlib import contextmanager

import pytest

from nbengine.engine import Engine
from nbengine.errors import EngineDeadError, EngineShutdownError, NBEngineError
from nbengine.utils import async_stream_and_merge, stream_and_merge

GREEDY = {"temperature": 0, "max_new_tokens": 8}
SHORT = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
# long enough that it is still running when the test aborts it (the tiny model's context is 1024)
LONG = {"temperature": 0, "max_new_tokens": 1000, "ignore_eos": True}
META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}
# No test here asserts a speed: this 2-core machine is shared. Waits are bounded only so that a hang
# fails its test; "promptly" checks (the contract says ~1 s) get a generous bound.
HANG_S = 60.0
PROMPT_S = 10.0


# --------------------------------------------------------------------------- helpers
def wait_until(pred, timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


async def async_wait_until(pred, timeout: float = 30.0, interval: float = 0.02) -> bool:
    """Like wait_until, but lets the running loop work (async generators close on it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return pred()


def is_idle(llm: Engine) -> bool:
    info = llm.get_server_info()
    return info["kv_pages_used"] == 0 and info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0


def num_running(llm: Engine) -> int:
    return llm.get_server_info()["num_running_reqs"]


@contextmanager
def recorded_aborts(llm: Engine):
    """Record the rids the engine core is asked to abort (wraps ``EngineCore.abort``)."""
    core = llm._thread.core
    seen: list[str | None] = []
    original = core.abort

    def abort(rid, *args, **kwargs):
        seen.append(rid)
        return original(rid, *args, **kwargs)

    core.abort = abort
    try:
        yield seen
    finally:
        del core.abort


def in_thread(fn, *args, **kwargs) -> concurrent.futures.Future:
    """Run ``fn`` in a daemon thread; a hung call then fails its test (fut.result(timeout)) without
    blocking the session the way a ThreadPoolExecutor's exit would."""
    fut: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return fut


def new_rid() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def check_output(out: dict, finished: bool = True) -> None:
    assert set(out) >= {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert isinstance(out["text"], str)
    assert all(isinstance(t, int) for t in out["output_ids"])
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert isinstance(meta["prompt_tokens"], int) and meta["prompt_tokens"] > 0
    assert isinstance(meta["cached_tokens"], int) and 0 <= meta["cached_tokens"] < meta["prompt_tokens"]
    if finished:
        assert META_KEYS <= set(meta)
        assert isinstance(meta["finish_reason"], dict) and meta["finish_reason"]["type"] in ("length", "stop", "abort")
        assert meta["e2e_latency"] > 0


def check_stream(chunks: list[dict]) -> dict:
    """Chunks of one request: cumulative text/ids, finish_reason None until the last. Returns the last."""
    assert chunks
    for prev, cur in zip(chunks, chunks[1:]):
        assert prev["meta_info"]["finish_reason"] is None
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][: len(prev["output_ids"])] == prev["output_ids"]
    for c in chunks[:-1]:
        check_output(c, finished=False)
    check_output(chunks[-1])
    return chunks[-1]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = Engine(str(tiny_llama), random_seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def default_llm(default_model_dir):
    engine = Engine(str(default_model_dir), random_seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture
def idle_after(llm):
    """Every test that uses it must leave the engine without running requests or used pages."""
    yield
    assert wait_until(lambda: is_idle(llm)), llm.get_server_info()


# ------------------------------------------------------------ the four modes (default model)
async def test_four_modes_agree_on_the_default_model(default_llm):
    llm = default_llm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.tokenizer.apply_chat_template(messages)
    # a text prompt on purpose (stream_and_merge takes text); SmolLM2's tokenizer adds no BOS of its own,
    # so the text encodes to exactly the ids apply_chat_template(tokenize=True) gives
    assert llm.tokenizer.encode(prompt) == llm.tokenizer.apply_chat_template(messages, tokenize=True)
    params = {"temperature": 0, "max_new_tokens": 10}

    sync_out = llm.generate(prompt, params)
    check_output(sync_out)
    assert sync_out["text"].strip()
    if sync_out["meta_info"]["finish_reason"]["type"] == "stop":  # EOS is in output_ids, not in text
        assert sync_out["output_ids"][-1] == sync_out["meta_info"]["finish_reason"]["matched"]

    sync_chunks = list(llm.generate(prompt, params, stream=True))
    assert check_stream(sync_chunks)["text"] == sync_out["text"]
    assert sync_chunks[-1]["output_ids"] == sync_out["output_ids"]

    async_out = await llm.async_generate(prompt, params)
    check_output(async_out)
    assert async_out["text"] == sync_out["text"]
    assert async_out["output_ids"] == sync_out["output_ids"]

    gen = await llm.async_generate(prompt, params, stream=True)
    assert hasattr(gen, "__aiter__")
    async_chunks = [c async for c in gen]
    assert check_stream(async_chunks)["text"] == sync_out["text"]

    assert stream_and_merge(llm, prompt, params) == sync_out["text"]
    pieces = [p async for p in async_stream_and_merge(llm, prompt, params)]
    assert "".join(pieces) == sync_out["text"]


# ------------------------------------------------------------------- output shape, streaming
def test_single_prompt_returns_one_dict_with_the_documented_keys(llm):
    out = llm.generate("Hello there", SHORT)
    assert isinstance(out, dict)
    check_output(out)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert out["meta_info"]["prompt_tokens"] == len(llm.tokenizer.encode("Hello there"))
    assert "index" not in out


def test_max_new_tokens_zero_returns_no_tokens(llm):
    out = llm.generate("Hello there", {"max_new_tokens": 0})
    assert out["output_ids"] == [] and out["text"] == ""
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert out["meta_info"]["completion_tokens"] == 0


def test_sync_stream_chunks_are_cumulative_and_finish_only_at_the_end(llm):
    chunks = list(llm.generate("Hello there", {**SHORT, "max_new_tokens": 6}, stream=True))
    assert len(chunks) == 6  # stream_interval 1: one chunk per token
    last = check_stream(chunks)
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert [c["meta_info"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5, 6]
    assert all("e2e_latency" not in c["meta_info"] for c in chunks[:-1])
    assert all("index" not in c for c in chunks)
    assert last["output_ids"] == llm.generate("Hello there", {**SHORT, "max_new_tokens": 6})["output_ids"]


async def test_async_stream_must_be_awaited_then_iterated(llm):
    pending = llm.async_generate("Hello there", SHORT, stream=True)
    assert asyncio.iscoroutine(pending)  # not an async iterator until awaited
    pending.close()
    gen = await llm.async_generate("Hello there", SHORT, stream=True)
    chunks = [c async for c in gen]
    check_stream(chunks)
    assert chunks[-1]["output_ids"] == (await llm.async_generate("Hello there", SHORT))["output_ids"]


def test_a_list_of_prompts_returns_a_list_in_order(llm):
    prompts = ["one", "one two three four five six", "one two"]
    outs = llm.generate(prompts, SHORT)
    assert isinstance(outs, list) and len(outs) == 3
    for p, out in zip(prompts, outs):
        check_output(out)
        assert out["meta_info"]["prompt_tokens"] == len(llm.tokenizer.encode(p))
    assert len({o["meta_info"]["id"] for o in outs}) == 3
    # a list of one prompt is still a batch
    one = llm.generate(["one"], SHORT)
    assert isinstance(one, list) and len(one) == 1


def test_n_returns_a_prompt_major_list(llm):
    prompts = ["one", "one two three four five six"]
    outs = llm.generate(prompts, {"n": 2, "temperature": 1.0, "max_new_tokens": 3, "ignore_eos": True})
    assert len(outs) == 4
    lens = [len(llm.tokenizer.encode(p)) for p in prompts]
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [lens[0], lens[0], lens[1], lens[1]]
    for o in outs:
        check_output(o)
    # n > 1 on a single prompt is a list too
    single = llm.generate("one", {"n": 2, "max_new_tokens": 2})
    assert isinstance(single, list) and len(single) == 2


def test_a_list_of_sampling_params_applies_one_per_prompt(llm):
    outs = llm.generate(["a b", "c d"], [{**SHORT, "max_new_tokens": 3}, {**SHORT, "max_new_tokens": 5}])
    assert [o["meta_info"]["completion_tokens"] for o in outs] == [3, 5]


def test_input_ids_flat_list_is_single_and_list_of_lists_is_a_batch(llm):
    ids = llm.tokenizer.encode("Hello there")
    single = llm.generate(input_ids=ids, sampling_params=SHORT)
    assert isinstance(single, dict)
    assert single["output_ids"] == llm.generate("Hello there", SHORT)["output_ids"]
    batch = llm.generate(input_ids=[ids, ids[:1]], sampling_params=SHORT)
    assert isinstance(batch, list) and [o["meta_info"]["prompt_tokens"] for o in batch] == [len(ids), 1]


def test_batch_stream_chunks_carry_their_index(llm):
    prompts = ["one", "one two three", "one two"]
    chunks = list(llm.generate(prompts, SHORT, stream=True))
    assert all(c.get("index") in (0, 1, 2) for c in chunks)
    finals = llm.generate(prompts, SHORT)
    for i in range(3):
        mine = [c for c in chunks if c["index"] == i]
        last = check_stream(mine)
        assert last["output_ids"] == finals[i]["output_ids"]
        assert last["meta_info"]["prompt_tokens"] == finals[i]["meta_info"]["prompt_tokens"]
    # a streamed list of one prompt is a batch, so its chunks carry index 0
    assert all(c.get("index") == 0 for c in llm.generate(["one"], SHORT, stream=True))


async def test_async_batch_stream_chunks_carry_their_index(llm):
    gen = await llm.async_generate(["one", "one two three"], SHORT, stream=True)
    chunks = [c async for c in gen]
    assert sorted({c["index"] for c in chunks}) == [0, 1]
    for i in range(2):
        check_stream([c for c in chunks if c["index"] == i])


def test_incremental_streaming_output_gives_deltas(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, incremental_streaming_output=True) as inc:
        params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
        full = inc.generate("Hello there", params)
        chunks = list(inc.generate("Hello there", params, stream=True))
        assert len(chunks) > 1
        assert "".join(c["text"] for c in chunks) == full["text"]
        assert [t for c in chunks for t in c["output_ids"]] == full["output_ids"]
        assert all(len(c["output_ids"]) == 1 for c in chunks)
        assert chunks[-1]["meta_info"]["completion_tokens"] == 12
        assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])

        async def collect():
            return [c async for c in await inc.async_generate("Hello there", params, stream=True)]

        achunks = asyncio.run(collect())
        assert "".join(c["text"] for c in achunks) == full["text"]
        assert [t for c in achunks for t in c["output_ids"]] == full["output_ids"]


def test_rid_is_used_as_the_id_and_expanded_for_batches(llm):
    assert llm.generate("hi", SHORT, rid="my-request")["meta_info"]["id"] == "my-request"
    outs = llm.generate(["a", "b"], SHORT, rid="batch")
    assert [o["meta_info"]["id"] for o in outs] == ["batch_0", "batch_1"]
    outs = llm.generate("a", {**SHORT, "n": 2}, rid="par")
    assert [o["meta_info"]["id"] for o in outs] == ["par_0", "par_1"]
    outs = llm.generate(["a", "b"], SHORT, rid=["x", "y"])
    assert [o["meta_info"]["id"] for o in outs] == ["x", "y"]
    chunks = list(llm.generate("hi", SHORT, stream=True, rid="streamed"))
    assert {c["meta_info"]["id"] for c in chunks} == {"streamed"}


def test_finished_request_frees_its_pages(llm, idle_after):
    llm.generate(["a", "b", "c"], {**SHORT, "max_new_tokens": 40})


# ---------------------------------------------------------------------------------- abort
def test_abort_by_rid_from_another_thread(llm, idle_after):
    rid = new_rid()
    fut = in_thread(llm.generate, "Hello", LONG, rid=rid)
    assert wait_until(lambda: num_running(llm) == 1)
    llm.abort(rid)
    out = fut.result(timeout=HANG_S)
    assert out["meta_info"]["id"] == rid
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert out["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    assert out["meta_info"]["completion_tokens"] == len(out["output_ids"])


def test_abort_all_and_abort_of_unknown_rid(llm, idle_after):
    llm.abort("no-such-request")  # a no-op
    with pytest.raises(ValueError):
        llm.abort()
    fut = in_thread(llm.generate, ["a", "b"], LONG)
    assert wait_until(lambda: num_running(llm) == 2)
    llm.abort(abort_all=True)
    outs = fut.result(timeout=HANG_S)
    assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["abort", "abort"]


def test_streamed_abort_ends_with_an_abort_chunk(llm, idle_after):
    rid = new_rid()
    chunks = []
    for chunk in llm.generate("Hello", LONG, stream=True, rid=rid):
        chunks.append(chunk)
        if len(chunks) == 3:
            llm.abort(rid)
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_keyboard_interrupt_during_a_sync_call_aborts(llm, stream):
    """Jupyter's Stop button raises KeyboardInterrupt in the thread blocked in generate()."""
    assert threading.current_thread() is threading.main_thread()
    rid = new_rid()

    def interrupt_when_running():
        if wait_until(lambda: num_running(llm) == 1):
            _thread.interrupt_main()

    with recorded_aborts(llm) as aborted:
        helper = threading.Thread(target=interrupt_when_running)
        helper.start()
        with pytest.raises(KeyboardInterrupt):
            if stream:
                for _ in llm.generate("Hello", LONG, stream=True, rid=rid):
                    pass
            else:
                llm.generate("Hello", LONG, rid=rid)
        helper.join()
        assert wait_until(lambda: rid in aborted)
        assert wait_until(lambda: is_idle(llm)), llm.get_server_info()


def test_leaving_a_sync_stream_early_aborts_and_frees_pages(llm):
    rid = new_rid()
    with recorded_aborts(llm) as aborted:
        for i, _chunk in enumerate(llm.generate("Hello", LONG, stream=True, rid=rid)):
            if i == 2:
                break
        assert wait_until(lambda: rid in aborted)
        assert wait_until(lambda: is_idle(llm)), llm.get_server_info()


def test_closing_a_held_sync_stream_aborts(llm):
    rid = new_rid()
    with recorded_aborts(llm) as aborted:
        gen = llm.generate("Hello", LONG, stream=True, rid=rid)
        next(gen)
        gen.close()
        assert wait_until(lambda: rid in aborted)
        assert wait_until(lambda: is_idle(llm)), llm.get_server_info()


async def test_leaving_an_async_stream_early_aborts_and_frees_pages(llm):
    rid = new_rid()
    with recorded_aborts(llm) as aborted:
        n = 0
        async for _chunk in await llm.async_generate("Hello", LONG, stream=True, rid=rid):
            n += 1
            if n == 3:
                break
        assert await async_wait_until(lambda: rid in aborted)
        assert await async_wait_until(lambda: is_idle(llm)), llm.get_server_info()

        # the explicit form: aclose() a held generator
        rid2 = new_rid()
        gen = await llm.async_generate("Hello", LONG, stream=True, rid=rid2)
        await gen.__anext__()
        await gen.aclose()
        assert await async_wait_until(lambda: rid2 in aborted)
        assert await async_wait_until(lambda: is_idle(llm)), llm.get_server_info()


async def test_cancelling_an_async_generate_task_aborts_and_frees_pages(llm):
    rid = new_rid()
    with recorded_aborts(llm) as aborted:
        task = asyncio.create_task(llm.async_generate("Hello", LONG, rid=rid))
        assert await async_wait_until(lambda: num_running(llm) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await async_wait_until(lambda: rid in aborted)
        assert await async_wait_until(lambda: is_idle(llm)), llm.get_server_info()


async def test_a_wait_for_timeout_aborts_every_request_of_the_call(llm):
    with recorded_aborts(llm) as aborted:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(llm.async_generate(["a", "b"], LONG, rid="timed"), 0.3)
        assert await async_wait_until(lambda: {"timed_0", "timed_1"} <= set(aborted))
        assert await async_wait_until(lambda: is_idle(llm)), llm.get_server_info()


def test_abort_of_a_waiting_request(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, max_running_requests=1) as one:
        first = in_thread(one.generate, "Hello", LONG, rid="first")
        assert wait_until(lambda: num_running(one) == 1)
        second = in_thread(one.generate, "Hello", LONG, rid="second")
        assert wait_until(lambda: one.get_server_info()["num_waiting_reqs"] == 1)
        one.abort("second")
        out = second.result(timeout=HANG_S)
        assert out["meta_info"]["finish_reason"]["type"] == "abort"
        assert out["output_ids"] == [] and out["meta_info"]["completion_tokens"] == 0
        assert out["text"] == ""
        assert not first.done()
        one.abort("first")
        assert first.result(timeout=HANG_S)["meta_info"]["finish_reason"]["type"] == "abort"
        assert wait_until(lambda: is_idle(one))


def test_a_duplicate_running_rid_is_rejected_without_touching_the_first(llm, idle_after):
    first = in_thread(llm.generate, "Hello", LONG, rid="dup")
    assert wait_until(lambda: num_running(llm) == 1)
    out = llm.generate("Hello", SHORT, rid="dup")
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert "dup" in out["meta_info"]["finish_reason"]["message"]
    assert not first.done()
    llm.abort("dup")
    assert first.result(timeout=HANG_S)["meta_info"]["finish_reason"]["type"] == "abort"


# ------------------------------------------------------------------------------ concurrency
async def test_500_concurrent_async_requests_all_complete(llm):
    prompts = [" ".join(["word"] * (1 + i % 7)) for i in range(500)]
    outs = await asyncio.gather(*(llm.async_generate(p, {"max_new_tokens": 3, "ignore_eos": True}) for p in prompts))
    assert len(outs) == 500
    for p, out in zip(prompts, outs):
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
        assert out["meta_info"]["prompt_tokens"] == len(llm.tokenizer.encode(p))
        assert len(out["output_ids"]) == 3
    assert len({o["meta_info"]["id"] for o in outs}) == 500
    assert await async_wait_until(lambda: is_idle(llm)), llm.get_server_info()


async def test_sync_generate_works_inside_a_running_event_loop(llm):
    asyncio.get_running_loop()  # as in a Jupyter cell: a loop is running in this thread
    out = llm.generate("Hello there", SHORT)
    check_output(out)
    chunks = list(llm.generate("Hello there", SHORT, stream=True))
    assert chunks[-1]["output_ids"] == out["output_ids"]
    # the loop is still usable afterwards
    assert (await llm.async_generate("Hello there", SHORT))["output_ids"] == out["output_ids"]


def test_sync_calls_from_several_threads_at_once(llm, idle_after):
    prompts = [" ".join(["hello"] * k) for k in range(1, 7)]
    solo = [llm.generate(p, GREEDY) for p in prompts]
    futs = [in_thread(llm.generate, p, GREEDY) for p in prompts]
    outs = [f.result(timeout=30) for f in futs]
    for s, o in zip(solo, outs):
        assert o["meta_info"]["prompt_tokens"] == s["meta_info"]["prompt_tokens"]
        assert o["output_ids"] == s["output_ids"]
        assert o["text"] == s["text"]


def test_async_calls_from_two_event_loops_in_two_threads(llm, idle_after):
    prompts = ["alpha", "alpha beta", "alpha beta gamma"]
    solo = [llm.generate(p, GREEDY)["output_ids"] for p in prompts]

    async def run_all():
        outs = await asyncio.gather(*(llm.async_generate(p, GREEDY) for p in prompts))
        gen = await llm.async_generate(prompts[0], GREEDY, stream=True)
        last = [c async for c in gen][-1]
        return [o["output_ids"] for o in outs], last["output_ids"]

    futs = [in_thread(lambda: asyncio.run(run_all())) for _ in range(2)]
    results = [f.result(timeout=60) for f in futs]
    for outs, streamed in results:
        assert outs == solo
        assert streamed == solo[0]


async def test_sync_and_async_calls_mix_on_one_engine(llm):
    expected = llm.generate("mixed calls", GREEDY)["output_ids"]
    a, b, c = await asyncio.gather(
        llm.async_generate("mixed calls", GREEDY),
        asyncio.to_thread(llm.generate, "mixed calls", GREEDY),
        asyncio.to_thread(lambda: list(llm.generate("mixed calls", GREEDY, stream=True))[-1]),
    )
    assert a["output_ids"] == b["output_ids"] == c["output_ids"] == expected
    assert llm.generate("mixed calls", GREEDY)["output_ids"] == expected
    assert await async_wait_until(lambda: is_idle(llm))


# ------------------------------------------------------------------------- shutdown, lifetime
def test_shutdown_is_idempotent_and_later_calls_raise_quickly(tiny_llama):
    llm = Engine(str(tiny_llama), random_seed=0)
    assert llm.generate("hi", SHORT)["meta_info"]["completion_tokens"] == 4
    llm.shutdown()
    llm.shutdown()
    t0 = time.monotonic()
    with pytest.raises(EngineShutdownError):
        llm.generate("hi", SHORT)
    with pytest.raises(EngineShutdownError):
        llm.generate("hi", SHORT, stream=True)
    with pytest.raises(EngineShutdownError):
        asyncio.run(llm.async_generate("hi", SHORT))
    with pytest.raises(EngineShutdownError):
        llm.get_server_info()
    llm.abort("anything")  # nothing to abort; must not raise
    assert time.monotonic() - t0 < PROMPT_S  # they raise at once, without waiting on the engine
    assert not llm._thread.thread.is_alive()
    assert issubclass(EngineShutdownError, NBEngineError)


def test_shutdown_ends_running_requests_with_an_error(tiny_llama):
    llm = Engine(str(tiny_llama), random_seed=0)
    fut = in_thread(llm.generate, "Hello", LONG)
    assert wait_until(lambda: num_running(llm) == 1)
    llm.shutdown()
    with pytest.raises(EngineShutdownError):
        fut.result(timeout=HANG_S)


def test_a_dropped_engine_stops_its_thread(tiny_llama):
    llm = Engine(str(tiny_llama), random_seed=0)
    llm.generate("hi", SHORT)
    list(llm.generate("hi", SHORT, stream=True))
    thread = llm._thread.thread
    del llm
    gc.collect()
    thread.join(timeout=HANG_S)
    assert not thread.is_alive()


def test_engine_is_a_context_manager(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as llm:
        assert llm.generate("hi", SHORT)["meta_info"]["completion_tokens"] == 4
    with pytest.raises(EngineShutdownError):
        llm.generate("hi", SHORT)


def test_two_engines_in_one_process(llm, tiny_models):
    prompt = "two engines"
    expected_a = llm.generate(prompt, GREEDY)["output_ids"]
    other = Engine(str(tiny_models["qwen2"]), random_seed=0)
    try:
        expected_b = other.generate(prompt, GREEDY)["output_ids"]
        fa = [in_thread(llm.generate, prompt, GREEDY) for _ in range(2)]
        fb = [in_thread(other.generate, prompt, GREEDY) for _ in range(2)]
        assert [f.result(timeout=30)["output_ids"] for f in fa] == [expected_a] * 2
        assert [f.result(timeout=30)["output_ids"] for f in fb] == [expected_b] * 2
    finally:
        other.shutdown()
    assert llm.generate(prompt, GREEDY)["output_ids"] == expected_a
    assert is_idle(llm)


# ------------------------------------------------------------------------- engine thread death
def test_engine_thread_death_fails_waiters_and_later_calls(tiny_llama):
    llm = Engine(str(tiny_llama), random_seed=0)
    core = llm._thread.core
    crash = threading.Event()
    original_step = core.step

    def step():
        if crash.is_set():
            raise RuntimeError("simulated crash in the engine thread")
        return original_step()

    core.step = step
    errors: dict[str, BaseException] = {}
    raised_at: dict[str, float] = {}

    def sync_waiter():
        try:
            llm.generate("Hello", LONG)
        except BaseException as e:  # noqa: BLE001
            errors["sync"], raised_at["sync"] = e, time.monotonic()

    def async_waiter():
        async def main():
            return await llm.async_generate("Hello", LONG)
        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001
            errors["async"], raised_at["async"] = e, time.monotonic()

    threads = [threading.Thread(target=sync_waiter, daemon=True), threading.Thread(target=async_waiter, daemon=True)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: num_running(llm) == 2)
        crashed_at = time.monotonic()
        crash.set()
        for t in threads:
            t.join(timeout=HANG_S)
        assert not any(t.is_alive() for t in threads), "a waiting call hung after the engine thread died"
        for name in ("sync", "async"):
            assert isinstance(errors.get(name), EngineDeadError), errors
            assert raised_at[name] - crashed_at < PROMPT_S
        assert "simulated crash" in str(errors["sync"])

        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate("Hello", SHORT)
        with pytest.raises(EngineDeadError):
            llm.generate("Hello", SHORT, stream=True)
        with pytest.raises(EngineDeadError):
            asyncio.run(llm.async_generate("Hello", SHORT))
        with pytest.raises(EngineDeadError):
            llm.get_server_info()
        assert time.monotonic() - t0 < PROMPT_S
        assert issubclass(EngineDeadError, NBEngineError)
    finally:
        crash.set()
        llm.shutdown()  # safe on a dead engine
        llm.shutdown()


def test_engine_thread_death_fails_a_waiting_stream(tiny_llama):
    llm = Engine(str(tiny_llama), random_seed=0)
    core = llm._thread.core
    original_step = core.step
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return original_step()

    core.step = step
    try:
        gen = llm.generate("Hello", LONG, stream=True)
        with pytest.raises(EngineDeadError):
            deadline = time.monotonic() + HANG_S
            for _ in gen:
                assert time.monotonic() < deadline
    finally:
        llm.shutdown()


def test_a_request_that_fails_to_start_raises_in_its_caller_only(llm, monkeypatch, idle_after):
    import nbengine.engine_core as engine_core

    original = engine_core.IncrementalDetokenizer

    def failing(tokenizer, prompt_ids, params):
        if params.stop == ["FAIL-TO-START"]:
            raise RuntimeError("simulated failure while starting a request")
        return original(tokenizer, prompt_ids, params)

    monkeypatch.setattr(engine_core, "IncrementalDetokenizer", failing)
    bad = {**SHORT, "stop": ["FAIL-TO-START"]}
    with pytest.raises(RuntimeError, match="simulated failure"):
        in_thread(llm.generate, "Hello", bad).result(timeout=HANG_S)  # raises in the caller instead of hanging it
    with pytest.raises(RuntimeError, match="simulated failure"):
        in_thread(llm.generate, ["Hello", "Hello"], [LONG, bad]).result(timeout=HANG_S)
    assert llm.generate("Hello", SHORT)["meta_info"]["completion_tokens"] == 4


# ------------------------------------------------------------------------------ server info
def test_get_server_info(llm, tiny_llama):
    info = llm.get_server_info()
    assert info["model_path"] == str(tiny_llama)
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    for key in ("kv_pages_total", "kv_pages_free", "kv_pages_used", "max_total_num_tokens", "num_running_reqs",
                "num_waiting_reqs", "page_size", "context_length", "max_running_requests"):
        assert isinstance(info[key], int), key
    assert info["kv_pages_free"] + info["kv_pages_used"] == info["kv_pages_total"]
    assert info["max_total_num_tokens"] == info["kv_pages_total"] * info["page_size"]
    assert info["context_length"] == 1024
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0
    assert 0.0 <= info["kv_token_usage"] <= 1.0


def test_server_info_shows_a_running_request(llm, idle_after):
    rid = new_rid()
    fut = in_thread(llm.generate, "Hello", LONG, rid=rid)
    assert wait_until(lambda: num_running(llm) == 1)
    info = llm.get_server_info()
    assert info["kv_pages_used"] > 0
    assert info["kv_pages_free"] + info["kv_pages_used"] == info["kv_pages_total"]
    llm.abort(rid)
    fut.result(timeout=HANG_S)
