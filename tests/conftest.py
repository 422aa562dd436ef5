"""Shared fixtures: real distributions, written by hand or installed with pip."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every variable that tgi reads, so the host's environment can't leak in."""
    from tgi_core.config import FIELDS

    for info in FIELDS.values():
        if info.env:
            monkeypatch.delenv(info.env, raising=False)
    launcher = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")  # torchrun's
    for name in ("TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS", *launcher):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def make_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Path]]:
    """Write an installed distribution (its modules and dist-info) onto ``sys.path``.

    ``make_distribution("tgi-x", {"tgi_x": "source"}, {"x": "tgi_x"})`` is found by
    ``importlib.metadata`` exactly like a pip-installed one.
    """
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    written: list[str] = []

    def make(
        name: str,
        modules: dict[str, str],
        entry_points: dict[str, str],
        version: str = "0.1",
    ) -> Path:
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[tgi]\n{lines}")
        return root

    yield make
    for module in written:
        sys.modules.pop(module, None)


def pip_install_to(target: Path, *sources: Path) -> None:
    """``pip install --target`` without dependencies or network (build with our setuptools)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--target",
            str(target),
            *map(str, sources),
        ],
        check=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )


@pytest.fixture(scope="session")
def installed_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tgi-testplugin and the docs' tgi-hello, pip-installed into a temporary folder."""
    target = tmp_path_factory.mktemp("plugins-site")
    pip_install_to(target, FIXTURES / "tgi-testplugin", REPO / "docs/examples/tgi-hello")
    return target


@pytest.fixture
def with_installed_plugins(
    installed_plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """Put the pip-installed test plugins on ``sys.path`` for this test."""
    monkeypatch.syspath_prepend(str(installed_plugins))
    yield installed_plugins
    for name in list(sys.modules):
        if name.split(".")[0] in ("tgi_testplugin", "tgi_hello"):
            del sys.modules[name]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint saved by transformers, with a 320-token BPE tokenizer
    (``<s>`` 0, ``</s>`` 1, ``<pad>`` 2) and a chat template, shared by the engine and
    server tests."""
    from transformers import LlamaConfig

    from tgi_core.model.fixtures import CHAT_TEMPLATE, save_checkpoint, train_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama") / "llama"
    save_checkpoint(
        path,
        LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=1,
        ),
    )
    train_tokenizer(path, 320, chat_template=CHAT_TEMPLATE)
    return path


class Server(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path  # the server's stdout and stderr (JSON lines with --json-output)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_environ() -> dict[str, str]:
    """The host's environment without the variables tgi reads (they would override defaults)."""
    from tgi_core.config import FIELDS

    names = {info.env for info in FIELDS.values() if info.env}
    names |= {"TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS"}
    names |= {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}  # a launcher's
    return {key: value for key, value in os.environ.items() if key not in names}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """``start_server(checkpoint, *flags)``: a real ``tgi-core serve`` process on a free
    port of 127.0.0.1 (``--json-output``, then ``flags``; no ``--model-id`` when
    ``checkpoint`` is None), once ``/health`` answers 200.
    Every process started is stopped with SIGTERM when the test module ends."""
    import httpx

    processes: list[subprocess.Popen[bytes]] = []

    def start(checkpoint: Path | None, *flags: str) -> Server:
        port = free_port()
        log = tmp_path_factory.mktemp("e2e-log") / "server.log"
        command = [
            sys.executable,
            "-m",
            "tgi_core.cli",
            "serve",
            *(() if checkpoint is None else ("--model-id", str(checkpoint))),
            "--hostname",
            "127.0.0.1",
            "--port",
            str(port),
            "--json-output",
            *flags,
        ]
        with open(log, "w") as out:
            process = subprocess.Popen(
                command, env=_server_environ(), stdout=out, stderr=subprocess.STDOUT
            )
        processes.append(process)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"not healthy after 60 s\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return Server(base, process, log)
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

    try:
        yield start
    finally:
        for process in processes:
            _stop(process)
