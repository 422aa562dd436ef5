"""Listing plugins must stay cheap: no torch (or litestar) behind the plugin system."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
{imports}
heavy = sorted(name for name in ("torch", "litestar", "transformers") if name in sys.modules)
assert not heavy, heavy
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import tgi_core",
        "import tgi_core.hookspecs",
        "import tgi_core.plugins",
        "import tgi_core.registry, tgi_core.config, tgi_core.cli, tgi_core.listing",
        "from tgi_core.plugins import make_plugin_manager\n"
        "from tgi_core.registry import Registry\n"
        "Registry.build(make_plugin_manager())",
        "from tgi_core.cli import main\n"
        "try:\n    main(['plugins', '--json'])\nexcept SystemExit:\n    pass",
        # the load generator runs on client machines: no torch there either
        "import tgi_core.bench.command, tgi_core.bench.report, tgi_core.bench.stats\n"
        "from tgi_core.cli import main\n"
        "try:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass",
    ],
)
def test_plugin_system_does_not_import_torch(imports: str) -> None:
    subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], check=True)
