"""The review's smaller findings: log lines printed once, YaRN rejected at load, one key per meaning in
the server info, accepted-but-unbuilt engine args warn once, and config.py not importing models/."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys

import pytest

import nbengine.config as config_module
from nbengine.engine import Engine, _configure_logging
from nbengine.errors import UnsupportedModelError
from nbengine.loader import gguf as gguf_loader


# ---------------------------------------------------------------------------- logging
@pytest.fixture
def clean_logging():
    """Run with a bare root logger and a fresh "nbengine" logger; put everything back afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("nbengine")
    saved = (root.handlers[:], root.level, ours.handlers[:], ours.level, ours.propagate)
    root.handlers[:] = []
    ours.handlers[:] = []
    ours.setLevel(logging.NOTSET)
    ours.propagate = True
    yield root, ours
    root.handlers[:], root.level = saved[0], saved[1]
    ours.handlers[:], ours.level, ours.propagate = saved[2], saved[3], saved[4]


def test_log_lines_print_once_when_the_application_configured_logging(clean_logging, capfd):
    root, ours = clean_logging
    stream = io.StringIO()
    root.addHandler(logging.StreamHandler(stream))
    _configure_logging("info")
    ours.info("hello from nbengine")
    assert stream.getvalue().count("hello from nbengine") == 1
    assert "hello from nbengine" not in capfd.readouterr().err  # not printed a second time by our own handler


def test_log_lines_print_once_when_logging_is_configured_after_the_engine(clean_logging, capfd):
    root, ours = clean_logging
    _configure_logging("info")  # nobody configured logging: our handler prints
    stream = io.StringIO()
    root.addHandler(logging.StreamHandler(stream))  # the application configures logging later
    ours.info("late line")
    printed = capfd.readouterr().err.count("late line") + stream.getvalue().count("late line")
    assert printed == 1
    _configure_logging(None)  # the next engine hands the lines to the application's logging
    ours.warning("next line")
    assert stream.getvalue().count("next line") == 1 and "next line" not in capfd.readouterr().err


# ---------------------------------------------------------------------------- YaRN
class _YarnMeta:
    arch = "llama"
    values = {"llama.embedding_length": 64, "llama.attention.head_count": 4, "llama.feed_forward_length": 128,
              "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 4096,
              "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
              "llama.rope.scaling.original_context_length": 1024}

    def get(self, key, default=None):
        return self.values.get(key.replace("{arch}", self.arch), default)


def test_gguf_with_yarn_rope_scaling_is_rejected_at_conversion_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported.*wrong positions"):
        gguf_loader._build_config(_YarnMeta(), {"token_embd.weight"}, (10, 64))


def test_gguf_with_linear_rope_scaling_still_converts():
    meta = _YarnMeta()
    meta.values = {**meta.values, "llama.rope.scaling.type": "linear"}
    cfg = gguf_loader._build_config(meta, {"token_embd.weight"}, (10, 64))
    assert cfg["rope_scaling"]["rope_type"] == "linear"


def test_hf_folder_with_yarn_is_rejected_before_loading(tiny_llama, tmp_path):
    folder = tmp_path / "yarn"
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "tokenizer.json").unlink()  # the check comes first: no tokenizer or weights are read
    with pytest.raises(UnsupportedModelError, match="'yarn' is not supported"):
        Engine(str(folder))


# ---------------------------------------------------------------------------- server info
def test_server_info_has_one_key_for_the_pool_size(tiny_llama):
    with Engine(str(tiny_llama), random_seed=0, max_total_tokens=256, page_size=16) as llm:
        info = llm.get_server_info()
    assert "max_total_tokens" not in info
    assert info["max_total_num_tokens"] == 256
    assert info["context_length"] == 1024 and info["max_running_requests"] == 64  # resolved, not None


# ---------------------------------------------------------------------------- not built yet
# disable_cuda_graph and cuda_graph_max_bs left this list when the CUDA runner (issue 7) built them,
# disable_radix_cache when prefix caching (issue 9) did
@pytest.mark.parametrize("name,value", [("trust_remote_code", True)])
def test_accepted_but_unbuilt_args_warn_once_when_set(name, value, monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_warned_not_built", set())
    with caplog.at_level(logging.WARNING, logger="nbengine"):
        for _ in range(3):
            config_module.EngineConfig(**{name: value}).warn_not_built()
        config_module.EngineConfig().warn_not_built()  # defaults say nothing
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith(f"{name}={value!r} has no effect")


def test_not_built_warning_comes_from_engine_creation(tiny_llama, monkeypatch, caplog):
    monkeypatch.setattr(config_module, "_warned_not_built", set())
    with caplog.at_level(logging.WARNING, logger="nbengine"):
        Engine(str(tiny_llama), random_seed=0, trust_remote_code=True).shutdown()
    assert any("trust_remote_code=True has no effect" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------- layering
def test_config_does_not_import_the_models():
    """config.py parses configs; the registry (and check_architecture) belong to models/, one way."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(config_module))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if "models" in m], imported
    code = "import sys, nbengine.config; print(any(m.startswith('nbengine.models') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
