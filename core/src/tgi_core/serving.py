"""``tgi-core serve``: resolve plugins and config, then run the server."""

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
    raise TGIError(
        "this build of tgi-core has no inference engine yet: configuration and plugins "
        "are valid, but serving arrives with the engine and server releases"
    )
