"""Model loading helpers: GGUF conversion and the embedded default model."""

from nbengine.loader.default_model import (
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    cache_dir,
    cached_conversion,
    default_model_path,
    find_default_gguf,
)
from nbengine.loader.gguf import convert_gguf_to_hf

__all__ = [
    "DEFAULT_MODEL_NAME",
    "DEFAULT_MODEL_PACKAGE",
    "cache_dir",
    "cached_conversion",
    "convert_gguf_to_hf",
    "default_model_path",
    "find_default_gguf",
]
