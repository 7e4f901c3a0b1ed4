"""Running the server: ``serve(llm)`` in a background thread (notebooks), or in the foreground (CLI).

The socket is bound by the caller before uvicorn starts, so a port in use is a clear error at
once, and ``port=0`` gives a free port whose number ``url`` reports. In the background, uvicorn
runs on its own thread with its own event loop, so it works inside a running Jupyter kernel,
with or without the nest-asyncio patch.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
import time
from typing import Any

import uvicorn

from ..errors import NBEngineError
from .settings import ServerSettings

logger = logging.getLogger("nbengine.server")
_START_TIMEOUT_S = 60.0


class ServerStartError(NBEngineError, OSError):
    """The server could not start (port in use, address not available, ...)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0 = a free port), or ServerStartError saying what to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ServerStartError(f"Cannot serve on {host!r}: the host name does not resolve ({e}).") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # no wait after a previous server's TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServerStartError(f"Cannot serve on {host}:{port}: the port is already in use (another server "
                                   "is listening there). Choose another port, or port=0 for any free one.") from None
        if e.errno == errno.EACCES:
            raise ServerStartError(f"Cannot serve on {host}:{port}: permission denied (ports below 1024 need "
                                   "privileges). Choose a port above 1024.") from None
        raise ServerStartError(f"Cannot serve on {host}:{port}: {e.strerror or e}.") from None
    sock.setblocking(False)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def warn_if_exposed(settings: ServerSettings) -> None:
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and settings.api_key is None:
        logger.warning("serving on %s without an API key: anyone who can reach this address can use the model "
                       "(pass api_key / --api-key)", settings.host)


def uvicorn_config(app: Any, settings: ServerSettings, *, log_config: Any = None, lifespan: str = "off",
                   log_level: str | None = None) -> uvicorn.Config:
    return uvicorn.Config(app, lifespan=lifespan, log_config=log_config, log_level=log_level,
                          access_log=settings.access_log, timeout_graceful_shutdown=settings.graceful_shutdown_s,
                          loop="asyncio")


class ServerHandle:
    """A server running in a background thread: ``url``, ``stop()``; usable as a context manager."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, name: str = "nbengine-server") -> None:
        self._server = server
        self.url = _url(sock)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(sock,), name=name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"The server did not start: {self._error!r}")
            time.sleep(0.01)

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()  # its own loop: never the kernel's (patched or not)
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._server.serve(sockets=[sock]))
        except BaseException as e:  # noqa: BLE001 - includes uvicorn's SystemExit on a failed start
            self._error = e
            logger.error("the server thread stopped: %r", e)
        finally:
            sock.close()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and self._server.started and not self._server.should_exit

    def stop(self, timeout: float | None = None) -> None:
        """Stop serving (open streams get ``graceful_shutdown_s`` to finish, then are aborted). Idempotent.

        The engine keeps running: it belongs to the caller.
        """
        self._server.should_exit = True
        if threading.current_thread() is not self._thread:
            grace = self._server.config.timeout_graceful_shutdown or 0
            self._thread.join(timeout if timeout is not None else grace + 10.0)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"ServerHandle({self.url}, {'running' if self.running else 'stopped'})"


def serve(llm: Any, port: int = 30000, host: str = "127.0.0.1", api_key: str | None = None, *,
          settings: ServerSettings | None = None, **options: Any) -> ServerHandle:
    """Serve ``llm`` over HTTP from a background thread and return at once with a :class:`ServerHandle`.

    ``port=0`` picks a free port (see ``handle.url``). Other ``options`` are :class:`ServerSettings`
    fields: ``served_model_name``, ``cors_origins``, ``max_request_bytes``, ``log_prompts``,
    ``access_log`` (default off here), ``graceful_shutdown_s``, ``allow_image_urls``. The engine is not
    stopped by ``stop()``.
    """
    from .app import create_app

    if settings is None:
        options.setdefault("access_log", False)  # a notebook cell is no place for an access log
        settings = ServerSettings(host=host, port=port, api_key=api_key, **options)
    warn_if_exposed(settings)
    app = create_app(llm, settings)
    sock = bind_socket(settings.host, settings.port)
    try:
        server = uvicorn.Server(uvicorn_config(app, settings))
    except BaseException:
        sock.close()
        raise
    handle = ServerHandle(server, sock)
    logger.info("serving %s at %s (OpenAI base URL %s/v1)", app.state.ctx.model_name, handle.url, handle.url)
    return handle
