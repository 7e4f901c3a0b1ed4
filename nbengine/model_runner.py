"""ModelRunner: loads the model, injects its kernels, owns the KV pool, turns a scheduled batch into logits.

A step is ``plan`` (host lists, :class:`BatchPlan`) -> ``prepare`` (metadata to the device: one
copy on the Triton path) -> ``launch`` (the model, or a CUDA graph replay for plain decodes).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .batch_buffers import BatchBuffers
from .batch_plan import BatchPlan
from .config import EngineConfig, ModelConfig
from .cuda_graph import CudaGraphRunner
from .forward_batch import ForwardBatch
from .kv_cache import KVCache
from .layers.cpu_threads import omp_team
from .layers.ops import Ops, build_ops, choose_backend
from .loader.hf import iter_weights
from .memory import check_explicit_pool, kv_pool_tokens, read_cuda_memory, read_host_memory, share_of
from .models import get_model_class
from .parallel.sharding import TPShard
from .quantization import ModelQuantizer, kernel_warm_up, resolve_quantization
from .scheduler import ScheduledSeq

logger = logging.getLogger("nbengine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA GPU is visible; use device='cpu'.")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # bfloat16 from Ampere on; older GPUs (a T4) get float16: the kernels need no Hopper/Ampere features there
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return _DTYPES[name]


@dataclass
class StepLogits:
    logits: torch.Tensor  # [R, V] float32, rows as listed in ``rows``
    sample_rows: list[int]  # for each scheduled item that samples: its row in ``logits`` (else -1)
    input_rows: list[tuple[int, int, int]]  # per item: (first logits row, count, first prompt position)
    hidden: torch.Tensor | None = None  # [K, hidden] float32 on the host: the final states requests asked for
    hidden_at: list[tuple[int, int, int]] | None = None  # per item: (first row in ``hidden``, count, first position)


@dataclass
class StepTimes:
    """Host seconds spent building and launching steps (to report how much a step costs the CPU)."""

    steps: int = 0
    host_s: float = 0.0
    graph_steps: int = 0


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, comm=None) -> None:
        """``comm``: this rank's tensor-parallel group (``TPComm``); the runner then holds its shard only."""
        self.config = config
        self.comm = comm
        self.model_config = mc = ModelConfig.from_folder(model_dir)
        self.shard = shard = TPShard.plan(mc, comm.rank, comm.size) if comm is not None else TPShard.plan(mc)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.context_length = min(config.context_length or mc.max_position_embeddings, mc.max_position_embeddings)
        if config.context_length and config.context_length > mc.max_position_embeddings:
            logger.warning("context_length %d is above the model's %d; using %d", config.context_length,
                           mc.max_position_embeddings, mc.max_position_embeddings)
        backend = choose_backend(config.attention_backend, self.device, config.page_size)
        t0 = time.perf_counter()
        self.quantization = resolve_quantization(config.quantization, self.device, self.dtype, model_dir,
                                                 shard.size)
        # numba's start-up (~1-2 s of CPU) runs on a thread while the weights load
        warm_up = kernel_warm_up() if self.quantization else None  # Engine() may have started it already
        quantizer = ModelQuantizer(self.quantization, model_dir, mc.tie_word_embeddings) if self.quantization else None
        with torch.device(self.device):
            self.model = get_model_class(mc.architecture)(mc, self.device, shard=shard, comm=comm).to(self.dtype)
        skip = quantizer.skipped_weights(self.model) if quantizer else set()
        # a tensor-parallel rank reads only its slice of each tensor from the files
        self.model.load_weights(iter_weights(model_dir, skip=skip, part=lambda n: shard.weight_slice(n, mc.head_dim)))
        self.model.eval()
        if warm_up is not None and (error := warm_up.wait()) is not None:
            if config.quantization != "auto":
                raise RuntimeError(f"the quantized CPU kernels failed to load ({error!r}); use quantization=None") \
                    from error
            logger.warning("the quantized CPU kernels failed to load (%r); running in float32", error)
            self.quantization = quantizer = None
            if skip:
                self.model.load_weights(iter_weights(model_dir))
        self.ops = build_ops(backend, shard.num_heads, shard.num_kv_heads, mc.head_dim)
        if quantizer is not None:
            self.ops = self._quantize(quantizer, self.ops)
        self.model.bind(self.ops)
        logger.info("loaded %s in %.2fs on %s (%s, attention: %s, quantization: %s)", mc.architecture,
                    time.perf_counter() - t0, self.device, self.dtype, self.ops.name, self.quantization)
        self.times = StepTimes()
        self.startup: dict[str, float] = {}
        self.buffers = None
        if self.ops.uses_triton:
            max_pages = -(-self.context_length // config.page_size) + 1
            self.buffers = BatchBuffers(self.token_budget, self.max_running, max_pages, config.page_size, self.dtype,
                                        self.device, fixed_width=backend == "flash_attn")
        if self.device.type == "cuda" and self.ops.uses_triton:
            self._warm_up()  # compiles every kernel before the pool takes the free memory
        self.kv_cache = self._make_pool()  # the one place the KV pool is sized
        self.graphs = self._capture_graphs()

    # ------------------------------------------------------------------ sizes
    @property
    def max_running(self) -> int:
        if self.config.max_running_requests:
            return self.config.max_running_requests
        return 256 if self.device.type == "cuda" else 64

    @property
    def token_budget(self) -> int:
        """Most tokens one step computes (``chunked_prefill_size``; never below ``max_running``)."""
        budget = self.config.chunked_prefill_size
        if budget is None:
            budget = 8192 if self.device.type == "cuda" else 512
        elif budget == -1:
            budget = self.context_length
        return max(budget, self.max_running)

    def _quantize(self, quantizer: ModelQuantizer, ops: Ops) -> Ops:
        """Swap the linear layers for block-quantized ones; decodes attend from the pool and element-wise work
        runs in numba kernels."""
        import numba

        from .layers import cpu_elementwise as ew
        from .layers.cpu_attention import CpuPagedAttention

        threads = self.config.num_threads or omp_team.wide_threads
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # this thread only
        omp_team.keep_narrow()  # numba's pool does the parallel work; torch's would fight it for the cores
        counts = quantizer.apply(self.model)
        logger.info("quantized linear layers: %s", counts)
        if hasattr(self.model, "decode_step"):
            from .models.cpu_decode import CpuDecodeStep

            self.model.decode_step = CpuDecodeStep.for_model(self.model)
        mc = self.model_config
        return dataclasses.replace(ops, name="cpu", attention=CpuPagedAttention(mc.num_heads, mc.num_kv_heads,
                                                                                mc.head_dim),
                                   add_rms_norm=ew.add_rms_norm, silu_and_mul=ew.silu_and_mul, rope_store=ew.rope_store)

    def _make_pool(self) -> KVCache:
        """The KV pool, sized by the rule in :mod:`nbengine.memory` (after the warm-up, before graph capture)."""
        mc, cfg, kv_heads = self.model_config, self.config, self.shard.num_kv_heads
        per_token = KVCache.bytes_per_token(mc.num_layers, kv_heads, mc.head_dim, self.dtype)
        reading = read_cuda_memory(self.device) if self.device.type == "cuda" else read_host_memory()
        if self.device.type == "cpu" and self.shard.size > 1:  # this node's ranks share its RAM
            reading = share_of(reading, cfg.tp_size // cfg.nnodes)
        if cfg.max_total_tokens:
            tokens = cfg.max_total_tokens
            check_explicit_pool(reading, tokens, per_token)
        else:
            tokens = kv_pool_tokens(reading, bytes_per_token=per_token, weights_bytes=_module_bytes(self.model),
                                    fraction=cfg.mem_fraction_static, min_tokens=min(self.context_length, 2048),
                                    cap_tokens=self.max_running * self.context_length)
        if self.comm is not None:  # every rank holds the same pages: the smallest rank decides
            tokens = self.comm.min_int(tokens)
        pages = max(2, tokens // cfg.page_size + 1)
        pool = KVCache(pages, cfg.page_size, mc.num_layers, kv_heads, mc.head_dim, self.dtype, self.device)
        logger.info("KV pool: %d pages x %d tokens (%.1f MiB)", pages, cfg.page_size,
                    pages * cfg.page_size * per_token / 2**20)
        if pool.capacity_tokens < self.context_length:
            logger.info("the KV pool holds %d tokens, fewer than the context length (%d): one request is limited "
                        "to %d tokens", pool.capacity_tokens, self.context_length, pool.capacity_tokens)
        return pool

    # --------------------------------------------------------------- warm-up
    def _warm_up(self) -> None:
        """One mixed step (two decodes, two prefill chunks) on a scratch pool: compiles the kernels."""
        t0 = time.perf_counter()
        mc, ps = self.model_config, self.config.page_size
        lens: list[tuple[int, int]] = []  # (new tokens, context) per sequence, within the step limits
        for n, ctx in [(1, 3), (1, 40), (70, 70), (5, 300)]:
            n = min(n, self.token_budget - sum(k for k, _ in lens))
            if n <= 0 or len(lens) == self.max_running:
                break
            lens.append((n, ctx))
        pages_per = [-(-ctx // ps) for _, ctx in lens]
        scratch = KVCache(sum(pages_per) + 1, ps, mc.num_layers, self.shard.num_kv_heads, mc.head_dim, self.dtype,
                           self.device)
        plan, first = BatchPlan(ps), 1
        for (n, ctx), np_ in zip(lens, pages_per):
            pages = list(range(first, first + np_))
            first += np_
            plan.q_starts.append(len(plan.ids))
            plan.ids.extend([0] * n)
            plan.positions.extend(range(ctx - n, ctx))
            plan.slots.extend(pages[p // ps] * ps + p % ps for p in range(ctx - n, ctx))
            plan.q_lens.append(n)
            plan.seq_lens.append(ctx)
            plan.tables.append(pages)
            plan.logits_rows.append(len(plan.ids) - 1)
        plan.q_starts.append(len(plan.ids))
        plan.num_decodes = sum(1 for n, _ in lens if n == 1)
        with torch.inference_mode():
            self.launch(self.prepare(plan), scratch.kv)
        torch.cuda.synchronize(self.device)
        scratch.release()
        del scratch
        torch.cuda.empty_cache()
        self.startup["warmup_s"] = time.perf_counter() - t0
        logger.info("warm-up (kernel compilation) took %.2fs", self.startup["warmup_s"])

    def _capture_graphs(self) -> CudaGraphRunner | None:
        cfg = self.config
        if self.device.type != "cuda":
            if cfg.cuda_graph_max_bs is not None:
                logger.warning("cuda_graph_max_bs applies to CUDA devices; there are no CUDA graphs on %s",
                               self.device)
            return None
        if cfg.disable_cuda_graph:
            return None
        if not self.ops.uses_triton:
            logger.warning("CUDA graphs need attention_backend 'triton' or 'flash_attn'; decoding eagerly")
            return None
        max_bs = min(cfg.cuda_graph_max_bs or 256, self.max_running)
        graphs = CudaGraphRunner(self.buffers, max_bs, self.model.cfg.vocab_size, self.device)
        with torch.inference_mode():
            graphs.capture(self.ops.attention.prepare, self._graph_forward)
        self.startup["cuda_graph_capture_s"] = graphs.capture_s
        return graphs

    def _graph_forward(self, fb: ForwardBatch, logits_out: torch.Tensor) -> None:
        hidden = self.model(fb.input_ids, fb.positions, fb, self.kv_cache.kv)
        self.model.compute_logits(hidden, out=logits_out)

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def run(self, items: list[ScheduledSeq], pending: torch.Tensor | None = None
            ) -> tuple[StepLogits, list[ScheduledSeq]]:
        """Run one step; returns logits and the items in the row order used. ``pending``: the previous
        step's sampled ids, still on the device, for the placeholders ``-(row + 1)`` among this step's ids."""
        t0 = time.perf_counter()
        items = sorted(items, key=lambda it: it.num_tokens != 1)  # decodes first (stable)
        vision = hasattr(self.model, "encode_images")  # (text models skip the per-request image checks)
        if vision:
            self._encode_images(items)
        plan = BatchPlan.build(items, self.config.page_size)
        fill = None
        if plan.has_pending:
            if pending is None:
                raise RuntimeError("a step feeds tokens still being sampled, but no step is in flight")
            fill = lambda ids: _fill_pending(ids, pending)  # noqa: E731
        if self.comm is not None:  # the other ranks run the same step on their shards
            self.comm.send(plan)
        logits, hidden = self.execute(plan, fill)
        for it in items if vision else ():  # image embeddings are not needed once their tokens are cached
            if it.seq.mm is not None and it.start + it.num_tokens >= it.seq.mm.end:
                it.seq.release_images()
        self.times.steps += 1
        self.times.host_s += time.perf_counter() - t0
        return StepLogits(logits, plan.sample_rows, plan.input_rows, hidden, plan.hidden_at), items

    def _encode_images(self, items: list[ScheduledSeq]) -> None:
        """Run the vision tower once per request, on the first step that computes one of its image tokens."""
        for it in items:
            mm = it.seq.mm
            if mm is not None and mm.embeds is None and mm.overlaps(it.start, it.num_tokens):
                pixels = mm.pixel_values.to(self.device, non_blocking=True)
                mm.embeds = self.model.encode_images(pixels, mm.grids).to(self.dtype)

    @torch.inference_mode()
    def execute(self, plan: BatchPlan, fill: Callable[[torch.Tensor], None] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits (and kept hidden states) of one planned step; every tensor-parallel rank runs this with
        the same plan. ``fill`` writes the ids still on the device into the placeholders (overlap)."""
        if self.graphs is not None and self.graphs.can_run(plan):
            self.times.graph_steps += 1
            return self.graphs.replay(plan, fill), None
        fb = plan.attach_multimodal(self.prepare(plan), self.device)
        if fill is not None:
            fill(fb.input_ids)
        keep = torch.tensor(plan.hidden_rows, dtype=torch.long, device=self.device) if plan.hidden_rows else None
        logits, hidden = self.launch(fb, self.kv_cache.kv, keep)
        return logits, None if hidden is None else hidden.float().cpu()

    def prepare(self, plan: BatchPlan) -> ForwardBatch:
        """The step's metadata on the device, and the attention backend's plan for it."""
        fb = self.buffers.load(plan) if self.buffers is not None else plan.to_tensors(self.device, self.dtype)
        self.ops.attention.prepare(fb)
        omp_team.begin_step(fb.num_tokens)
        return fb

    def launch(self, fb: ForwardBatch, kv: list[torch.Tensor], keep_rows: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model over ``fb``: float32 logits of its ``logits_rows``, and the final hidden states of
        ``keep_rows`` (None when not asked)."""
        hidden = self.model(fb.input_ids, fb.positions, fb, kv)
        logits = self.model.compute_logits(hidden.index_select(0, fb.logits_rows))
        return logits, hidden.index_select(0, keep_rows) if keep_rows is not None else None

    def release(self) -> None:
        self.graphs = None
        self.buffers = None
        self.kv_cache.release()
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _fill_pending(ids: torch.Tensor, pending: torch.Tensor) -> None:
    """Replace the placeholders ``-(row + 1)`` in ``ids`` with ``pending[row]``, on the device (no sync)."""
    rows = (-ids - 1).clamp_(min=0).long()
    ids.copy_(torch.where(ids < 0, pending.index_select(0, rows).to(ids.dtype), ids))


def _module_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
