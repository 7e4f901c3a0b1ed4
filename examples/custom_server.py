"""A custom HTTP server on nbengine's offline Engine (like SGLang's ``custom_server.py`` example).

    python examples/custom_server.py                 # default model, http://127.0.0.1:8000
    curl -s  127.0.0.1:8000/generate        -d '{"prompt": "The capital of France is"}'
    curl -sN 127.0.0.1:8000/generate_stream -d '{"prompt": "Once upon a time", "sampling_params": {"max_new_tokens": 64}}'

``/generate_stream`` sends each new piece of text once (the engine streams deltas because it is
created with ``incremental_streaming_output=True``), not the whole text again and again.
For an OpenAI-compatible server use ``nbengine serve`` or ``nbengine.server.serve(llm)`` instead.
"""

from __future__ import annotations

import argparse
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

import nbengine


def create_app(model_path: str | None = None, **engine_args) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # one engine for the whole server; it runs on its own thread, so it never blocks this loop
        app.state.engine = nbengine.Engine(model_path, incremental_streaming_output=True, **engine_args)
        yield
        app.state.engine.shutdown()

    app = FastAPI(lifespan=lifespan)

    async def read(request: Request) -> tuple[str | None, dict]:
        try:
            body = await request.json()
        except ValueError:
            return None, {}
        return (body.get("prompt"), body.get("sampling_params") or {}) if isinstance(body, dict) else (None, {})

    @app.post("/generate")
    async def generate(request: Request):
        prompt, params = await read(request)
        if not prompt:
            return JSONResponse({"error": "Prompt is required"}, status_code=400)
        try:
            out = await app.state.engine.async_generate(prompt, params)
        except (ValueError, TypeError) as e:  # bad sampling params: the engine says which and why
            return JSONResponse({"error": str(e)}, status_code=400)
        return PlainTextResponse(out["text"])

    @app.post("/generate_stream")
    async def generate_stream(request: Request):
        prompt, params = await read(request)
        if not prompt:
            return JSONResponse({"error": "Prompt is required"}, status_code=400)
        try:
            stream = await app.state.engine.async_generate(prompt, params, stream=True)
        except (ValueError, TypeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)

        async def deltas():
            async for chunk in stream:  # a client that disconnects cancels this loop: the engine aborts the request
                if chunk["text"]:
                    yield chunk["text"]

        return StreamingResponse(deltas(), media_type="text/plain; charset=utf-8")

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder, .gguf file or hub id (default: the embedded model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port)
