"""Model registry: HF architecture name -> our model class, and the check that a folder is one we can run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from ..config import rope_scaling_of
from ..errors import UnsupportedModelError
from ..layers.rotary import check_rope_scaling
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from .qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"Model architecture {architecture!r} is not supported; supported architectures: "
            f"{sorted(MODEL_REGISTRY)}."
        ) from None


def check_architecture(model_dir: str | os.PathLike) -> None:
    """Fail fast, before the tokenizer and weights load, on a model we have no implementation for
    (its architecture, or its rope scaling)."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(f"{path} names no architectures; supported architectures: "
                                    f"{sorted(MODEL_REGISTRY)}.")
    get_model_class(archs[0])  # raises UnsupportedModelError listing the supported ones
    check_rope_scaling(rope_scaling_of(cfg))
