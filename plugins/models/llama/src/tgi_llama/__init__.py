"""tgi-llama: the Llama family (Llama 1/2/3, Mistral, Qwen2) for tgi-core.

This module is imported whenever plugins are listed, so it stays import-cheap: the
model code (and torch) loads only when a Llama-family checkpoint is served.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

LLAMA = tgi_core.ModelSpec(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    model_types=("llama", "mistral", "qwen2"),
    factory="tgi_llama.model:build_model",
    requires=frozenset({"causal", "paged_kv"}),
    description="Llama 1/2/3, Mistral and Qwen2 decoder-only models",
)


@tgi_core.hookimpl
def register_models(register: Callable[[tgi_core.ModelSpec], None]) -> None:
    register(LLAMA)
