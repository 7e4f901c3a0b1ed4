"""``POST /v1/completions``: raw prompts (text, token ids, or lists of either), streamed or not."""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .engine_io import EventStream, ServerContext, StreamDeltas, aborted, start, until_disconnect
from .errors import APIError
from .metrics import RequestTrack
from .openai_common import (BASE_NAMES, as_list, check_stream_options, finish_reason, new_id, require_tokenizer,
                            sampling_params, usage, visible_logprobs)
from .protocol import CompletionRequest

logger = logging.getLogger("nbengine.server")
router = APIRouter()
_NAMES = {**BASE_NAMES, "max_new_tokens": "max_tokens", "top_logprobs_num": "logprobs"}


def _prompt_kwargs(req: CompletionRequest) -> tuple[dict[str, Any], int]:
    """``prompt=`` or ``input_ids=`` for the engine, and the number of prompts."""
    p = req.prompt
    if isinstance(p, list) and not p:
        raise APIError("prompt must not be empty.", param="prompt", code="invalid_value")
    if isinstance(p, str):
        return {"prompt": p}, 1
    if isinstance(p[0], str):
        return {"prompt": p}, len(p)
    if isinstance(p[0], int):
        return {"input_ids": p}, 1
    return {"input_ids": p}, len(p)


class _Offsets:
    """text_offset of each returned token, per choice, across stream chunks."""

    def __init__(self) -> None:
        self.pos: dict[int, int] = {}

    def logprobs(self, ctx: ServerContext, index: int, lps: list[tuple], tops: list[Any], k: int) -> dict[str, Any]:
        tokens, offsets, top = [], [], []
        pos = self.pos.get(index, 0)
        for j, (lp, token_id, _) in enumerate(lps):
            text = ctx.token_text(token_id)
            tokens.append(text)
            offsets.append(pos)
            pos += len(text)
            if k == 0:
                top.append({text: lp})
            else:
                top.append({ctx.token_text(t): v for v, t, _ in (tops[j] or [])} if j < len(tops) else None)
        self.pos[index] = pos
        return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in lps], "top_logprobs": top,
                "text_offset": offsets}


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(req.model)
    require_tokenizer(ctx)
    if req.echo:
        raise APIError("echo is not supported by this server.", param="echo", code="unsupported_parameter")
    if req.suffix:
        raise APIError("suffix is not supported by this server.", param="suffix", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError("best_of other than n is not supported by this server.", param="best_of",
                       code="unsupported_parameter")
    include_usage = check_stream_options(req)
    prompt, num_prompts = _prompt_kwargs(req)
    rid = new_id("cmpl")
    logger.debug("%s: %d prompt(s), n=%d, max_tokens=%s, stream=%s", rid, num_prompts, req.n, req.max_tokens,
                 req.stream)
    if ctx.settings.log_prompts:
        logger.info("%s prompt: %r", rid, req.prompt)
    want_lp = req.logprobs is not None
    kwargs = dict(prompt, sampling_params=sampling_params(req, req.max_tokens), return_logprob=want_lp,
                  top_logprobs_num=req.logprobs if want_lp else None)
    track = ctx.metrics.track()
    try:
        if req.stream:
            stream = await start(ctx, _NAMES, "prompt", stream=True, **kwargs)
            return EventStream(_chunks(ctx, req, rid, stream, track, include_usage), track)
        outs = as_list(await until_disconnect(request, start(ctx, _NAMES, "prompt", **kwargs)))
    except BaseException:
        track.close()
        raise
    offsets = _Offsets()
    choices = []
    for i, out in enumerate(outs):
        meta = out["meta_info"]
        if meta["finish_reason"]["type"] == "abort":
            track.close()
            raise aborted(meta["finish_reason"])
        lp = None
        if want_lp:
            lps, tops = visible_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs", []),
                                         meta["finish_reason"])
            lp = offsets.logprobs(ctx, i, lps, tops, req.logprobs)
        choices.append({"index": i, "text": out["text"], "logprobs": lp,
                        "finish_reason": finish_reason(meta["finish_reason"])})
    prompt_tokens = sum(outs[p * req.n]["meta_info"]["prompt_tokens"] for p in range(num_prompts))
    completion_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    track.finish(prompt_tokens, completion_tokens, [o["meta_info"]["finish_reason"]["type"] for o in outs])
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
                         "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
                         "system_fingerprint": None})


async def _chunks(ctx: ServerContext, req: CompletionRequest, rid: str, stream: AsyncIterator[dict],
                  track: RequestTrack, include_usage: bool) -> AsyncIterator[dict]:
    created = int(time.time())

    def chunk(choices: list[dict], usage_: dict | None = None) -> dict:
        c = {"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name,
             "system_fingerprint": None, "choices": choices}
        if include_usage:
            c["usage"] = usage_
        return c

    deltas = StreamDeltas(ctx.incremental)
    offsets = _Offsets()
    prompt_tokens: dict[int, int] = {}
    completion: dict[int, int] = {}
    reasons: list[str] = []
    async with aclosing(stream):
        async for out in stream:
            d = deltas(out)
            if d.finish_reason is not None and d.finish_reason["type"] == "abort":
                raise aborted(d.finish_reason)
            if d.meta["completion_tokens"]:
                track.first_token()
            lps, tops = visible_logprobs(d.token_logprobs, d.top_logprobs, d.finish_reason)
            if not (d.text or lps or d.finish_reason):
                continue
            lp = offsets.logprobs(ctx, d.index, lps, tops, req.logprobs) if req.logprobs is not None else None
            yield chunk([{"index": d.index, "text": d.text, "logprobs": lp,
                          "finish_reason": finish_reason(d.finish_reason)}])
            if d.finish_reason is not None:
                prompt_tokens[d.index // req.n] = d.meta["prompt_tokens"]
                completion[d.index] = d.meta["completion_tokens"]
                reasons.append(d.finish_reason["type"])
    p, c = sum(prompt_tokens.values()), sum(completion.values())
    track.finish(p, c, reasons)
    if include_usage:
        yield chunk([], usage(p, c))
