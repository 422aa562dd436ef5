"""The docs move with the code: generated reference, hooks, modules, the example plugin."""

from __future__ import annotations

import re
from pathlib import Path

from tgi_core import config_docs, hookspecs
from tgi_core.plugins import TGIPluginManager

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"


def test_configuration_reference_is_up_to_date() -> None:
    committed = (DOCS / "configuration.md").read_text()
    assert committed == config_docs.render(), "docs/configuration.md is stale: run `make docs`"


def hook_names() -> list[str]:
    pm = TGIPluginManager()
    return sorted(name for name, caller in vars(pm.hook).items() if caller.has_spec())


def test_every_hook_has_a_contract_and_is_in_the_plugin_guide() -> None:
    guide = (DOCS / "plugins.md").read_text()
    assert hook_names()
    for name in hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert ":param" in doc and len(doc.split()) > 20, name
        assert f"`{name}" in guide, f"docs/plugins.md does not document {name}"


def test_architecture_names_every_core_module() -> None:
    architecture = (DOCS / "architecture.md").read_text()
    package = REPO / "core/src/tgi_core"
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package).as_posix()
        if relative.endswith("__init__.py") and relative != "__init__.py":
            relative = relative.removesuffix("__init__.py")
        assert relative in architecture, f"docs/architecture.md does not mention {relative}"


def test_plugin_guide_example_is_the_checked_in_plugin() -> None:
    guide = (DOCS / "plugins.md").read_text()
    example = REPO / "docs/examples/tgi-hello"
    for path in ("pyproject.toml", "src/tgi_hello/__init__.py", "src/tgi_hello/routes.py"):
        source = (example / path).read_text().strip()
        assert source in guide, f"docs/plugins.md must quote docs/examples/tgi-hello/{path}"


def test_readme_quickstart_is_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text()
    quickstart = re.search(r"## Quickstart\n+```bash\n(.*?)```", readme, re.DOTALL)
    assert quickstart, "README.md needs a Quickstart section with a bash block"
    lines = (line.split("#", 1)[0].strip() for line in quickstart.group(1).splitlines())
    commands = [line for line in lines if line]
    assert commands == ["make serve", "make test"]
