"""Llama-family decoder (Llama 2/3.x, SmolLM2; Qwen2 and Qwen3 reuse it with two switches).

Reads top to bottom: embed -> N x (norm, attention over the paged cache, norm, SwiGLU MLP)
-> norm -> LM head. ``T`` is the number of tokens in the step (all sequences flattened).
The residual stream is carried beside the hidden state, so each norm also does the residual
add (one fused kernel on GPU). The kernels and the attention backend come from ``ops``, which
the runner injects with :meth:`LlamaForCausalLM.bind`; the model never picks them itself.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..forward_batch import ForwardBatch
from ..layers.linear import Linear
from ..layers.norm import RMSNorm
from ..layers.ops import Ops
from ..layers.rotary import Rotary, StepRope, interleave_rows
from ..parallel.sharding import TPShard


def _sum_ranks(comm, t: torch.Tensor) -> torch.Tensor:
    """The all-reduce after a row-parallel layer (nothing without tensor parallelism)."""
    return t if comm is None else comm.all_reduce(t)


class Attention(nn.Module):
    """Column-parallel q/k/v (this rank's heads), row-parallel o_proj, one all-reduce."""

    def __init__(self, cfg: ModelConfig, shard: TPShard, comm=None) -> None:
        super().__init__()
        self.h, self.hk, self.d = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        self.comm = comm
        self.qkv_proj = Linear(cfg.hidden_size, {"q_proj": self.h * self.d, "k_proj": self.hk * self.d,
                                                 "v_proj": self.hk * self.d}, bias=cfg.attention_bias)
        self.o_proj = Linear(self.h * self.d, {"o_proj": cfg.hidden_size})
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: StepRope, kv_layer: torch.Tensor, fb: ForwardBatch,
                ops: Ops) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (H + 2*Hkv) * D]
        # per-head q/k norm (Qwen3), rotary on q and k, and the new K/V written to their cache slots
        ops.rope_store(qkv, rope, kv_layer, fb.out_slots, self.h, self.hk, self.d,
                       self.q_norm.weight if self.q_norm is not None else None,
                       self.k_norm.weight if self.k_norm is not None else None,
                       self.q_norm.eps if self.q_norm is not None else 0.0)
        out = ops.attention.forward(qkv[:, : self.h * self.d], kv_layer, fb)  # reads the cache
        return _sum_ranks(self.comm, self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, comm=None) -> None:
        super().__init__()
        self.inter = shard.intermediate
        self.comm = comm
        self.gate_up_proj = Linear(cfg.hidden_size, {"gate_proj": self.inter, "up_proj": self.inter})
        self.down_proj = Linear(self.inter, {"down_proj": cfg.hidden_size})

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return _sum_ranks(self.comm, self.down_proj(ops.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: TPShard, comm=None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, shard, comm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, shard, comm)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, rope: StepRope, kv_layer: torch.Tensor,
                fb: ForwardBatch, ops: Ops) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual, ops)
        h = self.self_attn(h, rope, kv_layer, fb, ops)
        h, residual = self.post_attention_layernorm(h, residual, ops)
        return self.mlp(h, ops), residual


class Embedding(nn.Module):
    """Vocabulary rows ``[start, start + rows)``; with tensor parallelism other ranks' ids embed to
    zero here and the all-reduce sums in the rank that holds them."""

    def __init__(self, rows: int, hidden_size: int, start: int = 0, comm=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden_size), requires_grad=False)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        elsewhere = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        return self.comm.all_reduce(x.masked_fill_(elsewhere.unsqueeze(-1), 0))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, device: torch.device, shard: TPShard | None = None, comm=None) -> None:
        """``shard``/``comm``: this rank's part of the model and its group (None: the whole model)."""
        super().__init__()
        self.cfg = cfg
        self.shard = shard = shard or TPShard.plan(cfg)
        self.comm = comm
        self.embed_tokens = Embedding(shard.vocab_rows, cfg.hidden_size, shard.vocab_start, comm)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard, comm) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, {"lm_head": shard.vocab_rows})
        self.rotary = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, device)
        self.ops: Ops | None = None  # injected by the runner (bind)
        self.decode_step = None  # all-decode steps' fast path (the quantized CPU path sets one: cpu_decode)
        self._head: Linear | None = None

    def bind(self, ops: Ops) -> None:
        """Use these kernels and this attention backend from now on."""
        self.ops = ops

    # ----------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                kv: list[torch.Tensor]) -> torch.Tensor:
        """Returns the final-norm hidden states ``[T, hidden]``."""
        if self.decode_step is not None and fb.num_decodes == fb.num_tokens:
            return self.decode_step(input_ids, positions, fb, kv)
        ops = self.ops
        x = self.embed(input_ids, fb)
        residual = None
        rope = self.step_rope(positions, fb)
        for layer, kv_layer in zip(self.layers, kv):
            x, residual = layer(x, residual, rope, kv_layer, fb, ops)
        return self.norm(x, residual, ops)[0]

    def embed(self, input_ids: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        """The step's input embeddings ``[T, hidden]`` (vision models put image embeddings in)."""
        return self.embed_tokens(input_ids)

    def step_rope(self, positions: torch.Tensor, fb: ForwardBatch) -> StepRope:
        """The step's rotary inputs (M-RoPE models use the batch's 3-D positions)."""
        return self.rotary.for_step(positions)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits of ``hidden``'s rows (written into ``out`` when given)."""
        logits = self._head(hidden)
        if self.comm is not None:  # each rank scored its vocabulary rows: put them side by side
            logits = self.comm.all_gather(logits)[:, : self.cfg.vocab_size]
        if out is None:
            return logits.float()
        return out.copy_(logits)

    # ----------------------------------------------------------------- loading
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        cfg = self.cfg
        params = dict(self.named_parameters())
        seen: set[str] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                tensor = interleave_rows(tensor, tensor.shape[0] // cfg.head_dim, cfg.head_dim)  # this rank's heads
            elif name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] < self.shard.vocab_rows:
                tensor = F.pad(tensor, (0, 0, 0, self.shard.vocab_rows - tensor.shape[0]))  # the last rank's tail
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                tensor = interleave_rows(tensor, 1, cfg.head_dim)
            if name.startswith("lm_head") and self.lm_head is None:
                continue  # tied: some checkpoints still ship a copy
            module_path, _, leaf = name.rpartition(".")
            module_path, _, shard = module_path.rpartition(".")
            fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
            if name.startswith("lm_head"):
                self.lm_head.load_shard("lm_head", tensor.to(self.lm_head.weight.dtype), leaf == "bias")
            elif shard in fused or shard in ("o_proj", "down_proj"):
                target = self.get_submodule(f"{module_path}.{fused.get(shard, shard)}")
                target.load_shard(shard, tensor.to(target.weight.dtype), leaf == "bias")
            elif name in params:
                param = params[name]
                if param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
                param.copy_(tensor)
            else:
                raise ValueError(f"unexpected weight {name!r} in the checkpoint")
            seen.add(name)
        if not any(n.startswith("embed_tokens") for n in seen):
            raise ValueError("the checkpoint has no embed_tokens weight")
        self.finalize()

    def finalize(self) -> None:
        if self.lm_head is None:  # tied: the head reads the embedding matrix itself
            self._head = Linear(self.cfg.hidden_size, {"lm_head": self.shard.vocab_rows},
                                weight=self.embed_tokens.weight)
        else:
            self._head = self.lm_head
        for m in self.modules():
            if isinstance(m, Linear):
                m.finalize()
        self._head.finalize()
