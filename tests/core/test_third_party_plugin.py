"""Real plugin distributions, installed with pip into a temporary folder.

tests/fixtures/tgi-testplugin registers one spec of every kind; docs/examples/tgi-hello
is the plugin guide's example. Both are found through importlib.metadata like any
installed plugin, in this process and in a fresh ``tgi-core`` process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from tgi_core.config import load_config
from tgi_core.context import FrontendContext
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def tgi_core_cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    if "TGI_LOAD_PLUGINS" not in env:
        environ.pop("TGI_LOAD_PLUGINS", None)
    return subprocess.run(
        [sys.executable, "-m", "tgi_core.cli", *args],
        env=environ,
        capture_output=True,
        text=True,
        check=False,
    )


def test_registries_hold_every_kind(with_installed_plugins) -> None:
    registry = Registry.build(make_plugin_manager(environ={}))
    assert registry.models.for_architecture("TestLMForCausalLM").name == "testlm"
    assert registry.attention_backends["test-attention"].features == {"causal", "paged_kv"}
    assert registry.quantizers["test-quant"].quant_methods == ("testq",)
    assert registry.frontends["test-frontend"].routes == ("/test",)
    assert "testplugin" in registry.config_sections
    owner = registry.models.owner("testlm")
    assert (owner.distribution, owner.version) == ("tgi-testplugin", "1.2.3")
    # factories are imported only when loaded
    assert "tgi_testplugin.impl" not in sys.modules
    assert registry.models["testlm"].load()({"x": 1}, None, None) == ("model", {"x": 1})
    assert "tgi_testplugin.impl" in sys.modules


def test_plugins_json_in_a_fresh_process(with_installed_plugins) -> None:
    result = tgi_core_cli(with_installed_plugins, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["distribution"]: p for p in json.loads(result.stdout)["plugins"]}
    assert {"tgi-llama", "tgi-testplugin", "tgi-hello"} <= set(plugins)
    test = plugins["tgi-testplugin"]
    assert test["version"] == "1.2.3" and test["name"] == "testplugin"
    assert test["models"][0]["architectures"] == ["TestLMForCausalLM"]
    assert test["attention_backends"][0]["features"] == ["causal", "paged_kv"]
    assert test["quantizers"][0]["quant_methods"] == ["testq"]
    assert test["frontends"][0]["routes"] == ["/test"]
    assert test["config_sections"][0]["schema"]["fields"] == ["threshold", "label"]


def test_plugins_table_in_a_fresh_process(with_installed_plugins) -> None:
    result = tgi_core_cli(with_installed_plugins, "plugins")
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^testplugin\s+tgi-testplugin\s+1\.2\.3\s+model testlm: "
        r"TestLMForCausalLM$",
        result.stdout,
        re.MULTILINE,
    )
    assert "attention test-attention on cpu: causal, paged_kv" in result.stdout
    assert "quantizer test-quant (quantizes at load; loads testq)" in result.stdout
    assert "frontend hello: /hello" in result.stdout


@pytest.mark.parametrize(
    ("allow", "expected"),
    [
        ("tgi-testplugin", {"tgi-testplugin"}),
        ("hello,llama", {"tgi-hello", "tgi-llama"}),
        ("", set()),
    ],
)
def test_load_plugins_filter_in_a_fresh_process(with_installed_plugins, allow, expected) -> None:
    result = tgi_core_cli(with_installed_plugins, "plugins", "--json", TGI_LOAD_PLUGINS=allow)
    assert result.returncode == 0, result.stderr
    plugins = json.loads(result.stdout)["plugins"]
    assert {p["distribution"] for p in plugins if not p["builtin"]} == expected
    assert plugins[0]["builtin"] and plugins[0]["distribution"] == "tgi-core"


def test_plugin_config_section_through_the_cli(with_installed_plugins, tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.toml"
    deploy.write_text("[plugins.testplugin]\nthreshold = 9\n[plugins.hello]\nexcited = true\n")
    result = tgi_core_cli(with_installed_plugins, "config", "--json", "--config", str(deploy))
    assert result.returncode == 0, result.stderr
    sections = json.loads(result.stdout)["plugin_sections"]
    assert sections["testplugin"] == {"threshold": 9, "label": "default"}
    assert sections["hello"] == {"greeting": "Hello", "excited": True}
    deploy.write_text("[plugins.testplugin]\nthreshold = 'x'\n")
    result = tgi_core_cli(with_installed_plugins, "config", "--config", str(deploy))
    assert result.returncode == 2
    assert "[plugins.testplugin]" in result.stderr and "tgi-testplugin" in result.stderr


def test_the_guide_example_serves_its_route(with_installed_plugins, tmp_path: Path) -> None:
    registry = Registry.build(make_plugin_manager(environ={}))
    deploy = tmp_path / "deploy.toml"
    deploy.write_text('[plugins.hello]\ngreeting = "Hola"\n')
    resolved = load_config(config_file=deploy, environ={}).with_registry(registry)
    handlers = registry.frontends["hello"].load()(
        FrontendContext(resolved.config, resolved.plugin_sections)
    )
    with TestClient(Litestar(route_handlers=handlers)) as client:
        assert client.get("/hello").json() == {"message": "Hola, world."}


def test_the_guide_example_own_tests_pass(with_installed_plugins) -> None:
    """The example's tests use the fixtures tgi-core ships as a pytest plugin."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(REPO / "docs/examples/tgi-hello/tests"),
        ],
        env={**os.environ, "PYTHONPATH": str(with_installed_plugins)},
        capture_output=True,
        text=True,
        cwd=with_installed_plugins,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
