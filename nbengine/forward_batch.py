"""Per-step batch metadata, device-agnostic: what every attention backend and model needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ForwardBatch:
    """One step's flattened tokens. Rows are ordered by sequence; sequences with one new token
    (decodes) come first, so rows ``[0, num_decodes)`` are one token each.

    input_ids, positions, out_slots: ``[T]`` (out_slots = KV slot each new token writes to;
        negative = a padded row that writes nothing)
    page_table: ``[B, W]`` int32 page ids; the Triton path reads it flat, with the row stride in
        the device scalar ``page_table_width`` (so a captured CUDA graph serves any width)
    seq_lens:   ``[B]`` tokens in the cache after this step (prefix + new)
    q_starts:   ``[B + 1]`` first row of each sequence's new tokens, then the total
    logits_rows: ``[R]`` rows whose logits are needed (sampling + requested input logprobs)
    The torch path builds int64 tensors; the Triton path int32 views of one device buffer.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    out_slots: torch.Tensor
    page_table: torch.Tensor
    seq_lens: torch.Tensor
    q_starts: torch.Tensor
    logits_rows: torch.Tensor
    page_size: int
    num_decodes: int
    dtype: torch.dtype  # activation dtype (masks are built in it)
    # host copies, so backends can plan without device syncs
    seq_lens_host: list[int] = field(default_factory=list)
    q_lens_host: list[int] = field(default_factory=list)
    q_starts_host: list[int] = field(default_factory=list)
    page_table_width: torch.Tensor | None = None  # [1] int32 on the device (Triton path)
    attn: Any = None  # the attention backend's own prepared metadata
    # vision models, steps that compute image tokens: M-RoPE positions [3, T] (None when the three rows
    # would equal ``positions``) and the image embeddings [K, hidden] that replace rows ``mm_rows`` [K]
    mrope_positions: torch.Tensor | None = None
    mm_rows: torch.Tensor | None = None
    mm_embeds: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens_host)
