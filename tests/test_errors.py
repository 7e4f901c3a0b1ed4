"""Errors a user can cause: each raises a clear error on the caller's thread, before anything
reaches the engine, and the engine keeps working afterwards."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest

from nbengine.engine import Engine
from nbengine.errors import ModelNotFoundError, NBEngineError, UnsupportedModelError

VOCAB = 49152  # the tiny models' vocab size
OK = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = Engine(str(tiny_llama), random_seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture
def enqueued(llm):
    """Records every batch of sequences that reaches the engine core; afterwards checks that the
    engine still serves a normal request."""
    core = llm._thread.core
    seen: list[list] = []
    original = core.add

    def add(seqs):
        seen.append(list(seqs))
        return original(seqs)

    core.add = add
    try:
        yield seen
    finally:
        del core.add
    out = llm.generate("still working", OK)
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    info = llm.get_server_info()
    assert info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0 and info["kv_pages_used"] == 0


def raises_everywhere(llm, exc, match, *args, **kwargs):
    """The sync, sync-stream and async entry points all raise ``exc`` at call time."""
    with pytest.raises(exc, match=match):
        llm.generate(*args, **kwargs)
    with pytest.raises(exc, match=match):
        llm.generate(*args, stream=True, **kwargs)  # raises at the call, not at the first next()

    async def call(stream):
        return await llm.async_generate(*args, stream=stream, **kwargs)

    for stream in (False, True):
        with pytest.raises(exc, match=match):
            asyncio.run(call(stream))


# ------------------------------------------------------------------------- sampling params
BAD_SAMPLING = [
    ("temperature", -1),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_k", 0),
    ("top_k", -2),
    ("min_p", 1.5),
    ("min_p", -0.1),
    ("frequency_penalty", 3),
    ("frequency_penalty", -3),
    ("presence_penalty", 3),
    ("repetition_penalty", 0),
    ("repetition_penalty", 3),
    ("max_new_tokens", -1),
    ("n", 0),
    ("seed", -1),
    ("stop_token_ids", [VOCAB]),
    ("stop_token_ids", [-1]),
    ("logit_bias", {VOCAB: 1.0}),
    ("logit_bias", {-1: 1.0}),
    # wrong types
    ("temperature", "hot"),
    ("temperature", float("nan")),
    ("top_p", "0.5"),
    ("top_k", 1.5),
    ("min_p", [0.1]),
    ("max_new_tokens", "10"),
    ("max_new_tokens", 2.5),
    ("n", 1.5),
    ("repetition_penalty", "1"),
    ("presence_penalty", True),
    ("logit_bias", {"a": 1.0}),
    ("logit_bias", {1: float("nan")}),
    ("stop", [1, 2]),
]


@pytest.mark.parametrize("field,value", BAD_SAMPLING, ids=[f"{f}={v!r}" for f, v in BAD_SAMPLING])
def test_bad_sampling_value_raises_value_error_naming_the_field(llm, enqueued, field, value):
    raises_everywhere(llm, ValueError, field, "Hello", {field: value})
    assert enqueued == []


@pytest.mark.parametrize("value", [["a"], [1.5]])
def test_non_integer_stop_token_ids_raise_naming_the_field(llm, enqueued, value):
    raises_everywhere(llm, ValueError, "stop_token_ids", "Hello", {"stop_token_ids": value})
    assert enqueued == []


def test_min_new_tokens_above_max_new_tokens(llm, enqueued):
    raises_everywhere(llm, ValueError, "min_new_tokens", "Hello", {"min_new_tokens": 5, "max_new_tokens": 2})
    assert enqueued == []


def test_one_bad_entry_in_a_batch_enqueues_nothing(llm, enqueued):
    with pytest.raises(ValueError, match="temperature"):
        llm.generate(["a", "b", "c"], [OK, OK, {"temperature": -1}])
    with pytest.raises(ValueError, match="input_ids"):
        llm.generate(input_ids=[[1, 2], [3, VOCAB]], sampling_params=OK)
    assert enqueued == []


def test_unknown_sampling_key_raises_type_error_naming_it(llm, enqueued):
    raises_everywhere(llm, TypeError, "temprature", "Hello", {"temprature": 0.5})
    assert enqueued == []


def test_sampling_params_of_the_wrong_shape(llm, enqueued):
    with pytest.raises(TypeError, match="sampling_params"):
        llm.generate("Hello", "temperature=0")
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [OK])  # one per prompt
    with pytest.raises(ValueError, match="n must be equal"):
        llm.generate(["a", "b"], [{**OK, "n": 1}, {**OK, "n": 2}])
    assert enqueued == []


# ------------------------------------------------------------------------------ inputs
def test_empty_prompt(llm, enqueued):
    raises_everywhere(llm, ValueError, "empty", "")
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["ok", ""])
    assert enqueued == []


def test_empty_input_ids(llm, enqueued):
    raises_everywhere(llm, ValueError, "input_ids cannot be empty", input_ids=[])
    with pytest.raises(ValueError, match="empty"):
        llm.generate(input_ids=[[1, 2], []])
    assert enqueued == []


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 100, -1])
def test_token_id_outside_the_vocab(llm, enqueued, bad):
    raises_everywhere(llm, ValueError, f"vocab size \\({VOCAB}\\)", input_ids=[1, 2, bad])
    assert enqueued == []


def test_input_ids_must_be_integers(llm, enqueued):
    with pytest.raises(ValueError, match="input_ids"):
        llm.generate(input_ids=[1, 2.5, 3])
    with pytest.raises(ValueError, match="input_ids"):
        llm.generate(input_ids=["a", "b"])
    assert enqueued == []


def test_neither_prompt_nor_input_ids(llm, enqueued):
    raises_everywhere(llm, ValueError, "input_ids")
    assert enqueued == []


def test_both_prompt_and_input_ids(llm, enqueued):
    with pytest.raises(ValueError, match="either prompt or input_ids"):
        llm.generate("Hello", input_ids=[1, 2])
    assert enqueued == []


def test_prompt_of_the_wrong_type(llm, enqueued):
    with pytest.raises(ValueError, match="prompt"):
        llm.generate(["ok", 3])
    assert enqueued == []


def test_image_data_on_a_text_model(llm, enqueued):
    raises_everywhere(llm, ValueError, "image_data", "Describe this image", image_data="cat.png")
    assert enqueued == []


def test_return_hidden_states_needs_the_engine_flag(llm, enqueued):
    raises_everywhere(llm, ValueError, "enable_return_hidden_states", "Hello", return_hidden_states=True)
    assert enqueued == []


def test_bad_logprob_arguments(llm, enqueued):
    with pytest.raises(ValueError, match="top_logprobs_num"):
        llm.generate("Hello", OK, return_logprob=True, top_logprobs_num=-1)
    with pytest.raises(ValueError, match="top_logprobs_num"):
        llm.generate("Hello", OK, return_logprob=True, top_logprobs_num=60000)
    with pytest.raises(ValueError, match="logprob_start_len"):
        llm.generate(input_ids=[1, 2, 3], sampling_params=OK, return_logprob=True, logprob_start_len=3)
    assert enqueued == []


def test_bad_rid_lists(llm, enqueued):
    with pytest.raises(ValueError, match="rid"):
        llm.generate(["a", "b"], OK, rid=["only-one"])
    with pytest.raises(ValueError, match="unique"):
        llm.generate(["a", "b"], OK, rid=["same", "same"])
    assert enqueued == []


def test_abort_needs_a_rid_or_abort_all(llm):
    with pytest.raises(ValueError, match="abort_all"):
        llm.abort()


# ------------------------------------------------------------------------ context length
@pytest.fixture(scope="module")
def short_ctx(tiny_llama):
    engine = Engine(str(tiny_llama), random_seed=0, context_length=64)
    yield engine
    engine.shutdown()


def test_prompt_plus_max_new_tokens_over_the_context_length(short_ctx):
    with pytest.raises(ValueError, match="64 tokens") as info:
        short_ctx.generate(input_ids=[5] * 60, sampling_params={"max_new_tokens": 10})
    msg = str(info.value)
    assert "70" in msg and "60" in msg and "10" in msg and "max_new_tokens" in msg
    with pytest.raises(ValueError, match=r"input \(64 tokens\).*context length \(64 tokens\)") as info:
        short_ctx.generate(input_ids=[5] * 64, sampling_params={"max_new_tokens": 1})
    assert "allow_auto_truncate" in str(info.value)
    # exactly at the limit is fine
    out = short_ctx.generate(input_ids=[5] * 60, sampling_params={"max_new_tokens": 4, "ignore_eos": True})
    assert out["meta_info"]["completion_tokens"] == 4
    assert short_ctx.get_server_info()["num_running_reqs"] == 0


def test_allow_auto_truncate_runs_instead(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, context_length=64, allow_auto_truncate=True) as llm:
        out = llm.generate(input_ids=[5] * 60, sampling_params={"max_new_tokens": 10, "ignore_eos": True})
        assert out["meta_info"]["prompt_tokens"] == 60
        assert out["meta_info"]["completion_tokens"] == 4
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        out = llm.generate(input_ids=[5] * 100, sampling_params={"max_new_tokens": 10, "ignore_eos": True})
        assert out["meta_info"]["prompt_tokens"] + out["meta_info"]["completion_tokens"] <= 64
        assert out["meta_info"]["completion_tokens"] >= 1


# ------------------------------------------------------------------------ engine creation
def test_unknown_engine_argument(tiny_llama):
    with pytest.raises(TypeError, match="not_an_engine_arg"):
        Engine(str(tiny_llama), not_an_engine_arg=1)


@pytest.mark.parametrize("kwargs,field", [
    ({"page_size": 0}, "page_size"),
    ({"tp_size": 3}, "tp_size"),  # does not divide the 4 heads: refused before any process starts
    ({"dp_size": 0}, "dp_size"),
    ({"nnodes": 2, "tp_size": 2}, "dist_init_addr"),
    ({"context_length": 0}, "context_length"),
    ({"dtype": "float64"}, "dtype"),
    ({"mem_fraction_static": 1.5}, "mem_fraction_static"),
    ({"schedule_policy": "random"}, "schedule_policy"),
    ({"log_level": "loud"}, "log_level"),
])
def test_bad_engine_argument_values(tiny_llama, kwargs, field):
    with pytest.raises(ValueError, match=field):
        Engine(str(tiny_llama), **kwargs)


def test_missing_model_path(tmp_path, monkeypatch):
    import huggingface_hub

    downloads = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: downloads.append(a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="no/such/model") as info:
        Engine("./no/such/model")
    assert downloads == []  # no download attempt for a local-looking path
    assert isinstance(info.value, NBEngineError) and isinstance(info.value, FileNotFoundError)
    assert "does not exist" in str(info.value)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        Engine(str(tmp_path))


def test_unsupported_architecture(tiny_llama, tmp_path):
    folder = tmp_path / "foo-model"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM") as info:
        Engine(str(folder))
    msg = str(info.value)
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg
    assert isinstance(info.value, NBEngineError)


def test_unsupported_architecture_with_an_unfamiliar_config(tmp_path):
    # a config.json that lacks the Llama-style fields must still say "unsupported", not KeyError
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM"):
        Engine(str(tmp_path))
