"""CudaGraphRunner: decode steps captured as CUDA graphs, one per padded batch size.

Each graph runs the whole model and the LM head for ``bs`` rows over the static metadata that
``BatchBuffers`` lays out for a padded decode batch of ``bs`` (page table ``[bs, max_pages]``
at most, its width read on the device). A step of ``n <= max_bs`` decodes loads its metadata
padded to the smallest captured ``bs >= n`` (one host-to-device copy) and replays that graph.
All graphs share one memory pool and write their logits into one ``[max_bs, vocab]`` buffer.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from .batch_buffers import BatchBuffers
from .batch_plan import BatchPlan
from .forward_batch import ForwardBatch

logger = logging.getLogger("nbengine")


def graph_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 to 32, every 16 to 128, every 32 beyond; and ``max_bs`` itself."""
    sizes = [1, 2, 4, 8] + list(range(16, 33, 8)) + list(range(48, 129, 16)) + list(range(160, max_bs + 1, 32))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


class CudaGraphRunner:
    def __init__(self, buffers: BatchBuffers, max_bs: int, vocab_size: int, device: torch.device) -> None:
        self.buffers = buffers
        self.max_bs = max_bs
        self.sizes = graph_batch_sizes(max_bs)
        self.logits = torch.empty(max_bs, vocab_size, dtype=torch.float32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0

    def capture(self, prepare: Callable[[ForwardBatch], None],
                forward: Callable[[ForwardBatch, torch.Tensor], None]) -> None:
        """``prepare(fb)`` plans on the host; ``forward(fb, logits_out)`` runs the model into ``logits_out``."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool memory
            fb = self.buffers.load(BatchPlan(self.buffers.page_size, q_starts=[0]), pad_to=bs)
            prepare(fb)
            out = self.logits[:bs]
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                forward(fb, out)  # warm-up outside the capture (lazy inits, autotuning)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                forward(fb, out)
            self._graphs[bs] = graph
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.2fs", len(self.sizes),
                    self.sizes, self.capture_s)

    def can_run(self, plan: BatchPlan) -> bool:
        return plan.is_plain_decode and plan.batch_size <= self.max_bs

    def replay(self, plan: BatchPlan, fill_ids: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """``fill_ids(ids)`` edits the step's input ids on the device before the replay (overlap's placeholders)."""
        n = plan.batch_size
        bs = next(s for s in self.sizes if s >= n)
        offsets = self.buffers.write(plan, pad_to=bs)[-1]
        if fill_ids is not None:
            fill_ids(self.buffers.device_buf[offsets[0]:offsets[0] + bs])
        self._graphs[bs].replay()
        return self.logits[:n]
