"""Images over the server (issue 11): OpenAI chat image parts on a tiny random Qwen2.5-VL."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from nbengine import Engine
from nbengine.server import serve

PNG = io.BytesIO()
Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(PNG, format="PNG")
PNG = PNG.getvalue()
DATA_URI = "data:image/png;base64," + base64.b64encode(PNG).decode()


@pytest.fixture(scope="module")
def llm(tiny_vlm):
    with Engine(str(tiny_vlm), random_seed=0) as engine:
        yield engine


def _chat(url: str, image_part: dict) -> httpx.Response:
    body = {"model": "m", "max_tokens": 5, "temperature": 0,
            "messages": [{"role": "user", "content": [image_part, {"type": "text", "text": "w20 w21"}]}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def _want(llm) -> str:
    ids = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w20 w21"}]}], tokenize=True)
    return llm.generate(input_ids=ids, sampling_params={"max_new_tokens": 5, "temperature": 0},
                        image_data=PNG)["text"]


def test_chat_image_parts_as_data_uris_answer_as_the_engine_does(llm):
    handle = serve(llm, port=0, served_model_name="m")
    try:
        for part in ({"type": "image_url", "image_url": {"url": DATA_URI}}, {"type": "image", "image": DATA_URI}):
            r = _chat(handle.url, part)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == _want(llm)
        r = _chat(handle.url, {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}})
        assert r.status_code == 400 and "--allow-image-urls" in r.json()["error"]["message"]
        r = _chat(handle.url, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})
        assert r.status_code == 400 and "could not be read as an image" in r.json()["error"]["message"]
        # SGLang's /generate: data URIs and base64 work; a file path is never read for a client
        native = {"text": "w20 w21 <|vision_start|><|image_pad|><|vision_end|>",
                  "sampling_params": {"max_new_tokens": 3, "temperature": 0}}
        want = llm.generate(native["text"], native["sampling_params"], image_data=PNG)["output_ids"]
        for image in (DATA_URI, base64.b64encode(PNG).decode()):
            r = httpx.post(handle.url + "/generate", json={**native, "image_data": image}, timeout=120)
            assert r.status_code == 200 and r.json()["output_ids"] == want, r.text
        r = httpx.post(handle.url + "/generate", json={**native, "image_data": "/etc/hostname"}, timeout=120)
        assert r.status_code == 400 and r.json()["error"]["param"] == "image_data"
    finally:
        handle.stop()


def test_http_image_urls_are_fetched_only_when_the_server_allows_it(llm, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    files = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    handle = serve(llm, port=0, served_model_name="m", allow_image_urls=True)
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/a.png"
        r = _chat(handle.url, {"type": "image_url", "image_url": {"url": url}})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == _want(llm)
        r = _chat(handle.url, {"type": "image_url", "image_url": {"url": url + ".missing"}})
        assert r.status_code == 400 and "Could not fetch" in r.json()["error"]["message"]
    finally:
        handle.stop()
        files.shutdown()
