"""One request's life, shared by every frontend: admission, events, disconnects, timing.

- :func:`token_events` streams an engine request's events, turning engine failures into
  :class:`~tgi_core.server.errors.APIError` (and marking the server unhealthy).
- :func:`collect` gathers a non-streaming request's events, and cancels the generation
  (freeing its KV blocks) if the client disconnects first.
- :func:`admitted_stream` ties a request slot to a streaming body, so the slot is
  released however the stream ends, even if it never starts.
- :class:`RequestTrace` times the request, writes its one log line, feeds the metrics
  and makes TGI's ``x-*`` timing headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from litestar import Request

from tgi_core.engine.engine import RequestError
from tgi_core.engine.requests import GenerateRequest, TokenEvent
from tgi_core.logging import get_logger
from tgi_core.server.errors import (
    APIError,
    ClientDisconnected,
    generation_error,
    validation_error,
)
from tgi_core.server.state import ServerState, Slot

log = get_logger("tgi_core.server.requests")
T = TypeVar("T")


async def token_events(state: ServerState, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
    """The engine's events for ``request``; an engine failure raises a 424 APIError."""
    try:
        async for event in state.engine.generate(request):
            if event.error is not None:
                state.healthy = False
                raise generation_error(event.error)
            yield event
    except RequestError as exc:
        raise validation_error(str(exc)) from None


async def _disconnected(request: Request[Any, Any, Any]) -> None:
    """Return once the client has closed its connection (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_done_or_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """``await work``, or cancel it and raise ClientDisconnected if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected
    return task.result()


async def collect(
    state: ServerState, requests: list[GenerateRequest], http_request: Request[Any, Any, Any]
) -> list[list[TokenEvent]]:
    """All events of each of ``requests`` (run concurrently); cancelled on disconnect."""

    async def one(request: GenerateRequest) -> list[TokenEvent]:
        return [event async for event in token_events(state, request)]

    async def every() -> list[list[TokenEvent]]:
        return list(await asyncio.gather(*(one(r) for r in requests)))

    return await until_done_or_disconnected(http_request, every())


async def merged(
    streams: list[AsyncIterator[TokenEvent]],
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several requests as they come, tagged with their stream's position."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent] | tuple[int, BaseException] | None] = (
        asyncio.Queue()
    )

    async def pump(position: int, stream: AsyncIterator[TokenEvent]) -> None:
        try:
            async for event in stream:
                await queue.put((position, event))
        except Exception as exc:
            await queue.put((position, exc))
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            position, value = item
            if isinstance(value, BaseException):
                raise value
            yield position, value
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def admitted_stream(slot: Slot, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``body``, with ``slot`` released when it ends, fails, is closed or is dropped unstarted."""

    async def wrapped() -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        finally:
            slot.release()

    stream = wrapped()
    weakref.finalize(stream, slot.release)
    return stream


class RequestTrace:
    """Timing and accounting of one request: log line, metrics, TGI's timing headers."""

    def __init__(self, state: ServerState, route: str, request_id: str = "") -> None:
        self.state, self.route, self.request_id = state, route, request_id
        self.start = time.perf_counter()
        self.validated_at = self.start
        self.first_token_at: float | None = None
        self.queue_s = 0.0
        self.prompt_tokens = 0
        self.max_new_tokens = 0
        self.generated_tokens = 0
        self.finish_reason: str | None = None
        self._closed = False
        if state.metrics is not None:
            state.metrics.request_received()

    def validated(self, request_id: str, prompt_tokens: int, max_new_tokens: int) -> None:
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.validated_at = time.perf_counter()

    def observe(self, event: TokenEvent) -> None:
        """Note an event: the first one ends the queue time, the last the generation."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            self.queue_s = max(0.0, event.queue_time)
        if event.finish_reason is not None:
            self.generated_tokens += event.generated_tokens
            self.finish_reason = self.finish_reason or event.finish_reason

    def timings(self) -> dict[str, float]:
        now = time.perf_counter()
        validation = self.validated_at - self.start
        inference = max(0.0, now - self.validated_at - self.queue_s)
        return {
            "validation": validation,
            "queue": self.queue_s,
            "inference": inference,
            "total": now - self.start,
            "per_token": inference / self.generated_tokens if self.generated_tokens else 0.0,
        }

    def succeeded(self) -> dict[str, str]:
        """Log and count a success; returns TGI's timing headers."""
        t = self.timings()
        if not self._closed:
            self._closed = True
            self._log("ok", t)
            if self.state.metrics is not None:
                from tgi_core.server.metrics import RequestTiming

                self.state.metrics.request_succeeded(
                    RequestTiming(
                        validation_s=t["validation"],
                        queue_s=t["queue"],
                        inference_s=t["inference"],
                        total_s=t["total"],
                        input_tokens=self.prompt_tokens,
                        generated_tokens=self.generated_tokens,
                        max_new_tokens=self.max_new_tokens,
                    )
                )
        ms = {k: str(int(v * 1000)) for k, v in t.items()}
        return {
            "x-compute-type": "cpu",
            "x-compute-time": f"{t['total']:.6f}",
            "x-total-time": ms["total"],
            "x-validation-time": ms["validation"],
            "x-queue-time": ms["queue"],
            "x-inference-time": ms["inference"],
            "x-time-per-token": ms["per_token"],
            "x-prompt-tokens": str(self.prompt_tokens),
            "x-generated-tokens": str(self.generated_tokens),
        }

    def failed(self, exc: BaseException) -> None:
        """Log and count a failure (a disconnect counts as ``dropped``)."""
        if self._closed:
            return
        self._closed = True
        if isinstance(exc, ClientDisconnected | asyncio.CancelledError | GeneratorExit):
            kind = "dropped"
        elif isinstance(exc, APIError):
            kind = {"template_error": "template"}.get(exc.error_type, exc.error_type)
        else:
            kind = "internal"
        self._log(kind, self.timings())
        if self.state.metrics is not None:
            self.state.metrics.request_failed(kind)

    def _log(self, outcome: str, t: dict[str, float]) -> None:
        log.info(
            "request",
            request_id=self.request_id,
            route=self.route,
            outcome=outcome,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            finish_reason=self.finish_reason,
            validation_ms=round(t["validation"] * 1000, 2),
            queue_ms=round(t["queue"] * 1000, 2),
            inference_ms=round(t["inference"] * 1000, 2),
            total_ms=round(t["total"] * 1000, 2),
        )


async def traced(trace: RequestTrace, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work``; a failure is logged and counted on ``trace`` before it propagates."""
    try:
        return await work()
    except BaseException as exc:
        trace.failed(exc)
        raise
