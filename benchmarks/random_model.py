"""Random-weight model folders shaped like real models, for benchmarks where the words do not matter.

    python benchmarks/random_model.py qwen2.5-0.5b /tmp/random-qwen2.5-0.5b

The folder holds a transformers config, bf16 safetensors with random weights, and a synthetic
word-level tokenizer covering the whole vocabulary (token i decodes to " w<i>"), so every
generated token makes text, as with a real tokenizer, and nothing needs downloading.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# HF config class and the published architecture numbers (weights are random)
PRESETS: dict[str, tuple[str, dict]] = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")),
    "qwen3-0.6b": ("Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")),
    "llama-3.2-1b": ("LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu")),
}
BOS, EOS = 1, 2


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer: id 0 <unk>, 1 <bos>, 2 <eos>, id i >= 3 the word "w<i>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<bos>": BOS, "<eos>": EOS, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<bos>", "<eos>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "model_max_length": 1 << 20}))


def build_random_model(preset: str, folder: str | Path, seed: int = 0) -> Path:
    """Build ``folder`` for ``preset`` unless it is already there; returns it."""
    folder = Path(folder).expanduser()
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    import torch
    import transformers

    cls_name, shape = PRESETS[preset]
    config = getattr(transformers, cls_name)(**shape, bos_token_id=BOS, eos_token_id=EOS)
    print(f"building a random {preset} in {folder} ...", file=sys.stderr, flush=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, config.vocab_size)
        os.replace(tmp, folder)  # appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = sum(p.numel() for p in model.parameters())
    print(f"  {n / 1e6:.0f} M parameters", file=sys.stderr)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python {sys.argv[0]} PRESET FOLDER   (presets: {', '.join(PRESETS)})")
    print(build_random_model(sys.argv[1], sys.argv[2]))
