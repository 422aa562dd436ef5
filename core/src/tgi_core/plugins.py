"""The plugin manager: built-in plugins first, then every entry point of group ``tgi``.

``make_plugin_manager()`` builds a fresh manager on every call (as pytest does), so a
server, a CLI command or a test never shares plugin state with another. Loading is
controlled by ``TGI_LOAD_PLUGINS``: unset loads every installed plugin, a
comma-separated list loads only those (by distribution or entry-point name), and an
empty value loads none. Built-in plugins are always loaded.

This module imports neither torch nor litestar.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType

import pluggy

from tgi_core import hookspecs
from tgi_core.errors import PluginError

ENTRY_POINT_GROUP = "tgi"
LOAD_PLUGINS_ENV = "TGI_LOAD_PLUGINS"
TRACE_PLUGINS_ENV = "TGI_TRACE_PLUGINS"

#: Modules registered before any entry point, through the very same hooks.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "tgi_core.attention.default_backends",
    "tgi_core.server.builtin_frontends",
)


@dataclass(frozen=True, slots=True)
class PluginInfo:
    """Where a registered plugin came from."""

    name: str
    distribution: str
    version: str
    module: str
    builtin: bool = False

    def describe(self) -> str:
        """``plugin 'x' (distribution tgi-x 1.0)``: how error messages name a plugin."""
        return f"plugin {self.name!r} (distribution {self.distribution} {self.version})"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _core_version() -> str:
    try:
        return importlib.metadata.version("tgi-core")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


class TGIPluginManager(pluggy.PluginManager):
    """A pluggy manager for project ``tgi`` that remembers where each plugin came from."""

    def __init__(self) -> None:
        super().__init__("tgi")
        self.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}

    # -- registration ---------------------------------------------------------------

    def register_plugin(self, plugin: object, info: PluginInfo) -> None:
        """Register ``plugin``; any problem becomes a :class:`PluginError` naming it."""
        existing = self._infos.get(info.name)
        if existing is not None:
            raise PluginError(
                f"{info.describe()} uses the plugin name {info.name!r}, which "
                f"{existing.describe()} already uses; one of them must be renamed or "
                f"left out with {LOAD_PLUGINS_ENV}"
            )
        try:
            self.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            raise PluginError(f"{info.describe()} is invalid: {detail}") from exc
        self._infos[info.name] = info

    def load_builtins(self, modules: Iterable[str] = DEFAULT_PLUGINS) -> None:
        """Import and register the core's own plugins."""
        version = _core_version()
        for module_name in modules:
            module = importlib.import_module(module_name)
            short = module_name.rsplit(".", 1)[-1]
            info = PluginInfo(short, "tgi-core", version, module_name, builtin=True)
            self.register_plugin(module, info)

    def load_entrypoints(self, allow: frozenset[str] | None = None) -> None:
        """Import and register every ``tgi`` entry point, or only those in ``allow``.

        ``allow`` holds normalized distribution or entry-point names; ``None`` allows all.
        """
        for entry_point in tgi_entry_points():
            dist_name, version = _distribution_of(entry_point)
            if (
                allow is not None
                and not {_normalize(dist_name), _normalize(entry_point.name)} & allow
            ):
                continue
            info = PluginInfo(entry_point.name, dist_name, version, entry_point.value)
            try:
                plugin = entry_point.load()
            except (Exception, SystemExit) as exc:
                raise PluginError(
                    f"{info.describe()} failed to import {entry_point.value!r}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            self.register_plugin(plugin, info)

    def check_pending_hooks(self) -> None:
        """Fail on a hook implementation that matches no hook of tgi (a misspelling)."""
        try:
            self.check_pending()
        except pluggy.PluginValidationError as exc:
            info = self.info(exc.plugin)
            hook_names = sorted(
                name for name, caller in vars(self.hook).items() if caller.has_spec()
            )
            unknown = [
                name
                for name, caller in vars(self.hook).items()
                if not name.startswith("_")
                and not caller.has_spec()
                and any(impl.plugin is exc.plugin for impl in caller.get_hookimpls())
            ]
            hint = ""
            for name in unknown:
                close = difflib.get_close_matches(name, hook_names, n=1)
                if close:
                    hint = f" (did you mean {close[0]!r}?)"
            raise PluginError(
                f"{info.describe()} implements {', '.join(repr(n) for n in unknown)}, "
                f"which is not a tgi hook{hint}; tgi's hooks are: {', '.join(hook_names)}"
            ) from exc

    # -- queries --------------------------------------------------------------------

    def info(self, plugin: object) -> PluginInfo:
        """The :class:`PluginInfo` of a registered plugin object."""
        name = self.get_name(plugin)
        if name is None or name not in self._infos:
            return PluginInfo(name or repr(plugin), "?", "?", repr(plugin))
        return self._infos[name]

    def infos(self) -> list[PluginInfo]:
        """Every registered plugin, in registration order (built-ins first)."""
        return list(self._infos.values())

    def plugins_in_order(self) -> Iterator[tuple[object, PluginInfo]]:
        """Registered plugin objects with their info, in registration order."""
        for name, info in self._infos.items():
            plugin = self.get_plugin(name)
            if plugin is not None:
                yield plugin, info


def tgi_entry_points() -> list[importlib.metadata.EntryPoint]:
    """Every installed ``tgi`` entry point (one per distribution name and entry-point name)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _distribution_of(entry_point: importlib.metadata.EntryPoint) -> tuple[str, str]:
    dist = entry_point.dist
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or dist.name, dist.version


def installed_plugin_names() -> list[str]:
    """Distribution names that provide a ``tgi`` entry point, sorted."""
    return sorted({_distribution_of(ep)[0] for ep in tgi_entry_points()})


def parse_allow_list(environ: Mapping[str, str]) -> frozenset[str] | None:
    """Read ``TGI_LOAD_PLUGINS``: ``None`` when unset, else the normalized names."""
    raw = environ.get(LOAD_PLUGINS_ENV)
    if raw is None:
        return None
    return frozenset(_normalize(part.strip()) for part in raw.split(",") if part.strip())


def _check_allow_list(allow: frozenset[str]) -> None:
    available: set[str] = set()
    for entry_point in tgi_entry_points():
        available |= {_normalize(_distribution_of(entry_point)[0]), _normalize(entry_point.name)}
    missing = sorted(allow - available)
    if missing:
        installed = ", ".join(installed_plugin_names()) or "none"
        raise PluginError(
            f"{LOAD_PLUGINS_ENV} names {', '.join(missing)}, which no installed "
            f"distribution provides; installed plugins: {installed}"
        )


def make_plugin_manager(
    *,
    environ: Mapping[str, str] | None = None,
    builtins: Iterable[str] = DEFAULT_PLUGINS,
    extra_plugins: Iterable[tuple[object, PluginInfo]] = (),
) -> TGIPluginManager:
    """Build a fresh plugin manager: built-ins, then allowed entry points, then extras.

    ``extra_plugins`` registers objects directly (tests, embedding applications).
    Raises :class:`PluginError` naming the distribution at fault.
    """
    environ = os.environ if environ is None else environ
    pm = TGIPluginManager()
    if environ.get(TRACE_PLUGINS_ENV):
        pm.trace.root.setwriter(sys.stderr.write)
        pm.enable_tracing()
    pm.load_builtins(builtins)
    allow = parse_allow_list(environ)
    if allow:
        _check_allow_list(allow)
    pm.load_entrypoints(allow)
    for plugin, info in extra_plugins:
        pm.register_plugin(plugin, info)
    pm.check_pending_hooks()
    return pm


def plugin_module_info(module: ModuleType, distribution: str = "local") -> PluginInfo:
    """A :class:`PluginInfo` for a module registered by hand (tests, applications)."""
    short = module.__name__.rsplit(".", 1)[-1]
    return PluginInfo(short, distribution, "0", module.__name__)
