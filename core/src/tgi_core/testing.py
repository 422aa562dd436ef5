"""pytest fixtures for plugin authors, loaded automatically (``pytest11`` entry point).

- ``tgi_plugin_manager``: a fresh plugin manager of every installed plugin.
- ``tgi_registry``: what the installed plugins registered (``Registry``).
- ``tgi_registry_with``: a factory building a registry from plugin objects you pass
  (modules or instances with ``@tgi_core.hookimpl`` methods), to test hooks in
  isolation: ``tgi_registry_with(my_plugin, installed=False)``.

And :func:`build_test_app`, the whole server app for a checkpoint folder, in-process.

Nothing heavy is imported until a fixture is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tgi_core.plugins import TGIPluginManager
    from tgi_core.registry import Registry


@pytest.fixture
def tgi_plugin_manager() -> TGIPluginManager:
    """A fresh plugin manager: built-ins and every installed ``tgi`` entry point."""
    from tgi_core.plugins import make_plugin_manager

    return make_plugin_manager()


@pytest.fixture
def tgi_registry(tgi_plugin_manager: TGIPluginManager) -> Registry:
    """The registries built from every installed plugin."""
    from tgi_core.registry import Registry

    return Registry.build(tgi_plugin_manager)


@pytest.fixture
def tgi_registry_with() -> Callable[..., Registry]:
    """Build a registry from the given plugin objects (and, by default, installed ones)."""
    from tgi_core.plugins import PluginInfo, make_plugin_manager
    from tgi_core.registry import Registry

    def build(*plugins: object, installed: bool = True) -> Registry:
        extra = []
        for index, plugin in enumerate(plugins):
            name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
            extra.append((plugin, PluginInfo(name, "local", "0", name)))
        environ = None if installed else {"TGI_LOAD_PLUGINS": ""}
        return Registry.build(make_plugin_manager(environ=environ, extra_plugins=extra))

    return build


def build_test_app(
    model_dir: str | None,
    environ: dict[str, str] | None = None,
    config_file: str | None = None,
    **options: str,
) -> Any:
    """The server's Litestar app for ``model_dir``, built in-process as ``tgi-core serve``
    would (``options`` are ``serve`` options by field name, as strings; ``config_file`` a
    deployment file, e.g. with ``[plugins.NAME]`` sections; no ``model_dir`` serves the
    default model source, as ``serve`` without ``--model-id`` does). Use it with
    ``litestar.testing.TestClient(app)``, whose lifespan starts and warms the engine."""
    from tgi_core.config import load_config
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry
    from tgi_core.server.app import build_app
    from tgi_core.server.builder import build_state

    cli = options if model_dir is None else {"model_id": model_dir, **options}
    resolved = load_config(cli=cli, config_file=config_file, environ={})
    registry = Registry.build(make_plugin_manager(environ=environ))
    resolved = resolved.with_registry(registry)
    return build_app(build_state(resolved, registry), registry, resolved.plugin_sections)
