"""Percentiles, and the summary of one concurrency level.

Definitions (those of TGI's and vLLM's benchmarks):

- output tokens/s: tokens received by the level's successful requests, divided by the
  level's wall-clock time (first request sent to last request ended);
- time to first token (TTFT): from sending a request to receiving its first token;
- inter-token latency (ITL): the gaps between a request's consecutive tokens, pooled
  over all successful requests;
- end-to-end latency: from sending a request to the end of its stream.

Failed requests count as errors and stay out of every timing. A request that ended
without error but with fewer tokens than it asked for counts as ``short``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from tgi_core.bench.client import LevelRun


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between the closest
    ranks (numpy's default method); ``values`` must not be empty."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    below, above = math.floor(rank), math.ceil(rank)
    return ordered[below] + (ordered[above] - ordered[below]) * (rank - below)


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of a sample: count, mean, p50, p95, min and max."""

    count: int
    mean: float
    p50: float
    p95: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution | None:
        """The summary of ``values``, or None when there are none."""
        if not values:
            return None
        return cls(
            count=len(values),
            mean=sum(values) / len(values),
            p50=percentile(values, 50),
            p95=percentile(values, 95),
            min=min(values),
            max=max(values),
        )


@dataclass(frozen=True, slots=True)
class LevelReport:
    """What ``tgi-core bench`` reports for one concurrency level (times in seconds)."""

    concurrency: int
    requests: int
    succeeded: int
    errors: int
    short: int  # succeeded with fewer tokens than max_new_tokens (EOS or a stop)
    duration_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: Distribution | None
    itl_s: Distribution | None
    e2e_s: Distribution | None
    prompt_tokens: Distribution | None  # as the server counted them, else as planned
    output_tokens_per_request: Distribution | None
    error_messages: dict[str, int]


def summarize(run: LevelRun) -> LevelReport:
    """The report of one level's results."""
    good = [r for r in run.results if r.ok]
    output_tokens = sum(r.output_tokens for r in good)
    prompt_counts = [
        r.server_prompt_tokens if r.server_prompt_tokens is not None else r.planned.prompt_tokens
        for r in good
    ]
    duration = run.duration
    return LevelReport(
        concurrency=run.concurrency,
        requests=len(run.results),
        succeeded=len(good),
        errors=len(run.results) - len(good),
        short=sum(r.output_tokens < r.planned.max_new_tokens for r in good),
        duration_s=duration,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / duration if duration > 0 else 0.0,
        requests_per_s=len(good) / duration if duration > 0 else 0.0,
        ttft_s=Distribution.of([r.ttft for r in good if r.ttft is not None]),
        itl_s=Distribution.of([gap for r in good for gap in r.inter_token_latencies()]),
        e2e_s=Distribution.of([r.e2e for r in good]),
        prompt_tokens=Distribution.of([float(n) for n in prompt_counts if n is not None]),
        output_tokens_per_request=Distribution.of([float(r.output_tokens) for r in good]),
        error_messages=dict(
            Counter(r.error for r in run.results if r.error is not None).most_common()
        ),
    )
