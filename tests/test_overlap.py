"""Overlap scheduling (the next step launched before this one's sampled ids are read), checked on CPU by
switching the engine core's ``overlap`` on (CPU engines run synchronously by default: nothing to overlap)."""

from __future__ import annotations

import pytest
import torch

from nbengine.engine import Engine
from nbengine.inflight import InFlightStep
from nbengine.model_runner import ModelRunner
from nbengine.sampler import Sampler
from nbengine.sampling_batch import SamplingBatch

PROMPTS = [[100 + 37 * i + 11 * j for j in range(n)] for i, n in enumerate((5, 30, 70, 130, 9, 300, 2))]
LENGTHS = (1, 7, 20, 33, 0, 12, 25)
ARGS = dict(random_seed=0, max_running_requests=4, chunked_prefill_size=64, dtype="float32", quantization=None)


def _run(folder, overlap: bool, fn, **engine_args):
    with Engine(str(folder), **{**ARGS, **engine_args}) as llm:
        core = llm._thread.core
        llm._thread.call(lambda: setattr(core, "overlap", overlap))
        return fn(llm)


def _both(folder, fn, **engine_args):
    return [_run(folder, overlap, fn, **engine_args) for overlap in (False, True)]


def _greedy(m: int, **extra) -> dict:
    return {"temperature": 0, "max_new_tokens": m, "ignore_eos": True, **extra}


def test_greedy_outputs_are_identical_with_and_without_overlap(tiny_llama):
    def batch(llm):
        out = llm.generate(input_ids=PROMPTS, sampling_params=[_greedy(m) for m in LENGTHS])
        return [(o["output_ids"], o["text"], o["meta_info"]["finish_reason"]) for o in out]

    sync, overlapped = _both(tiny_llama, batch)
    assert [len(ids) for ids, _, _ in sync] == list(LENGTHS)
    assert overlapped == sync


