"""A real ``tgi-core serve`` process on a free port, for the end-to-end server tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def server(start_server: Callable[..., Any], tiny_llama: Path) -> Any:
    """``tgi-core serve`` on ``tiny_llama``, one process per test module, stopped with SIGTERM.

    float32, so that greedy decoding matches transformers' float32 reference exactly (the
    default dtype is bfloat16 on CPUs with native bf16).
    """
    return start_server(tiny_llama, "--max-batch-total-tokens", "2048", "--dtype", "float32")
