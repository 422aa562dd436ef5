"""Concurrent streaming clients: ``concurrency`` workers send a plan's requests back to
back (a closed loop), and each request's timing is recorded as its events arrive."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tgi_core.bench.wire import (
    ROUTES,
    Api,
    Sampling,
    StreamEvent,
    error_message,
    parse_event,
    request_body,
)
from tgi_core.bench.workload import PlannedRequest


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to send: the server's base URL, its API, and the sampling."""

    url: str
    api: Api
    sampling: Sampling = field(default_factory=Sampling)
    api_key: str | None = None
    timeout: float = 600.0

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + ROUTES[self.api]


@dataclass(slots=True)
class RequestResult:
    """One request's outcome. Times are ``time.perf_counter()`` seconds.

    ``token_times`` holds the arrival time of each event that carried a token; an
    ``error`` (HTTP status, connection failure, in-band error, stream cut short) makes
    the request failed, whatever it received before.
    """

    planned: PlannedRequest
    start: float
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    server_output_tokens: int | None = None
    server_prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """Tokens received (one per token event)."""
        return len(self.token_times)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def inter_token_latencies(self) -> list[float]:
        return [later - earlier for earlier, later in itertools.pairwise(self.token_times)]

    def observe(self, event: StreamEvent, now: float) -> None:
        self.token_times.extend([now] * event.tokens)
        self.finish_reason = event.finish_reason or self.finish_reason
        if event.server_output_tokens is not None:
            self.server_output_tokens = event.server_output_tokens
        if event.server_prompt_tokens is not None:
            self.server_prompt_tokens = event.server_prompt_tokens
        if event.error is not None and self.error is None:
            self.error = event.error


@dataclass(slots=True)
class LevelRun:
    """Every result of one concurrency level and the level's wall-clock span."""

    concurrency: int
    results: list[RequestResult]
    duration: float


async def send(client: httpx.AsyncClient, target: Target, planned: PlannedRequest) -> RequestResult:
    """Send one streaming request and record its events as they arrive."""
    result = RequestResult(planned, start=time.perf_counter())
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    body = request_body(target.api, planned, target.sampling)
    try:
        async with client.stream("POST", target.endpoint, json=body, headers=headers) as response:
            result.status = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {_message(text)}"
            else:
                await _read_stream(response, target.api, result)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    result.end = time.perf_counter()
    if result.ok and result.finish_reason is None:
        result.error = "the stream ended before its last token"
    return result


async def _read_stream(response: httpx.Response, api: Api, result: RequestResult) -> None:
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:  # a blank line ends an event
            result.observe(parse_event(api, "\n".join(data)), time.perf_counter())
            data = []
    if data:  # the last event without its blank line
        result.observe(parse_event(api, "\n".join(data)), time.perf_counter())


def _message(text: str) -> str:
    try:
        message = error_message(json.loads(text))
    except json.JSONDecodeError:
        message = None
    return message or text.strip()[:200] or "(empty body)"


async def run_level(
    target: Target,
    plan: list[PlannedRequest],
    concurrency: int,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LevelRun:
    """Send ``plan`` with ``concurrency`` clients, each sending its next request as soon
    as its previous one ended; results come back in the plan's order."""
    pending = iter(enumerate(plan))
    results: list[RequestResult | None] = [None] * len(plan)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(target.timeout)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index, planned in pending:
            result = await send(client, target, planned)
            results[index] = result
            if on_result is not None:
                on_result(result)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return LevelRun(concurrency, [r for r in results if r is not None], duration)
