"""tgi-demo: a small Llama model trained on Python's standard library, served by default.

Registers the model source ``demo``: ``tgi-core serve --model-id demo`` serves the
checkpoint folder packaged with this distribution, and so does ``tgi-core serve`` with
no model at all. This module is imported whenever plugins are listed, so it imports
neither torch nor transformers (``tgi_demo.train`` made the checkpoint and does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import tgi_core

DEMO = tgi_core.ModelSourceSpec(
    name="demo",
    path_factory="tgi_demo:model_dir",
    description="a 4M-parameter Llama trained on Python's standard library (tgi_demo.train)",
)


def model_dir() -> Path:
    """The packaged checkpoint folder (config.json, model.safetensors, tokenizer files)."""
    return Path(__file__).resolve().parent / "model"


@tgi_core.hookimpl
def register_model_sources(register: Callable[[tgi_core.ModelSourceSpec], None]) -> None:
    register(DEMO)
