"""``POST /v1/completions``: raw prompts (text, token ids, or lists of either), streamed or not."""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .engine_io import ServerContext, run_request
from .errors import APIError
from .metrics import RequestTrack
from .openai_common import (BASE_NAMES, StreamUsage, as_list, check_stream_options, choice_deltas, chunk_maker,
                            final_usage, finish_reason, new_id, require_tokenizer, sampling_params, visible_logprobs)
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
    if req.stream:
        events = lambda stream, track: _chunks(ctx, req, rid, stream, track, include_usage)  # noqa: E731
        return (await run_request(ctx, request, _NAMES, "prompt", kwargs, events))[0]
    result, track = await run_request(ctx, request, _NAMES, "prompt", kwargs)
    outs = as_list(result)
    usage_ = final_usage(outs, req.n, track)
    offsets = _Offsets()
    choices = []
    for i, out in enumerate(outs):
        meta = out["meta_info"]
        lp = None
        if want_lp:
            lps, tops = visible_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs", []),
                                         meta["finish_reason"])
            lp = offsets.logprobs(ctx, i, lps, tops, req.logprobs)
        choices.append({"index": i, "text": out["text"], "logprobs": lp,
                        "finish_reason": finish_reason(meta["finish_reason"])})
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name,
                         "choices": choices, "usage": usage_, "system_fingerprint": None})


async def _chunks(ctx: ServerContext, req: CompletionRequest, rid: str, stream: AsyncIterator[dict],
                  track: RequestTrack, include_usage: bool) -> AsyncIterator[dict]:
    chunk = chunk_maker(rid, "text_completion", ctx.model_name, include_usage)
    offsets = _Offsets()
    counts = StreamUsage(req.n)
    async with aclosing(choice_deltas(ctx, stream, track, counts)) as deltas:
        async for d, lps, tops in deltas:
            lp = offsets.logprobs(ctx, d.index, lps, tops, req.logprobs) if req.logprobs is not None else None
            yield chunk([{"index": d.index, "text": d.text, "logprobs": lp,
                          "finish_reason": finish_reason(d.finish_reason)}])
    if include_usage:
        yield chunk([], counts.usage())
