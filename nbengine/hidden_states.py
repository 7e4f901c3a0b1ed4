"""HiddenStates: the final-norm hidden states one request asked for, collected as its forwards run.

Three modes:

- ``"all"`` (``generate(return_hidden_states=True)``, SGLang's layout): ``states`` holds one entry
  per output token: the prompt's states ``[prompt_len, hidden]`` first, then the ``[hidden]`` state
  of each position fed back in. The last generated token has none (its forward never runs), so
  concatenated they match transformers' ``hidden_states[-1]`` over ``prompt + output[:-1]``.
- ``"last"`` / ``"mean"`` (``Engine.encode``): the last prompt position's state, or the mean over
  the prompt, in ``embedding``.

Each position is taken once: rows recomputed after a preemption are skipped, and the prefix
cache never stands in for positions still needed (``first_needed`` caps the reuse).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MODES = ("all", "last", "mean")


@dataclass
class HiddenStates:
    mode: str
    prompt_len: int
    next_pos: int = 0  # positions before it are collected (or not needed)
    states: list[torch.Tensor] = field(default_factory=list)  # "all": one entry per output token
    embedding: torch.Tensor | None = None  # "last" / "mean": set once the prompt is done
    _prompt_rows: list[torch.Tensor] = field(default_factory=list)
    _sum: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode == "last":
            self.next_pos = self.prompt_len - 1

    @property
    def first_needed(self) -> int:
        """The first position whose state is still to collect (the prefix cache may supply K/V before it)."""
        return self.next_pos

    def rows(self, start: int, n: int) -> tuple[int, int]:
        """Positions ``[lo, hi)`` of a chunk covering ``[start, start + n)`` whose states this request takes."""
        lo = max(start, self.next_pos)
        hi = start + n if self.mode == "all" else min(start + n, self.prompt_len)
        return (lo, hi) if hi > lo else (0, 0)

    def take(self, lo: int, rows: torch.Tensor) -> None:
        """``rows``: float32 states of positions ``lo, lo + 1, ...`` (on the host)."""
        hi = lo + rows.shape[0]
        L = self.prompt_len
        if self.mode == "all":
            if lo < L:
                self._prompt_rows.append(rows[: L - lo])
                if hi >= L:
                    self.states.append(torch.cat(self._prompt_rows))
                    self._prompt_rows = []
            self.states.extend(rows[max(0, L - lo):].unbind(0))
        elif self.mode == "mean":
            part = rows.double().sum(0)
            self._sum = part if self._sum is None else self._sum + part
            if hi >= L:
                self.embedding = (self._sum / L).float()
        elif hi >= L:  # "last"
            self.embedding = rows[L - 1 - lo].clone()
        self.next_pos = hi

    def fork(self, leader: "HiddenStates", num_computed: int) -> None:
        """A forked sample starts with its leader's prompt states for positions ``< num_computed`` (the leader
        assembled them in the step its prompt finished, before any sample forks it)."""
        if self.mode == "all":
            self._prompt_rows = [leader.states[0][:num_computed]]
            self.next_pos = num_computed
