"""``POST /v1/chat/completions``: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import asyncio
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
from .images import fetch, part_image
from .protocol import ChatCompletionRequest, ChatMessage

logger = logging.getLogger("nbengine.server")
router = APIRouter()


def render_messages(ctx: ServerContext, messages: list[ChatMessage]) -> tuple[list[int], list[tuple[str, str]]]:
    """Token ids of the conversation through the model's chat template, ready for the assistant's turn, and
    the images of its image parts in order, as (data URI or http URL, where)."""
    turns: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    vision = getattr(ctx.llm, "processor", None) is not None
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts, parts = [], []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                if part.type in ("image_url", "image") and vision:
                    images.append((part_image(part, where, ctx.settings.allow_image_urls), where))
                    parts.append({"type": "image"})
                elif part.type != "text" or part.text is None:
                    only = "text and images" if vision else "text only"
                    raise APIError(f"Content parts of type '{part.type}' are not supported: this model reads {only}.",
                                   param=f"{where}.type", code="invalid_value")
                else:
                    texts.append(part.text)
                    parts.append({"type": "text", "text": part.text})
            content = parts if any(p["type"] == "image" for p in parts) else "\n".join(texts)
        if (m.model_extra or {}).get("tool_calls"):
            raise APIError("Tool calls are not supported by this server.", param=f"messages[{i}].tool_calls",
                           code="unsupported_parameter")
        turn = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            turn["name"] = m.name
        turns.append(turn)
    try:
        return ctx.llm.tokenizer.apply_chat_template(turns, tokenize=True, add_generation_prompt=True), images
    except Exception as e:  # noqa: BLE001 - a template's own checks (e.g. role order) are the client's to fix
        raise APIError(f"The model's chat template rejected 'messages': {e}", param="messages",
                       code="invalid_value") from None


def _logprobs(ctx: ServerContext, lps: list[tuple], tops: list[Any]) -> dict[str, Any]:
    def entry(lp: float, token_id: int) -> dict[str, Any]:
        text = ctx.token_text(token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for k, (lp, token_id, _) in enumerate(lps):
        item = entry(lp, token_id)
        item["top_logprobs"] = [entry(v, t) for v, t, _ in (tops[k] or [])] if k < len(tops) else []
        content.append(item)
    return {"content": content}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    ctx: ServerContext = request.app.state.ctx
    ctx.check_model(req.model)
    require_tokenizer(ctx)
    if req.tools:
        raise APIError("Tool calling is not supported by this server; remove 'tools'.", param="tools",
                       code="unsupported_parameter")
    if req.tool_choice not in (None, "none", "auto"):
        raise APIError("tool_choice needs tools, which this server does not support.", param="tool_choice",
                       code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError("top_logprobs needs logprobs=true.", param="top_logprobs", code="invalid_value")
    include_usage = check_stream_options(req)
    max_tokens_name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    names = {**BASE_NAMES, "max_new_tokens": max_tokens_name, "top_logprobs_num": "top_logprobs"}
    ids, image_parts = render_messages(ctx, req.messages)
    images = [await asyncio.to_thread(fetch, src, where) if src.startswith(("http://", "https://")) else src
              for src, where in image_parts]
    names["image_data"] = "messages"
    rid = new_id("chatcmpl")
    logger.debug("%s: %d prompt tokens, n=%d, %s=%s, stream=%s", rid, len(ids), req.n, max_tokens_name, max_tokens,
                 req.stream)
    if ctx.settings.log_prompts:
        logger.info("%s prompt: %r", rid, [m.model_dump(exclude_none=True) for m in req.messages])
    kwargs = dict(input_ids=ids, sampling_params=sampling_params(req, max_tokens), return_logprob=req.logprobs,
                  top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else None,
                  image_data=images or None)
    if req.stream:
        events = lambda stream, track: _chunks(ctx, req, rid, stream, track, include_usage)  # noqa: E731
        return (await run_request(ctx, request, names, "messages", kwargs, events))[0]
    result, track = await run_request(ctx, request, names, "messages", kwargs)
    outs = as_list(result)
    usage_ = final_usage(outs, req.n, track)
    choices = []
    for i, out in enumerate(outs):
        meta = out["meta_info"]
        lp = None
        if req.logprobs:
            lp = _logprobs(ctx, *visible_logprobs(meta["output_token_logprobs"], meta.get("output_top_logprobs", []),
                                                  meta["finish_reason"]))
        choices.append({"index": i, "message": {"role": "assistant", "content": out["text"]}, "logprobs": lp,
                        "finish_reason": finish_reason(meta["finish_reason"])})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name,
                         "choices": choices, "usage": usage_, "system_fingerprint": None})


async def _chunks(ctx: ServerContext, req: ChatCompletionRequest, rid: str, stream: AsyncIterator[dict],
                  track: RequestTrack, include_usage: bool) -> AsyncIterator[dict]:
    chunk = chunk_maker(rid, "chat.completion.chunk", ctx.model_name, include_usage)
    for i in range(req.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    counts = StreamUsage(req.n)
    async with aclosing(choice_deltas(ctx, stream, track, counts)) as deltas:
        async for d, lps, tops in deltas:
            yield chunk([{"index": d.index, "delta": {"content": d.text} if d.text else {},
                          "logprobs": _logprobs(ctx, lps, tops) if req.logprobs else None,
                          "finish_reason": finish_reason(d.finish_reason)}])
    if include_usage:
        yield chunk([], counts.usage())
