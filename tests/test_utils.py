"""``nbengine.utils``: the SGLang-compatible streaming helpers."""

from __future__ import annotations

import asyncio

import pytest

from nbengine.utils import async_stream_and_merge, stream_and_merge, trim_overlap


@pytest.mark.parametrize("existing,new,expected", [
    ("Hello", "Hello world", " world"),  # cumulative chunk -> exactly the delta
    ("", "Hello", "Hello"),  # first chunk
    ("Hello world", "Hello world", ""),  # nothing new
    ("abc", "xyz", "xyz"),  # no overlap -> the whole chunk
    ("abc", "", ""),  # empty chunk
    ("", "", ""),
    ("The cat", "cat sat", " sat"),  # overlap in the middle of the text
    ("aaa", "aab", "b"),  # longest overlap wins
])
def test_trim_overlap(existing, new, expected):
    assert trim_overlap(existing, new) == expected


def test_trim_overlap_on_cumulative_chunks_rebuilds_the_text():
    full = "Paris is the capital of France. Paris!"
    chunks = [full[:k] for k in range(1, len(full) + 1)]
    merged = ""
    for c in chunks:
        merged += trim_overlap(merged, c)
    assert merged == full


class _FakeEngine:
    """Streams cumulative chunks like Engine.generate / async_generate do."""

    def __init__(self, pieces):
        self.pieces = pieces

    def _chunks(self):
        text = ""
        for p in self.pieces:
            text += p
            yield {"text": text}

    def generate(self, prompt, sampling_params=None, stream=False):
        assert stream
        return self._chunks()

    async def async_generate(self, prompt, sampling_params=None, stream=False):
        assert stream

        async def gen():
            for c in self._chunks():
                yield c

        return gen()


def test_stream_and_merge_helpers():
    llm = _FakeEngine(["Hel", "lo", " wor", "ld"])
    assert stream_and_merge(llm, "p", None) == "Hello world"

    async def collect():
        return [p async for p in async_stream_and_merge(llm, "p", None)]

    assert asyncio.run(collect()) == ["Hel", "lo", " wor", "ld"]
