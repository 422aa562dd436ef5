"""``tgi-core bench`` against a real ``tgi-core serve`` process on the tiny Llama."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tgi_core.bench.client import RequestResult, Target, run_level
from tgi_core.bench.command import BenchSettings, make_plans
from tgi_core.bench.stats import summarize
from tgi_core.bench.wire import Api, Sampling
from tgi_core.bench.workload import LengthRange, PlannedRequest
from tgi_core.cli import cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tiny_llama: Path) -> Any:
    return start_server(tiny_llama, "--max-batch-total-tokens", "2048", "--dtype", "float32")


def bench(*args: str) -> Any:
    return CliRunner().invoke(cli, ["bench", "--no-progress", *args], catch_exceptions=False)


def sent(base: str, api: Api, tiny_llama: Path, ignore_eos: bool = False) -> list[RequestResult]:
    settings = BenchSettings(
        url=base,
        api=api,
        concurrency=(3,),
        requests=6,
        prompt_tokens=LengthRange(8, 24),
        max_new_tokens=LengthRange(3, 12),
        tokenizer=str(tiny_llama),
        ignore_eos=ignore_eos,
        warmup=0,
    )
    (_, plan), *_ = make_plans(settings).levels
    run = asyncio.run(run_level(settings.target(), plan, 3))
    return run.results


@pytest.mark.parametrize("api", ["tgi", "openai"])
def test_counts_and_timings_agree_with_what_the_server_sent(
    server: Any, tiny_llama: Path, api: Api
) -> None:
    results = sent(server.base, api, tiny_llama)
    assert len(results) == 6
    for r in results:
        assert r.ok, r.error
        assert r.status == 200
        assert r.output_tokens == r.server_output_tokens  # every token event was counted
        assert 1 <= r.output_tokens <= r.planned.max_new_tokens
        if r.output_tokens < r.planned.max_new_tokens:
            assert r.finish_reason in ("eos_token", "stop")  # TGI's and OpenAI's names
        assert r.server_prompt_tokens == r.planned.prompt_tokens  # exact prompt lengths
        assert r.start < r.token_times[0] <= r.token_times[-1] <= r.end
        assert r.ttft is not None and 0 < r.ttft <= r.e2e
        assert r.token_times == sorted(r.token_times)
        assert len(r.inter_token_latencies()) == r.output_tokens - 1


def test_ignore_eos_makes_every_request_generate_all_its_tokens(
    server: Any, tiny_llama: Path
) -> None:
    results = sent(server.base, "openai", tiny_llama, ignore_eos=True)
    assert all(r.ok and r.finish_reason == "length" for r in results)
    assert [r.output_tokens for r in results] == [r.planned.max_new_tokens for r in results]


def test_token_id_prompts_over_the_openai_api(server: Any) -> None:
    plan = [PlannedRequest(tuple(range(10, 10 + n)), n, 5, seed=0) for n in (3, 17)]
    target = Target(server.base, "openai", Sampling(ignore_eos=True))
    results = asyncio.run(run_level(target, plan, 2)).results
    assert [(r.ok, r.server_prompt_tokens, r.output_tokens) for r in results] == [
        (True, 3, 5),
        (True, 17, 5),
    ]


def test_json_report(server: Any, tiny_llama: Path) -> None:
    result = bench(
        "--url", server.base, "-c", "1,2", "-n", "4", "--prompt-tokens", "16",
        "--max-new-tokens", "6", "--tokenizer", str(tiny_llama), "--api", "openai",
        "--ignore-eos", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["settings"]["concurrency"] == [1, 2]
    assert report["settings"]["prompt_tokens"] == "16"
    assert [level["concurrency"] for level in report["levels"]] == [1, 2]
    for level in report["levels"]:
        assert (level["requests"], level["succeeded"], level["errors"]) == (4, 4, 0)
        assert level["short"] == 0 and level["error_messages"] == {}
        assert level["output_tokens"] == 4 * 6
        assert level["output_tokens_per_s"] == pytest.approx(24 / level["duration_s"])
        assert level["prompt_tokens"]["min"] == level["prompt_tokens"]["max"] == 16
        for name in ("ttft_s", "itl_s", "e2e_s"):
            dist = level[name]
            assert set(dist) == {"count", "mean", "p50", "p95", "min", "max"}
            assert 0 < dist["min"] <= dist["p50"] <= dist["p95"] <= dist["max"]
        assert level["itl_s"]["count"] == 4 * 5
        assert level["ttft_s"]["max"] <= level["e2e_s"]["max"]


def test_table_and_plot(server: Any, tiny_llama: Path, tmp_path: Path) -> None:
    plot = tmp_path / "sweep.png"
    result = bench(
        "--url", server.base, "-c", "1,4", "-n", "4", "--prompt-tokens", "4:12",
        "--max-new-tokens", "4", "--plot", str(plot),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:2] == ["prompt", "output"]
    assert lines[1].split()[:4] == ["clients", "requests", "errors", "short"]
    rows = [line.split() for line in lines[2:4]]
    assert [(row[0], row[1], row[2]) for row in rows] == [("1", "4", "0"), ("4", "4", "0")]
    assert lines[4] == f"wrote {plot}"
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 400


def test_refusals_are_counted_as_errors(start_server: Callable[..., Any], tiny_llama: Path) -> None:
    busy = start_server(
        tiny_llama, "--max-batch-total-tokens", "2048", "--dtype", "float32",
        "--max-concurrent-requests", "1",
    )  # fmt: skip
    target = Target(busy.base, "tgi", Sampling())
    settings = BenchSettings(
        url=busy.base,
        concurrency=(4,),
        requests=8,
        prompt_tokens=LengthRange(8, 8),
        max_new_tokens=LengthRange(40, 40),
        warmup=0,
    )
    (_, plan), *_ = make_plans(settings).levels
    report = summarize(asyncio.run(run_level(target, plan, 4)))
    assert report.requests == 8 and report.succeeded + report.errors == 8
    assert report.errors > 0 and report.succeeded > 0
    assert list(report.error_messages) == ["HTTP 429: Model is overloaded"], report.error_messages
    assert report.succeeded <= report.output_tokens <= 40 * report.succeeded


def test_a_server_that_is_down_is_one_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench", "--url", "http://127.0.0.1:9", "-c", "1", "-n", "1"])
    assert result.exit_code == 1
    assert "Error: the warm-up request to http://127.0.0.1:9/generate_stream failed" in (
        result.output
    )
