"""Ways to start a server: from a notebook cell in a real kernel with nest-asyncio applied
(notebooks/server.ipynb, executed with nbclient), the ``nbengine serve`` command, and
examples/custom_server.py."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from nbengine.server.background import ServerHandle, bind_socket  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_server_notebook_runs_in_a_kernel_with_nest_asyncio(monkeypatch, default_model_dir):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("nest_asyncio2")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "notebooks" / "server.ipynb", as_version=4)
    assert "nest_asyncio2.apply()" in nb.cells[1].source  # the kernel's loop is patched before the server starts
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = {i: "".join(o.get("text", "") or o.get("data", {}).get("text/plain", "") for o in c.outputs)
               for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    texts = list(outputs.values())
    assert re.search(r"ServerHandle\(http://127\.0\.0\.1:\d+, running\)", texts[1])
    assert "SmolLM2-135M-Instruct -> " in texts[2] and "Paris" in texts[2]
    assert texts[3].strip()  # the streamed haiku
    assert texts[4].count("->") == 3  # three async completions
    assert "nbengine_generation_tokens_total" in texts[5]
    assert "stopped" in texts[6]


def _read_until(stream, pattern: str, timeout: float) -> str:
    """Lines of ``stream`` until one matches ``pattern`` (read on a thread, so the bound holds)."""
    found: list[str] = []
    seen: list[str] = []

    def reader() -> None:
        for line in stream:
            seen.append(line)
            if re.search(pattern, line):
                found.append(line)
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    assert found, "".join(seen)
    return found[0]


def test_nbengine_serve_command(tiny_llama):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "nbengine", "serve", "--model", str(tiny_llama), "--port", "0",
           "--api-key", "k", "--served-model-name", "tiny", "--max-running-requests", "4", "--no-access-log"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = _read_until(proc.stderr, r"serving tiny at http://127\.0\.0\.1:\d+", timeout=120)
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 3, "ignore_eos": True},
                       headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 3
        busy = subprocess.run(cmd[:6] + ["--port", url.rsplit(":", 1)[1]], capture_output=True, text=True,
                              env=env, timeout=120)
        assert busy.returncode == 2 and "already in use" in busy.stderr  # before loading any model
        proc.send_signal(signal.SIGINT)  # Ctrl-C: graceful stop, engine shut down
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_custom_server_example_streams_deltas(tiny_llama):
    import uvicorn

    spec = importlib.util.spec_from_file_location("custom_server", ROOT / "examples" / "custom_server.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    app = example.create_app(str(tiny_llama))
    server = ServerHandle(uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None)),
                          bind_socket("127.0.0.1", 0))
    try:
        body = {"prompt": "Once upon a time", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                   "ignore_eos": True}}
        whole = httpx.post(server.url + "/generate", json=body, timeout=60)
        assert whole.status_code == 200 and whole.text
        pieces = []
        with httpx.stream("POST", server.url + "/generate_stream", json=body, timeout=60) as r:
            pieces = list(r.iter_text())
        assert "".join(pieces) == whole.text  # deltas: each piece of text is sent once
        assert httpx.post(server.url + "/generate", json={}, timeout=60).status_code == 400
        bad = httpx.post(server.url + "/generate_stream", json={"prompt": "x", "sampling_params": {"top_p": 2}})
        assert bad.status_code == 400 and "top_p" in bad.json()["error"]
    finally:
        server.stop()
