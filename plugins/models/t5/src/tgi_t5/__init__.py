"""tgi-t5: T5 encoder-decoder models (T5 v1.0, v1.1, flan-t5) for tgi-core.

This module is imported whenever plugins are listed, so it stays import-cheap: the
model code (and torch) loads only when a T5 checkpoint is served.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

T5 = tgi_core.ModelSpec(
    name="t5",
    architectures=("T5ForConditionalGeneration",),
    model_types=("t5",),
    kind="seq2seq",
    factory="tgi_t5.model:build_model",
    requires=frozenset({"causal", "paged_kv", "relative_bias", "cross_attention"}),
    description="T5 v1.0, v1.1 and flan-t5 encoder-decoder models",
)


@tgi_core.hookimpl
def register_models(register: Callable[[tgi_core.ModelSpec], None]) -> None:
    register(T5)
