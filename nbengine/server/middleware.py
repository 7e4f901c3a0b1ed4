"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect detection).

- ``ApiKeyAuth``: ``Authorization: Bearer <key>`` on every path but ``/health``, compared in constant time.
- ``BodySizeLimit``: bodies over the cap get 413 before the app parses them (Content-Length or chunked).
- ``RequestCounter``: counts responses by endpoint and status for ``/metrics``.
"""

from __future__ import annotations

import hmac
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_bytes

OPEN_PATHS = frozenset({"/health"})


async def _send_error(send: Send, status: int, message: str, code: str, extra_headers: list | None = None) -> None:
    body = error_bytes(message, status, None, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # the scheme is case-insensitive; the key itself is compared in constant time
        if given[:7].lower() == b"bearer ":
            given = b"Bearer " + given[7:].strip()
        if not hmac.compare_digest(given, self._expected):
            message = ("Missing API key: send the header 'Authorization: Bearer <key>'." if not given else
                       "Incorrect API key provided.")
            await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._too_large(send)
                return
        # read the whole body first (the endpoints parse all of it anyway), counting as it arrives
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the server's own receive does

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"The request body is larger than the server's limit of {self.max_bytes} bytes.",
                          "request_too_large")


class RequestCounter:
    """Counts every HTTP response (auth failures and 404s included) as ``(endpoint, status)``."""

    def __init__(self, app: ASGIApp, count: Callable[[str, int], Any], known_paths: frozenset[str]) -> None:
        self.app = app
        self.count = count
        self.known_paths = known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in self.known_paths else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
