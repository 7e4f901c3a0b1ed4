"""ModelRunner: loads the model, owns the KV pool, turns a scheduled batch into logits."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import EngineConfig, ModelConfig
from .forward_batch import ForwardBatch
from .kv_cache import KVPool
from .layers.cpu_threads import omp_team
from .loader.hf import iter_weights
from .memory import check_explicit_pool, kv_pool_tokens, read_cuda_memory, read_host_memory
from .models import get_model_class
from .quantization import KernelWarmUp, ModelQuantizer, resolve_quantization
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
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass
class StepLogits:
    logits: torch.Tensor  # [R, V] float32, rows as listed in ``rows``
    sample_rows: list[int]  # for each scheduled item that samples: its row in ``logits`` (else -1)
    input_rows: list[tuple[int, int, int]]  # per item: (first logits row, count, first prompt position)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_config = ModelConfig.from_folder(model_dir)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        mc = self.model_config
        self.context_length = min(config.context_length or mc.max_position_embeddings, mc.max_position_embeddings)
        if config.context_length and config.context_length > mc.max_position_embeddings:
            logger.warning("context_length %d is above the model's %d; using %d", config.context_length,
                           mc.max_position_embeddings, mc.max_position_embeddings)
        t0 = time.perf_counter()
        self.quantization = resolve_quantization(config.quantization, self.device, self.dtype, model_dir)
        # numba's start-up (~1-2 s of CPU) runs on a thread while the weights load
        warm_up = KernelWarmUp() if self.quantization else None
        quantizer = ModelQuantizer(self.quantization, model_dir, mc.tie_word_embeddings) if self.quantization else None
        cls = get_model_class(mc.architecture)
        with torch.device(self.device):
            self.model = cls(mc, self.device).to(self.dtype)
        skip = quantizer.skipped_weights(self.model) if quantizer else set()
        self.model.load_weights((n, w) for n, w in iter_weights(model_dir, skip=skip))
        self.model.eval()
        if warm_up is not None and (error := warm_up.wait()) is not None:
            if config.quantization != "auto":
                raise RuntimeError(f"the quantized CPU kernels failed to load ({error!r}); use quantization=None") \
                    from error
            logger.warning("the quantized CPU kernels failed to load (%r); running in float32", error)
            self.quantization = quantizer = None
            if skip:
                self.model.load_weights(iter_weights(model_dir))
        if quantizer is not None:
            self._quantize(quantizer)
        logger.info("loaded %s in %.2fs on %s (%s, quantization %s)", mc.architecture, time.perf_counter() - t0,
                    self.device, self.dtype, self.quantization)
        self.pool = self._make_pool()

    def _quantize(self, quantizer: ModelQuantizer) -> None:
        """Swap the linear layers for block-quantized ones and attend decodes from the pool with numba."""
        import numba

        from .layers.cpu_attention import CpuPagedAttention

        threads = self.config.num_threads or omp_team.wide_threads
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # this thread only
        omp_team.keep_narrow()  # numba's pool does the parallel work; torch's would fight it for the cores
        counts = quantizer.apply(self.model)
        mc = self.model_config
        self.model.attn_backend = CpuPagedAttention(mc.num_heads, mc.num_kv_heads, mc.head_dim)
        logger.info("quantized linear layers: %s", counts)

    # ------------------------------------------------------------------ KV pool
    def _make_pool(self) -> KVPool:
        mc, cfg = self.model_config, self.config
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        reading = read_cuda_memory(self.device) if self.device.type == "cuda" else read_host_memory()
        if cfg.max_total_tokens:
            tokens = cfg.max_total_tokens
            check_explicit_pool(reading, tokens, per_token)
        else:
            tokens = kv_pool_tokens(reading, bytes_per_token=per_token, weights_bytes=_module_bytes(self.model),
                                    fraction=cfg.mem_fraction_static, min_tokens=min(self.context_length, 2048),
                                    cap_tokens=self.max_running * self.context_length)
        pages = max(2, tokens // cfg.page_size + 1)
        pool = KVPool(pages, cfg.page_size, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        logger.info("KV pool: %d pages x %d tokens (%.1f MiB)", pages, cfg.page_size,
                    pages * cfg.page_size * per_token / 2**20)
        if pool.capacity_tokens < self.context_length:
            logger.info("the KV pool holds %d tokens, fewer than the context length (%d): one request is limited "
                        "to %d tokens", pool.capacity_tokens, self.context_length, pool.capacity_tokens)
        return pool

    @property
    def max_running(self) -> int:
        if self.config.max_running_requests:
            return self.config.max_running_requests
        return 256 if self.device.type == "cuda" else 64

    # ------------------------------------------------------------------ a step
    @torch.inference_mode()
    def run(self, items: list[ScheduledSeq]) -> tuple[StepLogits, list[ScheduledSeq]]:
        """Run one step; returns logits and the items in the row order used."""
        items = sorted(items, key=lambda it: it.num_tokens != 1)  # decodes first (stable)
        fb, input_rows = self._prepare(items)
        self.model.attn_backend.prepare(fb)
        omp_team.begin_step(fb.num_tokens)
        hidden = self.model(fb.input_ids, fb.positions, fb, self.pool.kv)
        logits = self.model.compute_logits(hidden.index_select(0, fb.logits_rows))
        sample_rows, r = [], 0
        for it, (_, n_in, _) in zip(items, input_rows):
            r += n_in
            if it.samples:
                sample_rows.append(r)
                r += 1
            else:
                sample_rows.append(-1)
        return StepLogits(logits, sample_rows, input_rows), items

    def _prepare(self, items: list[ScheduledSeq]) -> tuple[ForwardBatch, list[tuple[int, int, int]]]:
        ps = self.pool.page_size
        ids: list[int] = []
        pos: list[int] = []
        q_lens, q_starts, seq_lens, tables, logits_rows = [], [], [], [], []
        input_rows: list[tuple[int, int, int]] = []
        n_logits = 0
        for it in items:
            seq, start, n = it.seq, it.start, it.num_tokens
            q_starts.append(len(ids))
            ids.extend(seq.tokens(start, start + n))
            pos.extend(range(start, start + n))
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(seq.pages)
            # prompt positions whose logits score the next prompt token (input logprobs)
            lo, hi = _input_logprob_positions(it)
            rows = [q_starts[-1] + p - start for p in range(lo, hi)]
            input_rows.append((n_logits, len(rows), lo))
            logits_rows.extend(rows)
            n_logits += len(rows)
            if it.samples:
                logits_rows.append(q_starts[-1] + n - 1)
                n_logits += 1
        width = max(len(t) for t in tables)
        dev = self.device
        page_table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        seq_of_token = torch.repeat_interleave(torch.arange(len(items), device=dev),
                                               torch.tensor(q_lens, device=dev))
        out_slots = page_table[seq_of_token, positions // ps].long() * ps + positions % ps
        fb = ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=positions,
            out_slots=out_slots,
            page_table=page_table,
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=dev),
            q_lens=torch.tensor(q_lens, dtype=torch.long, device=dev),
            q_starts=torch.tensor(q_starts, dtype=torch.long, device=dev),
            logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            page_size=ps,
            dtype=self.dtype,
            num_decodes=sum(1 for n in q_lens if n == 1),
            seq_lens_host=seq_lens,
            q_lens_host=q_lens,
            q_starts_host=q_starts,
        )
        return fb, input_rows

    def release(self) -> None:
        self.pool.release()
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _input_logprob_positions(it: ScheduledSeq) -> tuple[int, int]:
    """Positions ``p`` in this chunk whose logits give the logprob of prompt token ``p + 1``.

    Only for requests asking for logprobs, only once (not again after a preemption), and only
    for prompt tokens from ``logprob_start_len`` on; the final prompt position is the sampling row.
    """
    seq = it.seq
    if not seq.logprob.return_logprob or seq.output_ids:
        return 0, 0
    first = max(seq.logprob.logprob_start_len, 1) - 1  # token 0 has no logprob
    lo = max(it.start, first, seq.input_lp_pos)
    hi = min(it.start + it.num_tokens, len(seq.prompt_ids) - 1)
    return (lo, hi) if hi > lo else (0, 0)


def _module_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
