"""Qwen2.5-VL and Qwen2-VL: the Qwen2 decoder with M-RoPE, plus the vision tower whose embeddings
replace the image tokens' rows.

The engine thread asks :meth:`Qwen2_5_VLForConditionalGeneration.encode_images` once per request
(the embeddings are kept on the request and sliced per prefill chunk); a step then carries the
image rows and embeddings and the 3-D positions in its ``ForwardBatch``.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

from ..config import ModelConfig
from ..errors import UnsupportedModelError
from ..forward_batch import ForwardBatch
from ..layers.rotary import StepRope
from .qwen2 import Qwen2ForCausalLM
from .qwen_vision import QwenVisionTower


def mrope_section_of(raw: dict[str, Any]) -> list[int]:
    """``mrope_section`` from a Qwen2-VL / Qwen2.5-VL config (top level or text_config; rope_scaling
    or transformers 5's rope_parameters)."""
    for cfg in (raw.get("text_config") or {}, raw):
        for key in ("rope_scaling", "rope_parameters"):
            section = (cfg.get(key) or {}).get("mrope_section")
            if section:
                return list(section)
    raise UnsupportedModelError("the config has no rope_scaling.mrope_section; a Qwen2.5-VL config needs one.")


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    legacy_tower = False  # Qwen2-VL's older vision tower

    def __init__(self, cfg: ModelConfig, device: torch.device, **parallel) -> None:
        super().__init__(cfg, device, **parallel)
        self.visual = QwenVisionTower(cfg.raw["vision_config"], legacy=self.legacy_tower)
        self.mrope_section = mrope_section_of(cfg.raw)
        if sum(self.mrope_section) * 2 != cfg.head_dim:
            raise UnsupportedModelError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 "
                                        f"({cfg.head_dim // 2}).")

    def embed(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if fb.mm_embeds is not None:
            x = x.index_copy(0, fb.mm_rows.long(), fb.mm_embeds.to(x.dtype))
        return x

    def step_rope(self, positions: torch.Tensor, fb: ForwardBatch) -> StepRope:
        if fb.mrope_positions is None:  # no image token in the step: the three rows are equal
            return self.rotary.for_step(positions)
        return self.rotary.for_step(positions, fb.mrope_positions, self.mrope_section)

    def encode_images(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """One request's images -> ``[image tokens, hidden]`` embeddings, in prompt order."""
        return self.visual(pixels, grids)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen: set[str] = set()

        def text_only() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                # transformers 5 saves model.language_model.* / model.visual.*; older folders model.* / visual.*
                name = name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
                if name.startswith("visual."):
                    self.visual.load_weight(name.removeprefix("visual."), tensor)
                    seen.add(name)
                else:
                    yield name, tensor

        super().load_weights(text_only())
        missing = [n for n, _ in self.visual.named_parameters() if f"visual.{n}" not in seen]
        if missing:
            raise ValueError(f"the checkpoint lacks vision weights {missing[:4]} ({len(missing)} in all)")


class Qwen2VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    legacy_tower = True
