"""Input fuzzing with hypothesis: any sampling_params, any prompt shape and any engine args either work
or raise ValueError / TypeError naming the field; never an internal error, never a hang, never a
changed engine state.

Bounded for CI: a fixed number of examples each, derandomized (the same examples every run), no
example database. Each test prints how many examples ran (``pytest -s`` shows it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbengine.config import EngineConfig
from nbengine.engine import Engine
from nbengine.sampling_params import SamplingParams

VOCAB = 49152
SAMPLING_EXAMPLES = 300
PROMPT_EXAMPLES = 300
ENGINE_EXAMPLES = 100
FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
SAMPLING_KEYS = [f.name for f in dataclasses.fields(SamplingParams)]
GENERATE_FIELDS = ["prompt", "input_ids", "sampling_params", "rid", "return_logprob", "logprob_start_len",
                   "top_logprobs_num", "image_data", "return_hidden_states",
                   "max_new_tokens"]  # named by context-length errors even when left at its default
RAN: dict[str, int] = {}

# ---------------------------------------------------------------- strategies
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3, max_value=3),
    st.text(max_size=12),
    st.binary(max_size=8),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.one_of(st.text(max_size=6), st.integers()),
                                                                      inner, max_size=3)),
                      max_leaves=8)
def _mostly(usual: st.SearchStrategy, rare: st.SearchStrategy, one_in: int = 6) -> st.SearchStrategy:
    """``usual`` five times in six, ``rare`` otherwise (st.one_of merges repeated branches, so no weights there)."""
    return st.integers(min_value=1, max_value=one_in).flatmap(lambda k: rare if k == 1 else usual)


_floats = lambda lo, hi: st.floats(min_value=lo, max_value=hi)  # noqa: E731
_ints = lambda lo, hi: st.integers(min_value=lo, max_value=hi)  # noqa: E731
_flags = st.booleans()
nasty = st.sampled_from([5, -1, 10**400, float("nan"), float("inf"), [1, 2], ["a", 3], {"a": 1}, {1: "x"}, "x",
                         b"\xff", True, (), object()])  # values of the wrong type or beyond any range
_SAMPLING_PLAUSIBLE = {  # per key: values of its own type, in range or just out of it
    "max_new_tokens": _ints(-1, 40) | st.none() | st.just(5000), "min_new_tokens": _ints(-1, 10),
    "temperature": _floats(-0.5, 3), "top_p": _floats(-0.1, 1.2), "top_k": _ints(-2, 100), "min_p": _floats(-0.1, 1.1),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": _ints(-1, VOCAB) | st.lists(_ints(-1, VOCAB), max_size=3),
    "ignore_eos": _flags, "skip_special_tokens": _flags, "spaces_between_special_tokens": _flags,
    "no_stop_trim": _flags, "repetition_penalty": _floats(0, 2.5), "frequency_penalty": _floats(-2.5, 2.5),
    "presence_penalty": _floats(-2.5, 2.5), "n": _ints(0, 4), "seed": _ints(-1, 2**64) | st.none(),
    "json_schema": st.none() | st.text(max_size=8), "regex": st.none() | st.text(max_size=8),
    "ebnf": st.none() | st.text(max_size=8), "stream_interval": _ints(0, 5) | st.none(),
    "logit_bias": st.dictionaries(_ints(-1, VOCAB) | _ints(0, 100).map(str), _floats(-10, 10), max_size=3),
    "custom_params": st.none() | st.dictionaries(st.text(max_size=4), _ints(0, 5), max_size=2),
}
known_sampling = st.lists(st.sampled_from(SAMPLING_KEYS).flatmap(
    lambda k: st.tuples(st.just(k), _mostly(_SAMPLING_PLAUSIBLE[k], nasty | values, one_in=3))), max_size=5).map(dict)
sampling_dicts = _mostly(known_sampling, st.dictionaries(st.text(max_size=10), values, min_size=1, max_size=3))
sampling_params = st.one_of(st.none(), sampling_dicts, sampling_dicts, st.lists(sampling_dicts, min_size=1, max_size=3),
                            values)

token_ids = st.one_of(st.integers(min_value=0, max_value=VOCAB - 1), st.integers(min_value=-5, max_value=VOCAB + 5),
                      st.integers(), st.floats(), st.booleans(), st.none(), st.text(max_size=3))
flat_ids = st.one_of(st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=20),
                     st.lists(token_ids, max_size=20))
texts = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.text(st.characters(categories=["Cs", "Co", "Cn", "Zs", "So"]), min_size=1, max_size=10),  # lone surrogates too
    st.builds(lambda n: "word " * n, st.integers(min_value=900, max_value=1400)),  # over the context length
)
prompts = st.one_of(st.none(), texts, st.text(min_size=1, max_size=40), st.lists(texts, max_size=3),
                    st.binary(max_size=20),
                    st.lists(st.one_of(texts, st.integers(), st.none()), max_size=3), scalars)
input_ids = st.one_of(st.none(), flat_ids, st.lists(flat_ids, max_size=3),
                      st.lists(st.lists(flat_ids, max_size=2), max_size=2), st.lists(st.integers(0, 100), min_size=1100,
                                                                                       max_size=1100), scalars)
simple_params = st.one_of(st.none(), st.fixed_dictionaries({"max_new_tokens": st.integers(0, 8)},
                                                            optional={"temperature": st.floats(0, 2)}))
extras = {"rid": values, "return_logprob": values, "logprob_start_len": values, "top_logprobs_num": values,
          "image_data": st.none() | scalars, "return_hidden_states": values}
calls = st.one_of(
    st.fixed_dictionaries({"prompt": prompts, "sampling_params": simple_params}),  # one shape at a time
    st.fixed_dictionaries({"input_ids": input_ids, "sampling_params": simple_params}),
    st.fixed_dictionaries({"prompt": prompts, "input_ids": input_ids, "sampling_params": sampling_params},
                          optional=extras),  # anything at all
)


# ---------------------------------------------------------------- checks
def _names(kwargs: dict) -> list[str]:
    """Field names an error about this call may name."""
    names = list(GENERATE_FIELDS)
    sp = kwargs.get("sampling_params")
    for d in (sp if isinstance(sp, list) else [sp]):
        if isinstance(d, dict):
            names += [str(k) for k in d]
    return names


def _names_one(msg: str, names: list) -> bool:
    """Whether ``msg`` names one of ``names`` (a short name like "n" as a whole word)."""
    for name in map(str, names):
        if repr(name) in msg or (re.search(rf"\b{re.escape(name)}\b", msg) if len(name) <= 2 else name in msg):
            return True
    return False


def _state(llm: Engine) -> dict:
    info = llm.get_server_info()
    return {k: info[k] for k in ("kv_pages_used", "num_running_reqs", "num_waiting_reqs", "max_total_num_tokens",
                                 "context_length")} | {"config": dict(vars(llm.config))}


def _call(llm: Engine, kwargs: dict) -> None:
    """Submit; a valid call streams its first chunk, then leaves (which aborts it): bounded work."""
    stream = llm.generate(**kwargs, stream=True)
    first = next(stream)
    assert isinstance(first, dict) and "meta_info" in first
    stream.close()


def _check(llm: Engine, kwargs: dict, before: dict) -> str:
    try:
        _call(llm, kwargs)
        outcome = "ran"
    except (ValueError, TypeError) as e:
        msg = str(e)
        assert _names_one(msg, _names(kwargs)), f"the error names no field: {msg!r} for {kwargs!r}"
        outcome = type(e).__name__
    deadline = time.monotonic() + 30
    while _state(llm) != before and time.monotonic() < deadline:  # an abort lands at the next step
        time.sleep(0.01)
    assert _state(llm) == before, (kwargs, _state(llm), before)
    return outcome


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0) as engine:
        yield engine


def _report(name: str, outcomes: list[str]) -> None:
    RAN[name] = len(outcomes)
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    print(f"\n[fuzz] {name}: {len(outcomes)} examples {counts}")


# ---------------------------------------------------------------- the tests
def test_any_sampling_params_work_or_raise_naming_the_field(llm):
    before = _state(llm)
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=SAMPLING_EXAMPLES)
    @given(params=sampling_params, many=st.booleans())
    def run(params, many):
        prompt = ["Hello", "Hi there"] if many else "Hello"
        outcomes.append(_check(llm, {"prompt": prompt, "sampling_params": params}, before))

    run()
    _report("sampling_params", outcomes)
    assert len(outcomes) >= SAMPLING_EXAMPLES * 0.9
    assert "ran" in outcomes and "ValueError" in outcomes and "TypeError" in outcomes


def test_any_prompt_shape_works_or_raises_naming_the_field(llm):
    before = _state(llm)
    outcomes: list[str] = []

    @settings(FUZZ, max_examples=PROMPT_EXAMPLES)
    @given(kwargs=calls)
    def run(kwargs):
        outcomes.append(_check(llm, kwargs, before))

    run()
    _report("prompt shapes", outcomes)
    assert len(outcomes) >= PROMPT_EXAMPLES * 0.9
    assert "ran" in outcomes and "ValueError" in outcomes


ENGINE_ARG_NAMES = [f.name for f in dataclasses.fields(EngineConfig) if f.name != "model_path"]
small_ints = st.integers(min_value=-2, max_value=64) | st.sampled_from([256, 1024, 4096, 65536])
_PLAUSIBLE = {  # per argument: values of its own type, in range or not; arbitrary values come on top
    "dtype": st.sampled_from(["auto", "float32", "bfloat16", "float64", "int8"]),
    "device": st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "tpu", "cpu:1"]),
    "schedule_policy": st.sampled_from(["fcfs", "lpm", "random"]),
    "sampling_defaults": st.sampled_from(["model", "openai", "greedy"]),
    "log_level": st.sampled_from(["info", "WARNING", "debug", "loud"]) | st.none(),
    "tokenizer_path": st.sampled_from(["/nonexistent", ""]) | st.none(),
    "mem_fraction_static": st.floats(min_value=-0.5, max_value=1.5) | st.none(),
    # parallel layouts that cannot start worker processes (those have their own tests)
    "tp_size": st.sampled_from([-1, 0, 1, 3, 64]), "dp_size": st.sampled_from([-1, 0, 1, 64]),
    "nnodes": st.sampled_from([-1, 0, 1, 3]), "node_rank": st.sampled_from([-1, 0, 1, 5]),
    "dist_init_addr": st.sampled_from(["nohost", "127.0.0.1:x", ":1"]) | st.none(),
}
_BOOLS = {"disable_radix_cache", "disable_cuda_graph", "enable_return_hidden_states", "skip_tokenizer_init",
          "enable_custom_logit_processor",
          "incremental_streaming_output", "allow_auto_truncate", "trust_remote_code"}


def _plausible(name: str) -> st.SearchStrategy:
    if name in _PLAUSIBLE:
        own = _PLAUSIBLE[name]
    else:
        own = st.booleans() if name in _BOOLS else small_ints | st.none()
    return _mostly(own, nasty | scalars)


known_args = st.lists(st.sampled_from(ENGINE_ARG_NAMES).flatmap(lambda n: st.tuples(st.just(n), _plausible(n))),
                      max_size=3).map(dict)
engine_args = _mostly(known_args, st.dictionaries(st.text(max_size=8), scalars, min_size=1, max_size=2))


def test_any_engine_args_work_or_raise_naming_the_field(tiny_llama):
    outcomes: list[str] = []
    log = logging.getLogger("nbengine")

    @settings(FUZZ, max_examples=ENGINE_EXAMPLES)
    @given(args=engine_args)
    def run(args):
        threads, torch_threads, level = threading.active_count(), torch.get_num_threads(), log.level
        try:
            engine = Engine(str(tiny_llama), **args)
        except (ValueError, TypeError) as e:
            msg = str(e)
            assert _names_one(msg, list(args)), f"the error names no argument: {msg!r} for {args!r}"
            outcomes.append(type(e).__name__)
        else:
            try:
                out = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
                assert out["meta_info"]["finish_reason"] is not None
            except ValueError as e:  # e.g. context_length=2: the prompt does not fit, and it says so
                assert "context length" in str(e) or "KV pool" in str(e), str(e)
            finally:
                engine.shutdown()
            outcomes.append("ran")
        finally:
            torch.set_num_threads(torch_threads)  # num_threads is process-wide in torch
            log.setLevel(level)
        deadline = time.monotonic() + 10
        while threading.active_count() > threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threading.active_count() <= threads, "an engine thread outlived its engine"

    run()
    _report("engine args", outcomes)
    assert len(outcomes) >= ENGINE_EXAMPLES * 0.9
    assert "ran" in outcomes and "ValueError" in outcomes and "TypeError" in outcomes


def test_fuzz_example_counts_are_reported():
    """Runs last in this file: the totals, for benchmarks/RESULTS.md."""
    if len(RAN) < 3:
        pytest.skip("run with the three fuzz tests above")
    print(f"\n[fuzz] total examples: {sum(RAN.values())} ({RAN})")
    assert math.prod(RAN.values()) > 0
