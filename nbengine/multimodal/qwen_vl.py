"""Qwen2.5-VL's input processor: images through the model folder's image processor, each image
placeholder expanded to the image's tokens, and the prompt's M-RoPE positions.

The prompt holds one ``<|image_pad|>`` per image (the chat template writes
``<|vision_start|><|image_pad|><|vision_end|>``), as in SGLang; the processor repeats it
``t * h * w / merge^2`` times for an image of ``t x h x w`` patches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .images import load_image
from .inputs import MultimodalInputs

logger = logging.getLogger("nbengine")

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class QwenVLProcessor:
    placeholder = PLACEHOLDER

    def __init__(self, model_dir: Path, max_images: int = 16) -> None:
        raw = json.loads((model_dir / "config.json").read_text())
        vc = raw["vision_config"]
        self.image_token_id = raw.get("image_token_id", 151655)
        self.merge = vc.get("spatial_merge_size", 2)
        self.max_images = max_images
        with warnings.catch_warnings():  # "torchvision is not available, using the PIL backend": expected here
            warnings.simplefilter("ignore")
            from transformers import AutoImageProcessor

            try:
                self.image_processor = AutoImageProcessor.from_pretrained(str(model_dir))
            except Exception as e:  # noqa: BLE001 - older folders: build the Qwen2-VL one from its config
                logger.info("AutoImageProcessor failed (%r); using Qwen2VLImageProcessor", e)
                from transformers import Qwen2VLImageProcessor

                self.image_processor = Qwen2VLImageProcessor.from_pretrained(str(model_dir))

    def process(self, ids: list[int], images: list[Any], where: str) -> tuple[list[int], MultimodalInputs | None]:
        """``ids`` with each placeholder expanded, and the request's multimodal inputs (None without images)."""
        slots = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(images) > self.max_images:
            raise ValueError(f"{where} has {len(images)} images; at most {self.max_images} per prompt are allowed "
                             "(the engine's max_images_per_prompt).")
        if len(slots) != len(images):
            raise ValueError(
                f"{where} has {len(slots)} image placeholder(s) but {len(images)} image(s) were given; put one "
                f"{PLACEHOLDER!r} in the prompt where each image goes (the chat template writes it for "
                "{'type': 'image'} content parts).")
        if not images:
            return ids, None
        pil = [load_image(im, f"{where}, image {k}" if len(images) > 1 else f"{where}'s image")
               for k, im in enumerate(images)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = self.image_processor(images=pil, return_tensors="pt")
        pixels = out["pixel_values"].float()
        grids = [tuple(int(x) for x in g) for g in out["image_grid_thw"].tolist()]
        counts = [t * h * w // (self.merge * self.merge) for t, h, w in grids]
        expanded: list[int] = []
        spans: list[tuple[int, int]] = []
        prev = 0
        for slot, count in zip(slots, counts):
            expanded.extend(ids[prev:slot])
            spans.append((len(expanded), count))
            expanded.extend([self.image_token_id] * count)
            prev = slot + 1
        expanded.extend(ids[prev:])
        mrope, delta = mrope_positions(len(expanded), spans, grids, self.merge)
        at, hashes = 0, []
        for t, h, w in grids:
            hashes.append(hashlib.sha256(pixels[at:at + t * h * w].numpy().tobytes()).hexdigest()[:16])
            at += t * h * w
        return expanded, MultimodalInputs(pixels, grids, spans, mrope, delta, hashes)


def mrope_positions(length: int, spans: list[tuple[int, int]], grids: list[tuple[int, int, int]],
                    merge: int) -> tuple[torch.Tensor, int]:
    """``[3, length]`` (temporal, height, width) positions and the delta for later tokens.

    Text tokens count up by one on all three rows; an image starting at position ``s`` puts its token
    ``(ti, hi, wi)`` at ``(s + ti, s + hi, s + wi)`` and the text after it resumes at
    ``s + max(t, h, w)`` (merged units)."""
    rows = torch.empty(3, length, dtype=torch.long)
    pos, at = 0, 0
    for (off, count), (t, h, w) in zip(spans, grids):
        n = off - at
        rows[:, at:off] = torch.arange(pos, pos + n)
        pos += n
        gh, gw = h // merge, w // merge
        ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        rows[:, off:off + count] = torch.stack([ti.flatten(), hi.flatten(), wi.flatten()]) + pos
        pos += max(t, gh, gw)
        at = off + count
    rows[:, at:] = torch.arange(pos, pos + length - at)
    delta = int(rows.max()) + 1 - length
    return rows, delta
