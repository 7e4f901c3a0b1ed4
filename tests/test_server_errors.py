"""Security and bad input: API key, OpenAI-style 400/401/404/413 bodies naming the field, over-long
prompts, port in use, CORS, prompt logging, missing dependencies — and the server keeps serving.

Runs on the tiny random Llama (words do not matter here; its context is 1024 tokens)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from nbengine.engine import Engine  # noqa: E402
from nbengine.server import serve  # noqa: E402
from nbengine.server.background import ServerStartError  # noqa: E402

KEY = "sk-test-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    engine = Engine(str(tiny_llama))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def server(llm):
    handle = serve(llm, port=0, api_key=KEY, served_model_name="tiny", max_request_bytes=64 * 1024)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def still_serving(http) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "a b c", "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_api_key_required_everywhere_but_health(server, http):
    assert http.get("/health").status_code == 200  # open: for load balancers and probes
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/generate"),
                         ("GET", "/metrics"), ("GET", "/no/such/path")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = http.request(method, path, headers=headers, json={})
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    assert http.get("/v1/models", headers={"Authorization": f"bearer {KEY}"}).status_code == 200  # scheme: any case
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    still_serving(http)


CHAT_400 = [  # (body, the field the error must name)
    ({"messages": MSG, "temperature": "hot"}, "temperature"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "top_p": 0}, "top_p"),
    ({"messages": MSG, "n": 0}, "n"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "max_completion_tokens": "ten"}, "max_completion_tokens"),
    ({"messages": MSG, "stream": "yes"}, "stream"),
    ({"messages": MSG, "top_k": 0}, "top_k"),  # checked by the engine, named by the server
    ({"messages": MSG, "seed": -1}, "seed"),
    ({"messages": MSG, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": MSG, "logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": MSG, "stop": 5}, "stop"),
    ({"messages": MSG, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": MSG, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSG, "frobnicate": 1}, "frobnicate"),
    ({"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                 "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"messages": MSG, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({}, "messages"),
]


@pytest.mark.parametrize("body,field", CHAT_400, ids=[f for _, f in CHAT_400])
def test_bad_chat_input_is_400_naming_the_field(http, body, field):
    r = http.post("/v1/chat/completions", json={"model": "tiny", **body}, headers=AUTH)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert error["message"]


@pytest.mark.parametrize("body,field", [
    ({"prompt": [1.5, 2]}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": "x", "logprobs": 50}, "logprobs"),
    ({"prompt": "x", "echo": True}, "echo"), ({"prompt": "x", "max_tokens": 5000}, "max_tokens"),
    ({"prompt": [[1, 2], [10 ** 9]]}, "prompt"),
])
def test_bad_completion_input_is_400_naming_the_field(http, body, field):
    r = http.post("/v1/completions", json={"model": "tiny", **body}, headers=AUTH)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_malformed_json_and_non_object_bodies_are_400(http):
    for content in (b"{not json", b"[1, 2]", b""):
        r = http.post("/v1/chat/completions", content=content,
                      headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(server, http):
    r = http.post("/v1/chat/completions", json={"model": "gpt-4", "messages": MSG}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["error"] | {"message": None} == {"message": None, "type": "not_found_error", "param": "model",
                                                     "code": "model_not_found"}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")


def test_over_long_prompt_is_400_with_the_numbers(server, http):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=list(range(5, 1205)), max_tokens=4)
    assert "1200 tokens" in str(e.value) and "1024 tokens" in str(e.value)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=1020)
    assert e.value.body["param"] == "max_completion_tokens" and "1024 tokens" in str(e.value)
    assert "max_new_tokens" not in str(e.value)  # reworded with the API's name
    still_serving(http)


def test_oversized_body_is_413(http):
    big = {"model": "tiny", "prompt": "x" * (70 * 1024)}
    r = http.post("/v1/completions", json=big, headers=AUTH)
    assert r.status_code == 413 and "65536 bytes" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413
    still_serving(http)


def test_native_generate_errors_are_400(http):
    for body, field in [({"text": "x", "sampling_params": {"temperature": -1}}, "temperature"),
                        ({"text": "x", "sampling_params": {"bogus": 1}}, "sampling_params"),
                        ({"sampling_params": {}}, "text"), ({"text": "x", "image_data": "a.png"}, "image_data")]:
        r = http.post("/generate", json=body, headers=AUTH)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field


def test_port_in_use_is_a_clear_error_at_start(server, llm):
    port = int(server.url.rsplit(":", 1)[1])
    with pytest.raises(ServerStartError, match=f"127.0.0.1:{port}: the port is already in use"):
        serve(llm, port=port)
    assert server.running


def test_no_cors_unless_enabled(server, llm, http):
    origin = {"Origin": "http://evil.example"}
    r = http.get("/v1/models", headers={**AUTH, **origin})
    assert "access-control-allow-origin" not in r.headers
    with serve(llm, port=0, cors_origins=["http://app.example"]) as other:
        pre = httpx.options(other.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        pre = httpx.options(other.url + "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in pre.headers


def test_prompts_are_not_logged_unless_asked(llm, caplog):
    secret = "zebra-secret-4711"
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="nbengine")  # even at DEBUG, prompts stay out of the log
    for log_prompts in (False, True):
        caplog.clear()
        with serve(llm, port=0, log_prompts=log_prompts, access_log=True) as srv:
            body = {"messages": [{"role": "user", "content": secret}], "max_tokens": 2}
            assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            assert httpx.post(srv.url + "/generate", json={"text": secret, "sampling_params": {"max_new_tokens": 1}},
                              timeout=60).status_code == 200
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "/v1/chat/completions" in logged  # the access log ran (at DEBUG everything is captured)
        assert (secret in logged) == log_prompts


def test_missing_server_dependencies_name_the_extra():
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "try:\n    from nbengine.server import serve\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "fastapi" in out and 'pip install "nbengine[server]"' in out


def test_engine_gone_is_503_and_unhealthy(tiny_llama):
    engine = Engine(str(tiny_llama))
    with serve(engine, port=0) as srv:
        engine.shutdown()
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 503
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        with httpx.stream("POST", srv.url + "/generate", json={"text": "a", "stream": True}, timeout=30) as s:
            assert s.status_code == 503
        assert "nbengine_engine_up 0.0" in httpx.get(srv.url + "/metrics", timeout=30).text
