"""Shared fixtures: real distributions, written by hand or installed with pip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

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
    for name in ("TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS"):
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
