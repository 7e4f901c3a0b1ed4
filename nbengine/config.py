"""Engine arguments (names as in SGLang's ServerArgs) and the model's own config."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sampling_params import SamplingParams

logger = logging.getLogger("nbengine")

_SCHEDULE_POLICIES = ("fcfs",)
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_SAMPLING_DEFAULTS = ("model", "openai")
_MAX_PAGE_SIZE = 1024

# The type of each engine argument: (kind, None allowed). "int" refuses bools; "number" takes ints and floats.
_ARG_KINDS: dict[str, tuple[str, bool]] = {
    "model_path": ("path", True), "tokenizer_path": ("path", True), "dtype": ("str", False),
    "device": ("str", False), "context_length": ("int", True), "max_running_requests": ("int", True),
    "max_total_tokens": ("int", True), "mem_fraction_static": ("number", True),
    "chunked_prefill_size": ("int", True), "page_size": ("int", False), "schedule_policy": ("str", False),
    "disable_radix_cache": ("bool", False), "disable_cuda_graph": ("bool", False),
    "disable_overlap_schedule": ("bool", False),
    "cuda_graph_max_bs": ("int", True), "random_seed": ("int", True), "tp_size": ("int", False),
    "dp_size": ("int", False), "enable_return_hidden_states": ("bool", False),
    "skip_tokenizer_init": ("bool", False), "log_level": ("str", True),
    "incremental_streaming_output": ("bool", False), "allow_auto_truncate": ("bool", False),
    "stream_interval": ("int", False), "trust_remote_code": ("bool", False), "num_threads": ("int", True),
    "sampling_defaults": ("str", False), "quantization": ("str", True), "dist_init_addr": ("str", True),
    "nnodes": ("int", False), "node_rank": ("int", False), "enable_custom_logit_processor": ("bool", False),
}
_KIND_NAMES = {"path": "a string path", "str": "a string", "int": "an integer", "number": "a number",
               "bool": "True or False"}

# Accepted for SGLang compatibility but not built yet: (the default, what setting it does today).
# Setting one to another value logs one warning per process. Remove an entry when its feature lands.
NOT_BUILT_YET: dict[str, tuple[Any, str]] = {
    "trust_remote_code": (False, "nbengine runs its own code for the supported architectures and never runs "
                                 "code from the model folder"),
}
_warned_not_built: set[str] = set()


@dataclass
class EngineConfig:
    """Everything ``Engine(...)`` accepts. Unknown names and wrong types raise ``TypeError``; bad values
    ``ValueError``; each message names the argument."""

    model_path: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None  # weights + KV pool, as a fraction of memory (see memory.py)
    chunked_prefill_size: int | None = None
    page_size: int = 16
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False  # True turns prefix caching (KV page reuse across requests) off
    disable_cuda_graph: bool = False
    disable_overlap_schedule: bool = False  # True: read each step's sampled ids before scheduling the next
    cuda_graph_max_bs: int | None = None  # CUDA: decode graphs for batches up to this (default min(256, max running))
    attention_backend: str | None = None  # "triton" (default on CUDA) | "flash_attn" | "torch" (default on CPU)
    random_seed: int | None = None
    tp_size: int = 1  # tensor-parallel ranks (processes; one GPU each on CUDA)
    dp_size: int = 1  # data-parallel replicas (each of tp_size ranks), requests to the least loaded
    dist_init_addr: str | None = None  # "host:port" of the TCP store (node 0 serves it); None: a free local port
    nnodes: int = 1  # hosts the tp_size ranks are spread over
    node_rank: int = 0  # this host's index among them (0 schedules; the others only run ranks)
    enable_return_hidden_states: bool = False
    enable_custom_logit_processor: bool = False  # allow generate(custom_logit_processor=...): runs caller code
    skip_tokenizer_init: bool = False
    log_level: str | None = None  # None: leave the "nbengine" logger as configured (WARNING if unset)
    incremental_streaming_output: bool = False
    allow_auto_truncate: bool = False
    stream_interval: int = 1
    trust_remote_code: bool = False
    num_threads: int | None = None
    quantization: str | None = "auto"  # see nbengine.quantization: auto, none/None, q8_0, q4_1
    sampling_defaults: str = "model"  # "model": generation_config.json's sampling values; "openai": SGLang's own

    @classmethod
    def from_kwargs(cls, model_path: str | None, kwargs: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # SGLang's old name for incremental_streaming_output
        if "stream_output" in kwargs:
            kwargs = dict(kwargs)
            kwargs["incremental_streaming_output"] = kwargs.pop("stream_output")
        unknown = sorted(str(k) for k in kwargs if k not in known)
        if unknown:
            raise TypeError(f"Unknown engine argument(s) {unknown}; allowed names are {sorted(known)}.")
        return cls(model_path=model_path, **kwargs)

    def __post_init__(self) -> None:
        self._check_types()
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}.")
        if self.device != "auto" and not _is_device_name(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}.")
        if not 1 <= self.page_size <= _MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be in [1, {_MAX_PAGE_SIZE}], got {self.page_size}.")
        for name in ("context_length", "max_running_requests", "max_total_tokens", "cuda_graph_max_bs",
                     "num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be -1 (off) or positive, got {self.chunked_prefill_size}.")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}.")
        cores = os.cpu_count() or 1
        if self.num_threads is not None and self.num_threads > cores:  # more would only oversubscribe the cores
            raise ValueError(f"num_threads must be in [1, {cores}] (the CPU count), got {self.num_threads}.")
        if self.random_seed is not None and not 0 <= self.random_seed < 2**63:
            raise ValueError(f"random_seed must be in [0, 2**63), got {self.random_seed}.")
        if self.attention_backend not in (None, "triton", "flash_attn", "torch"):
            raise ValueError("attention_backend must be 'triton', 'flash_attn' or 'torch' (or None for the "
                             f"device's default), got {self.attention_backend!r}.")
        if self.schedule_policy not in _SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {_SCHEDULE_POLICIES}, got {self.schedule_policy!r}.")
        self._check_parallel()
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}.")
        from .quantization import validate_quantization

        validate_quantization(self.quantization)
        if self.sampling_defaults not in _SAMPLING_DEFAULTS:
            raise ValueError(f"sampling_defaults must be one of {_SAMPLING_DEFAULTS}, got {self.sampling_defaults!r}.")
        level = logging.getLevelName(self.log_level.upper()) if self.log_level is not None else 0
        if not isinstance(level, int):
            raise ValueError(f"log_level must be one of debug, info, warning, error, got {self.log_level!r}.")

    def _check_parallel(self) -> None:
        for name in ("tp_size", "dp_size", "nnodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}.")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, nnodes={self.nnodes}), got {self.node_rank}.")
        if self.tp_size % self.nnodes:
            raise ValueError(f"tp_size={self.tp_size} must be a multiple of nnodes={self.nnodes} (the same number "
                             "of ranks on every node).")
        if self.dist_init_addr is not None:
            parse_dist_addr(self.dist_init_addr)
            if self.tp_size == 1:
                logger.warning("dist_init_addr=%r has no effect with tp_size=1 (nothing to connect).",
                               self.dist_init_addr)
        if self.nnodes > 1 and self.dist_init_addr is None:
            raise ValueError("nnodes > 1 needs dist_init_addr='host:port' of node 0, the same on every node.")
        if self.dp_size > 1 and self.nnodes > 1:
            raise ValueError("dp_size > 1 runs on one node; use nnodes=1, or one engine per node.")
        if self.tp_size > 1 and self.quantization not in (None, "none", "auto"):
            raise ValueError(f"quantization={self.quantization!r} runs in one process and cannot be combined with "
                             f"tp_size={self.tp_size}; use quantization=None (or 'auto', which runs in float).")

    def _check_types(self) -> None:
        for name, (kind, nullable) in _ARG_KINDS.items():
            value = getattr(self, name)
            if value is None and nullable:
                continue
            if kind == "path":
                ok = isinstance(value, (str, os.PathLike))
            elif kind == "str":
                ok = isinstance(value, str)
            elif kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            else:
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                raise TypeError(f"{name} must be {_KIND_NAMES[kind]}{' or None' if nullable else ''}, "
                                f"got {value!r} ({type(value).__name__}).")
            if kind == "int":
                setattr(self, name, int(value))

    def warn_not_built(self) -> None:
        """One warning per process for each accepted-but-not-built argument set to a non-default value."""
        for name, (default, effect) in NOT_BUILT_YET.items():
            value = getattr(self, name)
            if value != default and name not in _warned_not_built:
                _warned_not_built.add(name)
                logger.warning("%s=%r has no effect: %s.", name, value, effect)


def parse_dist_addr(addr: str | None) -> tuple[str, int]:
    """``dist_init_addr`` as (host, port); None: this host, a free port."""
    if addr is None:
        return "127.0.0.1", 0
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"dist_init_addr must be 'host:port' (a port in 1..65535), got {addr!r}.")
    return host, int(port)


def _is_device_name(name: str) -> bool:
    kind, _, index = name.partition(":")
    return kind in ("cpu", "cuda") and (index == "" or (kind == "cuda" and index.isdigit()))


@dataclass
class ModelConfig:
    """The parts of an HF ``config.json`` the model code needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "ModelConfig":
        folder = Path(folder)
        raw = json.loads((folder / "config.json").read_text())
        # vision-language models nest their decoder's config under text_config (older Qwen2-VL
        # folders keep it at the top level): the decoder's keys win, the architecture stays the top's
        cfg = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
        archs = raw.get("architectures") or [""]
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        gen_path = folder / "generation_config.json"
        if gen_path.exists():
            gen_eos = json.loads(gen_path.read_text()).get("eos_token_id")
            eos = gen_eos if gen_eos is not None else eos
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        arch = archs[0]
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch.startswith("Qwen2")),
            qk_norm=arch.startswith("Qwen3"),
            rope_scaling=rope_scaling_of(cfg),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            raw=raw,
        )


