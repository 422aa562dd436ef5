"""Prometheus metrics with TGI's ``tgi_*`` names, types, labels and buckets.

One :class:`ServerMetrics` per app, on its own ``CollectorRegistry`` (never the global
one, so many apps can live in one process). Request and batch metrics are pushed by the
server and the engine thread; engine gauges are read from ``stats()`` at scrape time.

prometheus_client writes a counter ``tgi_request_count`` as ``tgi_request_count_total``
and adds ``*_created`` samples (it has no per-registry switch for those); TGI's Rust
exporter writes neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_float_to_go

if TYPE_CHECKING:
    from tgi_core.engine.engine import EngineStats


def duration_buckets() -> list[float]:
    """TGI's 35 geometric duration buckets: 0.00015 s, then x1.5 each (to about 146 s)."""
    buckets, value = [], 0.0001
    for _ in range(35):
        value *= 1.5  # the router's own loop, so the bounds are the same floats
        buckets.append(value)
    return buckets


def linear_buckets(maximum: int) -> list[float]:
    """TGI's 100 linear token buckets up to ``maximum``."""
    return [maximum / 100 * (i + 1) for i in range(100)]


#: ``tgi_batch_next_size`` bounds: powers of two up to 1024 (TGI has every integer 1..1024).
BATCH_SIZE_BUCKETS = [float(2**i) for i in range(11)]


@dataclass(frozen=True)
class RequestTiming:
    """One successful request's phases (seconds) and token counts."""

    validation_s: float
    queue_s: float
    inference_s: float
    total_s: float
    input_tokens: int
    generated_tokens: int
    max_new_tokens: int


