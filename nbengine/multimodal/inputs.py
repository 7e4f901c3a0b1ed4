"""MultimodalInputs: one request's images as the engine thread sees them.

Built on the caller's thread by a processor (pixels, where the image tokens sit in the expanded
prompt, the 3-D positions); the engine thread adds the embeddings once (``embeds``), slices them
per prefill chunk, and drops them when the prompt has been computed, the request is preempted or ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class MultimodalInputs:
    pixel_values: torch.Tensor  # [patches, 3 * tp * p * p] float32, the images in prompt order
    grids: list[tuple[int, int, int]]  # (t, h, w) patches per image
    spans: list[tuple[int, int]]  # (first prompt position, tokens) of each image's tokens, in order
    mrope: torch.Tensor  # [3, prompt length] int64 M-RoPE positions of the prompt
    mrope_delta: int  # a generated token at position p turns by p + mrope_delta (all three rows)
    hashes: list[str] = field(default_factory=list)  # one per image (its pixels): the prefix cache's key of its tokens
    embeds: torch.Tensor | None = field(default=None, repr=False)  # [image tokens, hidden] on the device

    @property
    def end(self) -> int:
        """The prompt position after the last image token."""
        return self.spans[-1][0] + self.spans[-1][1]

    def positions(self, start: int, n: int) -> tuple[list[int], torch.Tensor | None]:
        """Positions of tokens ``start .. start+n-1``: the 1-D list (the text row) and, when the chunk
        holds image tokens, the ``[3, n]`` M-RoPE rows (else None: the rows are equal)."""
        prompt = self.mrope.shape[1]
        inside = max(0, min(start + n, prompt) - start)
        flat = self.mrope[0, start:start + inside].tolist() + list(
            range(start + inside + self.mrope_delta, start + n + self.mrope_delta))
        if not self.overlaps(start, n):
            return flat, None
        rows = torch.tensor(flat, dtype=torch.long).expand(3, n).clone()
        rows[:, :inside] = self.mrope[:, start:start + inside]
        return flat, rows

    def overlaps(self, start: int, n: int) -> bool:
        return any(off < start + n and start < off + length for off, length in self.spans)

    def pieces(self, start: int, n: int) -> list[tuple[int, int, int]]:
        """For tokens ``start .. start+n-1``: (offset in the chunk, offset in ``embeds``, count) of each
        run of image tokens."""
        out, emb = [], 0
        for off, length in self.spans:
            lo, hi = max(off, start), min(off + length, start + n)
            if lo < hi:
                out.append((lo - start, emb + lo - off, hi - lo))
            emb += length
        return out
