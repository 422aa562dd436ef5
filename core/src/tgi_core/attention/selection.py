"""Choosing the attention backend for a model: by name, or the best that fits."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tgi_core.attention.backend import missing_features
from tgi_core.errors import ConfigError
from tgi_core.registry import Registry
from tgi_core.specs import AttentionBackendSpec, ModelSpec

if TYPE_CHECKING:
    from torch import nn


def required_features(model: nn.Module) -> frozenset[str]:
    """What a built model's attention layers need: windows, ALiBi, grouped KV heads,
    relative position biases, cross-attention."""
    from tgi_core.model.layers.attention import Attention

    needs = {"causal", "paged_kv"}
    for layer in model.modules():
        if isinstance(layer, Attention):
            if layer.sliding_window is not None:
                needs.add("sliding_window")
            if layer.alibi_slopes is not None:
                needs.add("alibi")
            if layer.num_kv_heads != layer.num_heads:
                needs.add("gqa")
            if layer.position_bias is not None:
                needs.add("relative_bias")
            if layer.kind == "cross":
                needs.add("cross_attention")
    return frozenset(needs)


def select_backend(
    model: ModelSpec,
    registry: Registry,
    name: str | None = None,
    device: str = "cpu",
    needs: frozenset[str] = frozenset(),
) -> AttentionBackendSpec:
    """The backend named ``name``, or the highest-priority one that serves ``model``.

    ``needs`` adds what the built model requires beyond its spec (see
    :func:`required_features`). Raises ConfigError naming the model, the backend and the
    missing features when the named backend cannot serve the model, or listing the
    candidates when none can.
    """
    backends = registry.attention_backends
    requires = model.requires | needs
    model_owner = registry.models.owner(model.name).distribution
    if name is not None:
        spec = backends.get(name)
        if spec is None:
            available = ", ".join(sorted(backends.names())) or "none installed"
            raise ConfigError(
                f"attention = {name!r} names no installed attention backend; available: {available}"
            )
        missing = missing_features(requires, spec.features)
        if missing:
            raise ConfigError(
                f"attention backend {name!r} ({backends.owner(name).distribution}) cannot "
                f"serve model {model.name!r} ({model_owner}): it lacks {', '.join(missing)}"
            )
        if device not in spec.devices:
            raise ConfigError(
                f"attention backend {name!r} does not run on {device}; it runs on "
                f"{', '.join(spec.devices)}"
            )
        return spec
    fitting = [spec for spec in backends if requires <= spec.features and device in spec.devices]
    if not fitting:
        reasons = [
            f"{spec.name} lacks {', '.join(missing_features(requires, spec.features)) or device}"
            for spec in backends
        ]
        raise ConfigError(
            f"no installed attention backend can serve model {model.name!r} ({model_owner}), "
            f"which needs {', '.join(sorted(requires))}: "
            f"{'; '.join(reasons) or 'no attention backend is installed'}"
        )
    return max(fitting, key=lambda spec: spec.priority)
