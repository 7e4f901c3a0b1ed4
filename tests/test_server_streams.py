"""Streams and faults on a live server: abandoned streams and disconnects abort their requests and free
their KV pages, stop() with open streams, SGLang's native /generate (streamed too), /metrics, and a
bounded load test (200 concurrent streaming requests). Runs on the tiny random Llama."""

from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from server_helpers import engine_idle, metric, recorded_aborts, sse_events, wait_until  # noqa: E402

from nbengine.engine import Engine  # noqa: E402
from nbengine.server import serve  # noqa: E402

# long enough to still be running when the client leaves (the tiny model's context is 1024)
LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = Engine(str(tiny_llama))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    handle = serve(llm, port=0, served_model_name="tiny")
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_abandoned_stream_frees_its_pages(client, llm):
    assert engine_idle(llm)
    with recorded_aborts(llm) as aborted:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                stream=True, max_tokens=900, temperature=0,
                                                extra_body={"ignore_eos": True})
        got = 0
        for chunk in stream:
            got += bool(chunk.choices and chunk.choices[0].delta.content)
            if got == 3:
                break
        assert llm.get_server_info()["kv_pages_used"] > 0
        stream.close()  # the client hangs up mid-stream
        assert wait_until(lambda: engine_idle(llm), timeout=30)
        assert len(aborted) == 1  # aborted, not run to its 900 tokens


def test_client_leaving_a_non_streamed_request_aborts_it(server, llm):
    with recorded_aborts(llm) as aborted:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(server.url + "/v1/completions", json={"prompt": "a b", **LONG}, timeout=httpx.Timeout(60, read=1))
        assert wait_until(lambda: engine_idle(llm) and len(aborted) == 1, timeout=30)


def test_stop_with_open_streams_aborts_them_and_frees_the_port(llm):
    srv = serve(llm, port=0, graceful_shutdown_s=0.5)
    with recorded_aborts(llm) as aborted, httpx.Client(base_url=srv.url, timeout=60) as http:
        with http.stream("POST", "/generate", json={"text": "x", "stream": True,
                                                    "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}}) as r:
            next(r.iter_lines())
            srv.stop()
        assert not srv.running
        assert wait_until(lambda: engine_idle(llm) and len(aborted) == 1, timeout=30)
    port = int(srv.url.rsplit(":", 1)[1])
    again = serve(llm, port=port)  # the port is free again
    assert httpx.get(again.url + "/health").status_code == 200
    again.stop()


def test_native_generate_contract_streamed_and_not(server, llm):
    body = {"text": "The capital", "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
            "return_logprob": True, "return_text_in_logprobs": True}
    ref = llm.generate("The capital", body["sampling_params"], return_logprob=True)
    out = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert out["text"] == ref["text"] and out["output_ids"] == ref["output_ids"]
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert set(ref["meta_info"]) <= set(out["meta_info"])
    assert [t[2] for t in out["meta_info"]["output_token_logprobs"]] == \
        [llm.tokenizer.decode([i], skip_special_tokens=False) for i in ref["output_ids"]]
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # cumulative text, as SGLang streams it
    assert texts[-1] == ref["text"] and chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    batch = httpx.post(server.url + "/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}},
                       timeout=60).json()
    assert isinstance(batch, list) and len(batch) == 2


def test_metrics_report_requests_tokens_latency_and_kv(server):
    before = httpx.get(server.url + "/metrics").text
    n0 = metric(before, "nbengine_generation_tokens_total")
    c = httpx.post(server.url + "/v1/completions", json={"prompt": "a b c", "max_tokens": 5, "stream": True,
                                                        "ignore_eos": True}, timeout=60)
    assert c.status_code == 200
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "nbengine_generation_tokens_total") == n0 + 5
    assert metric(text, 'nbengine_http_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert metric(text, "nbengine_time_to_first_token_seconds_count") >= 1
    assert metric(text, "nbengine_e2e_request_latency_seconds_count") >= 1
    assert metric(text, "nbengine_engine_up") == 1
    assert metric(text, "nbengine_kv_cache_usage_ratio") == 0.0 and metric(text, "nbengine_kv_cache_total_pages") > 0
    assert metric(text, "nbengine_cache_hit_rate") >= 0.0 and metric(text, "nbengine_cached_tokens_total") >= 0
    assert metric(text, "nbengine_requests_in_flight") == 0


def test_200_concurrent_streams_all_complete(server, llm):
    n, max_tokens = 200, 8
    prompts = [f"request {i}:" for i in range(n)]
    expected = [o["text"] for o in llm.generate(prompts, {"max_new_tokens": max_tokens, "temperature": 0,
                                                          "ignore_eos": True})]

    async def one(client, prompt):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, reasons, usage = "", [], None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
            else:
                usage = chunk.usage
        return text, reasons, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    assert [r[0] for r in results] == expected  # nothing lost, nothing mixed up between streams
    assert all(r[1] == ["length"] and r[2].completion_tokens == max_tokens for r in results)
    assert httpx.get(server.url + "/health").status_code == 200
    assert wait_until(lambda: engine_idle(llm), timeout=30)
    assert metric(httpx.get(server.url + "/metrics").text, "nbengine_requests_in_flight") == 0
