"""LiveRun: drive a streamed generate from the notebook's main thread and refresh a view.

The engine's stream is read by a small reader thread into a queue; the calling thread (the
kernel's main thread, running the cell) drains that queue, coalesces tokens and refreshes the
view at most every ``FLUSH_INTERVAL`` seconds (Jupyter drops output past 1,000 messages/s).
All display and widget updates therefore come from the cell's own thread.

Stopping: ``request_stop()`` (the Stop button, from any thread) aborts the requests at once; a
KeyboardInterrupt (the kernel's interrupt) in the wait loop does the same, waits for the aborts
to land (their KV pages are then free), marks the partial text stopped, and re-raises.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

FLUSH_INTERVAL = 0.05  # seconds: at most ~20 refreshes a second
MAX_MESSAGES_PER_S = 200  # batches: all panes together stay far below Jupyter's 1,000 msg/s
ABORT_WAIT = 10.0  # seconds to wait for aborted requests to report back
_DONE = object()


@dataclass
class Sample:
    """One stream (one pane): the text so far, its logprobs (when asked for) and its latest chunk."""

    label: str
    llm: Any = None
    rid: str = ""
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: dict[str, list] = field(default_factory=dict)  # meta_info's *_logprobs lists, whole
    last: dict | None = None
    done: bool = False
    dirty: bool = False
    t_first: float | None = None  # first chunk with a token
    t_last: float | None = None

    @property
    def completion_tokens(self) -> int:
        return self.last["meta_info"]["completion_tokens"] if self.last else 0

    def output(self) -> dict:
        """The sample's output dict, with the full text (and logprobs) even when the engine streams deltas."""
        if self.last is None:
            return {"text": self.text, "output_ids": [], "meta_info": {"finish_reason": None}}
        out = {k: v for k, v in self.last.items() if k != "index"}
        out["text"] = self.text
        out["output_ids"] = list(self.output_ids)
        if self.logprobs:
            out["meta_info"] = {**out["meta_info"], **{k: list(v) for k, v in self.logprobs.items()}}
        return out

    def stats(self, t_start: float) -> dict[str, Any]:
        """This sample's own TTFT and decode speed (tokens after the first over the time after the first)."""
        n = self.completion_tokens
        span = (self.t_last - self.t_first) if self.t_first is not None and self.t_last is not None else 0
        return {"completion_tokens": n,
                "ttft_s": None if self.t_first is None else round(self.t_first - t_start, 4),
                "tok_per_s": round((n - 1) / span, 2) if span > 0 and n > 1 else None,
                "finish_reason": self.last["meta_info"]["finish_reason"] if self.last else None}


@dataclass
class Batch:
    """One ``generate`` call of a run: one engine, its prompts (text or ids) and sampling params
    (one dict, or one per prompt), plus generate's logprob arguments."""

    llm: Any
    prompts: list[str] | None
    input_ids: list[list[int]] | None
    params: dict | list[dict]
    logprobs: dict[str, Any] = field(default_factory=dict)
    image_data: list | None = None  # per prompt: the images of a vision-language model

    @property
    def size(self) -> int:
        n = (self.params[0] if isinstance(self.params, list) else self.params).get("n", 1) or 1
        return len(self.prompts if self.prompts is not None else self.input_ids) * n


_LOGPROB_KEYS = ("output_token_logprobs", "output_top_logprobs")  # deltas in incremental streams
_INPUT_LOGPROB_KEYS = ("input_token_logprobs", "input_top_logprobs")  # always whole


