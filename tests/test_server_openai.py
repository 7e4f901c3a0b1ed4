"""The OpenAI-compatible endpoints, driven by the official ``openai`` client (sync and async) against a
live server on 127.0.0.1 serving the default model (words matter here), checked against the engine."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from nbengine.engine import Engine  # noqa: E402
from nbengine.server import serve  # noqa: E402

KEY = "sk-test-openai"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    engine = Engine(str(default_model_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    handle = serve(llm, port=0, api_key=KEY, served_model_name="smollm2")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def aclient(server):
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def chat_ids(llm, messages):
    return llm.tokenizer.apply_chat_template(messages, tokenize=True)


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_chat_completion_matches_the_engine_and_counts_usage(client, llm):
    reply = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0)
    ref = llm.generate(input_ids=chat_ids(llm, MESSAGES), sampling_params={"max_new_tokens": 8, "temperature": 0})
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == ref["text"] and "Paris" in ref["text"]
    assert choice.finish_reason == {"length": "length", "stop": "stop"}[ref["meta_info"]["finish_reason"]["type"]]
    assert reply.usage.prompt_tokens == len(chat_ids(llm, MESSAGES)) == ref["meta_info"]["prompt_tokens"]
    assert reply.usage.completion_tokens == ref["meta_info"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == "smollm2" and reply.id.startswith("chatcmpl-")


def test_streamed_chat_equals_non_streamed_at_temperature_0(client):
    args = dict(model="smollm2", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=8,
                temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage  # the usage chunk comes last
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_equals_non_streamed_and_usage_counts(client, llm):
    args = dict(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == len(llm.tokenizer.encode("The capital of France is"))
    assert whole.usage.completion_tokens == 6
    assert chunks[-1].usage == whole.usage
    plain = client.completions.create(**args, stream=True)  # without include_usage: no usage chunk
    assert all(c.choices for c in plain)


async def test_async_client_streams_and_completes(aclient):
    args = dict(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0)
    whole = await aclient.chat.completions.create(**args)
    stream = await aclient.chat.completions.create(**args, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == whole.choices[0].message.content
    done = await aclient.completions.create(model="smollm2", prompt=["One, two,", "A, B,"], max_tokens=4,
                                            temperature=0)
    assert [c.index for c in done.choices] == [0, 1] and all(c.text for c in done.choices)
    assert done.usage.completion_tokens == 8


def test_n_seed_and_stop(client, llm):
    args = dict(model="smollm2", messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=6,
                temperature=1.0, seed=123, n=2)
    first = client.chat.completions.create(**args)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.choices[0].message.content != first.choices[1].message.content  # seeds seed, seed + 1
    # the prompt is counted once for its n samples; every sample's tokens are counted
    assert first.usage.prompt_tokens == len(chat_ids(llm, args["messages"]))
    assert 2 <= first.usage.completion_tokens <= 12
    streamed = list(client.chat.completions.create(**args, stream=True))  # same seed: same samples
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i)
        assert text == first.choices[i].message.content
    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=8, temperature=0,
                                        stop=[" 6"])
    assert stopped.choices[0].finish_reason == "stop"
    assert " 6" not in stopped.choices[0].text and stopped.choices[0].text.startswith(" 5")


def test_logprobs_for_chat_and_completions(client):
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == chat.choices[0].message.content
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.bytes == list(t.token.encode())
    done = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4,
                                     temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) == 2 for d in lp.top_logprobs)


def test_response_format_json_schema_constrains_the_reply(client):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}  # at most ~20 tokens: never cut by max_tokens
    r = client.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=64, temperature=1.0, n=3,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
    r = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=160, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
