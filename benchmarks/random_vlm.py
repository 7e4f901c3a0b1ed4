"""Random-weight Qwen2.5-VL / Qwen2-VL folders (tiny ones for tests, one in the 3B shape for benchmarks).

    python benchmarks/random_vlm.py tiny /tmp/random-qwen2.5-vl-tiny
    python benchmarks/random_vlm.py tiny-qwen2-vl /tmp/random-qwen2-vl-tiny
    python benchmarks/random_vlm.py small /tmp/random-qwen2.5-vl-small   # CPU benchmark size
    python benchmarks/random_vlm.py qwen2.5-vl-3b /tmp/random-qwen2.5-vl-3b

The folder holds the transformers config, safetensors with random weights, the word-level tokenizer
of ``random_model.py`` with Qwen's vision tokens added (ids 3-6), a small chat template that writes
Qwen's image placeholder, and ``preprocessor_config.json`` for transformers' Qwen2-VL image
processor (the slow PIL one works without torchvision).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

VISION_TOKENS = {"<|vision_start|>": 3, "<|vision_end|>": 4, "<|image_pad|>": 5, "<|video_pad|>": 6}
BOS, EOS = 1, 2

PRESETS: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                  tie_word_embeddings=False),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        pixels=(28 * 28 * 4, 28 * 28 * 64), dtype="float32"),
    "tiny-qwen2-vl": dict(  # Qwen2-VL's older tower: LayerNorm, quick_gelu MLP, no windows
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]},
                  tie_word_embeddings=False),
        vision=dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        pixels=(28 * 28 * 4, 28 * 28 * 64), dtype="float32", family="qwen2_vl"),
    "small": dict(  # CPU benchmarks: big enough that the model, not the host loop, is timed
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=8192, max_position_embeddings=4096, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
                  tie_word_embeddings=True),
        vision=dict(depth=4, hidden_size=256, intermediate_size=704, num_heads=4, out_hidden_size=512, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3]),
        pixels=(28 * 28 * 4, 28 * 28 * 1280), dtype="float32"),
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                  tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]),
        pixels=(28 * 28 * 4, 28 * 28 * 1280), dtype="bfloat16"),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Word-level: 0 <unk>, 1 <bos>, 2 <eos>, 3-6 Qwen's vision tokens, 7-8 chat markers, then "w<i>"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    special = {"<unk>": 0, "<bos>": BOS, "<eos>": EOS, **VISION_TOKENS, "<|im_start|>": 7, "<|im_end|>": 8}
    vocab = {**special, **{f"w{i}": i for i in range(len(special), vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(list(special))  # matched inside text without spaces around them
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "model_max_length": 1 << 20,
         "chat_template": CHAT_TEMPLATE}))


def build_random_vlm(preset: str, folder: str | Path, seed: int = 0) -> Path:
    """Build ``folder`` for ``preset`` unless it is already there; returns it."""
    folder = Path(folder).expanduser()
    if (folder / "config.json").exists() and (folder / "preprocessor_config.json").exists():
        return folder
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    import torch
    import transformers

    p = PRESETS[preset]
    family = "Qwen2VL" if p.get("family") == "qwen2_vl" else "Qwen2_5_VL"
    config = getattr(transformers, f"{family}Config")(
        text_config=dict(**p["text"], bos_token_id=BOS, eos_token_id=EOS), vision_config=p["vision"],
        vision_start_token_id=3, vision_end_token_id=4, image_token_id=5, video_token_id=6,
        bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=p["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).to(getattr(torch, p["dtype"]))
    if preset.startswith("tiny"):
        with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
            for name, w in model.named_parameters():
                if w.dim() == 2 and "visual" not in name:
                    w.mul_(3.0)
                elif name.endswith("bias"):
                    w.normal_(0, 0.2)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer(tmp, p["text"]["vocab_size"])
        v = p["vision"]
        (tmp / "preprocessor_config.json").write_text(json.dumps({  # the same image processor for both families
            "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": p["pixels"][0],
            "max_pixels": p["pixels"][1], "patch_size": v["patch_size"],
            "temporal_patch_size": v["temporal_patch_size"],
            "merge_size": v["spatial_merge_size"], "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "do_resize": True, "do_normalize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True}))
        os.replace(tmp, folder)  # appears whole or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(f"usage: python {sys.argv[0]} PRESET FOLDER   (presets: {', '.join(PRESETS)})")
    print(build_random_vlm(sys.argv[1], sys.argv[2]))
