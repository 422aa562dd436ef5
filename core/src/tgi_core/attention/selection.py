"""Choosing the attention backend for a model: by name, or the best that fits."""

from __future__ import annotations

from tgi_core.errors import ConfigError
from tgi_core.registry import Registry
from tgi_core.specs import AttentionBackendSpec, ModelSpec


def select_backend(
    model: ModelSpec, registry: Registry, name: str | None = None, device: str = "cpu"
) -> AttentionBackendSpec:
    """The backend named ``name``, or the highest-priority one that serves ``model``.

    Raises ConfigError naming the model, the backend and the missing features when the
    named backend cannot serve the model, or listing the candidates when none can.
    """
    backends = registry.attention_backends
    model_owner = registry.models.owner(model.name).distribution
    if name is not None:
        spec = backends.get(name)
        if spec is None:
            available = ", ".join(sorted(backends.names())) or "none installed"
            raise ConfigError(
                f"attention = {name!r} names no installed attention backend; available: {available}"
            )
        missing = sorted(model.requires - spec.features)
        if missing:
            raise ConfigError(
                f"attention backend {name!r} ({backends.owner(name).distribution}) cannot serve "
                f"model {model.name!r} ({model_owner}): it lacks {', '.join(missing)}"
            )
        if device not in spec.devices:
            raise ConfigError(
                f"attention backend {name!r} does not run on {device}; it runs "
                f"on {', '.join(spec.devices)}"
            )
        return spec
    fitting = [
        spec for spec in backends if model.requires <= spec.features and device in spec.devices
    ]
    if not fitting:
        detail = (
            "; ".join(
                f"{spec.name} lacks {', '.join(sorted(model.requires - spec.features)) or device}"
                for spec in backends
            )
            or "no attention backend is installed"
        )
        raise ConfigError(
            f"no installed attention backend can serve model {model.name!r} ({model_owner}), "
            f"which needs {', '.join(sorted(model.requires))}: {detail}"
        )
    return max(fitting, key=lambda spec: spec.priority)
