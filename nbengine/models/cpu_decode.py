"""The Llama-family decode step of the quantized CPU path, in numpy and numba calls.

A step whose rows are all decodes (the steady state of generation) runs here instead of through the
modules: the same computation as ``LlamaForCausalLM.forward`` with the CPU ``Ops`` (numba add+RMSNorm,
rotary+KV store, paged attention, SiLU-and-mul, block-quantized matmuls), but on numpy arrays held
since the model was bound. At batch 1 the module path spent about as long in torch's per-op
dispatch, tensor views and Python module calls (~12 torch ops a layer at several µs each) as in the
element-wise work itself; here each layer is nine numba calls and a few numpy views. Prefill and
mixed steps keep the module path; models with per-head q/k norms (Qwen3) too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..forward_batch import ForwardBatch
from ..layers import cpu_attention as ca
from ..layers import cpu_elementwise as ew
from ..layers.quant_linear import QuantLinear

Matmul = Callable[[np.ndarray], np.ndarray]


def _matmul(linear) -> Matmul:
    if isinstance(linear, QuantLinear):
        return linear.matmul_numpy
    return lambda x: linear(torch.from_numpy(x)).numpy()  # a layer left in float (rare: odd shapes)


@dataclass
class _Layer:
    input_norm: np.ndarray
    post_norm: np.ndarray
    qkv: Matmul
    o: Matmul
    gate_up: Matmul
    down: Matmul


class CpuDecodeStep:
    """``__call__(input_ids, positions, fb, kv) -> hidden [B, hidden]`` for an all-decode ``fb``."""

    def __init__(self, model) -> None:
        cfg = model.cfg
        self.h, self.hk, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.inter = cfg.intermediate_size
        self.eps = np.float32(cfg.rms_norm_eps)
        self.scale = np.float32(cfg.head_dim ** -0.5)
        self.embed = model.embed_tokens.weight.detach().numpy()
        self.final_norm = model.norm.weight.detach().numpy()
        self.cos_sin = model.rotary.cos_sin.numpy()
        self.layers = [_Layer(layer.input_layernorm.weight.detach().numpy(),
                              layer.post_attention_layernorm.weight.detach().numpy(),
                              _matmul(layer.self_attn.qkv_proj), _matmul(layer.self_attn.o_proj),
                              _matmul(layer.mlp.gate_up_proj), _matmul(layer.mlp.down_proj))
                       for layer in model.layers]
        self._kv_source: list[torch.Tensor] | None = None
        self._kv: list[tuple[np.ndarray, np.ndarray]] = []

    @classmethod
    def for_model(cls, model) -> "CpuDecodeStep | None":
        """The fast step for ``model``, or None where it does not apply (per-head q/k norms)."""
        return None if model.cfg.qk_norm else cls(model)

    def _kv_views(self, kv: list[torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        if kv is not self._kv_source:  # one pool for the engine's life: built once
            self._kv = [(t.numpy(), t.numpy().reshape(t.shape[0], -1)) for t in kv]
            self._kv_source = kv
        return self._kv

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                 kv: list[torch.Tensor]) -> torch.Tensor:
        meta = fb.attn  # CpuPagedAttention.prepare: the decodes' page-table rows and lengths, as numpy
        attend = ca.paged_decode_attention_serial if meta.keys < ca.SERIAL_MAX_KEYS else ca.paged_decode_attention
        pos, slots, eps = positions.numpy(), fb.out_slots.numpy(), self.eps
        h, hk, d = self.h, self.hk, self.d
        residual = self.embed[input_ids.numpy()]  # [B, hidden], a fresh array
        b = residual.shape[0]
        normed = np.empty_like(residual)
        att = np.empty((b, h, d), np.float32)
        act = np.empty((b, self.inter), np.float32)
        x = None
        for layer, (kv4, kv2) in zip(self.layers, self._kv_views(kv)):
            if x is None:
                ew._rms_norm(residual, layer.input_norm, eps, normed)
            else:
                ew._add_rms_norm(x, residual, layer.input_norm, eps, normed)
            qkv = layer.qkv(normed)
            ew._rope_store(qkv, pos, self.cos_sin, kv2, slots, h, hk, d)
            attend(np.ascontiguousarray(qkv[:, : h * d]).reshape(b, h, d), kv4, meta.page_table, meta.seq_lens,
                   fb.page_size, self.scale, att)
            ew._add_rms_norm(layer.o(att.reshape(b, h * d)), residual, layer.post_norm, eps, normed)
            ew._silu_and_mul(layer.gate_up(normed), act)
            x = layer.down(act)
        ew._add_rms_norm(x, residual, self.final_norm, eps, normed)
        return torch.from_numpy(normed)
