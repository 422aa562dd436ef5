"""Typed registries built from the registration hooks of a plugin manager.

``Registry.build(pm)`` calls each ``register_*`` hook once per plugin, checks every
spec's type and name, and records which plugin registered it. The server, the engine
and ``tgi-core plugins`` read these plain registries; no hook runs after this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tgi_core.errors import PluginError
from tgi_core.plugins import PluginInfo, TGIPluginManager
from tgi_core.specs import (
    AnySpec,
    AttentionBackendSpec,
    ConfigSectionSpec,
    FrontendSpec,
    ModelSourceSpec,
    ModelSpec,
    QuantizerSpec,
)

S = TypeVar("S", bound=AnySpec)


class SpecRegistry(Generic[S]):
    """Specs of one type, by unique name, each with the plugin that registered it."""

    def __init__(self, kind: str, spec_type: type[S]) -> None:
        self.kind = kind
        #: the key of this kind in JSON listings: ``attention_backends``, ...
        self.json_key = kind.replace(" ", "_") + "s"
        self.spec_type = spec_type
        self._specs: dict[str, S] = {}
        self._owners: dict[str, PluginInfo] = {}

    def add(self, spec: object, owner: PluginInfo, hook: str) -> None:
        """Add ``spec``; a wrong type or a name already taken raises PluginError."""
        if not isinstance(spec, self.spec_type):
            raise PluginError(
                f"{owner.describe()} passed {type(spec).__name__} {spec!r:.80} to the "
                f"register callback of {hook}; expected tgi_core.{self.spec_type.__name__}"
            )
        if spec.name in self._specs:
            other = self._owners[spec.name]
            raise PluginError(
                f"{owner.describe()} registers the {self.kind} {spec.name!r}, which "
                f"{other.describe()} already registered; {self.kind} names must be unique"
            )
        self._specs[spec.name] = spec
        self._owners[spec.name] = owner

    def __getitem__(self, name: str) -> S:
        try:
            return self._specs[name]
        except KeyError:
            known = ", ".join(sorted(self._specs)) or "none installed"
            raise KeyError(f"no {self.kind} named {name!r}; available: {known}") from None

    def get(self, name: str) -> S | None:
        return self._specs.get(name)

    def owner(self, name: str) -> PluginInfo:
        """The plugin that registered ``name``."""
        return self._owners[name]

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[S]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


class ModelRegistry(SpecRegistry[ModelSpec]):
    """Model specs, also indexed by the Hugging Face architecture names they serve."""

    def __init__(self) -> None:
        super().__init__("model", ModelSpec)
        self._by_architecture: dict[str, str] = {}

    def add(self, spec: object, owner: PluginInfo, hook: str) -> None:
        if isinstance(spec, ModelSpec):
            for architecture in spec.architectures:
                taken_by = self._by_architecture.get(architecture)
                if taken_by is not None:
                    raise PluginError(
                        f"{owner.describe()} registers model {spec.name!r} for architecture "
                        f"{architecture!r}, which model {taken_by!r} of "
                        f"{self.owner(taken_by).describe()} already serves; an architecture "
                        "can be served by one installed plugin"
                    )
        super().add(spec, owner, hook)
        assert isinstance(spec, ModelSpec)
        for architecture in spec.architectures:
            self._by_architecture[architecture] = spec.name

    def for_architecture(self, architecture: str) -> ModelSpec | None:
        """The model that serves ``architecture`` (a config.json ``architectures`` item)."""
        name = self._by_architecture.get(architecture)
        return None if name is None else self._specs[name]

    def for_model_type(self, model_type: str) -> ModelSpec | None:
        """The first model that lists ``model_type`` (config.json ``model_type``)."""
        return next((spec for spec in self if model_type in spec.model_types), None)

    def architectures(self) -> list[str]:
        return sorted(self._by_architecture)


@dataclass
class Registry:
    """Everything the installed plugins registered, by kind."""

    plugins: list[PluginInfo] = field(default_factory=list)
    models: ModelRegistry = field(default_factory=ModelRegistry)
    attention_backends: SpecRegistry[AttentionBackendSpec] = field(
        default_factory=lambda: SpecRegistry("attention backend", AttentionBackendSpec)
    )
    quantizers: SpecRegistry[QuantizerSpec] = field(
        default_factory=lambda: SpecRegistry("quantizer", QuantizerSpec)
    )
    frontends: SpecRegistry[FrontendSpec] = field(
        default_factory=lambda: SpecRegistry("frontend", FrontendSpec)
    )
    config_sections: SpecRegistry[ConfigSectionSpec] = field(
        default_factory=lambda: SpecRegistry("config section", ConfigSectionSpec)
    )
    model_sources: SpecRegistry[ModelSourceSpec] = field(
        default_factory=lambda: SpecRegistry("model source", ModelSourceSpec)
    )

    def by_hook(self) -> dict[str, SpecRegistry[Any]]:
        """Each registration hook's name and the registry it fills, in listing order."""
        return {
            "register_models": self.models,
            "register_attention_backends": self.attention_backends,
            "register_quantizers": self.quantizers,
            "register_frontends": self.frontends,
            "register_config_sections": self.config_sections,
            "register_model_sources": self.model_sources,
        }

    @classmethod
    def build(cls, pm: TGIPluginManager) -> Registry:
        """Call every registration hook of every plugin, in registration order.

        Each plugin's implementation is called through pluggy on its own (a subset hook
        caller), so tracing and hook wrappers apply and every spec has a known owner.
        """
        registry = cls(plugins=pm.infos())
        plugins = list(pm.plugins_in_order())
        for hook_name, target in registry.by_hook().items():
            owners = {id(impl.plugin) for impl in getattr(pm.hook, hook_name).get_hookimpls()}
            for plugin, info in plugins:
                if id(plugin) not in owners:
                    continue
                others = [other for other, _ in plugins if other is not plugin]
                caller = pm.subset_hook_caller(hook_name, remove_plugins=others)
                try:
                    caller(register=_register_callback(target, info, hook_name))
                except PluginError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"{info.describe()} failed in {hook_name}: {type(exc).__name__}: {exc}"
                    ) from exc
        return registry

    def registered_by(self, plugin_name: str) -> dict[str, list[AnySpec]]:
        """What one plugin registered: ``{json_key: specs}`` for every kind, in order."""
        return {
            target.json_key: [
                spec for spec in target if target.owner(spec.name).name == plugin_name
            ]
            for target in self.by_hook().values()
        }


def _register_callback(
    target: SpecRegistry[Any], info: PluginInfo, hook_name: str
) -> Callable[[object], None]:
    def register(spec: object) -> None:
        target.add(spec, info, hook_name)

    return register
