"""Tests a plugin author writes, with the fixtures tgi-core ships for pytest."""

import tgi_hello
from litestar import Litestar
from litestar.testing import TestClient

from tgi_core.config import load_config
from tgi_core.context import FrontendContext


def test_plugin_is_installed(tgi_registry):
    assert "hello" in tgi_registry.frontends
    assert tgi_registry.frontends.owner("hello").distribution == "tgi-hello"


def test_hooks_in_isolation(tgi_registry_with):
    registry = tgi_registry_with(tgi_hello, installed=False)
    assert registry.config_sections["hello"].schema is tgi_hello.HelloConfig


def test_route_uses_the_config_section(tgi_registry, tmp_path):
    deploy = tmp_path / "deploy.toml"
    deploy.write_text('[plugins.hello]\ngreeting = "Bonjour"\nexcited = true\n')
    resolved = load_config(config_file=deploy, environ={}).with_registry(tgi_registry)
    ctx = FrontendContext(resolved.config, resolved.plugin_sections)
    handlers = tgi_registry.frontends["hello"].load()(ctx)
    with TestClient(Litestar(route_handlers=handlers)) as client:
        assert client.get("/hello", params={"name": "tgi"}).json() == {"message": "Bonjour, tgi!"}
