"""The Python API behind the magics: ``stream(llm, prompt, **params)`` shows the live view from code."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from . import render
from .live import LiveRun
from .probs import logprob_args, probs_view
from .prompting import build_inputs
from .views import make_view


def model_label(llm: Any) -> str:
    path = Path(str(getattr(llm, "model_dir", "model")))
    name = path.name
    # cached GGUF conversions are "<name>-<12 hex key>"
    head, _, key = name.rpartition("-")
    return head if head and len(key) == 12 and all(c in "0123456789abcdef" for c in key) else name


def _labels(prompts: list[str], n: int) -> list[str]:
    def short(p: str) -> str:
        p = " ".join(p.split())
        return p if len(p) <= 40 else p[:39] + "…"

    if len(prompts) == 1 and n == 1:
        return ["output"]
    return [f"{i + 1}" + (f".{j + 1}" if n > 1 else "") + f": {short(p)}" for i, p in enumerate(prompts) for j in range(n)]


def with_seed(params: dict) -> dict:
    """A random seed for sampled runs that have none, recorded in the metadata so the output can be reproduced."""
    params = dict(params)
    if params.get("seed") is None and params.get("temperature", 1.0) != 0:
        params["seed"] = random.randrange(2**31)
    return params


def prepare_run(llm: Any, prompts: list[str], params: dict, *, chat: bool | None = None, system: str | None = None,
                fmt: str = "markdown", ui: str = "auto", extra_meta: dict | None = None, trace: bool = False,
                messages_ids: list[int] | None = None, images: list[Any] | None = None,
                show: str = "text") -> LiveRun:
    """Validate everything and build the :class:`LiveRun` (nothing shown yet; bad input raises here).

    ``messages_ids`` (already templated chat ids) replaces ``prompts`` as model input for ``%%chat``.
    ``images``: the images of every prompt (a vision-language model; placeholders are added).
    ``show``: "text", "probs" (tokens shaded by probability) or "prompt" (the prompt's tokens too).
    """
    logprobs = logprob_args(show)
    if fmt not in render.FORMATS:
        raise ValueError(f"format must be one of {', '.join(render.FORMATS)}; got {fmt!r}.")
    params = with_seed(params)
    if messages_ids is not None:
        texts, ids, used_chat = None, [messages_ids], True
    else:
        texts, ids, used_chat = build_inputs(llm, prompts, chat, system, len(images or []))
    n = params.get("n", 1) or 1
    model = model_label(llm)
    meta = {"chat_template": used_chat, **({"system": system} if system else {}), **(extra_meta or {})}
    view = make_view(fmt, model, params, ui, meta)
    image_data = [list(images) for _ in prompts] if images else None
    if logprobs:
        view = probs_view(view, llm, show)
    return LiveRun(llm, view, prompts=texts, input_ids=ids, params=params, labels=_labels(prompts, n), trace=trace,
                   image_data=image_data, logprobs=logprobs)


def execute(run: LiveRun) -> LiveRun:
    """Run it live; on KeyboardInterrupt the exception carries the run (``nbengine_run``) for its partial text."""
    try:
        run.run()
    except KeyboardInterrupt as e:
        e.nbengine_run = run
        raise
    return run


def stream(llm: Any, prompt: str | list[str], sampling_params: dict | None = None, *, chat: bool | None = None,
           system: str | None = None, format: str = "markdown", ui: str = "auto", images: list[Any] | None = None,
           show: str = "text", **params: Any) -> dict | list[dict]:
    """Generate with the live view (text as it comes, stats, Stop) and return the output dict(s).

    ``prompt``: a string, or a list (one pane per sample). Sampling parameters come as a dict
    and/or keyword arguments (``max_new_tokens=64, temperature=0``). ``chat``: apply the model's
    chat template (default: where it has one); ``system``: a system message; ``format``:
    markdown / text / code / json for the finished output; ``ui``: auto / widget / text / terminal;
    ``images``: images for every prompt (paths, PIL images, bytes; a vision-language model);
    ``show``: text, probs (tokens shaded by their probability, live) or prompt (the prompt's too).
    Returns one dict for one prompt with n == 1, else a list (prompt-major), as ``generate`` does.
    A KeyboardInterrupt aborts the requests (their KV pages are freed), keeps the partial text
    marked stopped, and propagates.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    p = {**(sampling_params or {}), **params}
    run = execute(prepare_run(llm, prompts, p, chat=chat, system=system, fmt=format, ui=ui, images=images,
                              show=show))
    outs = run.outputs()
    return outs[0] if run.single else outs
