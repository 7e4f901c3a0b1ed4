"""One output of a request: taken on the engine thread, turned into the user's dict on the caller's.

Streaming outputs are cumulative by default (SGLang's contract): every chunk carries all output
ids so far. Copying them on the engine thread would make each step's cost grow with every
stream's length, so the engine thread only records *how many* there are: output ids and
logprobs are append-only lists (a preemption keeps them), so ``ids[:n]`` sliced later on the
caller's thread is exactly what the engine saw when it emitted the chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class RequestOutput:
    """A snapshot of one request; :meth:`to_dict` builds ``{"text", "output_ids", "meta_info", ...}``."""

    rid: str
    text: str | None  # cumulative text or, for incremental streams, the new text (None without a tokenizer)
    output_ids: list[int]  # the request's own list: only [ids_start:ids_end] belongs to this output
    ids_start: int
    ids_end: int
    finish_reason: dict[str, Any] | None
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (or a forked sample)
    index: int | None = None  # "index" of a streamed batch's chunk
    e2e_latency: float | None = None  # set on the final output
    num_retractions: int = 0
    # logprobs, when requested: the request's lists and the slice that belongs to this output
    input_token_logprobs: list | None = None
    input_top_logprobs: list | None = None
    output_token_logprobs: list | None = None
    output_top_logprobs: list | None = None
    num_input_logprobs: int = 0
    num_input_top_logprobs: int = 0
    # hidden states, when requested: the request's append-only list of host tensors and this output's slice
    hidden_states: list | None = None
    hidden_start: int = 0
    hidden_end: int = 0
    embedding: Any = None  # encode(): the pooled final hidden state (a host tensor)
    label_logprobs: list[float] | None = None  # score(): next-token logprobs of the label tokens
    token_text: Callable[[int], str] | None = None  # return_text_in_logprobs: fills the tuples' text slot

    @classmethod
    def snapshot(cls, seq: Any, incremental: bool, token_text: Callable[[int], str] | None) -> "RequestOutput":
        """The output of ``seq`` (a Sequence) now, on the engine thread: records how far each list has grown
        (and what an incremental stream already sent) instead of copying it."""
        finished = seq.finish_reason is not None
        text = None
        if seq.detok is not None:
            full = seq.detok.text if finished else seq.detok.visible
            text = full[seq.last_emitted_text :] if incremental else full
            seq.last_emitted_text = len(full)
        n_before = seq.last_emitted_tokens
        seq.last_emitted_tokens = len(seq.output_ids)
        hidden = seq.hidden.states if seq.hidden is not None and seq.hidden.mode == "all" else None
        h_before = seq.last_emitted_hidden if seq.stream else 0  # a stream's chunks carry the new states only
        if hidden is not None:
            seq.last_emitted_hidden = len(hidden)
        lp = seq.logprob
        tops = lp.return_logprob and lp.top_logprobs_num
        return cls(
            rid=seq.rid, text=text, output_ids=seq.output_ids, ids_start=n_before if incremental else 0,
            ids_end=len(seq.output_ids), finish_reason=seq.finish_reason, prompt_tokens=len(seq.prompt_ids),
            cached_tokens=seq.cached_tokens, token_text=token_text,
            embedding=seq.hidden.embedding if seq.hidden is not None else None, label_logprobs=seq.label_logprobs,
            hidden_states=hidden, hidden_start=h_before, hidden_end=len(hidden) if hidden is not None else 0,
            index=seq.index if seq.stream else None,
            e2e_latency=time.perf_counter() - seq.arrival if finished else None,
            num_retractions=seq.num_preemptions,
            input_token_logprobs=seq.input_token_logprobs if lp.return_logprob else None,
            output_token_logprobs=seq.output_token_logprobs if lp.return_logprob else None,
            input_top_logprobs=seq.input_top_logprobs if tops else None,
            output_top_logprobs=seq.output_top_logprobs if tops else None,
            num_input_logprobs=len(seq.input_token_logprobs), num_input_top_logprobs=len(seq.input_top_logprobs))

    def to_dict(self) -> dict[str, Any]:
        start, end = self.ids_start, self.ids_end
        meta: dict[str, Any] = {
            "id": self.rid,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": end,
            "cached_tokens": self.cached_tokens,
        }
        if self.e2e_latency is not None:
            meta["e2e_latency"] = self.e2e_latency
        if self.num_retractions:
            meta["num_retractions"] = self.num_retractions
        if self.output_token_logprobs is not None:
            text = self.token_text
            meta["input_token_logprobs"] = _texts(self.input_token_logprobs[: self.num_input_logprobs], text)
            meta["output_token_logprobs"] = _texts(self.output_token_logprobs[start:end], text)
            if self.output_top_logprobs is not None:
                meta["input_top_logprobs"] = [None if p is None else _texts(p, text)
                                              for p in self.input_top_logprobs[: self.num_input_top_logprobs]]
                meta["output_top_logprobs"] = [_texts(p, text) for p in self.output_top_logprobs[start:end]]
        if self.label_logprobs is not None:
            meta["label_token_logprobs"] = self.label_logprobs
        if self.hidden_states is not None:  # SGLang's layout: nested lists of floats
            meta["hidden_states"] = [h.tolist() for h in self.hidden_states[self.hidden_start : self.hidden_end]]
        out: dict[str, Any] = {"output_ids": self.output_ids[start:end], "meta_info": meta}
        if self.text is not None:
            out = {"text": self.text, **out}
        if self.index is not None:
            out["index"] = self.index
        if self.embedding is not None:
            out["embedding"] = self.embedding.tolist()
        return out


def _texts(tuples: list, token_text: Callable[[int], str] | None) -> list:
    """``(logprob, token_id, text)`` tuples with the text filled in when ``token_text`` is given."""
    if token_text is None:
        return tuples
    return [(lp, t, token_text(t)) for lp, t, _ in tuples]
