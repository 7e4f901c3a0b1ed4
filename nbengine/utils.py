"""Helpers with the same names and behaviour as ``sglang.utils``'s streaming helpers."""

from __future__ import annotations

from typing import Any, AsyncIterator


def trim_overlap(existing_text: str, new_chunk: str) -> str:
    """Return ``new_chunk`` minus its longest prefix that is already a suffix of ``existing_text``.

    With cumulative stream chunks this yields exactly the new part.
    """
    max_overlap = min(len(existing_text), len(new_chunk))
    for i in range(max_overlap, 0, -1):
        if existing_text.endswith(new_chunk[:i]):
            return new_chunk[i:]
    return new_chunk


def stream_and_merge(llm: Any, prompt: str, sampling_params: dict | None) -> str:
    """Stream ``prompt`` through ``llm.generate(..., stream=True)`` and return the merged text."""
    final_text = ""
    for chunk in llm.generate(prompt, sampling_params, stream=True):
        final_text += trim_overlap(final_text, chunk["text"])
    return final_text


async def async_stream_and_merge(llm: Any, prompt: str, sampling_params: dict | None) -> AsyncIterator[str]:
    """Async generator yielding each new piece of text of a streamed ``async_generate``."""
    final_text = ""
    generator = await llm.async_generate(prompt, sampling_params, stream=True)
    async for chunk in generator:
        cleaned = trim_overlap(final_text, chunk["text"])
        final_text += cleaned
        yield cleaned
