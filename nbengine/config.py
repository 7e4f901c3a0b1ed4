"""Engine arguments (names as in SGLang's ServerArgs) and the model's own config."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("nbengine")

_SCHEDULE_POLICIES = ("fcfs",)


@dataclass
class EngineConfig:
    """Everything ``Engine(...)`` accepts. Unknown names raise ``TypeError``; bad values ``ValueError``."""

    model_path: str | None = None
    tokenizer_path: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    max_running_requests: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float | None = None
    chunked_prefill_size: int | None = None
    page_size: int = 16
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = True
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int | None = None  # CUDA: decode graphs for batches up to this (default min(256, max running))
    attention_backend: str | None = None  # "triton" (default on CUDA) | "flash_attn" | "torch" (default on CPU)
    random_seed: int | None = None
    tp_size: int = 1
    dp_size: int = 1
    enable_return_hidden_states: bool = False
    skip_tokenizer_init: bool = False
    log_level: str | None = None  # None: leave the "nbengine" logger as configured (WARNING if unset)
    incremental_streaming_output: bool = False
    allow_auto_truncate: bool = False
    stream_interval: int = 1
    trust_remote_code: bool = False
    num_threads: int | None = None

    @classmethod
    def from_kwargs(cls, model_path: str | None, kwargs: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        # SGLang's old name for incremental_streaming_output
        if "stream_output" in kwargs:
            kwargs = dict(kwargs)
            kwargs["incremental_streaming_output"] = kwargs.pop("stream_output")
        unknown = sorted(k for k in kwargs if k not in known)
        if unknown:
            raise TypeError(f"Unknown engine argument(s) {unknown}; allowed names are {sorted(known)}.")
        return cls(model_path=model_path, **kwargs)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of 'auto', 'float32', 'bfloat16', 'float16', got {self.dtype!r}.")
        if self.page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {self.page_size}.")
        for name in ("context_length", "max_running_requests", "max_total_tokens", "cuda_graph_max_bs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1 and self.chunked_prefill_size < 1:
            raise ValueError(f"chunked_prefill_size must be -1 (off) or positive, got {self.chunked_prefill_size}.")
        if self.mem_fraction_static is not None and not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1), got {self.mem_fraction_static}.")
        if self.attention_backend not in (None, "triton", "flash_attn", "torch"):
            raise ValueError("attention_backend must be 'triton', 'flash_attn' or 'torch' (or None for the "
                             f"device's default), got {self.attention_backend!r}.")
        if self.schedule_policy not in _SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {_SCHEDULE_POLICIES}, got {self.schedule_policy!r}.")
        if self.tp_size != 1 or self.dp_size != 1:
            raise ValueError("tp_size and dp_size other than 1 are not supported yet; use tp_size=1, dp_size=1.")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, got {self.stream_interval}.")
        level = logging.getLevelName(str(self.log_level).upper()) if self.log_level is not None else 0
        if not isinstance(level, int):
            raise ValueError(f"log_level must be one of debug, info, warning, error, got {self.log_level!r}.")


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
        cfg = json.loads((folder / "config.json").read_text())
        archs = cfg.get("architectures") or [""]
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
            rope_scaling=cfg.get("rope_scaling") or _rope_params_scaling(cfg.get("rope_parameters")),
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            raw=cfg,
        )


def check_architecture(model_dir: str | os.PathLike) -> None:
    """Fail fast, before the tokenizer and weights load, on a model we have no implementation for."""
    from .errors import UnsupportedModelError
    from .models import get_model_class

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if not archs:
        from .models import MODEL_REGISTRY

        raise UnsupportedModelError(f"{Path(model_dir) / 'config.json'} names no architectures; supported "
                                    f"architectures: {sorted(MODEL_REGISTRY)}.")
    get_model_class(archs[0])  # raises UnsupportedModelError listing the supported ones


def _rope_params_scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers 5 stores rope scaling in ``rope_parameters``; 'default' means none."""
    if not params or params.get("rope_type", "default") == "default":
        return None
    return params
