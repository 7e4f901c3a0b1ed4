"""Qwen2 / Qwen2.5: the Llama decoder with a bias on q, k and v (set from the config)."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, device: torch.device, **parallel) -> None:
        cfg.attention_bias = True
        super().__init__(cfg, device, **parallel)
