"""The core's built-in frontends, registered through the plugin hook like any other."""

from __future__ import annotations

from collections.abc import Callable

from tgi_core.hookspecs import hookimpl
from tgi_core.specs import FrontendSpec


@hookimpl
def register_frontends(register: Callable[[FrontendSpec], None]) -> None:
    register(
        FrontendSpec(
            name="tgi",
            factory="tgi_core.server.tgi_frontend:build",
            routes=(
                "/generate",
                "/generate_stream",
                "/",
                "/tokenize",
                "/chat_tokenize",
                "/v1/models",
            ),
            description="TGI's native REST API",
        )
    )
    register(
        FrontendSpec(
            name="openai",
            factory="tgi_core.server.openai_frontend:build",
            routes=("/v1/chat/completions", "/v1/completions"),
            description="The OpenAI API: chat completions and completions",
        )
    )
