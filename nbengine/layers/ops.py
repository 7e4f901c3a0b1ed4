"""The kernels one model step calls, chosen once by the runner and injected into the model.

``Ops`` bundles the attention backend with the element-wise kernels it pairs with: the plain
torch references (the CPU path, and ``attention_backend="torch"`` anywhere) or the Triton
kernels (``"triton"``, and ``"flash_attn"`` for everything but attention).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import NBEngineError
# Imported with the engine, on purpose: its import-time SDPA probe runs a first OpenMP region on the
# importing (main) thread. GNU OpenMP then manages more threads than there are cores and shortens
# its workers' spin-wait; imported lazily on the engine thread instead, the engine thread's worker
# spun on a whole core and CPU decode ran 13-20x slower on the loaded 2-core machine (docs/NOTES.md).
from .attention import TorchPagedAttention
from .rotary import StepRope

logger = logging.getLogger("nbengine")

BACKENDS = ("triton", "flash_attn", "torch")


@dataclass(frozen=True)
class Ops:
    name: str  # the attention backend's name
    attention: Any  # prepare(ForwardBatch) per step, forward(q, kv_layer, ForwardBatch) per layer
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (qkv, rope, kv_layer, slots, heads, kv_heads, head_dim, q_norm, k_norm, eps): q/k norm, rotary, K/V store
    rope_store: Callable[..., None]

    @property
    def uses_triton(self) -> bool:
        return self.name != "torch"


def choose_backend(requested: str | None, device: torch.device, page_size: int) -> str:
    """The attention backend for this device: the request checked, or the best one available."""
    from ..kernels import interpreting, triton_available

    if requested is None:
        if device.type != "cuda":
            return "torch"
        if triton_available():
            return "triton"
        logger.warning("triton is not installed; running attention in plain torch (pip install triton)")
        return "torch"
    if requested not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {requested!r}.")
    if requested == "triton":
        if not triton_available():
            raise NBEngineError("attention_backend='triton' needs the triton package: pip install triton.")
        if device.type != "cuda" and not interpreting():
            raise ValueError("attention_backend='triton' runs on CUDA GPUs (on CPU only inside Triton's "
                             "interpreter, TRITON_INTERPRET=1, for tests); use attention_backend='torch' on CPU.")
    if requested == "flash_attn":
        from .flash_attention import flash_attn_available

        if device.type != "cuda" or not flash_attn_available():
            raise NBEngineError("attention_backend='flash_attn' needs a CUDA GPU and the flash-attn package "
                                "(pip install flash-attn); use 'triton' (the default on CUDA) or 'torch'.")
        if page_size % 256:
            raise ValueError(f"attention_backend='flash_attn' reads paged KV in pages of a multiple of 256 "
                             f"tokens; got page_size={page_size}. Pass page_size=256, or use 'triton'.")
    return requested


def build_ops(backend: str, num_heads: int, num_kv_heads: int, head_dim: int) -> Ops:
    if backend == "torch":
        from ..kernels import reference as ref

        def rope_store(qkv, rope: StepRope, kv_layer, slots, h, hk, d, q_norm, k_norm, eps) -> None:
            ref.rope_store(qkv, rope.cis, kv_layer, slots, h, hk, d, q_norm, k_norm, eps)

        return Ops("torch", TorchPagedAttention(num_heads, num_kv_heads, head_dim), ref.add_rms_norm,
                   ref.silu_and_mul, rope_store)

    from ..kernels import activation, norm
    from ..kernels import rope_store as rs

    def triton_rope_store(qkv, rope: StepRope, kv_layer, slots, h, hk, d, q_norm, k_norm, eps) -> None:
        rs.rope_store(qkv, rope.positions, rope.cos_sin, kv_layer, slots, h, hk, d, q_norm, k_norm, eps,
                      mrope_positions=rope.mrope, mrope_section=rope.mrope_section)

    if backend == "flash_attn":
        from .flash_attention import FlashAttention

        attention: Any = FlashAttention(num_heads, num_kv_heads, head_dim)
    else:
        from .triton_attention import TritonPagedAttention

        attention = TritonPagedAttention(num_heads, num_kv_heads, head_dim)
    return Ops(backend, attention, norm.add_rms_norm, activation.silu_and_mul, triton_rope_store)
