"""``tgi-core serve``: resolve plugins and config, load the model, then run the server."""

from __future__ import annotations

from tgi_core.config import ResolvedConfig
from tgi_core.errors import ConfigError, TGIError
from tgi_core.logging import configure_logging, get_logger
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry


def serve(resolved: ResolvedConfig) -> None:
    """Start serving with ``resolved``; returns when the server stops.

    Raises :class:`~tgi_core.errors.TGIError` subclasses for anything a user can fix.
    """
    config = resolved.config
    configure_logging(json_output=config.json_output, level=config.log_level)
    log = get_logger("tgi_core.serve")
    registry = Registry.build(make_plugin_manager())
    resolved = resolved.with_registry(registry)
    log.info(
        "plugins loaded",
        plugins=[f"{info.distribution}=={info.version}" for info in registry.plugins],
        architectures=registry.models.architectures(),
    )
    if config.model_id is None:
        raise ConfigError("no model to serve: pass --model-id DIR or set MODEL_ID")

    from tgi_core.attention.selection import required_features, select_backend
    from tgi_core.model.base import DTYPES, ModelContext, default_dtype
    from tgi_core.model.checkpoint import Checkpoint
    from tgi_core.model.loader import load_model, select_model_spec

    spec = select_model_spec(Checkpoint.open(config.model_id), registry)
    select_backend(spec, registry, config.attention)  # fail fast, before loading
    dtype = DTYPES[config.dtype] if config.dtype else default_dtype()
    loaded = load_model(config.model_id, registry, ctx=ModelContext(dtype=dtype), progress=True)
    backend = select_backend(
        spec, registry, config.attention, needs=required_features(loaded.model)
    )
    log.info(
        "model loaded",
        model=spec.name,
        architecture=type(loaded.model).__name__,
        dtype=str(dtype).removeprefix("torch."),
        attention=backend.name,
    )
    raise TGIError(
        "this build of tgi-core has no inference engine yet: the model loads and the "
        "configuration is valid, but serving arrives with the engine and server releases"
    )
