"""The engine in its own thread, with an async API for the server.

``async for event in engine.generate(request)`` streams a request's token events. The
engine thread owns the :class:`~tgi_core.engine.engine.Engine`: requests reach it through
a thread-safe command queue, and a step's events come back to the callers' asyncio
queues with one ``loop.call_soon_threadsafe`` per event loop (each wakes the loop
through a pipe: one wake a step instead of one per stream); torch releases the GIL
inside its ops, so the event loop stays responsive while a step runs. A caller that
stops iterating (a client that went away) cancels its request; its blocks are free
after the engine's next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from tgi_core.engine.engine import Engine, EngineStats
from tgi_core.engine.requests import GenerateRequest, TokenEvent
from tgi_core.errors import TGIError
from tgi_core.logging import get_logger

log = get_logger("tgi_core.engine")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | BaseException]


class AsyncEngine:
    """Runs an :class:`Engine` in a background thread."""

    def __init__(
        self, engine: Engine, *, threads: int | None = None, warm_up: bool = False
    ) -> None:
        """``threads``: torch's intra-op threads in the engine thread (default: leave
        torch's setting; see :mod:`tgi_core.engine.threads`). ``warm_up``: run
        :meth:`Engine.warm_up` in the engine thread before serving (a compiled model
        compiles there, for that thread's threads), and let :meth:`start` wait for it."""
        self.engine = engine
        self.threads = threads
        self.warm_up = warm_up
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="tgi-engine", daemon=True)
        self._stats = engine.stats()

    def start(self) -> None:
        """Start the engine thread; returns once it serves (after its warm-up)."""
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight get an error event."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def stats(self) -> EngineStats:
        """The engine's gauges and counters as of its last step."""
        return self._stats

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        """Stream ``request``'s events; raises RequestError if the engine refuses it."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._command("add", request, stream)
        finished = False
        try:
            while True:
                event = await stream.events.get()
                if isinstance(event, BaseException):
                    finished = True
                    raise event
                finished = event.done
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self._command("abort", request.request_id)

    def _command(self, *command: Any) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item: TokenEvent | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, TokenEvent | BaseException]]) -> None:
        """Put each item in its request's queue, in order, with one wake per event loop."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[str, _Stream, Any]]] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            if isinstance(item, BaseException) or item.done:
                del self._streams[request_id]
            batches.setdefault(stream.loop, []).append((request_id, stream, item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the callers' loop is closed: nobody is listening
                for request_id, _, _ in batch:
                    self.engine.abort(request_id)

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request, stream = command
                self._streams[request.request_id] = stream
                try:
                    self.engine.add_request(request)
                except Exception as exc:
                    self._deliver(request.request_id, exc)
            elif command[0] == "abort":
                self._streams.pop(command[1], None)
                self.engine.abort(command[1])

    def _run(self) -> None:
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        try:
            if self.warm_up:
                started = time.perf_counter()
                # the warm-up's steps are not served traffic: keep them out of metrics
                observer, self.engine.step_observer = self.engine.step_observer, None
                try:
                    self.engine.warm_up()
                finally:
                    self.engine.step_observer = observer
                log.info("model warmed up", seconds=round(time.perf_counter() - started, 1))
        except Exception as exc:
            log.exception("model warm-up failed")
            self._startup_error = TGIError(
                "warming up the model failed (with --compile, torch.compile could not "
                f"compile it: serve without --compile): {type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
            return
        finally:
            self._ready.set()
        while not self._stopping:
            self._drain_commands()
            self._stats = self.engine.stats()
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception:  # the engine fails requests itself; this is a last resort
                log.exception("engine step crashed")
                continue
            self._stats = self.engine.stats()
            self._deliver_all([(event.request_id, event) for event in events])
        closing = "the engine is shutting down"
        self._deliver_all([(request_id, RuntimeError(closing)) for request_id in self._streams])


def _put_all(batch: list[tuple[str, _Stream, Any]]) -> None:
    for _, stream, item in batch:
        stream.events.put_nowait(item)
