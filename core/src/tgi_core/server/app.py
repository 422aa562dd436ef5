"""Assemble the Litestar app: built-in routes plus every registered frontend's handlers.

Built in: ``/health`` (with TGI's recovery probe), ``/info``, ``/metrics``, and the
OpenAPI schema at ``/openapi.json`` (also TGI's ``/api-doc/openapi.json``) with its UI at
``/docs``. Around every route: the API key check, CORS, the JSON content-type check and
the payload limit.
"""

from __future__ import annotations

import functools
import hmac
import uuid
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from tgi_core.context import FrontendContext
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.errors import PluginError
from tgi_core.logging import get_logger
from tgi_core.registry import Registry
from tgi_core.server.errors import EXCEPTION_HANDLERS, APIError
from tgi_core.server.generation import token_events
from tgi_core.server.state import ServerState

log = get_logger("tgi_core.server")
#: routes that stay open when ``--api-key`` is set (as in TGI), and the OpenAPI docs
OPEN_PATHS = frozenset(
    {"/health", "/ping", "/info", "/metrics", "/v1/models", "/chat_tokenize", "/openapi.json"}
)
OPEN_PREFIXES = ("/docs", "/api-doc", "/schema")


@functools.cache
def version() -> str:
    """tgi-core's installed version (read once: the metadata lookup costs milliseconds)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("tgi-core")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def probe(state: ServerState) -> bool:
    """Generate one token of ``"liveness"``; sets and returns ``state.healthy``."""
    ids = state.tokenizer.encode("liveness") or [0]
    request = GenerateRequest(
        request_id=f"probe-{uuid.uuid4().hex}",
        prompt_token_ids=tuple(ids[: state.model.max_input_tokens]),
        stopping=StoppingParams(max_new_tokens=1, ignore_eos=True),
    )
    try:
        async for _ in token_events(state, request):
            pass
    except Exception as exc:
        log.error("health probe failed", error=str(exc))
        state.healthy = False
        return False
    state.healthy = True
    return True


def _core_routes(state: ServerState) -> list[HTTPRouteHandler]:
    @get(["/health", "/ping"], summary="Health", include_in_schema=True)
    async def health() -> Response[Any]:
        if state.failure is not None:
            error = f"unhealthy: {state.failure}"
            return Response({"error": error, "error_type": "healthcheck"}, status_code=503)
        if state.healthy or await probe(state):
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
            "version": version(),
            "sha": None,
            "docker_label": None,
            "model_dtype": model.dtype,
            "model_device_type": "cpu",
            "model_architecture": model.architecture,
            "is_encoder_decoder": model.is_encoder_decoder,
            "attention_backend": model.attention,
            "block_size": model.block_size,
            "max_batch_total_tokens": model.kv_tokens,
            "prefix_caching": config.prefix_caching,
            "num_shard": model.num_shard,
            "plugins": state.plugins,
        }

    @get("/metrics", summary="Prometheus metrics", sync_to_thread=False)
    def metrics() -> Response[bytes]:
        if state.metrics is None:
            return Response(b"", media_type="text/plain")
        body, _ = state.metrics.render()
        # Litestar appends the charset itself
        return Response(body, media_type="text/plain; version=0.0.4")

    return [health, info, metrics]


def _openapi_routes() -> list[HTTPRouteHandler]:
    @get(["/openapi.json", "/api-doc/openapi.json"], include_in_schema=False)
    async def openapi_json(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        return Response(request.app.openapi_schema.to_schema())

    return [openapi_json]


def _api_key_guard(api_key: str) -> Any:
    expected = f"Bearer {api_key}".encode()

    def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
        path = connection.scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return
        given = connection.headers.get("authorization", "")
        scheme, _sep, token = given.partition(" ")
        candidate = f"{scheme.capitalize()} {token.strip()}".encode()
        if not hmac.compare_digest(candidate, expected):
            raise APIError(
                401, "Unauthorized: a valid `Authorization: Bearer` key is required", "unauthorized"
            )

    return guard


async def _require_json(request: Request[Any, Any, Any]) -> None:
    """POST bodies must say they are JSON (415 otherwise, as axum's ``Json`` does)."""
    if request.method != "POST":
        return
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json" and not media_type.endswith("+json"):
        raise APIError(
            415,
            "Expected request with `Content-Type: application/json`",
            "unsupported_media_type",
        )


def build_app(
    state: ServerState,
    registry: Registry,
    plugin_sections: Mapping[str, msgspec.Struct] | None = None,
) -> Litestar:
    """The app; its lifespan starts the engine, warms it up, and stops it.

    ``app.state.tgi`` is ``state``, for tests and middleware.
    """
    ctx = FrontendContext(
        state.config, plugin_sections or {}, engine=state, tokenizer=state.tokenizer
    )
    handlers = _core_routes(state) + _openapi_routes()
    owners = {
        f"{method} {path}": "tgi-core"
        for handler in handlers
        for path in handler.paths
        for method in handler.http_methods
    }
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

    async def start_engine() -> None:
        state.engine.start()
        if not await probe(state):  # warm-up: /health says 503 until a generation worked
            log.error("warm-up generation failed; /health answers 503")

    def stop_engine() -> None:
        state.engine.shutdown()
        for hook in state.on_shutdown:
            hook()

    config = state.config
    origins = list(config.cors_allow_origin) if config.cors_allow_origin else ["*"]
    return Litestar(
        route_handlers=handlers,
        exception_handlers=EXCEPTION_HANDLERS,
        on_startup=[start_engine],
        on_shutdown=[stop_engine],
        guards=[_api_key_guard(config.api_key)] if config.api_key else [],
        before_request=_require_json,
        cors_config=CORSConfig(
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["content-type", "authorization"],
        ),
        request_max_body_size=config.payload_limit,
        openapi_config=OpenAPIConfig(
            title="tgi",
            version=version(),
            path="/docs",
            render_plugins=[SwaggerRenderPlugin(path="/")],
        ),
        logging_config=None,
        state=State({"tgi": state}),
    )
