"""Reading an HF-style folder: safetensors shards (one file or an index of many)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Container, Iterator

import torch
from safetensors import safe_open

from ..errors import ModelNotFoundError


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(
            f"No *.safetensors weights in {folder}; nbengine loads safetensors checkpoints "
            "(convert .bin files with transformers' save_pretrained(safe_serialization=True)).")
    return files


Slicer = Callable[[str], "tuple[int, int, int] | None"]


def iter_weights(folder: str | Path, skip: Container[str] = (),
                 part: Slicer | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor of every shard but those named in ``skip`` (never read).

    ``part(name)`` -> ``(dim, start, stop)``: read only that slice of the tensor from the file (a
    tensor-parallel rank's share); None reads all of it."""
    for path in safetensors_files(Path(folder)):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name in skip:
                    continue
                cut = part(name) if part is not None else None
                if cut is None:
                    yield name, f.get_tensor(name)
                else:
                    dim, start, stop = cut
                    view = f.get_slice(name)
                    yield name, view[start:stop] if dim == 0 else view[:, start:stop]
