"""What /v1/completions and /v1/chat/completions share: OpenAI fields -> engine sampling params, usage,
finish reasons, response ids."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable

from .engine_io import Delta, ServerContext, StreamDeltas, aborted, totals
from .errors import APIError
from .metrics import RequestTrack
from .protocol import _OpenAIRequest

# engine names -> OpenAI names, for error messages (max_new_tokens is set per endpoint)
BASE_NAMES = {"min_new_tokens": "min_tokens", "json_schema": "response_format"}
_FINISH = {"length": "length", "stop": "stop"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def require_tokenizer(ctx: ServerContext) -> None:
    if ctx.llm.tokenizer is None:
        raise APIError("The engine was created with skip_tokenizer_init=True, so the OpenAI endpoints (which take "
                       "and return text) are not available; use /generate with input_ids.", param=None)


def sampling_params(req: _OpenAIRequest, max_tokens: int | None) -> dict[str, Any]:
    """The engine's sampling params for an OpenAI request (fields left unset keep the engine's defaults)."""
    sp: dict[str, Any] = {"max_new_tokens": max_tokens, "n": req.n}
    for name in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "skip_special_tokens"):
        value = getattr(req, name)
        if value is not None:
            sp[name] = value
    if req.min_tokens is not None:
        sp["min_new_tokens"] = req.min_tokens
    if req.logit_bias:
        try:
            sp["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError("Invalid value for 'logit_bias': keys must be token ids (integers as strings).",
                           param="logit_bias", code="invalid_value") from None
        if any(not -100 <= v <= 100 for v in sp["logit_bias"].values()):
            raise APIError("Invalid value for 'logit_bias': biases must be in [-100, 100].", param="logit_bias",
                           code="invalid_value")
    schema = json_schema(req)
    if schema is not None:
        sp["json_schema"] = schema
    return sp


def json_schema(req: _OpenAIRequest) -> str | None:
    """``response_format`` as the engine's ``json_schema`` sampling param (a JSON string)."""
    rf = req.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return json.dumps({"type": "object"})
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError("response_format of type 'json_schema' needs 'json_schema': {'name': ..., 'schema': {...}}.",
                       param="response_format.json_schema", code="missing_parameter")
    return json.dumps(rf.json_schema.schema_)


def check_stream_options(req: _OpenAIRequest) -> bool:
    """Whether the stream ends with a usage chunk."""
    if req.stream_options is not None and not req.stream:
        raise APIError("stream_options is only allowed when 'stream' is true.", param="stream_options",
                       code="invalid_value")
    return bool(req.stream and req.stream_options and req.stream_options.include_usage)


def finish_reason(reason: dict[str, Any] | None) -> str | None:
    if reason is None:
        return None
    return _FINISH.get(reason["type"], reason["type"])


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def visible_logprobs(lps: list[tuple], tops: list[Any], reason: dict[str, Any] | None) -> tuple[list, list]:
    """Drop the matched EOS / stop token's entry: it is not part of the returned text."""
    if reason is not None and reason.get("type") == "stop" and isinstance(reason.get("matched"), int) and lps \
            and lps[-1][1] == reason["matched"]:
        return lps[:-1], tops[:-1]
    return lps, tops


def as_list(out: dict | list[dict]) -> list[dict]:
    return out if isinstance(out, list) else [out]


def final_usage(outs: list[dict], n: int, track: RequestTrack) -> dict[str, int]:
    """Usage of a finished non-streamed request (prompt-major outputs, n per prompt); records it."""
    for out in outs:
        if out["meta_info"]["finish_reason"]["type"] == "abort":
            track.close()
            raise aborted(out["meta_info"]["finish_reason"])
    prompt_tokens, completion_tokens, reasons = totals(outs, n)
    track.finish(prompt_tokens, completion_tokens, reasons)
    return usage(prompt_tokens, completion_tokens)


def chunk_maker(rid: str, obj: str, model: str, include_usage: bool) -> Callable[..., dict]:
    """Builds the stream chunks of one response (``usage`` is null but in the last one with include_usage)."""
    created = int(time.time())

    def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
        c = {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None,
             "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    return chunk


class StreamUsage:
    """Token counts of a stream, gathered from each choice's final chunk."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}
        self.reasons: list[str] = []

    def add(self, d: Delta) -> None:
        self.prompt[d.index // self.n] = d.meta["prompt_tokens"]
        self.completion[d.index] = d.meta["completion_tokens"]
        self.reasons.append(d.finish_reason["type"])

    def usage(self) -> dict[str, int]:
        return usage(sum(self.prompt.values()), sum(self.completion.values()))


async def choice_deltas(ctx: ServerContext, stream: AsyncIterator[dict], track: RequestTrack,
                        counts: StreamUsage) -> AsyncIterator[tuple[Delta, list, list]]:
    """The engine stream as (delta, visible token logprobs, their top logprobs), skipping chunks that add
    nothing; an aborted request raises; the finished request is recorded in ``track`` and ``counts``."""
    deltas = StreamDeltas(ctx.incremental)
    async with aclosing(stream):
        async for out in stream:
            d = deltas(out)
            if d.finish_reason is not None and d.finish_reason["type"] == "abort":
                raise aborted(d.finish_reason)
            if d.meta["completion_tokens"]:
                track.first_token()
            lps, tops = visible_logprobs(d.token_logprobs, d.top_logprobs, d.finish_reason)
            if d.finish_reason is not None:
                counts.add(d)
            if d.text or lps or d.finish_reason:
                yield d, lps, tops
    track.finish(sum(counts.prompt.values()), sum(counts.completion.values()), counts.reasons)
