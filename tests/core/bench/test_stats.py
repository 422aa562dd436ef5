"""The load generator's statistics: percentiles, distributions, a level's summary."""

from __future__ import annotations

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tgi_core.bench.client import LevelRun, RequestResult
from tgi_core.bench.stats import Distribution, percentile, summarize
from tgi_core.bench.workload import PlannedRequest

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=50), st.floats(min_value=0, max_value=100))
def test_percentile_is_numpys_linear_percentile(values: list[float], q: float) -> None:
    assert percentile(values, q) == pytest.approx(numpy.percentile(values, q), abs=1e-6)


def test_percentile_by_hand() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 95) == 9.5
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution() -> None:
    dist = Distribution.of([4.0, 1.0, 3.0, 2.0])
    assert dist == Distribution(count=4, mean=2.5, p50=2.5, p95=3.85, min=1.0, max=4.0)
    assert Distribution.of([]) is None


def request(
    start: float, times: list[float], *, max_new: int = 3, error: str | None = None
) -> RequestResult:
    planned = PlannedRequest("a b", 2, max_new, 0)
    end = times[-1] + 0.5 if times else start + 0.1
    return RequestResult(
        planned,
        start=start,
        end=end,
        token_times=times,
        finish_reason="length",
        server_prompt_tokens=5,
        error=error,
    )


def test_summary_of_a_level() -> None:
    results = [
        request(0.0, [1.0, 1.5, 2.5]),  # TTFT 1, gaps 0.5 and 1, e2e 3
        request(1.0, [1.5, 2.0]),  # TTFT 0.5, gap 0.5, e2e 1.5, short (2 of 3)
        request(2.0, [2.1], error="HTTP 429: busy"),  # failed: out of every timing
        request(2.0, [], error="HTTP 429: busy"),
        request(3.0, [], error="ReadTimeout"),
    ]
    report = summarize(LevelRun(concurrency=2, results=results, duration=4.0))
    assert (report.requests, report.succeeded, report.errors, report.short) == (5, 2, 3, 1)
    assert report.output_tokens == 5
    assert report.output_tokens_per_s == 5 / 4.0
    assert report.requests_per_s == 2 / 4.0
    assert report.ttft_s is not None and report.ttft_s.count == 2
    assert report.ttft_s.mean == pytest.approx(0.75)
    assert report.itl_s is not None and sorted([report.itl_s.min, report.itl_s.max]) == [0.5, 1.0]
    assert report.itl_s.count == 3 and report.itl_s.p50 == pytest.approx(0.5)
    assert report.e2e_s is not None and report.e2e_s.max == pytest.approx(3.0)
    assert report.prompt_tokens is not None and report.prompt_tokens.mean == 5.0  # the server's
    assert report.error_messages == {"HTTP 429: busy": 2, "ReadTimeout": 1}


def test_summary_without_successes() -> None:
    report = summarize(LevelRun(1, [request(0.0, [], error="boom")], duration=0.2))
    assert report.succeeded == 0 and report.output_tokens_per_s == 0.0
    assert report.ttft_s is None and report.itl_s is None and report.e2e_s is None
    assert not math.isnan(report.requests_per_s)
