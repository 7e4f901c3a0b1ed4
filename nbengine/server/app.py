"""``create_app(llm)``: the FastAPI application serving one engine (run it with any ASGI server)."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from . import native, openai_chat, openai_completions
from .engine_io import ServerContext
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import ApiKeyAuth, BodySizeLimit, RequestCounter
from .settings import ServerSettings

logger = logging.getLogger("nbengine.server")


def served_model_name(llm: Any) -> str:
    """The model path as the user gave it (as SGLang does), or the default model's name."""
    given = getattr(getattr(llm, "config", None), "model_path", None)
    if given:
        return str(given)
    from ..loader.default_model import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME


def create_app(llm: Any, settings: ServerSettings | None = None, **overrides: Any) -> FastAPI:
    """The server's ASGI app on ``llm`` (an :class:`nbengine.Engine`); ``overrides`` are ServerSettings fields."""
    if settings is None:
        settings = ServerSettings(**overrides)
    elif overrides:
        raise TypeError("Pass either settings or keyword overrides, not both.")
    if settings.log_prompts and logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # asked for: make the prompt lines visible
    info = llm.get_server_info()
    ctx = ServerContext(
        llm=llm, settings=settings, metrics=ServerMetrics(llm),
        model_name=settings.served_model_name or served_model_name(llm),
        context_length=int(info["context_length"]),
        incremental=bool(info.get("incremental_streaming_output", False)),
        created=int(time.time()),
    )
    app = FastAPI(title="nbengine", version=__version__,
                  description="OpenAI-compatible and SGLang-native endpoints on an nbengine Engine.")
    app.state.ctx = ctx
    routers = [m.router for m in (openai_chat, openai_completions, native)]
    for router in routers:
        app.include_router(router)
    install_error_handlers(app)
    # added innermost first: requests pass counter -> CORS -> auth -> body cap -> routes
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    known = frozenset(r.path for router in routers for r in router.routes if "{" not in r.path)
    app.add_middleware(RequestCounter, count=ctx.metrics.count_response, known_paths=known)
    return app
