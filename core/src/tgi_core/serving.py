"""``tgi-core serve``: resolve plugins and config, load the model, run the HTTP server."""

from __future__ import annotations

from tgi_core.config import ResolvedConfig
from tgi_core.logging import configure_logging, get_logger
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry


def serve(resolved: ResolvedConfig) -> None:
    """Serve with ``resolved`` until the process is told to stop (SIGINT, SIGTERM).

    Raises :class:`~tgi_core.errors.TGIError` subclasses for anything a user can fix.
    On SIGTERM, uvicorn stops accepting connections and gives requests in flight
    ``graceful_termination_timeout`` seconds to finish.
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
    import uvicorn

    from tgi_core.server.app import build_app
    from tgi_core.server.builder import build_state

    state = build_state(resolved, registry)
    app = build_app(state, registry, resolved.plugin_sections)
    log.info("serving", host=config.hostname, port=config.port, model=state.model.model_id)
    uvicorn.run(
        app,
        host=config.hostname,
        port=config.port,
        log_config=None,
        timeout_graceful_shutdown=config.graceful_termination_timeout,
    )
