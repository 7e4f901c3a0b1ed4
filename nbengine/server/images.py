"""Image content parts of chat messages (OpenAI's ``image_url``, and ``image``) -> images for the engine.

Data URIs (``data:image/png;base64,...``) always work. ``http(s)`` URLs are fetched only when the
server was started with ``allow_image_urls`` (``--allow-image-urls``): the server then makes
outbound requests on a client's behalf, which a host may not want.
"""

from __future__ import annotations

import base64
import binascii
import urllib.request
from typing import Any

from .errors import APIError

FETCH_TIMEOUT_S = 10.0
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def part_image(part: Any, where: str, allow_urls: bool) -> str:
    """The image a content part names: a data URI, or an http(s) URL (checked against ``allow_urls``)."""
    extra = part.model_extra or {}
    value = extra.get("image_url") if part.type == "image_url" else extra.get("image", extra.get("url"))
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        shape = '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'
        raise APIError(f"An image part needs its image as a URL string: {shape}.", param=where, code="invalid_value")
    if value.startswith(("http://", "https://")):
        if not allow_urls:
            raise APIError("This server does not fetch image URLs; send the image as a data URI "
                           "(data:image/png;base64,...) or start the server with --allow-image-urls.",
                           param=where, code="invalid_value")
        return value
    if not value.startswith("data:"):
        raise APIError("An image URL must be a data URI (data:image/...;base64,...) or an http(s) URL.",
                       param=where, code="invalid_value")
    return value


def fetch(url: str, where: str) -> bytes:
    """Download one image (blocking: call it in a worker thread)."""
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as r:  # noqa: S310 - http(s) only, checked
            data = r.read(MAX_IMAGE_BYTES + 1)
    except Exception as e:  # noqa: BLE001 - any failure is the client's URL to fix
        raise APIError(f"Could not fetch the image at {url[:200]}: {e}", param=where, code="invalid_value") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise APIError(f"The image at {url[:200]} is larger than {MAX_IMAGE_BYTES} bytes.", param=where,
                       code="invalid_value")
    return data


def remote_images(image_data: Any, allow_urls: bool) -> Any:
    """``/generate``'s ``image_data`` made safe for a remote client: every string must be a data URI, an
    http(s) URL (with ``allow_urls``; returned to be fetched) or bare base64 (decoded here to bytes), so a
    client can never make the server read one of its own files by passing a path."""
    if image_data is None:
        return None
    if isinstance(image_data, list):
        return [remote_images(item, allow_urls) for item in image_data]
    if not isinstance(image_data, str):
        raise APIError("image_data entries must be strings: data URIs (data:image/png;base64,...) or base64.",
                       param="image_data", code="invalid_value")
    if image_data.startswith("data:"):
        return image_data
    if image_data.startswith(("http://", "https://")):
        if not allow_urls:
            raise APIError("This server does not fetch image URLs; send data URIs or base64, or start the server "
                           "with --allow-image-urls.", param="image_data", code="invalid_value")
        return image_data
    try:
        return base64.b64decode(image_data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError("image_data entries must be data URIs or base64 (file paths are not read from a client's "
                       "request).", param="image_data", code="invalid_value") from None


async def fetch_urls(image_data: Any) -> Any:
    """``image_data`` with its http(s) URLs downloaded (in worker threads)."""
    import asyncio

    if isinstance(image_data, list):
        return [await fetch_urls(item) for item in image_data]
    if isinstance(image_data, str) and image_data.startswith(("http://", "https://")):
        return await asyncio.to_thread(fetch, image_data, "image_data")
    return image_data
