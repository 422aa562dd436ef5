"""Named model sources: the ``register_model_sources`` hook, ``ModelSourceSpec`` and how
``--model-id`` resolves (a folder first, then a source name; no model id serves ``demo``).

Sources come from distributions written by the ``make_distribution`` fixture, loaded alone
with ``TGI_LOAD_PLUGINS`` so that an installed tgi-demo does not take part.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import tgi_core
from tgi_core.cli import cli
from tgi_core.errors import ConfigError, PluginError
from tgi_core.model import sources
from tgi_core.model.sources import resolve_model_id
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry

SOURCE_PLUGIN = """
import tgi_core

@tgi_core.hookimpl
def register_model_sources(register):
    register(tgi_core.ModelSourceSpec(name={name!r}, path_factory={factory!r},
                                      description="a test source"))

def folder():
    return {folder!r}
"""


@pytest.fixture
def add_source(make_distribution, tmp_path: Path):
    """``add_source(dist, name, folder=None, factory=None)``: a distribution registering
    one model source whose factory returns ``folder`` (a new folder by default)."""

    def add(dist: str, name: str, folder: str | None = None, factory: str | None = None) -> str:
        module = dist.replace("-", "_")
        if folder is None:
            folder = str(tmp_path / f"{module}-checkpoint")
            Path(folder).mkdir()
        code = SOURCE_PLUGIN.format(name=name, factory=factory or f"{module}:folder", folder=folder)
        make_distribution(dist, {module: code}, {dist.removeprefix("tgi-"): module})
        return folder

    return add


def build(*distributions: str) -> Registry:
    """The built-ins and only the named distributions."""
    return Registry.build(
        make_plugin_manager(environ={"TGI_LOAD_PLUGINS": ",".join(distributions)})
    )


def test_a_plugin_names_a_folder(add_source) -> None:
    folder = add_source("tgi-mine", "mine")
    registry = build("tgi-mine")
    spec = registry.model_sources["mine"]
    assert spec.description == "a test source"
    assert registry.model_sources.owner("mine").distribution == "tgi-mine"
    assert resolve_model_id("mine", registry) == (folder, "source", "mine")


def test_an_existing_folder_wins_over_a_source_name(
    add_source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_source("tgi-mine", "mine")
    monkeypatch.chdir(tmp_path)
    Path("mine").mkdir()
    assert resolve_model_id("mine", build("tgi-mine")) == ("mine", "folder", "mine")


def test_no_model_id_serves_the_demo_source(add_source) -> None:
    folder = add_source("tgi-fake-demo", "demo")
    assert resolve_model_id(None, build("tgi-fake-demo")) == (folder, "default", "demo")


def test_no_model_id_without_demo_says_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "installed_plugin_names", lambda: [])
    with pytest.raises(ConfigError) as error:
        resolve_model_id(None, build())
    assert str(error.value) == (
        "no model to serve: pass --model-id DIR or set MODEL_ID, or `pip install tgi-demo` "
        "to serve its demo model"
    )


def test_no_model_id_with_demo_left_out_names_tgi_load_plugins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources, "installed_plugin_names", lambda: ["tgi-demo"])
    with pytest.raises(ConfigError, match=r"tgi-demo.*installed but not loaded.*TGI_LOAD_PLUGINS"):
        resolve_model_id(None, build())


def test_an_unknown_name_lists_the_sources(add_source) -> None:
    add_source("tgi-mine", "mine")
    with pytest.raises(ConfigError) as error:
        resolve_model_id("gpt2", build("tgi-mine"))
    assert "model_id 'gpt2' is neither a folder nor a model source name" in str(error.value)
    assert "registered sources: mine (tgi-mine)" in str(error.value)


@pytest.mark.parametrize("model_id", ["org/model", "./nowhere", "~/models/x"])
def test_a_missing_path_is_left_to_the_checkpoint_loader(model_id: str) -> None:
    assert resolve_model_id(model_id, build()) == (model_id, "folder", model_id)


def test_two_distributions_cannot_register_one_name(add_source) -> None:
    add_source("tgi-one", "shared")
    add_source("tgi-two", "shared")
    with pytest.raises(PluginError) as error:
        build("tgi-one", "tgi-two")
    message = str(error.value)
    assert "registers the model source 'shared'" in message
    assert "distribution tgi-one" in message and "distribution tgi-two" in message


@pytest.mark.parametrize(
    ("name", "factory", "problem"),
    [
        ("no spaces", "tgi_x:folder", "model source name 'no spaces' is invalid"),
        ("ok", "not a reference", "must be a callable or a 'package.module:attribute'"),
    ],
)
def test_invalid_specs_are_refused(name: str, factory: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        tgi_core.ModelSourceSpec(name=name, path_factory=factory)


def test_an_invalid_spec_from_a_plugin_names_its_distribution(add_source) -> None:
    add_source("tgi-bad", "bad name")
    with pytest.raises(PluginError, match=r"distribution tgi-bad .*register_model_sources"):
        build("tgi-bad")


def test_a_source_whose_folder_is_missing(add_source, tmp_path: Path) -> None:
    add_source("tgi-gone", "gone", folder=str(tmp_path / "gone"))
    with pytest.raises(ConfigError, match=r"'gone' of plugin 'gone' \(distribution tgi-gone"):
        resolve_model_id("gone", build("tgi-gone"))


def test_a_failing_factory_names_its_distribution(add_source) -> None:
    add_source("tgi-oops", "oops", factory="tgi_oops:missing")
    with pytest.raises(ConfigError, match=r"distribution tgi-oops .*failed to give its folder"):
        resolve_model_id("oops", build("tgi-oops"))


def test_a_callable_factory(tmp_path: Path) -> None:
    spec = tgi_core.ModelSourceSpec(name="here", path_factory=lambda: str(tmp_path))
    assert spec.path() == tmp_path
    assert spec.factory_ref().endswith("<lambda>")


def test_listed_by_tgi_core_plugins(add_source, clean_environ) -> None:
    add_source("tgi-mine", "mine")
    env = {"TGI_LOAD_PLUGINS": "tgi-mine"}
    table = CliRunner().invoke(cli, ["plugins"], env=env).output
    assert re.search(r"^mine\s+tgi-mine\s+0\.1\s+model source mine", table, re.MULTILINE)
    data = json.loads(CliRunner().invoke(cli, ["plugins", "--json"], env=env).output)
    (mine,) = [p for p in data["plugins"] if p["distribution"] == "tgi-mine"]
    assert mine["model_sources"] == [
        {"name": "mine", "path_factory": "tgi_mine:folder", "description": "a test source"}
    ]
