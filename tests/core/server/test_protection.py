"""What protects the server and tells on it: 429, 413, 415, 401, CORS, disconnects,
the health probe, /metrics, timing headers and the per-request log line."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from tgi_core.testing import build_test_app

PLUGINS = {"TGI_LOAD_PLUGINS": "tgi-llama"}
OPTIONS = {"max_batch_total_tokens": "4096", "dtype": "float32"}
GENERATE = {"inputs": "import os\n", "parameters": {"max_new_tokens": 4}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def app(tiny_llama: Path):
    return build_test_app(
        str(tiny_llama),
        PLUGINS,
        max_concurrent_requests="2",
        payload_limit="4000",
        cors_allow_origin="https://allowed.example",
        **OPTIONS,
    )


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def blocks_used(app) -> int:
    return app.state.tgi.engine.engine.blocks.num_used


def test_full_server_answers_429_before_anything_starts(app, client) -> None:
    state = app.state.tgi
    slots = [state.admit(), state.admit()]
    try:
        tgi = client.post("/generate", json=GENERATE)
        assert tgi.status_code == 429
        assert tgi.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        stream = client.post("/generate_stream", json=GENERATE)
        assert stream.status_code == 429  # not a 200 with an in-band error
        openai = client.post("/v1/chat/completions", json=CHAT | {"stream": True})
        assert openai.status_code == 429
        assert openai.json()["error"]["type"] == "rate_limit_error"
    finally:
        for slot in slots:
            slot.release()
    assert client.post("/generate", json=GENERATE).status_code == 200
    assert client.post("/generate_stream", json=GENERATE).status_code == 200
    assert state.in_flight == 0  # every finished request gave its slot back


def test_body_over_the_payload_limit_is_413(client) -> None:
    big = {"inputs": "x" * 5000}
    tgi = client.post("/generate", json=big)
    assert tgi.status_code == 413 and tgi.json()["error_type"] == "payload_too_large"
    openai = client.post("/v1/completions", json={"prompt": "x" * 5000})
    assert openai.status_code == 413 and openai.json()["error"]["message"]


def test_non_json_content_type_is_415(client) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = client.post(
            "/generate",
            content=msgspec.json.encode(GENERATE),
            headers={"content-type": content_type},
        )
        assert response.status_code == 415, content_type
        assert "application/json" in response.json()["error"]
    vendor = client.post(
        "/generate",
        content=msgspec.json.encode(GENERATE),
        headers={"content-type": "application/vnd.api+json; charset=utf-8"},
    )
    assert vendor.status_code == 200


def test_cors_allows_the_configured_origin_only(client) -> None:
    preflight = {
        "Origin": "https://allowed.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    allowed = client.options("/generate", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://allowed.example"
    assert "POST" in allowed.headers["access-control-allow-methods"]
    denied = client.options("/generate", headers=preflight | {"Origin": "https://evil.example"})
    assert denied.headers.get("access-control-allow-origin") != "https://evil.example"
    simple = client.post("/generate", json=GENERATE, headers={"Origin": "https://allowed.example"})
    assert simple.headers["access-control-allow-origin"] == "https://allowed.example"


def test_api_key(tiny_llama: Path) -> None:
    app = build_test_app(str(tiny_llama), PLUGINS, api_key="s3cret", **OPTIONS)
    with TestClient(app) as client:
        missing = client.post("/generate", json=GENERATE)
        assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
        wrong = client.post("/generate", json=GENERATE, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        for scheme in ("Bearer", "bearer"):
            ok = client.post(
                "/generate", json=GENERATE, headers={"Authorization": f"{scheme} s3cret"}
            )
            assert ok.status_code == 200, scheme
        openai = client.post("/v1/chat/completions", json=CHAT)
        assert openai.status_code == 401
        assert openai.json()["error"]["type"] == "authentication_error"
        for path in ("/health", "/metrics", "/info", "/v1/models", "/openapi.json"):
            assert client.get(path).status_code == 200, path


async def _call_and_disconnect(app, path: str, body: dict[str, Any], after: float) -> list[dict]:
    """Send ``body`` to ``path`` over raw ASGI, then disconnect after ``after`` seconds."""
    sent: list[dict] = []
    payload = msgspec.json.encode(body)
    messages = [{"type": "http.request", "body": payload, "more_body": False}]

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await asyncio.sleep(after)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }
    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions"])
def test_a_disconnect_cancels_the_generation_and_frees_its_blocks(app, client, path) -> None:
    state = app.state.tgi
    wait_for(lambda: blocks_used(app) == 0)
    # the tiny model's greedy text for this prompt runs 200 tokens without EOS (asserted
    # below: a request that finished would log "ok", not "dropped")
    body = (
        {"prompt": "import os\n", "max_tokens": 200, "temperature": 0}
        if path.startswith("/v1")
        else {"inputs": "import os\n", "parameters": {"max_new_tokens": 200}}
    )
    with capture_logs() as logs:
        sent = asyncio.run(_call_and_disconnect(app, path, body, after=0.05))
        wait_for(lambda: blocks_used(app) == 0 and not state.engine.engine.sequences)
    (line,) = [entry for entry in logs if entry["event"] == "request"]
    assert line["outcome"] == "dropped", line
    assert line["generated_tokens"] < 200
    assert state.in_flight == 0
    if path != "/generate_stream":  # no generated text: 499, "client closed request"
        (start,) = [m for m in sent if m["type"] == "http.response.start"]
        assert start["status"] == 499


def test_health_probe_recovers_after_a_failure(app, client, monkeypatch) -> None:
    state = app.state.tgi
    runner = state.engine.engine.runner

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    monkeypatch.setattr(runner, "execute", broken)
    failed = client.post("/generate", json=GENERATE)
    assert failed.status_code == 424 and failed.json()["error_type"] == "generation"
    assert not state.healthy
    unhealthy = client.get("/health")
    assert unhealthy.status_code == 503
    assert unhealthy.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    monkeypatch.undo()
    assert client.get("/health").status_code == 200  # the probe generation worked
    assert state.healthy


def scrape(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics").text
    return {
        (family.name if family.type == "counter" else s.name, tuple(sorted(s.labels.items()))): (
            s.value
        )
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_move_with_traffic(client) -> None:
    before = scrape(client)
    assert client.post("/generate", json=GENERATE).status_code == 200
    assert client.post("/generate", json={"inputs": ""}).status_code == 422
    after = scrape(client)
    count = ("tgi_request_count", ())
    assert after[count] == before[count] + 2
    success = ("tgi_request_success", ())
    assert after[success] == before[success] + 1
    failure = ("tgi_request_failure", (("err", "validation"),))
    assert after[failure] == before.get(failure, 0) + 1
    generated = ("tgi_request_generated_tokens_sum", ())
    assert after[generated] == before[generated] + 4
    steps = ("tgi_batch_inference_success", (("method", "decode"),))
    assert after[steps] >= before.get(steps, 0) + 3
    assert after[("tgi_kv_blocks_total", ())] == 4096 // 16
    assert after[("tgi_batch_max_total_tokens", ())] == 4096
    response = client.get("/metrics")
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "\ntgi_request_count " in response.text  # TGI's plain counter names, no _total


def test_wrong_method_is_405_with_allow(client) -> None:
    response = client.put("/generate", json=GENERATE)
    assert response.status_code == 405
    assert response.json()["error_type"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


def test_timing_headers_and_one_log_line_per_request(client) -> None:
    with capture_logs() as logs:
        response = client.post("/generate", json=GENERATE | {"parameters": {"max_new_tokens": 3}})
    headers = response.headers
    for name in (
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert int(headers[name]) >= 0, name
    assert headers["x-generated-tokens"] == "3"
    assert int(headers["x-prompt-tokens"]) > 0
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "/generate" and line["outcome"] == "ok"
    assert line["generated_tokens"] == 3 and line["finish_reason"] == "length"
    assert line["request_id"] and line["total_ms"] >= line["inference_ms"] >= 0


def test_kv_cache_is_no_bigger_than_admitted_requests_can_use(tiny_llama: Path) -> None:
    """Unset max_batch_total_tokens sizes the cache from memory, but never beyond
    max_concurrent_requests requests of max_total_tokens (tiny_llama: 256 positions)."""
    app = build_test_app(str(tiny_llama), max_concurrent_requests="3", dtype="float32")
    with TestClient(app) as client:
        info = client.get("/info").json()
    assert info["max_total_tokens"] == 256
    assert info["max_batch_total_tokens"] == 3 * 256
