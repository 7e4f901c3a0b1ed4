"""Chat conversations to prompt ids (``Engine.chat`` / ``async_chat``), on the caller's thread."""

from __future__ import annotations

from typing import Any

from .tokenizer import Tokenizer


def conversation_ids(tokenizer: Tokenizer | None, messages: Any, add_generation_prompt: bool = True,
                     chat_template: str | None = None, tools: list[dict] | None = None,
                     **template_kwargs: Any) -> tuple[list[int] | list[list[int]], bool]:
    """The prompt ids of one conversation (a list of message dicts) or of a list of conversations, and whether
    it was one. The model's chat template renders them (``chat_template`` overrides it; ``tools`` and other
    keyword arguments are passed to the template)."""
    if tokenizer is None:
        raise ValueError("chat needs the tokenizer; create the engine without skip_tokenizer_init=True.")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                         "or a list of such lists (one per conversation).")
    single = isinstance(messages[0], dict)
    convs = [messages] if single else list(messages)
    out = []
    for i, conv in enumerate(convs):
        where = "" if single else f" (conversation {i})"
        if not isinstance(conv, (list, tuple)) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"each conversation must be a non-empty list of message dicts{where}.")
        for m in conv:
            if "role" not in m:
                raise ValueError(f"every message needs a 'role' ('system', 'user', 'assistant', ...){where}: {m!r}")
        out.append(tokenizer.apply_chat_template(list(conv), add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, chat_template=chat_template, tools=tools,
                                                 **template_kwargs))
    return (out[0] if single else out), single
