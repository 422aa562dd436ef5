"""A real ``tgi-core serve`` process on a free port, for the end-to-end server tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest


class Server(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path  # the server's stdout and stderr (JSON lines with --json-output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _environ() -> dict[str, str]:
    """The host's environment without the variables tgi reads (they would override defaults)."""
    from tgi_core.config import FIELDS

    names = {info.env for info in FIELDS.values() if info.env}
    names |= {"TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS"}
    return {key: value for key, value in os.environ.items() if key not in names}


@contextmanager
def running_server(log: Path, *options: str, timeout: float = 60) -> Iterator[Server]:
    """``tgi-core serve OPTIONS`` on a free port of 127.0.0.1 (JSON logs into ``log``),
    healthy when entered; stopped with SIGTERM (then killed) on exit."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tgi_core.cli",
        "serve",
        *options,
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--json-output",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=_environ(), stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not healthy after {timeout} s\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield Server(base, process, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Iterator[Server]:
    """``tgi-core serve`` on ``tiny_llama``, one process per test module, stopped with SIGTERM.

    float32, so that greedy decoding matches transformers' float32 reference exactly (the
    default dtype is bfloat16 on CPUs with native bf16).
    """
    log = tmp_path_factory.mktemp("e2e-log") / "server.log"
    with running_server(
        log,
        "--model-id",
        str(tiny_llama),
        "--max-batch-total-tokens",
        "2048",
        "--dtype",
        "float32",
    ) as server:
        yield server
