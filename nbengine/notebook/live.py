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
from typing import Any

FLUSH_INTERVAL = 0.05  # seconds: at most ~20 refreshes a second
MAX_MESSAGES_PER_S = 200  # batches: all panes together stay far below Jupyter's 1,000 msg/s
ABORT_WAIT = 10.0  # seconds to wait for aborted requests to report back
_DONE = object()


@dataclass
class Sample:
    """One stream (one pane): the text so far and its latest chunk."""

    label: str
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    last: dict | None = None
    done: bool = False
    dirty: bool = False

    @property
    def completion_tokens(self) -> int:
        return self.last["meta_info"]["completion_tokens"] if self.last else 0

    def output(self) -> dict:
        """The sample's output dict, with the full text even when the engine streams deltas."""
        if self.last is None:
            return {"text": self.text, "output_ids": [], "meta_info": {"finish_reason": None}}
        out = {k: v for k, v in self.last.items() if k != "index"}
        out["text"] = self.text
        out["output_ids"] = list(self.output_ids)
        return out


class LiveRun:
    """One streamed ``generate`` call shown live. ``run()`` blocks and returns the output dicts."""

    def __init__(self, llm: Any, view: Any, *, prompts: list[str] | None, input_ids: list[list[int]] | None,
                 params: dict, labels: list[str], trace: bool = False, image_data: Any = None) -> None:
        self.llm = llm
        self.view = view
        self.params = params
        n = params.get("n", 1) or 1
        num = len(prompts if prompts is not None else input_ids)
        self.samples = [Sample(labels[i] if i < len(labels) else f"sample {i + 1}") for i in range(num * n)]
        self.rids = [uuid.uuid4().hex for _ in self.samples]
        self.single = num == 1 and n == 1
        self.incremental = bool(getattr(getattr(llm, "config", None), "incremental_streaming_output", False))
        # validation happens here, on the caller's thread: a bad parameter raises before anything shows
        self._gen = llm.generate(prompts[0] if self.single and prompts else prompts, params,
                                 input_ids=(input_ids[0] if self.single else input_ids) if input_ids else None,
                                 stream=True, rid=self.rids[0] if self.single else self.rids,
                                 **({"image_data": image_data[0] if self.single else image_data} if image_data else {}))
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._reader_done = False
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
        for s, rid in zip(self.samples, self.rids):
            if not s.done:
                self.llm.abort(rid)

    # ---------------------------------------------------------------- run
    def run(self) -> list[dict]:
        self.t_start = time.perf_counter()
        self.view.start(self)
        threading.Thread(target=self._read, name="nbengine-live-reader", daemon=True).start()
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

    def _read(self) -> None:
        try:
            for chunk in self._gen:
                self._q.put((time.perf_counter(), chunk))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            self._q.put((time.perf_counter(), e))
        finally:
            self._q.put((time.perf_counter(), _DONE))

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

    def _apply(self, t: float, chunk: Any) -> None:
        if chunk is _DONE:
            self._reader_done = True
            return
        if isinstance(chunk, BaseException):
            raise chunk
        s = self.samples[chunk.get("index", 0) if not self.single else 0]
        if self.incremental:
            s.text += chunk.get("text", "")
            s.output_ids.extend(chunk["output_ids"])
        else:
            s.text = chunk.get("text", s.text)
            s.output_ids = chunk["output_ids"]
        s.last = chunk
        s.dirty = True
        if self.t_first is None and chunk["meta_info"]["completion_tokens"]:
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
