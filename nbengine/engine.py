"""Engine: the thread-safe public API (SGLang's offline Engine, usable from any thread or loop)."""

from __future__ import annotations

import asyncio
import logging
import queue
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

from . import hooks
from . import scoring
from .chat import conversation_ids, with_images
from .config import EngineConfig, ModelConfig, model_sampling_defaults
from .engine_thread import EngineThread
from .errors import EngineDeadError, EngineShutdownError
from .grammar import GrammarBackend
from .hidden_states import HiddenStates
from .loader.resolve import resolve_model_path
from .models import check_architecture
from .multimodal import load_processor
from .request_builder import Limits, RequestSpec, build_requests
from .output_sink import as_output
from .output_sink import async_sink as _async_emit  # (module names the tests patch)
from .output_sink import queue_sink as _queue_emit
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
            self.processor = None
            self._finalizer = weakref.finalize(self, lambda: None)
            return
        _start_kernel_warm_up(self.config, self.model_dir)  # numba loads while the tokenizer and weights do
        self.tokenizer = None if self.config.skip_tokenizer_init else _load_tokenizer(
            self.config.tokenizer_path, self.model_dir)
        # the image input processor of a vision-language model (None for text-only models)
        self.processor = load_processor(self.model_dir)
        if self.processor is not None and (self.config.tp_size > 1 or self.config.dp_size > 1):
            raise ValueError("Vision-language models run on one device for now: leave tp_size and dp_size at 1.")
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
            enable_custom_logit_processor=self.config.enable_custom_logit_processor,
            sampling_defaults=defaults,
            grammar=GrammarBackend(self.tokenizer, info["vocab_size"], info["eos_token_ids"]),
        )
        self._device = f'{info["device"]}, {info["dtype"]}'
        self._finalizer = weakref.finalize(self, self._thread.stop)
        logger.info("engine ready in %.2fs: %s", time.perf_counter() - t0, self.model_dir)

    # ------------------------------------------------------------- generate
    def generate(self, prompt: str | list[str] | None = None, sampling_params: dict | list[dict] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None, image_data: Any = None,
                 return_logprob: bool | list[bool] = False, logprob_start_len: int | list[int] | None = None,
                 top_logprobs_num: int | list[int] | None = None, return_hidden_states: bool | list[bool] = False,
                 stream: bool = False, rid: str | list[str] | None = None, return_text_in_logprobs: bool = False,
                 custom_logit_processor: str | list[str | None] | None = None,
                 ) -> dict | list[dict] | Iterator[dict]:
        """Generate synchronously. Safe from any thread, including one running an event loop."""
        specs, single = self._build(prompt, sampling_params, input_ids, image_data, return_logprob,
                                    logprob_start_len, top_logprobs_num, return_hidden_states, rid,
                                    return_text_in_logprobs, custom_logit_processor)
        if stream:
            return self._sync_stream(specs, single)
        return self._run_sync(specs, single)

    def _run_sync(self, specs: list[RequestSpec], single: bool) -> dict | list[dict]:
        q: queue.Queue = queue.Queue()
        rids = self._submit(specs, single, stream=False, emit=_queue_emit(q))
        got: deque = deque()
        results: list[dict | None] = [None] * len(specs)
        progress = hooks.batch_started(len(specs)) if not single else None
        try:
            for _ in range(len(specs)):
                i, out = self._get_sync(q, got)
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
                             rid: str | list[str] | None = None, return_text_in_logprobs: bool = False,
                             custom_logit_processor: str | list[str | None] | None = None,
                             ) -> dict | list[dict] | AsyncIterator[dict]:
        """Generate from a coroutine; with ``stream=True`` await it, then ``async for`` the chunks."""
        specs, single = self._build(prompt, sampling_params, input_ids, image_data, return_logprob,
                                    logprob_start_len, top_logprobs_num, return_hidden_states, rid,
                                    return_text_in_logprobs, custom_logit_processor)
        if stream:
            return self._async_stream(specs, single)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        rids = self._submit(specs, single, stream=False, emit=_async_emit(loop, q))
        got: deque = deque()
        results: list[dict | None] = [None] * len(specs)
        progress = hooks.batch_started(len(specs)) if not single else None
        try:
            for _ in range(len(specs)):
                i, out = await self._get_async(q, got)
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

    # ------------------------------------------------------- encode / score
    def encode(self, prompt: str | list[str] | None = None, input_ids: list[int] | list[list[int]] | None = None,
               pooling: str = "last", rid: str | list[str] | None = None) -> dict | list[dict]:
        """The prompt's final hidden state (after the final norm): the last token's (``pooling="last"``) or the
        mean over the prompt (``"mean"``), as ``{"embedding": [...], "meta_info": {...}}`` (a list for a list)."""
        scoring.check_pooling(pooling)
        specs, single = self._build(prompt, {"max_new_tokens": 0}, input_ids, None, False, None, None, False, rid)
        for s in specs:
            s.pooling = pooling
        outs = self._run_sync(specs, single)
        return scoring.embedding_output(outs) if single else [scoring.embedding_output(o) for o in outs]

    def score(self, query: str | list[int], items: list[str] | list[list[int]], label_token_ids: list[int],
              apply_softmax: bool = False, item_first: bool = False) -> list[list[float]]:
        """For each item, the probabilities of ``label_token_ids`` as the next token after query + item (item +
        query with ``item_first``); ``apply_softmax`` renormalises them over the labels. As SGLang's ``score``."""
        labels = scoring.check_labels(label_token_ids, self._limits.vocab_size)
        texts, ids = scoring.score_prompts(self.tokenizer, query, items, item_first)
        specs, _ = self._build(texts, {"max_new_tokens": 0}, ids, None, False, None, None, False, None)
        for s in specs:
            s.label_ids = labels
        outs = self._run_sync(specs, single=False)
        return [scoring.label_scores(o["meta_info"]["label_token_logprobs"], apply_softmax) for o in outs]

    # ------------------------------------------------------------------ chat
    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: dict | list[dict] | None = None, *,
             add_generation_prompt: bool = True, chat_template: str | None = None, tools: list[dict] | None = None,
             stream: bool = False, **generate_kwargs: Any) -> dict | list[dict] | Iterator[dict]:
        """``generate`` on a conversation (a list of ``{"role", "content"}`` dicts) or a list of them, rendered
        with the model's chat template (``chat_template`` overrides it; ``tools`` reach the template). Takes
        ``generate``'s other keyword arguments and returns the same output dicts."""
        ids, single, images = conversation_ids(self.tokenizer, messages, add_generation_prompt, chat_template, tools)
        return self.generate(input_ids=ids, sampling_params=sampling_params, stream=stream,
                             **with_images(images, single, generate_kwargs))

    async def async_chat(self, messages: list[dict] | list[list[dict]], sampling_params: dict | list[dict] | None = None,
                         *, add_generation_prompt: bool = True, chat_template: str | None = None,
                         tools: list[dict] | None = None, stream: bool = False,
                         **generate_kwargs: Any) -> dict | list[dict] | AsyncIterator[dict]:
        """``chat`` from a coroutine; with ``stream=True`` await it, then ``async for`` the chunks."""
        ids, single, images = conversation_ids(self.tokenizer, messages, add_generation_prompt, chat_template, tools)
        return await self.async_generate(input_ids=ids, sampling_params=sampling_params, stream=stream,
                                         **with_images(images, single, generate_kwargs))

    def _sync_stream(self, specs: list[RequestSpec], single: bool) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        rids = self._submit(specs, single, stream=True, emit=_queue_emit(q))
        got: deque = deque()
        done = 0
        try:
            while done < len(specs):
                _, out = self._get_sync(q, got)
                done += out["meta_info"]["finish_reason"] is not None
                yield out
        finally:
            if done < len(specs):
                self._abort_many(rids)

    async def _async_stream(self, specs: list[RequestSpec], single: bool) -> AsyncIterator[dict]:
        q: asyncio.Queue = asyncio.Queue()
        rids = self._submit(specs, single, stream=True, emit=_async_emit(asyncio.get_running_loop(), q))
        got: deque = deque()
        done = 0
        try:
            while done < len(specs):
                _, out = await self._get_async(q, got)
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

    def get_recent_requests(self) -> list[dict[str, Any]]:
        """The last finished requests (up to 32, oldest first): ``rid``, ``finish_reason`` (its type),
        ``prompt_tokens``, ``completion_tokens``, ``ttft_s``, ``e2e_latency_s``, ``tok_per_s`` (decode speed
        after the first token), ``finished_at`` (``time.time()``). A copy, read without waiting for a step."""
        return self._thread.live_core().stats.recent_requests()

    def get_throughput_history(self, seconds: int = 60) -> list[int]:
        """Tokens generated in each of the last ``seconds`` (at most 60) whole seconds, oldest first.
        A copy, read without waiting for a step."""
        if not isinstance(seconds, int) or not 1 <= seconds <= 60:
            raise ValueError(f"seconds must be an int in [1, 60], got {seconds!r}.")
        return self._thread.live_core().stats.tokens_per_second(seconds)

    def flush_cache(self) -> bool:
        """Empty the prefix cache (KV pages running requests hold stay theirs); later requests compute
        their prompts from scratch. Returns True (SGLang's ``flush_cache`` reports success)."""
        self._thread.call(self._thread.live_core().flush_cache)
        return True

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
               top_logprobs_num, return_hidden_states, rid, return_text_in_logprobs=False,
               custom_logit_processor=None) -> tuple[list[RequestSpec], bool]:
        self._thread.check()
        return build_requests(self.tokenizer, self._limits, prompt, sampling_params, input_ids, image_data,
                              return_logprob, logprob_start_len, top_logprobs_num, return_hidden_states, rid,
                              return_text_in_logprobs, custom_logit_processor, processor=self.processor)

    def _submit(self, specs: list[RequestSpec], single: bool, stream: bool, emit) -> list[str]:
        # every request of a batch call (a list, or n > 1) reports its "index", even a list of one
        seqs = [Sequence(rid=s.rid, prompt_ids=s.prompt_ids, params=s.params, emit=emit(i),
                         index=None if single else i, stream=stream, logprob=s.logprob,
                         hidden=HiddenStates(s.pooling or "all", len(s.prompt_ids))
                         if s.hidden_states or s.pooling else None, label_ids=s.label_ids,
                         grammar=self._limits.grammar.matcher(s.grammar) if s.grammar is not None else None,
                         logit_processor=s.logit_processor, mm=s.mm)
                for i, s in enumerate(specs)]
        for seq, s in zip(seqs, specs):
            if s.fork_of is not None:
                seq.fork_of = seqs[s.fork_of]
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

    def _get_sync(self, q: queue.Queue, got: deque) -> tuple[int, dict]:
        """The next ``(index, output)`` of a call; ``got`` keeps the rest of a step's delivery."""
        while not got:
            try:
                got.extend(q.get(timeout=_POLL))
            except queue.Empty:
                self._thread.check()
        i, out = got.popleft()
        return i, as_output(out)

    async def _get_async(self, q: asyncio.Queue, got: deque) -> tuple[int, dict]:
        while not got:
            try:
                got.extend(await asyncio.wait_for(q.get(), _POLL))
            except asyncio.TimeoutError:
                self._thread.check()
        i, out = got.popleft()
        return i, as_output(out)


def _start_kernel_warm_up(config: EngineConfig, model_dir: Path) -> None:
    """Start loading the quantized CPU kernels now when this engine will run them (the runner waits for them)."""
    from .model_runner import resolve_device, resolve_dtype
    from .quantization import kernel_warm_up, resolve_quantization

    try:
        device = resolve_device(config.device)
        if resolve_quantization(config.quantization, device, resolve_dtype(config.dtype, device), model_dir):
            kernel_warm_up()
    except ValueError:
        pass  # the runner raises it, after the checks that come first


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
