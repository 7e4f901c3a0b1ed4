"""Sampling parameters: names, defaults and ranges as in SGLang's ``SamplingParams``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping

_TOP_K_ALL = 1 << 30  # top_k=-1 means "no top-k", as in SGLang
_MAX_N = 1024  # samples per prompt: a typo like n=10**9 must not build a billion requests


@dataclass
class SamplingParams:
    """Per-request sampling settings. Build with :meth:`from_dict` to get SGLang's checks."""

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    n: int = 1
    seed: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[int, float] | None = None
    stream_interval: int | None = None
    custom_params: dict[str, Any] | None = None  # handed to the request's custom logit processor

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | "SamplingParams" | None) -> "SamplingParams":
        """Validate a user dict; unknown keys raise ``TypeError``, bad values ``ValueError``."""
        if params is None:
            sp = cls()
        elif isinstance(params, SamplingParams):
            sp = dataclasses.replace(params)
        elif isinstance(params, Mapping):
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = [k for k in params if k not in known]
            if unknown:
                raise TypeError(
                    f"Unknown sampling parameter(s) {unknown}; allowed names are {sorted(known)}."
                )
            kwargs = {k: v for k, v in params.items() if v is not None or k in ("max_new_tokens", "seed")}
            sp = cls(**kwargs)
        else:
            raise TypeError(f"sampling_params must be a dict or SamplingParams, got {type(params).__name__}.")
        sp.normalize()
        sp.verify()
        return sp

    def normalize(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        self.stop = [s for s in self.stop if s != ""]
        if isinstance(self.stop_token_ids, numbers.Integral) and not isinstance(self.stop_token_ids, bool):
            self.stop_token_ids = [self.stop_token_ids]
        ids = self.stop_token_ids
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"stop_token_ids must be an integer or a list of integers, got {self.stop_token_ids!r}.")
        self.stop_token_ids = list(dict.fromkeys(int(t) for t in ids))
        if self.logit_bias is not None and not isinstance(self.logit_bias, Mapping):
            raise ValueError(f"logit_bias must be a dict of token id -> bias, got {self.logit_bias!r}.")
        if self.logit_bias:
            try:
                self.logit_bias = {_token_key(k): float(v) for k, v in self.logit_bias.items()}
            except (TypeError, ValueError, OverflowError) as e:
                raise ValueError(f"logit_bias must map token ids to floats, got {self.logit_bias!r}.") from e
            if not all(math.isfinite(v) for v in self.logit_bias.values()):
                raise ValueError(f"logit_bias values must be finite numbers, got {self.logit_bias!r}.")
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError(f"custom_params must be a dict, got {self.custom_params!r}.")
        for name in ("json_schema", "regex", "ebnf"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}.")

    # ---------------------------------------------------------------- checking
    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the field and its allowed range."""
        def num(name: str, value: Any, integer: bool = False) -> None:
            """Check the type (numpy scalars welcome) and store the field as a plain int / float."""
            kind = numbers.Integral if integer else numbers.Real
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if ok and not integer:
                try:
                    ok = math.isfinite(value)
                except OverflowError:  # an int too large for a float
                    ok = False
            if not ok:
                raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'}, got {value!r}.")
            setattr(self, name, int(value) if integer else float(value))

        num("temperature", self.temperature)
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        num("top_k", self.top_k, integer=True)
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        for name in ("frequency_penalty", "presence_penalty"):
            num(name, getattr(self, name))
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}.")
        num("repetition_penalty", self.repetition_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(f"repetition_penalty must be in (0, 2] (1.0 = no penalty), got {self.repetition_penalty}.")
        if self.max_new_tokens is not None:
            num("max_new_tokens", self.max_new_tokens, integer=True)
            if self.max_new_tokens < 0:
                raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        num("min_new_tokens", self.min_new_tokens, integer=True)
        upper = self.max_new_tokens if self.max_new_tokens is not None else float("inf")
        if not 0 <= self.min_new_tokens <= upper:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}.")
        num("n", self.n, integer=True)
        if not 1 <= self.n <= _MAX_N:
            raise ValueError(f"n must be in [1, {_MAX_N}], got {self.n}.")
        if self.seed is not None:
            num("seed", self.seed, integer=True)
            if not 0 <= self.seed < 2**63:
                raise ValueError(f"seed must be in [0, 2**63), got {self.seed}.")
        if self.stream_interval is not None:
            num("stream_interval", self.stream_interval, integer=True)
            if self.stream_interval < 1:
                raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}.")
        if not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}.")
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        if vocab_size is not None:
            for t in self.stop_token_ids:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"stop_token_ids must be in [0, {vocab_size - 1}], got {t}.")
            for t in self.logit_bias or {}:
                if not 0 <= t < vocab_size:
                    raise ValueError(f"logit_bias must have keys in [0, {vocab_size - 1}], got {t}.")

    # ------------------------------------------------------------- properties
    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1

    @property
    def effective_top_k(self) -> int:
        return _TOP_K_ALL if self.top_k == -1 else self.top_k

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _token_key(key: Any) -> int:
    """A logit_bias key: a token id, as an int or (JSON style) a string of digits."""
    if isinstance(key, bool) or isinstance(key, float):
        raise TypeError(key)
    return int(key)
