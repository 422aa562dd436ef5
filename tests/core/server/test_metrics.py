"""ServerMetrics: TGI's metric names and buckets, scrape-time engine gauges, the step observer."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tgi_core.engine.engine import EngineStats
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.fixtures import build_engine
from tgi_core.server.metrics import RequestTiming, ServerMetrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def stats(**overrides: int) -> EngineStats:
    values = dict(
        queue_size=0,
        batch_size=0,
        kv_blocks_total=64,
        kv_blocks_used=0,
        kv_blocks_cached=0,
        prefix_hit_tokens=0,
        preemptions=0,
    )
    return EngineStats(**{**values, **overrides})


def make(stats_fn=stats, **limits: int) -> ServerMetrics:
    kwargs = dict(max_input_tokens=1000, max_total_tokens=2000, kv_tokens=1024) | limits
    return ServerMetrics(stats_fn, **kwargs)


def scrape(metrics: ServerMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    # the parser names counter samples ``x_total``; we write TGI's plain ``x``
    return {
        (family.name if family.type == "counter" else s.name, tuple(sorted(s.labels.items()))): (
            s.value
        )
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def families(metrics: ServerMetrics) -> dict[str, str]:
    body, _ = metrics.render()
    return {f.name: f.type for f in text_string_to_metric_families(body.decode())}


def bounds(samples: Samples, name: str) -> list[float]:
    """A histogram's finite bucket bounds, in order."""
    les = [dict(labels)["le"] for sample, labels in samples if sample == f"{name}_bucket"]
    return sorted(float(le) for le in les if le != "+Inf")


TIMING = RequestTiming(
    validation_s=0.001,
    queue_s=0.01,
    inference_s=0.5,
    total_s=0.52,
    input_tokens=42,
    generated_tokens=10,
    max_new_tokens=20,
)


def test_names_and_types_are_tgis():
    kinds = families(make())
    for name in ("tgi_request_count", "tgi_request_success", "tgi_request_failure"):
        assert kinds[name] == "counter"
    for name in (
        "tgi_request_duration",
        "tgi_request_validation_duration",
        "tgi_request_queue_duration",
        "tgi_request_inference_duration",
        "tgi_request_mean_time_per_token_duration",
        "tgi_request_input_length",
        "tgi_request_generated_tokens",
        "tgi_request_max_new_tokens",
        "tgi_batch_next_size",
    ):
        assert kinds[name] == "histogram"
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_max_total_tokens"):
        assert kinds[name] == "gauge"
    for name in ("tgi_prefix_cache_hit_tokens", "tgi_preemptions"):
        assert kinds[name] == "counter"


def test_request_counters_and_histograms_move():
    metrics = make()
    before = scrape(metrics)
    assert before[("tgi_request_count", ())] == 0
    metrics.request_received()
    metrics.request_received()
    metrics.request_received()
    metrics.request_succeeded(TIMING)
    metrics.request_failed("validation")
    metrics.request_failed("overloaded")
    metrics.request_failed("validation")
    after = scrape(metrics)
    assert after[("tgi_request_count", ())] == 3
    assert after[("tgi_request_success", ())] == 1
    assert after[("tgi_request_failure", (("err", "validation"),))] == 2
    assert after[("tgi_request_failure", (("err", "overloaded"),))] == 1
    for name, value in [
        ("tgi_request_duration", 0.52),
        ("tgi_request_validation_duration", 0.001),
        ("tgi_request_queue_duration", 0.01),
        ("tgi_request_inference_duration", 0.5),
        ("tgi_request_mean_time_per_token_duration", 0.05),
        ("tgi_request_input_length", 42),
        ("tgi_request_generated_tokens", 10),
        ("tgi_request_max_new_tokens", 20),
    ]:
        assert after[(f"{name}_count", ())] == 1, name
        assert after[(f"{name}_sum", ())] == pytest.approx(value), name
    # 42 input tokens fall in the (40, 50] bucket of 100 buckets up to 1000
    assert after[("tgi_request_input_length_bucket", (("le", "40.0"),))] == 0
    assert after[("tgi_request_input_length_bucket", (("le", "50.0"),))] == 1


def test_no_time_per_token_without_generated_tokens():
    metrics = make()
    metrics.request_succeeded(
        RequestTiming(0.0, 0.0, 0.1, 0.1, input_tokens=3, generated_tokens=0, max_new_tokens=5)
    )
    samples = scrape(metrics)
    assert samples[("tgi_request_duration_count", ())] == 1
    assert samples[("tgi_request_mean_time_per_token_duration_count", ())] == 0


def test_bucket_bounds_match_tgi():
    samples = scrape(make(max_input_tokens=1000, max_total_tokens=2048))
    durations = [0.00015 * 1.5**i for i in range(35)]
    for name in (
        "tgi_request_duration",
        "tgi_request_queue_duration",
        "tgi_request_mean_time_per_token_duration",
    ):
        assert bounds(samples, name) == pytest.approx(durations, rel=1e-12)
    assert bounds(samples, "tgi_request_duration")[-1] == pytest.approx(146.0, abs=0.5)
    assert bounds(samples, "tgi_request_input_length") == pytest.approx(
        [10.0 * i for i in range(1, 101)]
    )
    for name in ("tgi_request_generated_tokens", "tgi_request_max_new_tokens"):
        assert bounds(samples, name) == pytest.approx([20.48 * i for i in range(1, 101)])
    assert bounds(samples, "tgi_batch_next_size") == [2.0**i for i in range(11)]
    assert ("tgi_request_duration_bucket", (("le", "+Inf"),)) in samples


