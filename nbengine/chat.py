"""Chat conversations to prompt ids (``Engine.chat`` / ``async_chat``), on the caller's thread."""

from __future__ import annotations

from typing import Any

from .tokenizer import Tokenizer


def conversation_ids(tokenizer: Tokenizer | None, messages: Any, add_generation_prompt: bool = True,
                     chat_template: str | None = None, tools: list[dict] | None = None,
                     **template_kwargs: Any) -> tuple[list[int] | list[list[int]], bool, list[Any]]:
    """The prompt ids of one conversation (a list of message dicts) or of a list of conversations, whether
    it was one, and the images of its image content parts (one list per conversation). The model's chat
    template renders them (``chat_template`` overrides it; ``tools`` and other keyword arguments are passed
    to the template)."""
    if tokenizer is None:
        raise ValueError("chat needs the tokenizer; create the engine without skip_tokenizer_init=True.")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                         "or a list of such lists (one per conversation).")
    single = isinstance(messages[0], dict)
    convs = [messages] if single else list(messages)
    out: list[list[int]] = []
    images: list[list[Any]] = []
    for i, conv in enumerate(convs):
        where = "" if single else f" (conversation {i})"
        if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"each conversation must be a non-empty list of message dicts{where}.")
        for m in conv:
            if "role" not in m:
                raise ValueError(f"every message needs a 'role' ('system', 'user', 'assistant', ...){where}: {m!r}")
        turns, found = _split_images(conv)
        images.append(found)
        out.append(tokenizer.apply_chat_template(turns, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, chat_template=chat_template, tools=tools,
                                                 **template_kwargs))
    return (out[0] if single else out), single, (images[0] if single else images)


def _split_images(conv: list[dict]) -> tuple[list[dict], list[Any]]:
    """OpenAI-style image content parts (``{"type": "image_url", "image_url": {"url": ...}}`` or
    ``{"type": "image", "image": ...}``) -> ``{"type": "image"}`` for the chat template (which writes the
    model's image placeholder), and the images themselves in order (data URI, base64, path, bytes or PIL
    image: whatever ``image_data`` takes)."""
    turns, images = [], []
    for m in conv:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in ("image_url", "image"):
                    value = part.get("image_url") if kind == "image_url" else part.get("image", part.get("url"))
                    images.append(value.get("url") if isinstance(value, dict) else value)
                    parts.append({"type": "image"})
                else:
                    parts.append(part)
            m = {**m, "content": parts}
        turns.append(m)
    return turns, images


def with_images(images: list[Any], single: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate`` keyword arguments for ``chat``: the image parts' images as ``image_data`` (if any)."""
    if not (any(images) if not single else images):
        return kwargs
    if kwargs.get("image_data") is not None:
        raise ValueError("Pass images either as image content parts of the messages or as image_data, not both.")
    return {**kwargs, "image_data": images}
