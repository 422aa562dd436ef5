"""`tgi-core serve` as a user runs it: a real process on a free port, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    path = tiny_llama
    port = free_port()
    log = tmp_path_factory.mktemp("e2e-log") / "server.log"
    env = {**os.environ, "MODEL_ID": str(path), "PORT": str(port)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tgi_core.cli",
                "serve",
                "--hostname",
                "127.0.0.1",
                "--max-batch-total-tokens",
                "2048",
                "--json-output",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
        assert process.poll() is None, Path(log).read_text()
    yield base, process, log
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


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
