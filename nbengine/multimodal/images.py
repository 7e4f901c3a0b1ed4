"""Reading the images a request names: PIL images, file paths, raw bytes, base64 (a data URI or bare).

Everything a user can get wrong raises ``ValueError`` (or ``TypeError`` for a wrong type) that
says which image and what to pass instead, on the caller's thread, before anything is enqueued.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from pathlib import Path
from typing import Any

ACCEPTED = "a PIL image, a file path, raw image bytes, or a base64 string / data URI (data:image/...;base64,...)"


def load_image(item: Any, where: str = "image"):
    """One ``image_data`` item -> an RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, (str, os.PathLike)):
        data = _read_named(item, where)
    else:
        raise TypeError(f"{where} is a {type(item).__name__}; pass {ACCEPTED}.")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{where} could not be read as an image ({e}); pass a PNG / JPEG / WebP / GIF file "
                         "or its bytes.") from None
    return image.convert("RGB")


def _read_named(item: str | os.PathLike, where: str) -> bytes:
    text = os.fspath(item)
    if text.startswith(("http://", "https://")):
        raise ValueError(f"{where} is a URL ({text[:60]}); nbengine does not download images. Download it and "
                         "pass the file path or its bytes (the server fetches http URLs only when started with "
                         "--allow-image-urls).")
    if text.startswith("data:"):
        head, sep, payload = text.partition(",")
        if not sep or ";base64" not in head:
            raise ValueError(f"{where} is a data URI without ';base64,' ({text[:40]}...); pass "
                             "data:image/png;base64,<data>.")
        return _b64(payload, where)
    path = Path(text).expanduser()
    if path.is_file():
        return path.read_bytes()
    if len(text) > 256 and "\n" not in text[:256]:  # long and not a path: bare base64
        return _b64(text, where)
    raise ValueError(f"{where}: no such file {text!r}; pass {ACCEPTED}.")


def _b64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} is not valid base64 data; pass the image's bytes base64-encoded.") from None
