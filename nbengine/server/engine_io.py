"""How the endpoints talk to the engine: starting requests, stream deltas, SSE, client disconnects.

Only the public ``Engine`` API is used: ``async_generate`` (streaming or not), ``tokenizer``,
``get_server_info``. Leaving an engine stream (cancelled task or closed generator) aborts the
request in the engine, which frees its KV pages before the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import NBEngineError
from .errors import APIError, ClientDisconnected, error_body, from_engine_error
from .metrics import RequestTrack, ServerMetrics
from .settings import ServerSettings

logger = logging.getLogger("nbengine.server")


@dataclass
class ServerContext:
    """What every endpoint needs: the engine and what the server knows about it."""

    llm: Any
    settings: ServerSettings
    metrics: ServerMetrics
    model_name: str
    context_length: int
    incremental: bool  # the engine streams deltas (incremental_streaming_output=True) instead of cumulative text
    created: int

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(f"The model '{model}' does not exist. This server serves '{self.model_name}' "
                           "(see GET /v1/models).", status=404, param="model", code="model_not_found")

    def token_text(self, token_id: int) -> str:
        """The text of one token (for logprobs), cached."""
        return self.llm.tokenizer.token_text(token_id)


async def run_request(ctx: ServerContext, request: Request, names: dict[str, str], prompt_field: str,
                      kwargs: dict[str, Any], stream_events: Any = None) -> tuple[Any, RequestTrack]:
    """Run one request with its metrics track: the engine's result (cancelled if the client leaves first),
    or with ``stream_events(engine_stream, track)`` an :class:`EventStream` of its events."""
    track = ctx.metrics.track()
    try:
        if stream_events is not None:
            stream = await start(ctx, names, prompt_field, stream=True, **kwargs)
            return EventStream(stream_events(stream, track), track), track
        return await until_disconnect(request, start(ctx, names, prompt_field, **kwargs)), track
    except BaseException:
        track.close()
        raise


def totals(outs: list[dict], n: int) -> tuple[int, int, list[str]]:
    """Prompt tokens (each prompt once, though its n samples all report it), generated tokens, finish reasons
    of finished outputs in prompt-major order."""
    metas = [o["meta_info"] for o in outs]
    return (sum(m["prompt_tokens"] for m in metas[::n]), sum(m["completion_tokens"] for m in metas),
            [(m["finish_reason"] or {}).get("type", "unknown") for m in metas])


async def start(ctx: ServerContext, names: dict[str, str], prompt_field: str, **kwargs: Any) -> Any:
    """``await llm.async_generate(**kwargs)``, with the engine's input errors as 400s naming the API field.

    With ``stream=True`` the engine checks the request here, before any byte of the response is sent.
    """
    try:
        return await ctx.llm.async_generate(**kwargs)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise from_engine_error(e, names, prompt_field) from None
    except Exception as e:  # noqa: BLE001 - dead / shut-down engine: 503
        raise from_engine_error(e, names, prompt_field) from e


async def until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; if the client disconnects first, cancel it (the engine aborts the request)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - it was cancelled on purpose
            pass
        raise ClientDisconnected()
    return task.result()


@dataclass
class Delta:
    """What one stream chunk adds to one choice."""

    index: int
    text: str
    token_logprobs: list[tuple]
    top_logprobs: list[Any]
    finish_reason: dict[str, Any] | None
    meta: dict[str, Any]


class StreamDeltas:
    """Turns engine stream chunks (cumulative by default, deltas with incremental_streaming_output) into deltas."""

    def __init__(self, incremental: bool) -> None:
        self.incremental = incremental
        self._text: dict[int, int] = {}
        self._lps: dict[int, int] = {}

    def __call__(self, chunk: dict[str, Any]) -> Delta:
        i = chunk.get("index", 0)
        meta = chunk["meta_info"]
        text = chunk.get("text", "")
        lps = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or []
        if not self.incremental:
            t0, l0 = self._text.get(i, 0), self._lps.get(i, 0)
            text, lps, tops = text[t0:], lps[l0:], tops[l0:]
            self._text[i] = t0 + len(text)
            self._lps[i] = l0 + len(lps)
        return Delta(i, text, lps, tops, meta["finish_reason"], meta)


def engine_failure(exc: Exception) -> APIError:
    """An error raised by the engine while a request was running (it died or was shut down)."""
    if isinstance(exc, APIError):
        return exc
    logger.error("request failed while running: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, NBEngineError):
        return from_engine_error(exc, {}, "prompt")
    return APIError("Internal server error.", status=500)


def aborted(reason: dict[str, Any]) -> APIError:
    return APIError(f"The request was aborted: {reason.get('message', 'aborted')}", status=503, code="aborted")


async def _sse(events: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    async with aclosing(events):
        try:
            async for event in events:
                yield b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is sent: report the error as an event
            err = engine_failure(e)
            yield b"data: " + json.dumps(error_body(err.message, err.status, err.param, err.code)).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-sent events (``data: {json}``, then ``data: [DONE]``), as OpenAI and SGLang stream.

    Starlette cancels the body when the client disconnects; the ``finally`` also closes a body
    that stopped at a ``yield``, so the engine request is aborted either way.
    """

    def __init__(self, events: AsyncIterator[Any], track: RequestTrack) -> None:
        super().__init__(_sse(events), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.track = track

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.track.close()  # also when the body never started (the client left at once)
