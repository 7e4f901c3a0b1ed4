"""EngineThread: the background thread and its private asyncio loop that run EngineCore.

Other threads talk to it only through ``call`` / ``submit`` (``call_soon_threadsafe``).
It holds no reference to the ``Engine`` facade, so an engine dropped in a notebook is
collected and its thread stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from pathlib import Path
from typing import Any, Callable

from .config import EngineConfig
from .engine_core import EngineCore
from .layers.cpu_threads import omp_team
from .errors import EngineDeadError, EngineShutdownError
from .tokenizer import Tokenizer

logger = logging.getLogger("nbengine")


class EngineThread:
    def __init__(self, config: EngineConfig, model_dir: Path, tokenizer: Tokenizer | None) -> None:
        self.loop = asyncio.new_event_loop()
        self.core: EngineCore | None = None
        self.dead: BaseException | None = None  # set when the thread failed
        self.stopped = False
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._main, args=(config, model_dir, tokenizer),
                                       name="nbengine-engine", daemon=True)
        self.thread.start()
        self._ready.result()  # re-raises a load failure in the caller

    # ------------------------------------------------------------ the thread
    def _main(self, config: EngineConfig, model_dir: Path, tokenizer: Tokenizer | None) -> None:
        asyncio.set_event_loop(self.loop)
        omp_team.manage_this_thread()
        try:
            self.core = EngineCore(config, model_dir, tokenizer)
        except BaseException as e:  # noqa: BLE001 - hand any load failure to the constructor
            self._ready.set_exception(e)
            self.loop.close()
            return
        self._wake = asyncio.Event()
        if self.core.workers is not None:
            self.core.workers.watch_with(self.fail)
        self._ready.set_result(None)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001
            logger.exception("the nbengine engine thread died")
            if self.dead is None and self.core.workers is not None:  # a worker's death says more than the
                self.dead = self.core.workers.wait_failure(2.0)     # collective that failed because of it
            self.dead = self.dead or e
        finally:
            try:
                if self.dead is None:
                    self.core.abort_all(EngineShutdownError("The engine was shut down while the request ran."))
                else:
                    self.core.abort_all(EngineDeadError(f"The engine thread died: {type(self.dead).__name__}: "
                                                        f"{self.dead}"))
                self.core.release()
            finally:
                self.core = None
                self.stopped = True
                self.loop.close()

    async def _serve(self) -> None:
        core = self.core
        while not self._stopping:
            if core.has_work():
                core.step()
                await asyncio.sleep(0)  # let submitted requests and aborts in
            else:
                self._wake.clear()
                await self._wake.wait()

    # ---------------------------------------------------- from other threads
    def fail(self, error: BaseException) -> None:
        """From any thread (a tensor-parallel worker died): the engine is dead from now on — waiters raise
        ``EngineDeadError`` at their next check — and the engine thread stops at its next chance."""
        if self.dead is None:
            self.dead = error

        def halt() -> None:
            self._stopping = True
            self._wake.set()

        try:
            self.loop.call_soon_threadsafe(halt)
        except RuntimeError:  # the loop already closed
            pass

    def check(self) -> None:
        """The one liveness check: raises ``EngineDeadError`` once the thread died (or vanished without a
        word), ``EngineShutdownError`` once it was stopped."""
        if self.dead is not None or (not self.stopped and not self.thread.is_alive()):
            raise EngineDeadError(f"The engine thread died ({self.dead!r}); create a new Engine.")
        if self.stopped or self._stopping:
            raise EngineShutdownError("This engine was shut down; create a new Engine to continue.")

    def alive(self) -> bool:
        try:
            self.check()
        except (EngineDeadError, EngineShutdownError):
            return False
        return True

    def live_core(self) -> EngineCore:
        """The engine core, to hand one of its methods to ``post`` / ``call``; raises once the engine is gone."""
        self.check()
        core = self.core
        if core is None:
            raise EngineShutdownError("This engine was shut down; create a new Engine to continue.")
        return core

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine thread between steps, and wake it."""
        self.check()

        def run() -> None:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a failed request must not stop the loop's wake-up
                logger.exception("engine-thread callback %r failed", fn)
            finally:
                self._wake.set()

        try:
            self.loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop closed between check() and here: the engine just stopped or died
            self.check()
            raise EngineShutdownError("This engine was shut down; create a new Engine to continue.") from None

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn()`` on the engine thread and return its result (raises if the engine dies)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001
                fut.set_exception(e)

        self.post(run)
        waited = 0.0
        while True:
            try:
                return fut.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                self.check()
                waited += 0.25
                if timeout is not None and waited >= timeout:
                    raise TimeoutError("the engine did not answer in time") from None

    def stop(self, timeout: float = 30.0) -> None:
        if self.stopped or not self.thread.is_alive():
            return

        def halt() -> None:
            self._stopping = True

        try:
            self.loop.call_soon_threadsafe(halt)
            self.loop.call_soon_threadsafe(lambda: self._wake.set())
        except RuntimeError:  # loop already closed
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
