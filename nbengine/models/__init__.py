"""Model registry: HF architecture name -> our model class."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from .llama import LlamaForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
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
