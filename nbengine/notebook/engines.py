"""The notebook's engines: a shared default engine started lazily, and engines loaded by name.

``%nbengine load`` / ``use`` / ``list`` / ``shutdown`` and every magic's ``-m/--model`` go
through one :class:`EngineRegistry` per kernel. A ``-m`` value is, in order: a registered name,
a variable of the notebook holding an ``Engine``, or a model path / hub id (loaded once and
registered under that string).
"""

from __future__ import annotations

import ast
import time
from typing import Any

DEFAULT_NAME = "default"


class EngineRegistry:
    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}
        self.models: dict[str, str | None] = {}  # name -> model argument it was loaded with
        self.current: str = DEFAULT_NAME
        self.last_tok_per_s: dict[str, float] = {}

    # ------------------------------------------------------------- lookup
    def get(self, model: str | None = None, user_ns: dict | None = None) -> tuple[str, Any]:
        """The engine for a magic's ``-m`` value (None: the current one, started on first use)."""
        from ..engine import Engine

        if model is None:
            model = self.current
        if model in self.engines:
            return model, self._alive(model)
        if user_ns is not None and isinstance(user_ns.get(model), Engine):
            return model, user_ns[model]
        if model == DEFAULT_NAME:
            return model, self.load(None, DEFAULT_NAME)
        return model, self.load(model, model)

    def _alive(self, name: str) -> Any:
        from ..errors import EngineDeadError, EngineShutdownError

        llm = self.engines[name]
        try:
            llm.get_server_info()
        except (EngineShutdownError, EngineDeadError):  # shut down from code, or died: start it again
            del self.engines[name]
            return self.load(self.models.get(name), name)
        return llm

    # ------------------------------------------------------------ actions
    def load(self, model: str | None, name: str | None = None, **engine_args: Any) -> Any:
        from IPython.display import display, update_display

        from ..engine import Engine

        name = name or (DEFAULT_NAME if model is None else model)
        if name in self.engines:
            raise ValueError(f"An engine named {name!r} is loaded already; `%nbengine shutdown {name}` first, "
                             "or pass --name to load it under another name.")
        label = model or "the default model (SmolLM2-135M-Instruct)"
        handle = display({"text/plain": f"Loading {label} ..."}, raw=True, display_id=True)
        t0 = time.perf_counter()
        try:
            llm = Engine(model, **engine_args)
        except BaseException:
            _update(handle, update_display, f"Could not load {label}.")
            raise
        info = llm.get_server_info()
        _update(handle, update_display, f"Loaded {label} as engine {name!r} ({info['device']}, {info['dtype']}) "
                                        f"in {time.perf_counter() - t0:.1f} s")
        self.engines[name] = llm
        self.models[name] = model
        return llm

    def use(self, name: str) -> None:
        if name not in self.engines and name != DEFAULT_NAME:
            raise ValueError(f"No engine named {name!r}; loaded: {', '.join(self.engines) or 'none'}. "
                             f"Load it with `%nbengine load MODEL --name {name}`.")
        self.current = name

    def shutdown(self, name: str | None = None) -> list[str]:
        names = list(self.engines) if name == "all" else [name or self.current]
        for n in names:
            if n not in self.engines:
                raise ValueError(f"No engine named {n!r}; loaded: {', '.join(self.engines) or 'none'}.")
        for n in names:
            self.engines.pop(n).shutdown()
            self.models.pop(n, None)
            self.last_tok_per_s.pop(n, None)
        if self.current not in self.engines:
            self.current = DEFAULT_NAME
        return names

    def shutdown_all(self) -> None:
        for llm in self.engines.values():
            llm.shutdown()
        self.engines.clear()
        self.models.clear()

    # ------------------------------------------------------------ reports
    def listing(self) -> str:
        if not self.engines:
            return f"No engine loaded yet; the magics start {DEFAULT_NAME!r} (the default model) on first use."
        rows = [f"{'*' if n == self.current else ' '} {n}: {llm!r}" for n, llm in self.engines.items()]
        return "\n".join(rows)

    def status(self, name: str | None = None) -> str:
        name = name or self.current
        if name not in self.engines:
            return f"Engine {name!r} is not loaded (it starts on the first %%generate)."
        info = self.engines[name].get_server_info()
        recent = self.last_tok_per_s.get(name)
        lines = [
            f"engine {name!r}{' (current)' if name == self.current else ''}",
            f"  model:    {info['model_path']} ({info['architecture']})",
            f"  device:   {info['device']}, {info['dtype']}, attention {info['attention_backend']}",
            f"  KV cache: {info['kv_pages_used']}/{info['kv_pages_total']} pages used "
            f"({100 * info['kv_token_usage']:.1f}%), {info['max_total_num_tokens']} tokens, page size {info['page_size']}",
            f"  requests: {info['num_running_reqs']} running, {info['num_waiting_reqs']} waiting, "
            f"{info['num_finished_reqs']} finished",
            f"  speed:    last step {info['last_gen_throughput']:.1f} tok/s"
            + (f", last cell {recent:.1f} tok/s" if recent is not None else ""),
        ]
        return "\n".join(lines)


def _update(handle: Any, update_display: Any, text: str) -> None:
    if handle is not None:
        update_display({"text/plain": text}, raw=True, display_id=handle.display_id)
    else:  # display() returns None without a kernel (terminal): it printed already
        print(text)


def parse_engine_args(tokens: list[str]) -> tuple[str | None, dict[str, Any]]:
    """``key=value`` tokens (values as Python literals where they parse) and an optional ``--name N``."""
    name = None
    args: dict[str, Any] = {}
    it = iter(tokens)
    for tok in it:
        if tok == "--name":
            name = next(it, None)
            if name is None:
                raise ValueError("--name needs a value: `%nbengine load MODEL --name NAME`.")
            continue
        key, sep, value = tok.partition("=")
        if not sep or not key:
            raise ValueError(f"Engine arguments are key=value pairs (e.g. max_total_tokens=8192), got {tok!r}.")
        key = key.lstrip("-").replace("-", "_")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = value
    return name, args
