"""What ``tgi-core plugins`` prints: installed plugins and what each registered."""

from __future__ import annotations

import dataclasses
from typing import Any

from tgi_core.registry import Registry
from tgi_core.specs import (
    AnySpec,
    AttentionBackendSpec,
    ConfigSectionSpec,
    FrontendSpec,
    ModelSourceSpec,
    ModelSpec,
    QuantizerSpec,
)


def spec_as_json(spec: AnySpec) -> dict[str, Any]:
    """A spec as plain JSON values (sets sorted, factories and schemas as text)."""
    result: dict[str, Any] = {}
    for spec_field in dataclasses.fields(spec):
        value = getattr(spec, spec_field.name)
        if spec_field.name in ("factory", "path_factory"):
            value = spec.factory_ref()  # type: ignore[union-attr]
        elif spec_field.name == "schema":
            value = {
                "name": f"{value.__module__}.{value.__qualname__}",
                "fields": list(value.__struct_fields__),
            }
        elif isinstance(value, frozenset):
            value = sorted(value)
        elif isinstance(value, tuple):
            value = list(value)
        result[spec_field.name] = value
    return result


def plugins_as_json(registry: Registry) -> dict[str, Any]:
    """``tgi-core plugins --json``: one object per plugin, in load order."""
    plugins = []
    for info in registry.plugins:
        entry: dict[str, Any] = dataclasses.asdict(info)
        for key, specs in registry.registered_by(info.name).items():
            entry[key] = [spec_as_json(spec) for spec in specs]
        plugins.append(entry)
    return {"plugins": plugins}


def describe_spec(spec: AnySpec) -> str:
    """One line saying what a spec provides, for the table."""
    if isinstance(spec, ModelSpec):
        extra = f" ({spec.kind})" if spec.kind != "causal" else ""
        return f"model {spec.name}{extra}: {', '.join(spec.architectures)}"
    if isinstance(spec, AttentionBackendSpec):
        features = ", ".join(sorted(spec.features)) or "no features"
        return f"attention {spec.name} on {'/'.join(spec.devices)}: {features}"
    if isinstance(spec, QuantizerSpec):
        loads = f" (loads {', '.join(spec.quant_methods)})" if spec.quant_methods else ""
        return f"quantizer {spec.name}{loads}"
    if isinstance(spec, FrontendSpec):
        routes = f": {' '.join(spec.routes)}" if spec.routes else ""
        return f"frontend {spec.name}{routes}"
    if isinstance(spec, ModelSourceSpec):
        return f"model source {spec.name}: --model-id {spec.name}"
    assert isinstance(spec, ConfigSectionSpec)
    return f"config [plugins.{spec.name}]"


def print_table(table: Any) -> None:
    """Print a rich table; off a terminal, lines are never cut, wrapped or padded."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=10_000)
    with console.capture() as capture:
        console.print(table)
    print("\n".join(line.rstrip() for line in capture.get().splitlines()))


def render_plugins_table(registry: Registry) -> None:
    """Print the plugin table to the terminal."""
    from rich.table import Table
    from rich.text import Text

    table = Table("plugin", "distribution", "version", "registered", box=None, pad_edge=False)
    for info in registry.plugins:
        registered = registry.registered_by(info.name).values()
        lines = [describe_spec(spec) for specs in registered for spec in specs]
        distribution = f"{info.distribution} (built-in)" if info.builtin else info.distribution
        registered_text = Text("\n".join(lines) or "nothing")
        table.add_row(info.name, distribution, info.version, registered_text)
    if not registry.plugins:
        print("No plugins loaded.")
        return
    print_table(table)
