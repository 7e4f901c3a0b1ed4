"""Qwen3: the Llama decoder with per-head RMSNorm on q and k before the rotation."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, device: torch.device, **parallel) -> None:
        cfg.qk_norm = True
        super().__init__(cfg, device, **parallel)
