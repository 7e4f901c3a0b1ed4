"""Image inputs: reading images, each vision family's input processor, the per-request inputs."""

from __future__ import annotations

import json
from pathlib import Path

from .images import load_image
from .inputs import MultimodalInputs

__all__ = ["MultimodalInputs", "load_image", "load_processor"]

# architecture -> the input processor class of its family (imported lazily: transformers is slow to import)
_PROCESSORS = {"Qwen2_5_VLForConditionalGeneration": ("qwen_vl", "QwenVLProcessor"),
               "Qwen2VLForConditionalGeneration": ("qwen_vl", "QwenVLProcessor")}


def load_processor(model_dir: str | Path, max_images: int = 16):
    """The folder's input processor, or None for a text-only model."""
    model_dir = Path(model_dir)
    archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or [""]
    entry = _PROCESSORS.get(archs[0])
    if entry is None:
        return None
    import importlib

    module = importlib.import_module(f".{entry[0]}", __name__)
    return getattr(module, entry[1])(model_dir, max_images=max_images)
