"""The sweep ``tgi-core bench`` runs: warm-up requests, then one level per concurrency,
each with fresh prompts (so a server's prefix cache cannot reuse an earlier level's)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tgi_core.bench.client import LevelRun, RequestResult, Target, run_level
from tgi_core.bench.stats import LevelReport, summarize
from tgi_core.bench.wire import Api, Sampling
from tgi_core.bench.workload import (
    LengthRange,
    PlannedRequest,
    PromptMaker,
    TokenizerPrompts,
    WordPrompts,
    plan_requests,
    shared_prefix,
)
from tgi_core.errors import TGIError


class BenchError(TGIError):
    """The sweep cannot run (the server refused or did not answer the warm-up)."""


#: Requests per client at each level when ``requests`` is not given.
REQUESTS_PER_CLIENT = 4


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """Everything a sweep depends on (``tgi-core bench``'s options)."""

    url: str = "http://127.0.0.1:8080"
    api: Api = "tgi"
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int | None = None  # per level; None: requests_per_client per client
    requests_per_client: int = REQUESTS_PER_CLIENT
    prompt_tokens: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    max_new_tokens: LengthRange = field(default_factory=lambda: LengthRange(128, 128))
    shared_prefix: int = 0
    tokenizer: str | None = None
    seed: int = 0
    temperature: float = 0.0
    ignore_eos: bool = False
    model: str | None = None
    api_key: str | None = None
    warmup: int = 1
    timeout: float = 600.0

    def requests_at(self, concurrency: int) -> int:
        if self.requests is not None:
            return self.requests
        return self.requests_per_client * concurrency

    def target(self) -> Target:
        sampling = Sampling(self.temperature, self.ignore_eos, self.model)
        return Target(self.url, self.api, sampling, self.api_key, self.timeout)

    def as_json(self) -> dict[str, Any]:
        """The settings, JSON-ready; the API key is never shown."""
        values = dataclasses.asdict(self)
        values["prompt_tokens"] = str(self.prompt_tokens)
        values["max_new_tokens"] = str(self.max_new_tokens)
        values["concurrency"] = list(self.concurrency)
        values["api_key"] = None if self.api_key is None else "<redacted>"
        return values


@dataclass(frozen=True, slots=True)
class Plans:
    """The warm-up requests, then each level's requests, in sweep order."""

    warmup: list[PlannedRequest]
    levels: list[tuple[int, list[PlannedRequest]]]


def prompt_maker(settings: BenchSettings) -> PromptMaker:
    if settings.tokenizer is None:
        return WordPrompts()
    return TokenizerPrompts.load(settings.tokenizer)


def make_plans(settings: BenchSettings, maker: PromptMaker | None = None) -> Plans:
    """Every request of the sweep, drawn from ``random.Random(settings.seed)``."""
    maker = maker or prompt_maker(settings)
    rng = random.Random(settings.seed)
    prefix = shared_prefix(maker, settings.shared_prefix, rng)

    def plan(count: int) -> list[PlannedRequest]:
        return plan_requests(
            count,
            prompt_tokens=settings.prompt_tokens,
            max_new_tokens=settings.max_new_tokens,
            maker=maker,
            rng=rng,
            prefix=prefix,
        )

    warmup = plan(settings.warmup)
    levels = [(c, plan(settings.requests_at(c))) for c in settings.concurrency]
    return Plans(warmup, levels)


async def run_plans(
    target: Target,
    plans: Plans,
    on_level: Callable[[int, int], None] | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[LevelRun]:
    """Send the warm-up requests one by one (unreported), then each level.

    Raises :class:`BenchError` at once if every warm-up request failed (a server that is
    down, or refuses the workload)."""
    if plans.warmup:
        warmup = await run_level(target, plans.warmup, 1)
        errors = [r.error for r in warmup.results if r.error is not None]
        if len(errors) == len(warmup.results):
            raise BenchError(f"the warm-up request to {target.endpoint} failed: {errors[0]}")
    runs = []
    for concurrency, plan in plans.levels:
        if on_level is not None:
            on_level(concurrency, len(plan))
        runs.append(await run_level(target, plan, concurrency, on_result))
    return runs


def run_sweep(
    settings: BenchSettings, *, progress: bool, console: Console | None = None
) -> list[LevelReport]:
    """Run the whole sweep (with a progress bar on ``console`` if asked) and summarize."""
    plans = make_plans(settings)
    total = sum(len(plan) for _, plan in plans.levels)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        disable=not progress,
        transient=True,
    )
    task = bar.add_task("warming up", total=total)

    def on_level(concurrency: int, count: int) -> None:
        bar.update(task, description=f"{concurrency} clients, {count} requests")

    def on_result(_: RequestResult) -> None:
        bar.advance(task)

    with bar:
        runs = asyncio.run(run_plans(settings.target(), plans, on_level, on_result))
    return [summarize(run) for run in runs]


def all_failed(reports: Sequence[LevelReport]) -> str | None:
    """The first error message if not one request succeeded, else None."""
    if any(r.succeeded for r in reports):
        return None
    messages = [m for r in reports for m in r.error_messages]
    return messages[0] if messages else "no requests were sent"
