"""Incremental detokenization with stop strings.

Text only grows by whole characters: a token that ends inside a UTF-8 character waits for the
next one. ``visible`` holds back any tail that could still become a stop string, so a stream
never shows text that a stop string later removes.
"""

from __future__ import annotations

from .sampling_params import SamplingParams
from .tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded alongside, so leading spaces come out right


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.tok = tokenizer
        self.skip_special = params.skip_special_tokens
        self.stops = params.stop
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.no_stop_trim = params.no_stop_trim
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all decoded output text (never ends in half a character)
        self.matched_stop: str | None = None

    def add(self, token_id: int) -> None:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip_special)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            old_len = len(self.text)
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stops:
                self._check_stop(old_len)

    def flush(self) -> None:
        """At the end: emit whatever bytes are pending, even half a character."""
        if self.read_offset < len(self.ids) and self.matched_stop is None:
            prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special)
            full = self.tok.decode(self.ids[self.prefix_offset :], self.skip_special)
            old_len = len(self.text)
            self.text += full[len(prefix) :]
            self.read_offset = len(self.ids)
            if self.stops:
                self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> None:
        start = max(0, old_len - self.max_stop + 1)
        best = None
        for s in self.stops:
            pos = self.text.find(s, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is not None:
            pos, s = best
            self.matched_stop = s
            self.text = self.text[: pos + len(s)] if self.no_stop_trim else self.text[:pos]

    @property
    def visible(self) -> str:
        """Text that is safe to show now: without a tail that may grow into a stop string."""
        if not self.stops or self.matched_stop is not None:
            return self.text
        text = self.text
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[: len(text) - hold] if hold else text
