"""What ``tgi-core plugins`` prints: installed plugins and what each registered, and the
tensor-parallel shard count ``tgi-core serve`` would use here."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
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


def plugins_as_json(registry: Registry, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``tgi-core plugins --json``: one object per plugin, in load order, and sharding."""
    plugins = []
    for info in registry.plugins:
        entry: dict[str, Any] = dataclasses.asdict(info)
        for key, specs in registry.registered_by(info.name).items():
            entry[key] = [spec_as_json(spec) for spec in specs]
        plugins.append(entry)
    return {"plugins": plugins, "sharding": sharding_as_json(environ)}


def sharding_as_json(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The shard count ``tgi-core serve`` would start with in this environment
    (``NUM_SHARD``, or a launcher's ``WORLD_SIZE``) and where it comes from."""
    from tgi_core.config import load_config
    from tgi_core.distributed.topology import resolve_topology
    from tgi_core.errors import ConfigError

    try:
        resolved = load_config(environ=environ)
        topology = resolve_topology(resolved, environ)
    except ConfigError as exc:
        return {"num_shard": None, "error": str(exc)}
    if topology.launcher == "external":
        source = "env:WORLD_SIZE"
    else:
        source = resolved.sources["num_shard"].short()
    return {"num_shard": topology.world_size, "source": source, "launcher": topology.launcher}


def describe_sharding(sharding: Mapping[str, Any]) -> str:
    """One line: the shard count, its source, and the collective backends."""
    if sharding["num_shard"] is None:
        return f"Sharding: unknown ({sharding['error']})"
    count = sharding["num_shard"]
    shards = "1 shard" if count == 1 else f"{count} shards"
    return (
        f"Sharding: {shards} (from {sharding['source']}); tensor parallelism on "
        "torch.distributed: gloo on CPU, NCCL on CUDA"
    )


def describe_spec(spec: AnySpec) -> str:
    """One line saying what a spec provides, for the table."""
    if isinstance(spec, ModelSpec):
        extra = f" ({spec.kind})" if spec.kind != "causal" else ""
        return f"model {spec.name}{extra}: {', '.join(spec.architectures)}"
    if isinstance(spec, AttentionBackendSpec):
        features = ", ".join(sorted(spec.features)) or "no features"
        return f"attention {spec.name} on {'/'.join(spec.devices)}: {features}"
    if isinstance(spec, QuantizerSpec):
        what = ["quantizes at load"] if spec.quantizes_at_load else []
        if spec.quant_methods:
            what.append(f"loads {', '.join(spec.quant_methods)}")
        return f"quantizer {spec.name} ({'; '.join(what) or 'nothing'})"
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
    else:
        print_table(table)
    print(describe_sharding(sharding_as_json()))