def test_engine_gauges_are_read_at_scrape_time():
    current = stats()
    metrics = make(lambda: current, kv_tokens=1024)
    samples = scrape(metrics)
    assert samples[("tgi_queue_size", ())] == 0
    assert samples[("tgi_kv_blocks_free", ())] == 64
    current = stats(
        queue_size=3,
        batch_size=5,
        kv_blocks_used=20,
        kv_blocks_cached=7,
        prefix_hit_tokens=128,
        preemptions=2,
    )
    samples = scrape(metrics)
    assert samples[("tgi_queue_size", ())] == 3
    assert samples[("tgi_batch_current_size", ())] == 5
    assert samples[("tgi_batch_max_total_tokens", ())] == 1024
    assert samples[("tgi_kv_blocks_total", ())] == 64
    assert samples[("tgi_kv_blocks_used", ())] == 20
    assert samples[("tgi_kv_blocks_cached", ())] == 7
    assert samples[("tgi_kv_blocks_free", ())] == 44
    assert samples[("tgi_prefix_cache_hit_tokens", ())] == 128
    assert samples[("tgi_preemptions", ())] == 2


def test_observe_step_counts_by_method():
    metrics = make()
    metrics.observe_step("prefill", 0.02, 4, True)
    metrics.observe_step("decode", 0.005, 4, True)
    metrics.observe_step("decode", 0.004, 3, False)
    samples = scrape(metrics)
    assert samples[("tgi_batch_inference_count", (("method", "prefill"),))] == 1
    assert samples[("tgi_batch_inference_count", (("method", "decode"),))] == 2
    assert samples[("tgi_batch_inference_success", (("method", "decode"),))] == 1
    assert samples[("tgi_batch_inference_failure", (("method", "decode"),))] == 1
    assert samples[("tgi_batch_inference_duration_count", (("method", "decode"),))] == 2
    assert samples[("tgi_batch_inference_duration_sum", (("method", "prefill"),))] == 0.02
    assert samples[("tgi_batch_next_size_count", ())] == 3
    assert samples[("tgi_batch_next_size_sum", ())] == 11
    assert samples[("tgi_batch_next_size_bucket", (("le", "2.0"),))] == 0
    assert samples[("tgi_batch_next_size_bucket", (("le", "4.0"),))] == 3


def test_instances_do_not_share_state():
    first, second = make(), make()
    first.request_received()
    first.observe_step("decode", 0.01, 1, True)
    assert scrape(first)[("tgi_request_count", ())] == 1
    fresh = scrape(second)
    assert fresh[("tgi_request_count", ())] == 0
    assert ("tgi_batch_inference_count", (("method", "decode"),)) not in fresh


def greedy(name: str, ids: list[int], max_new: int = 4) -> GenerateRequest:
    return GenerateRequest(
        request_id=name,
        prompt_token_ids=tuple(ids),
        stopping=StoppingParams(max_new_tokens=max_new, ignore_eos=True),
    )


def test_engine_step_observer_feeds_metrics(tiny_llama: Path):
    engine = build_engine(tiny_llama, num_blocks=64)
    metrics = make(engine.stats, kv_tokens=engine.capacity_tokens)
    steps: list[tuple[str, float, int, bool]] = []

    def observer(method: str, seconds: float, batch_size: int, ok: bool) -> None:
        steps.append((method, seconds, batch_size, ok))
        metrics.observe_step(method, seconds, batch_size, ok)

    engine.step_observer = observer
    engine.run([greedy("a", [5, 6, 7, 8]), greedy("b", [9, 10, 11])])
    # one prefill step with both prompts, then 3 decode steps for the other 3 tokens each
    assert [(m, size, ok) for m, _, size, ok in steps] == [("prefill", 2, True)] + [
        ("decode", 2, True)
    ] * 3
    assert all(seconds > 0 for _, seconds, _, _ in steps)
    samples = scrape(metrics)
    assert samples[("tgi_batch_inference_count", (("method", "prefill"),))] == 1
    assert samples[("tgi_batch_inference_success", (("method", "decode"),))] == 3
    assert samples[("tgi_batch_next_size_count", ())] == 4
    assert samples[("tgi_batch_max_total_tokens", ())] == engine.capacity_tokens
    assert samples[("tgi_kv_blocks_total", ())] == 64
    assert samples[("tgi_kv_blocks_used", ())] == 0


def test_failed_step_is_observed_and_observer_errors_are_ignored(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
):
    engine = build_engine(tiny_llama, num_blocks=64)
    metrics = make(engine.stats)
    engine.step_observer = metrics.observe_step

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "execute", broken)
        events = engine.run([greedy("a", [5, 6, 7])])["a"]
    assert events[-1].error is not None and "boom" in events[-1].error
    samples = scrape(metrics)
    assert samples[("tgi_batch_inference_failure", (("method", "prefill"),))] == 1
    assert ("tgi_batch_inference_success", (("method", "prefill"),)) not in samples

    def raising(method: str, seconds: float, batch_size: int, ok: bool) -> None:
        raise ValueError("observer bug")

    engine.step_observer = raising
    events = engine.run([greedy("b", [5, 6, 7], max_new=2)])["b"]
    assert [e.error for e in events] == [None, None]
    assert events[-1].finish_reason == "length"


def test_counters_are_written_with_tgis_plain_names():
    metrics = make()
    metrics.request_received()
    body, content_type = metrics.render()
    text = body.decode()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert "\ntgi_request_count 1.0\n" in text
    assert "_created" not in text and "tgi_request_count_total" not in text
