"""Which part of each weight a tensor-parallel rank holds, and the sizes its layers get.

Megatron-style: attention heads and the MLP's intermediate dim are split column-parallel
(q/k/v, gate/up: rows of the weight) and row-parallel (o_proj, down_proj: columns), so each
block needs one all-reduce; the embedding and the LM head are split by vocabulary rows.
With fewer KV heads than ranks, each KV head is replicated on the ranks whose q heads use it.
``size == 1`` is the single-process model: every slice is the whole tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


def check_tp_size(cfg: ModelConfig, tp_size: int) -> None:
    """``ValueError`` naming what does not divide (called before any process starts)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size}.")
    if tp_size == 1:
        return
    problems = []
    if cfg.num_heads % tp_size:
        problems.append(f"the {cfg.num_heads} attention heads")
    if cfg.intermediate_size % tp_size:
        problems.append(f"the MLP's intermediate size {cfg.intermediate_size}")
    hk = cfg.num_kv_heads
    if (hk >= tp_size and hk % tp_size) or (hk < tp_size and tp_size % hk):
        problems.append(f"the {hk} KV heads (or be a multiple of them)")
    if problems:
        divisors = [n for n in range(1, cfg.num_heads + 1) if check_divides(cfg, n)]
        raise ValueError(f"tp_size={tp_size} must divide {' and '.join(problems)} of this model; "
                         f"tp_size values that work: {divisors}.")


def check_divides(cfg: ModelConfig, n: int) -> bool:
    hk = cfg.num_kv_heads
    return (cfg.num_heads % n == 0 and cfg.intermediate_size % n == 0
            and (hk % n == 0 if hk >= n else n % hk == 0))


@dataclass(frozen=True)
class TPShard:
    rank: int
    size: int
    num_heads: int  # q heads on this rank
    num_kv_heads: int  # K/V heads on this rank (1 when replicated)
    head_start: int  # first global q head
    kv_head_start: int  # first global K/V head
    intermediate: int  # MLP intermediate columns on this rank
    vocab_size: int  # the whole vocabulary
    vocab_start: int  # first vocabulary row on this rank
    vocab_rows: int  # rows per rank (the last rank's tail past vocab_size is zero padding)

    @classmethod
    def plan(cls, cfg: ModelConfig, rank: int = 0, size: int = 1) -> "TPShard":
        check_tp_size(cfg, size)
        h, hk = cfg.num_heads // size, max(1, cfg.num_kv_heads // size)
        head_start = rank * h
        # replicated K/V heads: the one the q heads of this rank read (q head i uses KV head i // group)
        kv_start = rank * hk if cfg.num_kv_heads >= size else head_start // (cfg.num_heads // cfg.num_kv_heads)
        rows = -(-cfg.vocab_size // size)
        return cls(rank, size, h, hk, head_start, kv_start, cfg.intermediate_size // size, cfg.vocab_size,
                   rank * rows, rows)

    def weight_slice(self, name: str, head_dim: int) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of checkpoint tensor ``name`` that this rank holds; None: all of it."""
        if self.size == 1:
            return None
        d = head_dim
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return 0, self.head_start * d, (self.head_start + self.num_heads) * d
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return 0, self.kv_head_start * d, (self.kv_head_start + self.num_kv_heads) * d
        if name.endswith("o_proj.weight"):
            return 1, self.head_start * d, (self.head_start + self.num_heads) * d
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return 0, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if name.endswith("down_proj.weight"):
            return 1, self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return 0, self.vocab_start, min(self.vocab_start + self.vocab_rows, self.vocab_size)
        return None  # norms (and anything else) are replicated
