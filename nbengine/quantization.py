"""The ``quantization=`` engine arg: which linear layers run block-quantized on the CPU, in which format.

- ``None`` / ``"none"``: every layer in ``dtype`` (float32 on CPU): exact, the reference path.
- ``"q8_0"``: every linear layer and the LM head as int8 blocks of 32 (near-lossless).
- ``"q4_1"``: the decoder's linear layers as 4-bit blocks of 32 with a scale and a minimum; the
  LM head as ``q8_0``.
- ``"auto"`` (default): on the CPU with float32 activations, a model converted from a GGUF file
  (the default model included) runs each layer in the block format that holds its checkpoint
  weights exactly (Q4_0/Q4_1/K-quants of 4 bits or less -> ``q4_1``, 5 to 8 bits -> ``q8_0``,
  float tensors stay float): the float32 copy the converter writes is itself a dequantization, so
  nothing is lost but the activations' rounding to int8. Float checkpoints, and CUDA, stay float.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import threading
from pathlib import Path

import torch

logger = logging.getLogger("nbengine")

QUANTIZATION_CHOICES = ("auto", "none", "q8_0", "q4_1")

_FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS",
             "IQ2_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0")
_EIGHT_BIT = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K")
_PRECISION = {"q4_1": 0, "q8_0": 1, None: 2}  # higher keeps more of the weights
_HEAD_NAMES = ("_head", "lm_head")


def validate_quantization(value: str | None) -> None:
    if value is not None and value not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {QUANTIZATION_CHOICES} or None, got {value!r}.")


def kernels_available() -> tuple[bool, str]:
    """Whether the quantized CPU kernels can run here (numba installed), and why not."""
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed (`pip install numba`)"
    return True, ""


class KernelWarmUp:
    """Imports numba and loads (or compiles) the quantized kernels on a background thread, so that
    work overlaps the tokenizer and weight loading; :meth:`wait` joins it (numba's start-up is
    ~1 s of CPU). Once per process: :func:`kernel_warm_up` hands every engine the same one."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nbengine-kernel-warm-up", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            from .layers.numba_startup import numba_without_scipy_probe

            with numba_without_scipy_probe():
                from .layers import cpu_attention, cpu_elementwise, quant_kernels

                quant_kernels.warm_up()
                cpu_attention.warm_up()
                cpu_elementwise.warm_up()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the engine thread
            self.error = e

    def wait(self) -> BaseException | None:
        """Join the warm-up; returns the error that stopped it, if any."""
        self._thread.join()
        return self.error


_warm_up: KernelWarmUp | None = None
_warm_up_lock = threading.Lock()


def kernel_warm_up() -> KernelWarmUp:
    """The process's kernel warm-up, started on the first call (numba's kernels load once per process)."""
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None or _warm_up.error is not None:  # a failed one is tried again
            _warm_up = KernelWarmUp()
        return _warm_up


def resolve_quantization(value: str | None, device: torch.device, dtype: torch.dtype, model_dir: Path,
                         tp_size: int = 1) -> str | None:
    """The method this engine runs: ``None``, ``"q8_0"``, ``"q4_1"`` or ``"gguf"`` (per-layer from the file).

    An explicit method that cannot run here raises ``ValueError`` saying what to change; ``"auto"``
    quietly falls back to float.
    """
    if value in (None, "none"):
        return None
    explicit = value != "auto"
    problem = None
    if device.type != "cpu":
        problem = f"quantization={value!r} is a CPU path; on {device.type} use quantization=None"
    elif tp_size > 1:
        problem = f"quantization={value!r} runs in one process; tensor parallelism (tp_size={tp_size}) runs in float"
    elif dtype != torch.float32:
        problem = f"quantization={value!r} multiplies float32 activations; use dtype='float32' (or 'auto')"
    else:
        ok, why = kernels_available()
        if not ok:
            problem = f"the quantized CPU kernels are unavailable: {why}"
    if problem:
        if explicit:
            raise ValueError(problem + ", or quantization=None for the float path.")
        logger.info("quantization auto -> float: %s", problem)
        return None
    if explicit:
        return value
    return "gguf" if gguf_tensor_types(model_dir) else None


def gguf_tensor_types(model_dir: Path) -> dict[str, str]:
    from .loader.gguf import TENSOR_TYPES_FILE

    path = Path(model_dir) / TENSOR_TYPES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _format_of_gguf_type(gguf_type: str | None) -> str | None:
    if gguf_type in _FOUR_BIT:
        return "q4_1"
    if gguf_type in _EIGHT_BIT:
        return "q8_0"
    return None


def _checkpoint_names(layer_name: str, shards: list[str], tied: bool) -> list[str]:
    """HF weight names behind one of our (possibly fused) Linear layers."""
    if layer_name in _HEAD_NAMES:
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    parent = layer_name.rpartition(".")[0]
    return [f"model.{parent}.{shard}.weight" for shard in shards]


def layer_chooser(method: str, model_dir: Path, tied_embeddings: bool):
    """``choose(layer_name, linear) -> format | None`` for :func:`quantize_linears`."""
    types = gguf_tensor_types(model_dir) if method == "gguf" else {}

    def choose(name: str, linear) -> str | None:
        if method == "q8_0":
            return "q8_0"
        if method == "q4_1":
            return "q8_0" if name in _HEAD_NAMES else "q4_1"
        fmts = [_format_of_gguf_type(types.get(n)) for n in _checkpoint_names(name, list(linear.shards), tied_embeddings)]
        return max(fmts, key=lambda f: _PRECISION[f])

    return choose


class ModelQuantizer:
    """Puts a loaded model's linear layers into block formats, reusing the disk cache.

    Before the weights load, :meth:`skipped_weights` names the checkpoint tensors the cache makes
    unnecessary (so a cached start reads ~110 MB instead of the float32 copy's ~540 MB for the
    default model); after, :meth:`apply` swaps the layers and saves what it had to quantize.
    """

    def __init__(self, method: str, model_dir: Path, tied_embeddings: bool) -> None:
        from .loader import quant_cache

        self.method = method
        self.tied = tied_embeddings
        self.choose = layer_chooser(method, model_dir, tied_embeddings)
        self.cache_path = quant_cache.cache_path(model_dir, method)
        self.stored = quant_cache.load(self.cache_path)

    def skipped_weights(self, model: torch.nn.Module) -> set[str]:
        from .layers.linear import Linear

        names: set[str] = set()
        for layer_name, module in model.named_modules():
            if not isinstance(module, Linear) or (self.tied and layer_name in _HEAD_NAMES):
                continue
            prev = self.stored.get(layer_name)
            if prev is not None and prev[0] == self.choose(layer_name, module):
                names.update(_checkpoint_names(layer_name, list(module.shards), self.tied))
        return names

    def apply(self, model: torch.nn.Module) -> dict[str, int]:
        from .layers.quant_linear import quantize_linears
        from .loader import quant_cache

        counts, layers = quantize_linears(model, self.choose, self.stored)
        if any(name not in self.stored for name in layers):
            quant_cache.save(self.cache_path, layers)
        return counts
