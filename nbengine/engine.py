"""Engine: the thread-safe public API (SGLang's offline Engine, usable from any thread or loop)."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import weakref
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from . import hooks
from .config import EngineConfig, ModelConfig, model_sampling_defaults
from .engine_thread import EngineThread
from .errors import EngineDeadError, EngineShutdownError
from .loader.resolve import resolve_model_path
from .models import check_architecture
from .request_builder import Limits, RequestSpec, build_requests
from .request_output import RequestOutput
from .sequence import Sequence
from .tokenizer import Tokenizer

logger = logging.getLogger("nbengine")

_POLL = 0.25  # seconds between liveness checks while waiting for outputs


class Engine:
    """An LLM engine running in a background thread.

    ``Engine()`` loads the embedded default model (SmolLM2-135M-Instruct); ``model_path`` may be
    an HF folder, a ``.gguf`` file or a hub id. Engine arguments follow SGLang's ServerArgs.
    """

    def __init__(self, model_path: str | None = None, **engine_args: Any) -> None:
        self.config = EngineConfig.from_kwargs(model_path, engine_args)
        _configure_logging(self.config.log_level)
        self.config.warn_not_built()
        t0 = time.perf_counter()
        self.model_dir = resolve_model_path(model_path)
        check_architecture(self.model_dir)
        if self.config.tp_size > 1 or self.config.dp_size > 1:
            from .parallel.sharding import check_tp_size
            from .parallel.workers import check_launch

            check_tp_size(ModelConfig.from_folder(self.model_dir), self.config.tp_size)  # before any process starts
            check_launch(self.config)
        if self.config.node_rank > 0:  # another node's ranks: run them until node 0's engine stops them
            from .parallel.worker import FinishedNode, serve_node

            serve_node(self.config, self.model_dir)
            self._thread, self._device, self.tokenizer = FinishedNode(), "node {}".format(self.config.node_rank), None
            self._finalizer = weakref.finalize(self, lambda: None)
            return
        self.tokenizer = None if self.config.skip_tokenizer_init else _load_tokenizer(
            self.config.tokenizer_path, self.model_dir)
        defaults = model_sampling_defaults(self.model_dir) if self.config.sampling_defaults == "model" else {}
        if self.config.dp_size > 1:  # replicas behind this facade; requests go to the least loaded
            from .parallel.replicas import ReplicaSet

            self._thread: EngineThread | ReplicaSet = ReplicaSet(self.config, self.model_dir, self.tokenizer)
        else:
            self._thread = EngineThread(self.config, self.model_dir, self.tokenizer)
        info = self._thread.call(self._thread.live_core().info)
        self._limits = Limits(
            vocab_size=self._thread.core.runner.model_config.vocab_size,
            context_length=info["context_length"],
            kv_capacity=info["max_total_num_tokens"],
            allow_auto_truncate=self.config.allow_auto_truncate,
            skip_tokenizer_init=self.config.skip_tokenizer_init,
            enable_return_hidden_states=self.config.enable_return_hidden_states,
            sampling_defaults=defaults,
        )
        self._device = f'{info["device"]}, {info["dtype"]}'
        self._finalizer = weakref.finalize(self, self._thread.stop)
        logger.info("engine ready in %.2fs: %s", time.perf_counter() - t0, self.model_dir)

    # ------------------------------------------------------------- generate
    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, image_data: Any = None,
                 return_logprob: bool | list[bool] = False, logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None, return_hidden_states: bool | list[bool] = False,
                 stream: bool = False, rid: str | list[str] | None = None
                 ) -> dict | list[dict] | Iterator[dict]:
        """Generate synchronously. Safe from any thread, including one running an event loop."""
        specs, single = self._build(prompt, sampling_params, input_ids, image_data, return_logprob,
                                    logprob_start_len, top_logprobs_num, return_hidden_states, rid)
        if stream:
            return self._sync_stream(specs, single)
        q: queue.Queue = queue.Queue()
        rids = self._submit(specs, single, stream=False, emit=_queue_emit(q))
        results: list[dict | None] = [None] * len(specs)
        progress = hooks.batch_started(len(specs)) if not single else None
        try:
            for _ in range(len(specs)):
                i, out = self._get_sync(q)
                results[i] = out
                if progress is not None:
                    progress.advance(1)
        except BaseException:
            self._abort_many(rids)
            raise
        finally:
            if progress is not None:
                progress.close()
        return results[0] if single else results

    async def async_generate(self, prompt: str | list[str] | None = None,
                             sampling_params: dict | list[dict] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None, image_data: Any = None,
                             return_logprob: bool | list[bool] = False,
                             logprob_start_len: int | list[int] | None = None,
                             top_logprobs_num: int | list[int] | None = None,
                             return_hidden_states: bool | list[bool] = False, stream: bool = False,
                             rid: str | list[str] | None = None) -> dict | list[dict] | AsyncIterator[dict]:
        """Generate from a coroutine; with ``stream=True`` await it, then ``async for`` the chunks."""
        specs, single = self._build(prompt, sampling_params, input_ids, image_data, return_logprob,
                                    logprob_start_len, top_logprobs_num, return_hidden_states, rid)
        if stream:
            return self._async_stream(specs, single)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = self._submit(specs, single, stream=False, emit=_async_emit(loop, q))
        results: list[dict | None] = [None] * len(specs)
        progress = hooks.batch_started(len(specs)) if not single else None
        try:
            for _ in range(len(specs)):
                i, out = await self._get_async(q)
                results[i] = out
                if progress is not None:
                    progress.advance(1)
        except BaseException:  # includes cancellation of the awaiting task
            self._abort_many(rids)
            raise
        finally:
            if progress is not None:
                progress.close()
        return results[0] if single else results

    def _sync_stream(self, specs: list[RequestSpec], single: bool) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        rids = self._submit(specs, single, stream=True, emit=_queue_emit(q))
        done = 0
        try:
            while done < len(specs):
                _, out = self._get_sync(q)
                done += out["meta_info"]["finish_reason"] is not None
                yield out
        finally:
            if done < len(specs):
                self._abort_many(rids)

    async def _async_stream(self, specs: list[RequestSpec], single: bool) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        rids = self._submit(specs, single, stream=True, emit=_async_emit(asyncio.get_running_loop(), q))
        done = 0
        try:
            while done < len(specs):
                _, out = await self._get_async(q)
                done += out["meta_info"]["finish_reason"] is not None
                yield out
        finally:
            if done < len(specs):
                self._abort_many(rids)

    # ---------------------------------------------------------------- control
    def abort(self, rid: str | None = None, abort_all: bool = False) -> None:
        """Abort a request (its KV pages are freed before the next step). ``abort_all`` aborts every one."""
        if rid is None and not abort_all:
            raise ValueError("Pass the rid of the request to abort, or abort_all=True.")
        if self._thread.alive():
            try:
                self._thread.post(self._thread.live_core().abort, None if abort_all else rid)
            except (EngineDeadError, EngineShutdownError):  # it stopped meanwhile: nothing left to abort
                pass

    def get_server_info(self) -> dict[str, Any]:
        """Model, device, KV pool size and usage, running/waiting counts, and the engine args.

        Each key has one meaning: the pool's size is ``max_total_num_tokens`` (the ``max_total_tokens``
        argument only asks for it), and runtime values replace the arguments they resolve."""
        from . import __version__

        info = self._thread.call(self._thread.live_core().info)
        args = {k: v for k, v in vars(self.config).items() if k != "max_total_tokens"}
        return {**args, "model_path": str(self.model_dir), **info,
                "default_sampling_params": dict(self._limits.sampling_defaults), "version": __version__}

    def shutdown(self) -> None:
        """Stop the engine thread and free its model and KV memory. Safe to call twice."""
        self._finalizer()

    def __repr__(self) -> str:
        state = "running" if self._thread.alive() else ("dead" if self._thread.dead else "shut down")
        return f"Engine(model_path={str(self.model_dir)!r}, {self._device}, {state})"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- helpers
    def _build(self, prompt, sampling_params, input_ids, image_data, return_logprob, logprob_start_len,
               top_logprobs_num, return_hidden_states, rid) -> tuple[list[RequestSpec], bool]:
        self._thread.check()
        return build_requests(self.tokenizer, self._limits, prompt, sampling_params, input_ids, image_data,
                              return_logprob, logprob_start_len, top_logprobs_num, return_hidden_states, rid)

    def _submit(self, specs: list[RequestSpec], single: bool, stream: bool, emit) -> list[str]:
        # every request of a batch call (a list, or n > 1) reports its "index", even a list of one
        seqs = [Sequence(rid=s.rid, prompt_ids=s.prompt_ids, params=s.params, emit=emit(i),
                         index=None if single else i, stream=stream, logprob=s.logprob)
                for i, s in enumerate(specs)]
        self._thread.post(self._thread.live_core().add, seqs)
        return [s.rid for s in specs]

    def _abort_many(self, rids: list[str]) -> None:
        if not self._thread.alive():
            return
        try:
            core = self._thread.live_core()

            def run() -> None:
                for r in rids:
                    core.abort(r)

            self._thread.post(run)
        except Exception:  # noqa: BLE001 - the engine is gone; nothing to abort
            pass

    def _get_sync(self, q: queue.Queue) -> tuple[int, dict]:
        while True:
            try:
                i, out = q.get(timeout=_POLL)
            except queue.Empty:
                self._thread.check()
                continue
            return i, _as_output(out)

    async def _get_async(self, q: asyncio.Queue) -> tuple[int, dict]:
        while True:
            try:
                i, out = await asyncio.wait_for(q.get(), _POLL)
            except asyncio.TimeoutError:
                self._thread.check()
                continue
            return i, _as_output(out)


def _as_output(out: RequestOutput | BaseException) -> dict:
    """The user's dict, built here on the caller's thread; an error for this request is raised."""
    if isinstance(out, BaseException):
        raise out
    return out.to_dict()


def _queue_emit(q: queue.Queue):
    """For request ``i`` of a call, the callback that hands its outputs to a waiting thread."""
    def for_index(i: int):
        def emit(out: RequestOutput | BaseException) -> None:
            q.put((i, out))
        return emit
    return for_index


def _async_emit(loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
    """For request ``i`` of a call, the callback that hands its outputs to a waiting event loop."""
    def for_index(i: int):
        def emit(out: RequestOutput | BaseException) -> None:
            loop.call_soon_threadsafe(q.put_nowait, (i, out))
        return emit
    return for_index


def _load_tokenizer(tokenizer_path: Any, model_dir: Any) -> Tokenizer:
    folder = Path(tokenizer_path or model_dir)
    if tokenizer_path is not None and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ValueError(f"tokenizer_path {str(tokenizer_path)!r} is not a folder with a tokenizer.json or "
                         "tokenizer_config.json; pass a tokenizer folder or leave it unset.")
    return Tokenizer(folder)


def _configure_logging(level: str | None) -> None:
    """Set the "nbengine" logger's level only when asked (or when nobody set it). Lines are printed once:
    through the application's logging when it configured the root logger, else through our own handler
    (then not passed on to the root, or they would print twice once the root gets a handler)."""
    log = logging.getLogger("nbengine")
    if level is not None:
        log.setLevel(level.upper())
    elif log.level == logging.NOTSET:
        log.setLevel(logging.WARNING)
    ours = [h for h in log.handlers if getattr(h, "_nbengine", False)]
    if logging.getLogger().handlers:
        for h in ours:
            log.removeHandler(h)
        log.propagate = True
    elif not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[nbengine %(levelname)s] %(message)s"))
        handler._nbengine = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False