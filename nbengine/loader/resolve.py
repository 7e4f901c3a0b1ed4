"""Turning ``model_path`` into a local HF-style folder: default model, folder, .gguf, or hub id."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import ModelNotFoundError

logger = logging.getLogger("nbengine")


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    if model_path is None:
        from .default_model import default_model_path

        return default_model_path()
    path = Path(os.path.expanduser(str(model_path)))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json; point model_path at an HF model folder.")
        return path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotFoundError(f"{path} is a file but not a .gguf; pass an HF folder, a .gguf file or a hub id.")
        return _converted_gguf(path)
    return _download(str(model_path), path)


def _converted_gguf(path: Path) -> Path:
    from .default_model import cached_conversion

    return cached_conversion(path)


def _download(repo_id: str, tried: Path) -> Path:
    looks_like_id = repo_id.count("/") == 1 and not repo_id.startswith((".", "/", "~"))
    if not looks_like_id:
        raise ModelNotFoundError(f"Model not found: {tried.resolve()} does not exist, and {repo_id!r} is not a hub id "
                                 "('org/name'). Pass an existing folder, a .gguf file, or a hub id.")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"])
    except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear error
        raise ModelNotFoundError(
            f"Model {repo_id!r} not found: no local folder or file at {tried.resolve()}, and downloading it from "
            f"the Hugging Face hub failed ({type(e).__name__}: {e}). Check the name and your network, or pass a "
            "local folder / .gguf file.") from e
    return Path(folder)
