"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Every error a client can cause names the field it is about; the engine's own ``ValueError``s
(which name engine fields such as ``max_new_tokens``) are translated to the API's names.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineDeadError, EngineShutdownError, NBEngineError

logger = logging.getLogger("nbengine.server")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 503: "service_unavailable", 500: "internal_server_error"}


class APIError(Exception):
    """An error to send to the client as an OpenAI-style body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    """The client closed the connection before its (non-streamed) answer was ready."""


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_bytes(message: str, status: int, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(message, status, param, code)).encode()


# ------------------------------------------------------------------ engine errors
# request fields an engine error message starts with ("top_k must be -1 (disable) or at least 1, got 0.")
ENGINE_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "n", "seed", "stop", "stop_token_ids", "logit_bias",
                 "top_logprobs_num", "logprob_start_len", "stream_interval", "ignore_eos", "skip_special_tokens",
                 "sampling_params", "return_logprob", "return_hidden_states", "image_data", "rid")


def from_engine_error(exc: BaseException, names: dict[str, str], prompt_field: str) -> APIError:
    """Turn an engine exception raised while building a request into an APIError naming the API field.

    ``names`` maps engine field names to this endpoint's names (e.g. ``max_new_tokens`` -> ``max_tokens``);
    ``prompt_field`` is the field holding the prompt (``messages``, ``prompt``, ``text``).
    """
    if isinstance(exc, (EngineDeadError, EngineShutdownError)):
        return APIError(f"The engine is not available: {exc}", status=503, code="engine_unavailable")
    if isinstance(exc, APIError):
        return exc
    message = str(exc)
    param: str | None = None
    code = None
    first = re.match(r"(\w+)", message)
    if message.startswith("Requested token count exceeds"):
        param, code = names.get("max_new_tokens", "max_new_tokens"), "context_length_exceeded"
    elif isinstance(exc, TypeError) and "sampling parameter" in message:
        param = "sampling_params"
    elif first and first.group(1) in ENGINE_FIELDS:  # "top_k must be ...", "image_data was given ..."
        param = names.get(first.group(1), first.group(1))
    elif re.search(r"^The input \(|\binput_ids\b|^prompt\b|^The prompt list|^Either text", message):
        param = prompt_field
        code = "context_length_exceeded" if "context length" in message else None
    elif re.search(r"Structured output|\bjson_schema\b|\bregex\b|\bebnf\b", message):
        param = names.get("json_schema", "json_schema")
        if param != "json_schema":  # the API field differs from the engine's: name both
            return APIError(f"Invalid '{param}': {message}", status=400, param=param)
    for engine_name, api_name in names.items():
        message = re.sub(rf"\b{engine_name}\b", api_name, message)
    return APIError(message, status=400, param=param, code=code)


# ------------------------------------------------------------ validation errors
def _is_union_tag(part: Any) -> bool:
    # pydantic names the member of a union it tried: "str", "list[int]", "list[ContentPart]"
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)


def _split_loc(loc: tuple[Any, ...]) -> tuple[str | None, str | None]:
    """The field path up to the first union member tag ("messages[0].content"), and that tag."""
    out = ""
    for p in loc:
        if p == "body" and not out:
            continue
        if _is_union_tag(p):
            return out or None, p
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out or None, None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError("Invalid request body.")
    first = errors[0]
    kind = first.get("type")
    if kind == "json_invalid":
        return APIError(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}.",
                        code="invalid_json")
    param, _ = _split_loc(tuple(first.get("loc", ())))
    if param is None:
        return APIError("The request body must be a JSON object.", code="invalid_body")
    if kind == "extra_forbidden":
        return APIError(f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(f"Missing required parameter: '{param}'.", param=param, code="missing_parameter")
    tags = list(dict.fromkeys(t for e in errors for q, t in [_split_loc(tuple(e.get("loc", ())))] if q == param and t))
    if len(tags) > 1:
        msg = "expected " + " or ".join(tags)
    else:
        msg = first.get("msg", "invalid value")
    return APIError(f"Invalid value for '{param}': {msg}.", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            message = f"Not found: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        return APIError(message, status=exc.status_code).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        logger.debug("client left before the answer of %s was ready; request aborted", request.url.path)
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(NBEngineError)
    async def _engine(request: Request, exc: NBEngineError) -> JSONResponse:
        return from_engine_error(exc, {}, "prompt").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # the exception type and message only: a traceback line could quote request data
        logger.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return APIError("Internal server error.", status=500).response()
