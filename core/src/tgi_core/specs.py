"""The typed spec objects that plugins register.

A spec is small, frozen and cheap to build: it says *what* a plugin provides and
*where* the implementation lives (a ``"package.module:attribute"`` reference that is
imported only when the thing is actually used), so listing plugins never imports torch.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

#: A lazily imported callable: ``"package.module:attribute"`` (dots allowed after the
#: colon), or the callable itself.
Factory = str | Callable[..., Any]

ModelKind = Literal["causal", "seq2seq"]

#: Attention features a backend may declare and a model may require.
ATTENTION_FEATURES = frozenset(
    {
        "causal",  # causal self-attention over packed sequences
        "paged_kv",  # KV cache in fixed-size blocks addressed by a block table
        "prefix_caching",  # blocks shared between sequences with a common prefix
        "sliding_window",  # attention limited to the last N positions
        "alibi",  # ALiBi linear position biases (BLOOM)
        "relative_bias",  # T5 bucketed relative position bias
        "cross_attention",  # decoder attention over encoder outputs (T5)
        "gqa",  # fewer key/value heads than query heads (grouped-query, multi-query)
    }
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def load_factory(factory: Factory) -> Callable[..., Any]:
    """Return the callable that ``factory`` names, importing its module if needed."""
    if callable(factory):
        return factory
    module_name, _, attr_path = factory.partition(":")
    target: Any = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        target = getattr(target, attr)
    if not callable(target):
        raise TypeError(f"{factory!r} is not callable")
    return target  # type: ignore[no-any-return]


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"{kind} name {name!r} is invalid: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )


def _check_factory(kind: str, name: str, factory: Factory) -> None:
    if callable(factory):
        return
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise ValueError(
            f"{kind} {name!r}: factory {factory!r} must be a callable or a "
            "'package.module:attribute' string"
        )


def _check_strings(kind: str, name: str, label: str, values: tuple[str, ...]) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{kind} {name!r}: {label} must be a tuple of non-empty strings")


class _Spec:
    """Shared behaviour: every spec has a name and a lazily loaded factory."""

    __slots__ = ()
    name: str
    factory: Factory

    def load(self) -> Callable[..., Any]:
        """Import and return the implementation this spec points to."""
        return load_factory(self.factory)

    def factory_ref(self) -> str:
        """The factory as text, for listings."""
        return factory_ref(self.factory)


def factory_ref(factory: Factory) -> str:
    """A factory as ``"module:attribute"`` text, for listings."""
    if isinstance(factory, str):
        return factory
    return f"{factory.__module__}:{factory.__qualname__}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec(_Spec):
    """A model implementation and the Hugging Face checkpoints it serves.

    ``factory`` is called as ``factory(hf_config, ctx)`` (the checkpoint's transformers
    config and a ``tgi_core.model.base.ModelContext``) and returns a ``torch.nn.Module``;
    the core then loads its weights (the contract is in ``tgi_core.model.base``).
    """

    name: str
    architectures: tuple[str, ...]
    factory: Factory
    kind: ModelKind = "causal"
    #: config.json ``model_type`` values, used when a checkpoint lists no architectures.
    model_types: tuple[str, ...] = ()
    #: attention features (see ``ATTENTION_FEATURES``) the model needs from a backend.
    requires: frozenset[str] = frozenset({"causal"})
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("model", self.name)
        _check_factory("model", self.name, self.factory)
        _check_strings("model", self.name, "architectures", self.architectures)
        _check_strings("model", self.name, "model_types", self.model_types)
        if not self.architectures:
            raise ValueError(f"model {self.name!r}: architectures must not be empty")
        if self.kind not in ("causal", "seq2seq"):
            raise ValueError(f"model {self.name!r}: kind must be 'causal' or 'seq2seq'")


@dataclass(frozen=True, slots=True, kw_only=True)
class AttentionBackendSpec(_Spec):
    """An attention implementation: KV-cache layout, cache writes and attention kernels.

    ``factory()`` returns the backend object, a ``tgi_core.attention.backend.
    AttentionBackend``; ``features`` must equal the object's own.
    """

    name: str
    factory: Factory
    #: what the backend can do (see ``ATTENTION_FEATURES``).
    features: frozenset[str] = frozenset()
    #: torch device types it runs on.
    devices: tuple[str, ...] = ("cpu",)
    #: among backends that fit a model, the highest priority is chosen by default.
    priority: int = 0
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("attention backend", self.name)
        _check_factory("attention backend", self.name, self.factory)
        _check_strings("attention backend", self.name, "devices", self.devices)
        if not isinstance(self.features, frozenset):
            raise ValueError(f"attention backend {self.name!r}: features must be a frozenset")


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizerSpec(_Spec):
    """A weight quantization method, chosen with ``--quantize NAME``.

    ``factory(ctx)`` is called with a ``tgi_core.model.quantization.QuantizerContext``
    and returns a ``Quantizer`` (the contract is in that module). ``quant_methods``
    lists the ``quantization_config.quant_method`` values of pre-quantized checkpoints
    that this quantizer loads (it is then chosen for them without ``--quantize``);
    ``quantizes_at_load`` says whether it also quantizes a float checkpoint's weights
    while loading them.
    """

    name: str
    factory: Factory
    quant_methods: tuple[str, ...] = ()
    quantizes_at_load: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("quantizer", self.name)
        _check_factory("quantizer", self.name, self.factory)
        _check_strings("quantizer", self.name, "quant_methods", self.quant_methods)


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontendSpec(_Spec):
    """An API frontend: ``factory(ctx)`` returns the Litestar route handlers it serves.

    ``routes`` lists the paths for listings and conflict checks.
    """

    name: str
    factory: Factory
    routes: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("frontend", self.name)
        _check_factory("frontend", self.name, self.factory)
        _check_strings("frontend", self.name, "routes", self.routes)
        if not all(route.startswith("/") for route in self.routes):
            raise ValueError(f"frontend {self.name!r}: every route must start with '/'")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigSectionSpec:
    """A plugin's own configuration: the ``[plugins.NAME]`` table of a config file.

    ``schema`` is a ``msgspec.Struct`` subclass; the table is validated against it at
    startup and every field must have a default (an absent table means all defaults).
    """

    name: str
    schema: type[msgspec.Struct]
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("config section", self.name)
        if not (isinstance(self.schema, type) and issubclass(self.schema, msgspec.Struct)):
            raise ValueError(
                f"config section {self.name!r}: schema must be a msgspec.Struct subclass"
            )
        required = [
            field.name
            for field in msgspec.structs.fields(self.schema)
            if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT
        ]
        if required:
            raise ValueError(
                f"config section {self.name!r}: every field needs a default (an absent "
                f"section means all defaults); no default: {', '.join(required)}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSourceSpec:
    """A name that ``--model-id`` accepts besides a folder: ``--model-id NAME`` serves the
    checkpoint folder that ``path_factory()`` returns (a ``str`` or ``os.PathLike``).

    ``path_factory`` is called only when the name is served, so a source may find or
    unpack its folder lazily. A ``--model-id`` that is an existing folder is always
    served as that folder; the source named ``demo`` is also served when no model is
    given (``tgi_core.model.sources``).
    """

    name: str
    path_factory: Factory
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("model source", self.name)
        _check_factory("model source", self.name, self.path_factory)

    def path(self) -> Path:
        """Call ``path_factory`` and return the folder it names (not checked here)."""
        folder = load_factory(self.path_factory)()
        if not isinstance(folder, str | os.PathLike):
            raise TypeError(
                f"model source {self.name!r}: {self.factory_ref()} returned "
                f"{type(folder).__name__}, not a path"
            )
        return Path(folder)

    def factory_ref(self) -> str:
        """``path_factory`` as text, for listings."""
        return factory_ref(self.path_factory)


AnySpec = (
    ModelSpec
    | AttentionBackendSpec
    | QuantizerSpec
    | FrontendSpec
    | ConfigSectionSpec
    | ModelSourceSpec
)
