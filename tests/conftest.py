"""Session fixtures: tiny random Llama / Qwen2 / Qwen3 models and the default model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# keep the suite's threads modest and deterministic on 2-core CI machines
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Without a GPU the Triton kernels run in Triton's interpreter; the switch is read when triton is
# imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from nbengine.loader.default_model import default_model_path

    return default_model_path(progress=False)


# ---------------------------------------------------------------- a second tokenizer family
# SmolLM2's tokenizer adds no special tokens by itself; Llama 3's adds <|begin_of_text|> to every
# encode(). This one is built here, Llama-3 style: byte-level BPE trained on a small text, Llama 3's
# special tokens and chat template, and a post-processor that adds BOS.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
                   "<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, Rome of Italy.",
    "Once upon a time there was a little model that learned to write haiku about the sea and the sky.",
    "def main():\n    for i in range(10):\n        print(i * 2)  # doubles\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828; punctuation: !?,.;:'\"()[]{}<>/\\-_=+*&^%$#@~`|",
    "Café, naïve, façade, Straße, 日本語のテキスト, 中文文本, Ελληνικά, русский, emoji 😀🎉👍🏽 done.",
    "Hello there! How are you today? I am fine, thank you. What is your name? My name is nbengine.",
] * 20


def build_llama3_style_tokenizer(out: Path) -> Path:
    """Write tokenizer.json + tokenizer_config.json of the Llama-3-style test tokenizer into ``out``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": bos, "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def _tiny(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2, "llama3": 3, "llama3tok": 4}[kind])
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    if kind == "llama3tok":  # the Llama-3-style tokenizer's vocabulary: BOS 0, <|eot_id|> 4
        from tokenizers import Tokenizer as _Tok

        vocab = _Tok.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
        common.update(vocab_size=vocab, bos_token_id=0, eos_token_id=4)
    if kind in ("llama", "llama3tok"):
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    elif kind == "llama3":  # untied embeddings, llama3 rope scaling, MHA
        cfg = LlamaConfig(**{**common, "num_key_value_heads": 4}, tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
        with torch.no_grad():  # make the qkv biases matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=32, tie_word_embeddings=True))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.3)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.3)
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def default_tokenizer_dir(request) -> Path:
    """The default model's tokenizer files (all the tiny random models need). ``NBENGINE_TEST_TOKENIZER_DIR``
    points at a copy of them on a machine without the default model (the GPU machine: it has no model hub
    and the GGUF is too large to carry there)."""
    env = os.environ.get("NBENGINE_TEST_TOKENIZER_DIR")
    return Path(env) if env else request.getfixturevalue("default_model_dir")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {k: _tiny(k, root / k, default_tokenizer_dir) for k in ("llama", "llama3", "qwen2", "qwen3")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def llama3_tok_model(tmp_path_factory) -> Path:
    """A tiny random Llama whose tokenizer is the Llama-3-style one built above (adds BOS by itself)."""
    root = tmp_path_factory.mktemp("llama3-tokenizer")
    return _tiny("llama3tok", root / "model", build_llama3_style_tokenizer(root / "tokenizer"))


def _random_vlm(preset: str, folder: Path) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from random_vlm import build_random_vlm

    return build_random_vlm(preset, folder)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL (word-level tokenizer with Qwen's vision tokens, a PIL image processor)."""
    return _random_vlm("tiny", tmp_path_factory.mktemp("tiny-vlm") / "qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL (the older vision tower), same tokenizer and image processor."""
    return _random_vlm("tiny-qwen2-vl", tmp_path_factory.mktemp("tiny-qwen2-vl") / "qwen2-vl")
