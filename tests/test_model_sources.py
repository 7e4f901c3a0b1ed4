"""model_path forms: sharded HF folders, .gguf files, hub ids without a network."""

from __future__ import annotations

import pytest
import torch

from nbengine.engine import Engine
from nbengine.errors import ModelNotFoundError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
PROMPTS = [[5, 17, 300, 42], list(range(100, 140))]


def test_sharded_safetensors_folder_loads_like_the_single_file(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_models["qwen2"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((src / name).read_bytes())
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    with Engine(str(src), random_seed=0) as a, Engine(str(sharded), random_seed=0) as b:
        assert [o["output_ids"] for o in a.generate(input_ids=PROMPTS, sampling_params=GREEDY)] == \
               [o["output_ids"] for o in b.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


def test_gguf_file_path_is_converted_and_matches_the_default_model(default_model_dir, tmp_path, monkeypatch):
    from nbengine.loader.default_model import find_default_gguf

    monkeypatch.setenv("NBENGINE_CACHE", str(tmp_path / "cache"))
    prompt = "The capital of France is"
    with Engine(str(find_default_gguf()), random_seed=0) as from_gguf:
        assert str(tmp_path / "cache") in from_gguf.get_server_info()["model_path"]
        out = from_gguf.generate(prompt, GREEDY)
    monkeypatch.delenv("NBENGINE_CACHE")
    with Engine(str(default_model_dir), random_seed=0) as from_folder:
        assert from_folder.generate(prompt, GREEDY)["output_ids"] == out["output_ids"]


def test_hub_id_without_network_raises_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        Engine("no-such-org/no-such-model-nbengine")
    msg = str(info.value)
    assert "no-such-org/no-such-model-nbengine" in msg and "hub" in msg