def rope_scaling_of(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The rope scaling dict of an HF config: ``rope_scaling``, or transformers 5's ``rope_parameters``
    (where rope_type 'default' means none)."""
    if cfg.get("rope_scaling"):
        return cfg["rope_scaling"]
    params = cfg.get("rope_parameters")
    if not params or params.get("rope_type", "default") == "default":
        return None
    return params


# generation_config.json keys that become default sampling params (the ones SGLang and vLLM read)
_GENERATION_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def model_sampling_defaults(folder: str | os.PathLike) -> dict[str, Any]:
    """The sampling values a model folder's ``generation_config.json`` recommends, as sampling params.

    With ``sampling_defaults="model"`` they replace SGLang's defaults for the keys a request leaves
    out. HF's ``top_k=0`` (off) becomes ``-1``; a value our sampler would reject is skipped with a warning.
    """
    path = Path(folder) / "generation_config.json"
    try:
        gen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(gen, dict):
        return {}
    defaults = {k: gen[k] for k in _GENERATION_SAMPLING_KEYS if gen.get(k) is not None}
    if defaults.get("top_k") == 0:
        defaults["top_k"] = -1
    for key in list(defaults):
        try:
            SamplingParams.from_dict({key: defaults[key]})
        except (TypeError, ValueError) as e:
            logger.warning("ignoring %s=%r from %s: %s", key, defaults.pop(key), path, e)
    return defaults
