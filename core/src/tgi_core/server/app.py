"""Assemble the Litestar app: built-in routes plus every registered frontend's handlers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Litestar, Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig

from tgi_core.context import FrontendContext
from tgi_core.errors import PluginError
from tgi_core.registry import Registry
from tgi_core.server.errors import EXCEPTION_HANDLERS
from tgi_core.server.state import ServerState


def _core_routes(state: ServerState) -> list[HTTPRouteHandler]:
    @get("/health", summary="Health", sync_to_thread=False)
    def health() -> Response[Any]:
        if state.healthy:
            return Response(None, status_code=200)
        return Response({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)

    @get("/info", summary="Model and server information", sync_to_thread=False)
    def info() -> dict[str, Any]:
        config, model = state.config, state.model
        return {
            "model_id": model.model_id,
            "model_sha": None,
            "model_pipeline_tag": model.pipeline_tag,
            "max_concurrent_requests": config.max_concurrent_requests,
            "max_best_of": config.max_best_of,
            "max_stop_sequences": config.max_stop_sequences,
            "max_input_tokens": model.max_input_tokens,
            "max_total_tokens": model.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": config.max_client_batch_size,
            "router": "tgi-core",
            "version": _version(),
            "sha": None,
            "docker_label": None,
            "model_dtype": model.dtype,
            "model_device_type": "cpu",
            "model_architecture": model.architecture,
            "is_encoder_decoder": model.is_encoder_decoder,
            "attention_backend": model.attention,
            "block_size": model.block_size,
            "prefix_caching": config.prefix_caching,
            "plugins": state.plugins,
        }

    return [health, info]


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("tgi-core")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def build_app(
    state: ServerState,
    registry: Registry,
    plugin_sections: Mapping[str, msgspec.Struct] | None = None,
) -> Litestar:
    """The app; its lifespan starts and stops the engine thread."""
    ctx = FrontendContext(
        state.config, plugin_sections or {}, engine=state, tokenizer=state.tokenizer
    )
    handlers = _core_routes(state)
    owners = {path: "tgi-core" for handler in handlers for path in handler.paths}
    for spec in registry.frontends:
        owner = registry.frontends.owner(spec.name)
        built = spec.load()(ctx)
        for handler in built:
            for path in handler.paths:
                for method in handler.http_methods:
                    key = f"{method} {path}"
                    if key in owners:
                        raise PluginError(
                            f"frontend {spec.name!r} of {owner.describe()} serves "
                            f"{key}, which {owners[key]} already serves"
                        )
                    owners[key] = owner.distribution
        handlers.extend(built)

    def start_engine() -> None:
        state.engine.start()

    def stop_engine() -> None:
        state.engine.shutdown()

    return Litestar(
        route_handlers=handlers,
        exception_handlers=EXCEPTION_HANDLERS,
        on_startup=[start_engine],
        on_shutdown=[stop_engine],
        request_max_body_size=state.config.payload_limit,
        openapi_config=OpenAPIConfig(title="tgi", version=_version(), path="/docs"),
        logging_config=None,
    )