class LiveRun:
    """Streamed ``generate`` calls (one batch per engine) shown live. ``run()`` blocks and returns the output dicts."""

    def __init__(self, llm: Any, view: Any, *, prompts: list[str] | None = None,
                 input_ids: list[list[int]] | None = None, params: dict | None = None, labels: list[str],
                 trace: bool = False, logprobs: dict[str, Any] | None = None,
                 batches: list[Batch] | None = None, image_data: Any = None) -> None:
        """One engine (``llm``, ``prompts`` or ``input_ids``, ``params``) or several ``batches``."""
        if batches is None:
            batches = [Batch(llm, prompts, input_ids, params or {}, logprobs or {}, image_data)]
        self.view = view
        self.batches = batches
        self.llm = batches[0].llm
        self.params = batches[0].params
        self.samples: list[Sample] = []
        self._sources: list[tuple[Iterator[dict], int, bool]] = []  # (stream, its first sample, incremental)
        for b in batches:
            first = len(self.samples)
            incremental = bool(getattr(getattr(b.llm, "config", None), "incremental_streaming_output", False))
            for _ in range(b.size):
                i = len(self.samples)
                self.samples.append(Sample(labels[i] if i < len(labels) else f"sample {i + 1}", b.llm,
                                           uuid.uuid4().hex))
            rids = [s.rid for s in self.samples[first:]]
            # validation happens here, on the caller's thread: a bad parameter raises before anything shows
            images = {"image_data": b.image_data} if b.image_data else {}
            gen = b.llm.generate(b.prompts, b.params, input_ids=b.input_ids, stream=True, rid=rids, **b.logprobs,
                                 **images)
            self._sources.append((gen, first, incremental))
        self.rids = [s.rid for s in self.samples]
        self.single = len(self.samples) == 1
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._readers_left = len(self._sources)
        self.stopped: str | None = None  # "stop" (button / request_stop) or "interrupt"
        self.error: BaseException | None = None
        self.t_start = self.t_first = self.t_end = None
        self.t_stop_requested: float | None = None  # when the Stop / interrupt came in
        self.t_aborted: float | None = None  # when the last aborted request reported back
        self.trace: dict[str, list] | None = {"chunks": [], "refreshes": []} if trace else None
        self.num_refreshes = 0

    # ------------------------------------------------------------ control
    def request_stop(self, *_: Any) -> None:
        """Abort every request of this run now; safe from any thread (a widget's click handler)."""
        if self._stop.is_set():
            return
        self.t_stop_requested = time.perf_counter()
        self._stop.set()
        self._abort()

    def _abort(self) -> None:
        for s in self.samples:
            if not s.done:
                s.llm.abort(s.rid)

    # ---------------------------------------------------------------- run
    def run(self) -> list[dict]:
        self.t_start = time.perf_counter()
        self.view.start(self)
        for k, source in enumerate(self._sources):
            threading.Thread(target=self._read, args=(source,), name=f"nbengine-live-reader-{k}", daemon=True).start()
        try:
            self._wait()
        except KeyboardInterrupt:
            self.stopped = "interrupt"
            if self.t_stop_requested is None:
                self.t_stop_requested = time.perf_counter()
            self._abort()
            self._drain_after_abort()
            self._end()
            raise
        except BaseException as e:
            self.error = e
            self._abort()
            self._end()
            raise
        if self._stop.is_set():
            self.stopped = "stop"
        self._end()
        return self.outputs()

    def outputs(self) -> list[dict]:
        return [s.output() for s in self.samples]

    def _end(self) -> None:
        self.t_end = time.perf_counter()
        self.view.finish(self)

    def _read(self, source: tuple[Iterator[dict], int, bool]) -> None:
        gen, first, incremental = source
        try:
            for chunk in gen:
                self._q.put((time.perf_counter(), chunk, first, incremental))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self._q.put((time.perf_counter(), e, first, incremental))
        finally:
            self._q.put((time.perf_counter(), _DONE, first, incremental))

    @property
    def _reader_done(self) -> bool:
        return self._readers_left == 0

    def _wait(self) -> None:
        next_flush = 0.0
        while not self._reader_done:
            now = time.perf_counter()
            dirty = any(s.dirty for s in self.samples)
            self._take(max(0.0, next_flush - now) if dirty else FLUSH_INTERVAL)
            now = time.perf_counter()
            if now >= next_flush and any(s.dirty for s in self.samples):
                changed = self._flush()
                next_flush = time.perf_counter() + max(FLUSH_INTERVAL, (changed + 1) / MAX_MESSAGES_PER_S)
        self._flush()

    def _drain_after_abort(self) -> None:
        deadline = time.perf_counter() + ABORT_WAIT
        try:
            while not self._reader_done and time.perf_counter() < deadline:
                self._take(0.05)
        except KeyboardInterrupt:  # a second interrupt: stop waiting, the aborts still land
            pass
        self._flush()

    def _take(self, timeout: float) -> None:
        try:
            item = self._q.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._apply(*item)
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                return

    def _apply(self, t: float, chunk: Any, first: int, incremental: bool) -> None:
        if chunk is _DONE:
            self._readers_left -= 1
            return
        if isinstance(chunk, BaseException):
            raise chunk
        s = self.samples[first + chunk.get("index", 0)]
        meta = chunk["meta_info"]
        if incremental:
            s.text += chunk.get("text", "")
            s.output_ids.extend(chunk["output_ids"])
            for key in _LOGPROB_KEYS:
                if key in meta:
                    s.logprobs.setdefault(key, []).extend(meta[key])
        else:
            s.text = chunk.get("text", s.text)
            s.output_ids = chunk["output_ids"]
            s.logprobs.update((key, meta[key]) for key in _LOGPROB_KEYS if key in meta)
        s.logprobs.update((key, meta[key]) for key in _INPUT_LOGPROB_KEYS if key in meta)
        s.last = chunk
        s.dirty = True
        if meta["completion_tokens"]:
            s.t_last = t
            if s.t_first is None:
                s.t_first = t
            if self.t_first is None:
                self.t_first = t
        reason = chunk["meta_info"]["finish_reason"]
        if reason is not None:
            s.done = True
            if reason.get("type") == "abort":
                self.t_aborted = t
        if self.trace is not None:
            self.trace["chunks"].append((t, self.tokens))

    def _flush(self) -> int:
        changed = [i for i, s in enumerate(self.samples) if s.dirty]
        if not changed:
            return 0
        for i in changed:
            self.samples[i].dirty = False
        self.view.refresh(self, changed)
        self.num_refreshes += 1
        if self.trace is not None:
            self.trace["refreshes"].append((time.perf_counter(), self.tokens))
        return len(changed)

    # -------------------------------------------------------------- stats
    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)

    @property
    def num_done(self) -> int:
        return sum(s.done for s in self.samples)

    def stats(self) -> dict[str, Any]:
        now = self.t_end or time.perf_counter()
        ttft = None if self.t_first is None else self.t_first - self.t_start
        decode_time = None if self.t_first is None else now - self.t_first
        toks = self.tokens
        return {
            "completion_tokens": toks,
            "prompt_tokens": sum(s.last["meta_info"]["prompt_tokens"] for s in self.samples if s.last),
            "elapsed_s": round(now - self.t_start, 4),
            "ttft_s": None if ttft is None else round(ttft, 4),
            "tok_per_s": round(toks / decode_time, 2) if decode_time and toks > 1 else None,
            "samples": len(self.samples),
            "samples_done": self.num_done,
            "stopped": self.stopped,
            "stop_to_abort_s": (round(self.t_aborted - self.t_stop_requested, 4)
                                if self.t_aborted is not None and self.t_stop_requested is not None else None),
        }
