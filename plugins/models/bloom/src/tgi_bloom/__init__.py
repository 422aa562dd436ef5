"""tgi-bloom: BLOOM (ALiBi attention, fused per-head QKV) for tgi-core.

This module is imported whenever plugins are listed, so it stays import-cheap: the
model code (and torch) loads only when a BLOOM checkpoint is served.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

BLOOM = tgi_core.ModelSpec(
    name="bloom",
    architectures=("BloomForCausalLM",),
    model_types=("bloom",),
    factory="tgi_bloom.model:build_model",
    requires=frozenset({"causal", "paged_kv", "alibi"}),
    description="BLOOM decoder-only models (ALiBi attention)",
)


@tgi_core.hookimpl
def register_models(register: Callable[[tgi_core.ModelSpec], None]) -> None:
    register(BLOOM)
