"""The core's built-in attention backends, registered through the plugin hook."""

from __future__ import annotations

from collections.abc import Callable

from tgi_core.hookspecs import hookimpl
from tgi_core.specs import AttentionBackendSpec

_FEATURES = frozenset(
    {
        "causal",
        "paged_kv",
        "prefix_caching",
        "sliding_window",
        "alibi",
        "gqa",
        "relative_bias",
        "cross_attention",
    }
)


@hookimpl
def register_attention_backends(register: Callable[[AttentionBackendSpec], None]) -> None:
    register(
        AttentionBackendSpec(
            name="sdpa",
            factory="tgi_core.attention.sdpa:SdpaBackend",
            features=_FEATURES,
            devices=("cpu",),
            priority=10,
            description="PyTorch scaled_dot_product_attention over the paged cache (default)",
        )
    )
    register(
        AttentionBackendSpec(
            name="reference",
            factory="tgi_core.attention.reference:ReferenceBackend",
            features=_FEATURES,
            devices=("cpu",),
            priority=0,
            description="plain per-sequence attention in float32, for checking other backends",
        )
    )
