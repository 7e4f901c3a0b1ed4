"""SGLang-native and operational endpoints: ``/generate``, ``/health``, ``/metrics``, ``/v1/models``.

``/generate`` takes SGLang's ``GenerateReqInput`` JSON and returns the engine's output dicts as they
are (DESIGN §3); with ``"stream": true`` each engine chunk is one ``data: {json}`` event (``text``
cumulative unless the engine streams deltas), then ``data: [DONE]`` — as SGLang's server does.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from .engine_io import ServerContext, run_request, totals
from .images import fetch_urls, remote_images
from .openai_common import as_list
from .protocol import GenerateRequest

logger = logging.getLogger("nbengine.server")
router = APIRouter()
_HEALTH_TIMEOUT_S = 10.0


@router.get("/health")
async def health(request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    try:
        await asyncio.wait_for(run_in_threadpool(ctx.llm.get_server_info), _HEALTH_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - dead, shut down or stuck: not healthy
        return JSONResponse({"status": "unavailable", "detail": f"{type(e).__name__}: {e}"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    body = await run_in_threadpool(ctx.metrics.render)  # reads the engine's state: off the event loop
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "nbengine",
            "max_model_len": ctx.context_length}


@router.get("/v1/models")
async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.ctx)]})


@router.get("/v1/models/{model:path}")
async def model(model: str, request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(model)
    return JSONResponse(_model_card(ctx))


def _with_token_text(ctx: ServerContext, out: dict[str, Any]) -> dict[str, Any]:
    """Fill the text slot of each logprob tuple (``return_text_in_logprobs``)."""
    meta = out["meta_info"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        if key in meta:
            meta[key] = [(lp, t, ctx.token_text(t)) for lp, t, _ in meta[key]]
    for key in ("input_top_logprobs", "output_top_logprobs"):
        if key in meta:
            meta[key] = [None if pos is None else [(lp, t, ctx.token_text(t)) for lp, t, _ in pos]
                         for pos in meta[key]]
    return out


def _samples_per_prompt(sampling_params: dict | list[dict] | None) -> int:
    first = sampling_params[0] if isinstance(sampling_params, list) and sampling_params else sampling_params
    n = first.get("n") if isinstance(first, dict) else None
    return n if isinstance(n, int) and n > 0 else 1


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    if ctx.settings.log_prompts:
        logger.info("generate prompt: %r", req.text if req.text is not None else req.input_ids)
    kwargs = dict(prompt=req.text, input_ids=req.input_ids, sampling_params=req.sampling_params,
                  return_logprob=req.return_logprob, logprob_start_len=req.logprob_start_len,
                  top_logprobs_num=req.top_logprobs_num, return_hidden_states=req.return_hidden_states,
                  image_data=await fetch_urls(remote_images(req.image_data, ctx.settings.allow_image_urls)),
                  rid=req.rid)
    fill = ctx.llm.tokenizer is not None and req.return_text_in_logprobs
    n = _samples_per_prompt(req.sampling_params)
    if req.stream:
        return (await run_request(ctx, request, {}, "text", kwargs, lambda s, t: _chunks(ctx, s, t, fill, n)))[0]
    result, track = await run_request(ctx, request, {}, "text", kwargs)
    outs = as_list(result)
    if fill:
        outs = [_with_token_text(ctx, o) for o in outs]
    track.finish(*totals(outs, n))
    return JSONResponse(outs if isinstance(result, list) else outs[0])


async def _chunks(ctx: ServerContext, stream: AsyncIterator[dict], track: Any, fill: bool,
                  n: int) -> AsyncIterator[dict]:
    finals: list[dict] = []  # prompt-major by their "index"
    async with aclosing(stream):
        async for out in stream:
            if out["meta_info"]["completion_tokens"]:
                track.first_token()
            if out["meta_info"]["finish_reason"] is not None:
                finals.append(out)
            yield _with_token_text(ctx, out) if fill else out
    track.finish(*totals(sorted(finals, key=lambda o: o.get("index", 0)), n))
