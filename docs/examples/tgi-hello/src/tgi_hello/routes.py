"""The frontend: route handlers built from the serving context."""

from __future__ import annotations

from litestar import get
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromQuery

from tgi_core.context import FrontendContext
from tgi_hello import HelloConfig


def build(ctx: FrontendContext) -> list[HTTPRouteHandler]:
    """Return the handlers to mount; ``ctx`` carries the config and the engine."""
    settings = ctx.section("hello", HelloConfig)

    @get("/hello", sync_to_thread=False)
    def hello(name: FromQuery[str] = "world") -> dict[str, str]:
        punctuation = "!" if settings.excited else "."
        return {"message": f"{settings.greeting}, {name}{punctuation}"}

    return [hello]
