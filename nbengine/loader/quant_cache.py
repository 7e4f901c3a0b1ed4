"""Disk cache of a model's quantized layers, so a later ``Engine()`` does not quantize again.

One safetensors file per (model folder, method) under ``cache_dir()/quantized``, keyed by the
folder's weight files (size and mtime) and :data:`QUANT_VERSION`; written to a temp file and
renamed, so concurrent engines are safe. Tensors are named ``<layer>.<part>`` and each layer's
format is in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from .default_model import cache_dir
from .hf import safetensors_files

logger = logging.getLogger("nbengine")

#: Bump when the stored formats change.
QUANT_VERSION = 3

Layers = dict[str, tuple[str, dict[str, torch.Tensor]]]  # layer name -> (format, tensors)


def cache_path(model_dir: Path, method: str) -> Path:
    model_dir = Path(model_dir).resolve()
    stamp = [QUANT_VERSION, method, str(model_dir)]
    for f in safetensors_files(model_dir):
        st = f.stat()
        stamp += [f.name, st.st_size, st.st_mtime_ns]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return cache_dir() / "quantized" / f"{model_dir.name}-{method}-{key}.safetensors"


def load(path: Path) -> Layers:
    """The cached layers, or ``{}`` when there is no (readable) cache file."""
    if not path.exists():
        return {}
    from safetensors import safe_open

    try:
        layers: Layers = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            formats = json.loads((f.metadata() or {}).get("formats", "{}"))
            for name in f.keys():
                layer, _, part = name.rpartition(".")
                layers.setdefault(layer, (formats[layer], {}))[1][part] = f.get_tensor(name)
        return layers
    except Exception as e:  # noqa: BLE001 - a broken cache file is rebuilt, never fatal
        logger.warning("ignoring unreadable quantization cache %s (%s)", path, e)
        return {}


def save(path: Path, layers: Layers) -> None:
    from safetensors.torch import save_file

    tensors = {f"{layer}.{part}": t.contiguous() for layer, (_, parts) in layers.items() for part, t in parts.items()}
    formats = {layer: fmt for layer, (fmt, _) in layers.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata={"formats": json.dumps(formats)})
        os.replace(tmp, path)
    except OSError as e:  # read-only cache: quantize again next time
        logger.warning("could not write the quantization cache %s (%s)", path, e)
        if "tmp" in locals() and os.path.exists(tmp):
            os.unlink(tmp)
