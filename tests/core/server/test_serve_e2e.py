"""`tgi-core serve` as a user runs it: a real process on a free port, real HTTP.

The ``server`` fixture (one process for this module) is in ``conftest.py``.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_generate_and_stream_over_http(server) -> None:
    base, _, _ = server
    response = httpx.post(
        f"{base}/generate", json={"inputs": "import os\n", "parameters": {"max_new_tokens": 5}}
    )
    assert response.status_code == 200
    assert isinstance(response.json()["generated_text"], str)
    with httpx.stream(
        "POST",
        f"{base}/generate_stream",
        json={"inputs": "import os\n", "parameters": {"max_new_tokens": 4}},
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) == 4
    assert json.loads(events[-1][5:])["generated_text"] is not None


def test_sigterm_stops_the_server_cleanly(server) -> None:
    base, process, log = server
    assert httpx.get(f"{base}/info").json()["max_total_tokens"] == 256
    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    lines = [
        json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith("{")
    ]
    assert any(line["event"] == "engine ready" for line in lines)
