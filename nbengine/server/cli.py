"""``nbengine serve``: arguments and the foreground server.

Engine arguments are generated from :class:`nbengine.config.EngineConfig` (``--context-length``,
``--max-running-requests``, ...), so the command accepts exactly what ``Engine(...)`` accepts.
Importing this module needs no server dependency; running the command checks for them first.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from typing import Any

from ..config import EngineConfig
from .settings import DEFAULT_MAX_REQUEST_BYTES, ServerSettings

_TYPES = {"int": int, "float": float, "str": str}


def _engine_arg_type(annotation: str) -> Any:
    base = [t.strip() for t in str(annotation).split("|") if t.strip() != "None"][0]
    return _TYPES.get(base, base)


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible and SGLang-native endpoints)",
                       description="Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models, "
                                   "/generate, /health, /metrics.")
    s.add_argument("--model", "--model-path", dest="model", default=None,
                   help="HF folder, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=30000, help="port (0 = any free port)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every endpoint but /health")
    s.add_argument("--served-model-name", default=None, help="model name clients pass (default: --model as given)")
    s.add_argument("--cors-origin", dest="cors_origins", action="append", default=[],
                   help="allow browser requests from this origin (repeatable; '*' for any). Off by default")
    s.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES, help="request body cap")
    s.add_argument("--log-prompts", action="store_true", help="log prompt text (off by default)")
    s.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs in chat image parts (outbound requests; off: data URIs only)")
    s.add_argument("--no-access-log", dest="access_log", action="store_false", help="no per-request access log")
    add_engine_args(s)
    return s


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`EngineConfig` field but model_path; read them back with :func:`engine_args`."""
    g = parser.add_argument_group("engine arguments (as Engine(...) takes them)")
    for f in dataclasses.fields(EngineConfig):
        if f.name == "model_path":
            continue
        flag = "--" + f.name.replace("_", "-")
        if str(f.type).strip() == "bool":
            g.add_argument(flag, dest=f"engine_{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            g.add_argument(flag, dest=f"engine_{f.name}", type=_engine_arg_type(f.type), default=None,
                           metavar=f.name.upper())


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments given on the command line (the rest keep Engine's defaults)."""
    return {k.removeprefix("engine_"): v for k, v in vars(args).items() if k.startswith("engine_") and v is not None}


def run_serve(args: argparse.Namespace) -> int:
    from . import require_server_deps

    try:
        require_server_deps()
    except ImportError as e:
        print(f"nbengine: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from ..engine import Engine
    from ..errors import NBEngineError
    from .app import create_app
    from .background import bind_socket, uvicorn_config, warn_if_exposed

    try:
        settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key,
                                  served_model_name=args.served_model_name, cors_origins=args.cors_origins,
                                  max_request_bytes=args.max_request_bytes, log_prompts=args.log_prompts,
                                  access_log=args.access_log, allow_image_urls=args.allow_image_urls)
        warn_if_exposed(settings)
        sock = bind_socket(settings.host, settings.port)  # before loading the model: a busy port fails fast
    except (NBEngineError, ValueError) as e:
        print(f"nbengine: error: {e}", file=sys.stderr)
        return 2
    try:
        llm = Engine(args.model, **engine_args(args))
    except (NBEngineError, ValueError, TypeError) as e:
        sock.close()
        print(f"nbengine: error: {e}", file=sys.stderr)
        return 2
    try:
        app = create_app(llm, settings)
        host, port = sock.getsockname()[:2]
        url = f"http://{host}:{port}"
        print(f"nbengine: serving {app.state.ctx.model_name} at {url} (OpenAI base URL {url}/v1); Ctrl-C stops",
              file=sys.stderr, flush=True)
        from uvicorn.config import LOGGING_CONFIG

        server = uvicorn.Server(uvicorn_config(app, settings, log_config=LOGGING_CONFIG, log_level="info"))
        # uvicorn stops gracefully on SIGINT / SIGTERM, then re-raises the signal: let both end up here
        signal.signal(signal.SIGTERM, _interrupt)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        llm.shutdown()
    print("nbengine: server stopped", file=sys.stderr)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