class _EngineCollector(Collector):
    """Engine gauges and counters, read from ``stats()`` on every scrape."""

    def __init__(self, stats: Callable[[], EngineStats], kv_tokens: int) -> None:
        self._stats, self._kv_tokens = stats, kv_tokens

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        gauges = [
            ("tgi_queue_size", "Requests waiting in the queue", s.queue_size),
            ("tgi_batch_current_size", "Sequences in the running batch", s.batch_size),
            ("tgi_batch_max_total_tokens", "Tokens the KV cache holds", self._kv_tokens),
            ("tgi_kv_blocks_total", "KV cache blocks", s.kv_blocks_total),
            ("tgi_kv_blocks_used", "KV cache blocks held by sequences", s.kv_blocks_used),
            ("tgi_kv_blocks_cached", "KV cache blocks kept for prefix reuse", s.kv_blocks_cached),
            (
                "tgi_kv_blocks_free",
                "KV cache blocks not held",
                s.kv_blocks_total - s.kv_blocks_used,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily(
            "tgi_prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            value=s.prefix_hit_tokens,
        )
        yield CounterMetricFamily(
            "tgi_preemptions", "Sequences preempted for lack of KV blocks", value=s.preemptions
        )


def _go_float(value: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, ``1.0``...)."""
    return str(_untyped_float_to_go(value))  # type: ignore[no-untyped-call]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    """One per app, on its own CollectorRegistry (never the global one: tests build many apps).

    Every method is thread-safe (prometheus_client's metrics are), so the engine thread
    may call :meth:`observe_step` while the server counts requests and scrapes.
    """

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        *,
        max_input_tokens: int,
        max_total_tokens: int,
        kv_tokens: int,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        durations = duration_buckets()

        def duration(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, registry=reg, buckets=durations)

        self.request_count = Counter("tgi_request_count", "Requests received", registry=reg)
        self.request_success = Counter("tgi_request_success", "Requests served", registry=reg)
        self.request_failure = Counter(
            "tgi_request_failure", "Requests failed, by error kind", ["err"], registry=reg
        )
        self.request_duration = duration("tgi_request_duration", "End-to-end request latency")
        self.validation_duration = duration(
            "tgi_request_validation_duration", "Request validation time"
        )
        self.queue_duration = duration("tgi_request_queue_duration", "Time waiting in the queue")
        self.inference_duration = duration("tgi_request_inference_duration", "Generation time")
        self.time_per_token = duration(
            "tgi_request_mean_time_per_token_duration", "Inference time per generated token"
        )
        self.input_length = Histogram(
            "tgi_request_input_length",
            "Prompt tokens per request",
            registry=reg,
            buckets=linear_buckets(max_input_tokens),
        )
        self.generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Generated tokens per request",
            registry=reg,
            buckets=linear_buckets(max_total_tokens),
        )
        self.max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "max_new_tokens per request",
            registry=reg,
            buckets=linear_buckets(max_total_tokens),
        )
        method = ("method",)
        self.batch_count = Counter(
            "tgi_batch_inference_count", "Engine steps, by method", method, registry=reg
        )
        self.batch_success = Counter(
            "tgi_batch_inference_success", "Engine steps that succeeded", method, registry=reg
        )
        self.batch_failure = Counter(
            "tgi_batch_inference_failure", "Engine steps that failed", method, registry=reg
        )
        self.batch_duration = duration("tgi_batch_inference_duration", "Engine step time", method)
        self.batch_next_size = Histogram(
            "tgi_batch_next_size",
            "Sequences per engine step",
            registry=reg,
            buckets=BATCH_SIZE_BUCKETS,
        )
        reg.register(_EngineCollector(stats, kv_tokens))

    def request_received(self) -> None:
        """Count one incoming request (``tgi_request_count``)."""
        self.request_count.inc()

    def request_succeeded(self, timing: RequestTiming) -> None:
        """Count a success and observe its durations and token counts."""
        self.request_success.inc()
        self.request_duration.observe(timing.total_s)
        self.validation_duration.observe(timing.validation_s)
        self.queue_duration.observe(timing.queue_s)
        self.inference_duration.observe(timing.inference_s)
        if timing.generated_tokens > 0:
            self.time_per_token.observe(timing.inference_s / timing.generated_tokens)
        self.input_length.observe(timing.input_tokens)
        self.generated_tokens.observe(timing.generated_tokens)
        self.max_new_tokens.observe(timing.max_new_tokens)

    def request_failed(self, err: str) -> None:
        """Count a failure under label ``err`` (TGI's: validation, overloaded, generation,
        incomplete, dropped, template; also unauthorized). The label is not checked."""
        self.request_failure.labels(err=err).inc()

    def observe_step(self, method: str, seconds: float, batch_size: int, ok: bool) -> None:
        """Record one engine step (``method`` is ``prefill`` or ``decode``); an
        :attr:`Engine.step_observer <tgi_core.engine.engine.Engine.step_observer>`."""
        self.batch_count.labels(method=method).inc()
        (self.batch_success if ok else self.batch_failure).labels(method=method).inc()
        self.batch_duration.labels(method=method).observe(seconds)
        self.batch_next_size.observe(batch_size)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of this registry, with TGI's names, and its content type.

        prometheus_client writes a counter ``x`` as ``x_total`` plus ``x_created``; TGI's
        exporter writes plain ``x``. So the ``_total`` suffix of counter samples is
        dropped, and so are the ``_created`` series (valid Prometheus text format 0.0.4).
        """
        lines = []
        for family in self.registry.collect():
            kind = "untyped" if family.type == "unknown" else family.type
            lines.append(f"# HELP {family.name} {_escape_help(family.documentation)}")
            lines.append(f"# TYPE {family.name} {kind}")
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                name = sample.name
                if family.type == "counter" and name == f"{family.name}_total":
                    name = family.name
                labels = ",".join(
                    f'{key}="{_escape_label(value)}"' for key, value in sample.labels.items()
                )
                lines.append(
                    f"{name}{{{labels}}} {_go_float(sample.value)}"
                    if labels
                    else f"{name} {_go_float(sample.value)}"
                )
        return ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4; charset=utf-8"
