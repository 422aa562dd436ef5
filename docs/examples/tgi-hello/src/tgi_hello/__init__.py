"""tgi-hello: a route and a config section, the smallest complete tgi plugin.

This module is imported whenever tgi lists or loads plugins, so it only declares
specs; the route code in ``tgi_hello.routes`` (and Litestar) loads when it is served.
"""

from __future__ import annotations

import msgspec

import tgi_core


class HelloConfig(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[plugins.hello]`` section of a deployment file."""

    greeting: str = "Hello"
    excited: bool = False


@tgi_core.hookimpl
def register_config_sections(register):
    register(tgi_core.ConfigSectionSpec(name="hello", schema=HelloConfig))


@tgi_core.hookimpl
def register_frontends(register):
    register(
        tgi_core.FrontendSpec(
            name="hello",
            factory="tgi_hello.routes:build",
            routes=("/hello",),
            description="Greets whoever asks",
        )
    )