def test_stop_tokens_and_stop_strings_end_at_the_same_place_with_overlap(tiny_llama):
    def free(llm):
        return llm.generate(input_ids=PROMPTS[:4], sampling_params=_greedy(24))

    ref = _run(tiny_llama, False, free)
    # stop on what the 6th token / the text after the 4th token turned out to be
    params = [_greedy(24, stop_token_ids=[o["output_ids"][5]]) for o in ref[:2]] + \
             [_greedy(24, stop=[o["text"][len(o["text"]) // 3:][:3]]) for o in ref[2:] if o["text"].strip()]

    def stopped(llm):
        out = llm.generate(input_ids=PROMPTS[:len(params)], sampling_params=params)
        return [(o["output_ids"], o["text"], o["meta_info"]["finish_reason"]) for o in out]

    sync, overlapped = _both(tiny_llama, stopped)
    assert all(reason["type"] == "stop" for _, _, reason in sync)
    assert overlapped == sync


def test_streams_and_preemption_under_a_small_pool_match_with_overlap(tiny_llama):
    def streamed(llm):
        chunks = list(llm.generate(input_ids=PROMPTS[:4], sampling_params=_greedy(40), stream=True))
        return sorted((c["index"], c["output_ids"]) for c in chunks), llm.get_server_info()["num_preemptions"]

    sync, overlapped = _both(tiny_llama, streamed, max_total_tokens=400, page_size=16)
    assert sync[1] > 0  # the pool is small enough that requests were preempted
    assert overlapped[0] == sync[0]


def test_requests_that_need_the_host_each_step_still_get_exact_results_with_overlap(tiny_llama):
    # logprobs, penalties and min_new_tokens make a step synchronous; mixed with plain requests
    params = [_greedy(9), {"temperature": 0, "max_new_tokens": 9, "repetition_penalty": 1.3},
              {"temperature": 0, "max_new_tokens": 9, "min_new_tokens": 5}, _greedy(9)]

    def mixed(llm):
        out = llm.generate(input_ids=PROMPTS[:4], sampling_params=params, return_logprob=[False, False, False, True])
        return [(o["output_ids"], o["meta_info"].get("output_token_logprobs")) for o in out]

    sync, overlapped = _both(tiny_llama, mixed)
    assert overlapped == sync


def test_the_next_step_is_launched_before_the_previous_ids_are_read(tiny_llama, monkeypatch):
    order: list[str] = []
    run, read = ModelRunner.run, InFlightStep.read
    monkeypatch.setattr(ModelRunner, "run", lambda self, *a: (order.append("run"), run(self, *a))[1])
    monkeypatch.setattr(InFlightStep, "read", lambda self: (order.append("read"), read(self))[1])
    _run(tiny_llama, True, lambda llm: llm.generate(input_ids=PROMPTS[0], sampling_params=_greedy(6)))
    # prefill, then each decode is launched before the previous step's id is read; the sixth id needs no step
    assert order == ["run"] + ["run", "read"] * 5 + ["read"]


def test_an_aborted_request_drops_its_in_flight_token_and_the_engine_goes_on(tiny_llama):
    def abort_mid_stream(llm):
        got = []
        for chunk in llm.generate(input_ids=PROMPTS[1], sampling_params=_greedy(200), stream=True):
            got.append(chunk)
            if len(chunk["output_ids"]) == 5:
                llm.abort(chunk["meta_info"]["id"])
        after = llm.generate(input_ids=PROMPTS[0], sampling_params=_greedy(5))
        return got[-1]["meta_info"]["finish_reason"]["type"], len(got[-1]["output_ids"]), after["output_ids"], \
            llm.get_server_info()["kv_pages_used"]

    reason, n, after, pages_used = _run(tiny_llama, True, abort_mid_stream)
    assert reason == "abort" and n < 200 and len(after) == 5 and pages_used == 0


# ------------------------------------------------------------------------ sampler
def test_sampling_parameters_are_rebuilt_only_when_the_batch_changes(tiny_llama, monkeypatch):
    built: list[int] = []
    init = SamplingBatch.__init__

    def counting(self, seqs, *a):
        built.append(len(seqs))
        init(self, seqs, *a)

    monkeypatch.setattr(SamplingBatch, "__init__", counting)
    sp = [{"temperature": 0.7, "top_p": 0.9, "max_new_tokens": m, "ignore_eos": True} for m in (8, 12)]
    _run(tiny_llama, True, lambda llm: llm.generate(input_ids=PROMPTS[:2], sampling_params=sp))
    # 12 sampling steps: the prefill and 7 decodes of both share one batch, then the longer one decodes alone
    assert built == [2, 1]


def test_sample_returns_device_ids_that_match_the_synchronous_call():
    from nbengine.sampling_params import SamplingParams
    from nbengine.sequence import Sequence

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seqs = [Sequence(rid=str(i), prompt_ids=[1], emit=lambda _: None, params=SamplingParams(**p)) for i, p in
            enumerate([{"temperature": 0}, {"temperature": 0.8, "top_k": 5, "logit_bias": {"7": 3.0}},
                       {"temperature": 1.2, "min_p": 0.1}])]
    a = Sampler(50, [2], torch.device("cpu"), 123).sample(logits.clone(), seqs)
    b = Sampler(50, [2], torch.device("cpu"), 123)(logits.clone(), seqs).tokens
    assert isinstance(a, torch.Tensor) and a.tolist() == b


# ------------------------------------------------------------------------ output delivery
def test_streams_of_one_call_are_woken_once_per_step_not_once_per_token(tiny_llama, monkeypatch):
    import nbengine.engine as engine_mod
    from nbengine.engine_core import EngineCore

    deliveries, steps = [], [0]
    make_sink = engine_mod._queue_emit

    def counting_sink(q):
        sink = make_sink(q)
        put = sink.deliver
        sink.deliver = lambda items: (deliveries.append(len(items)), put(items))[1]
        return sink

    step = EngineCore.step
    monkeypatch.setattr(engine_mod, "_queue_emit", counting_sink)
    monkeypatch.setattr(EngineCore, "step", lambda self: (steps.__setitem__(0, steps[0] + 1), step(self))[1])
    chunks = _run(tiny_llama, False, lambda llm: list(llm.generate(input_ids=PROMPTS[:4], sampling_params=_greedy(10),
                                                                stream=True)))
    assert len(chunks) == 40 and sum(deliveries) == 40
    assert len(deliveries) <= steps[0] and max(deliveries) == 4  # the four streams' chunks of a step go together
