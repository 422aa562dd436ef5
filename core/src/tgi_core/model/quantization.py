"""Which quantizer a checkpoint is served with, and how it reaches the linear layers.

The contract with quantizer plugins: a :class:`~tgi_core.specs.QuantizerSpec`'s factory
is called once per model load as ``factory(ctx: QuantizerContext)`` and returns a
:class:`Quantizer`. The loader builds the model with :func:`deferred_linear_methods`
active, so linear layers built without an explicit method create no weights yet; then
it asks the quantizer, layer by layer and with the layer's module name, for a
:class:`~tgi_core.model.layers.linear.LinearMethod` (``None`` keeps the layer in
floating point), and loads the checkpoint through the methods' parameters. Model
plugins never see any of this. Each layer's ``process_weights_after_loading`` runs as
soon as its last tensor is loaded, so a quantize-at-load method holds at most a few
float layers at a time.

Choosing the quantizer (:func:`select_quantizer`): a checkpoint whose config.json has a
``quantization_config`` is served by the quantizer whose spec lists its
``quant_method``; ``--quantize NAME`` on a float checkpoint picks a quantizer that
quantizes while loading. Every other combination is a one-line startup error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import msgspec
import torch
from torch import nn

from tgi_core.errors import ConfigError
from tgi_core.model.checkpoint import Checkpoint, CheckpointError
from tgi_core.model.layers.embedding import VocabParallelEmbedding, VocabularyMethod
from tgi_core.model.layers.linear import LinearBase, LinearMethod, UnquantizedLinearMethod
from tgi_core.model.parallel import ParallelContext, current_parallel_context
from tgi_core.registry import Registry
from tgi_core.specs import QuantizerSpec

T = TypeVar("T", bound=msgspec.Struct)

#: What to do about a ``quant_method`` no installed quantizer loads.
HINTS = {
    "gptq": "install tgi-gptq (pip install tgi-gptq)",
    "awq": "install tgi-awq (pip install tgi-awq)",
    "bitsandbytes": "tgi does not load checkpoints saved quantized by bitsandbytes: serve "
    "the float checkpoint with --quantize bitsandbytes-nf4 (pip install tgi-bitsandbytes)",
}


@dataclass(frozen=True)
class QuantizerContext:
    """What a quantizer's factory receives."""

    #: the registered name it was chosen by (one factory may serve several names)
    name: str
    #: the checkpoint's ``quantization_config`` when it is already quantized, else None
    quantization_config: Mapping[str, Any] | None = None
    #: the model's dtype (activations and unquantized parameters)
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp: ParallelContext = field(default_factory=current_parallel_context)
    #: every validated ``[plugins.NAME]`` config section
    plugin_sections: Mapping[str, msgspec.Struct] = field(default_factory=dict)

    def section(self, name: str, schema: type[T]) -> T:
        """The ``[plugins.NAME]`` section, or the schema's defaults when none is known."""
        value = self.plugin_sections.get(name)
        if value is None:
            return schema()
        if not isinstance(value, schema):
            raise TypeError(f"section {name!r} is a {type(value).__name__}, not {schema.__name__}")
        return value


class Quantizer(Protocol):
    """What a ``QuantizerSpec`` factory returns: the method of each linear layer.

    The factory raises ``ValueError`` (or ``ImportError``) with a message for users
    when it cannot serve the checkpoint here (an unsupported ``quantization_config``, a
    missing library); the server stops with that message.
    """

    def linear_method(self, layer: LinearBase, prefix: str) -> LinearMethod | None:
        """The method for the linear layer named ``prefix`` in the model (fused layers
        carry their fused name, e.g. ``model.layers.0.self_attn.qkv_proj``), or None to
        keep it unquantized. Raise ``ValueError`` for a layer the method cannot take
        (e.g. input features per rank that are not a multiple of the group size)."""


@dataclass(frozen=True)
class ActiveQuantizer:
    """A quantizer chosen for one model load."""

    spec: QuantizerSpec
    quantizer: Quantizer


def quant_method_of(checkpoint: Checkpoint) -> str | None:
    """The checkpoint's ``quantization_config.quant_method``, or None for a float one."""
    qconfig = checkpoint.quantization_config
    if qconfig is None:
        return None
    method = qconfig.get("quant_method")
    if not isinstance(method, str) or not method:
        raise CheckpointError(
            f"{checkpoint.path}/config.json has a quantization_config without a quant_method"
        )
    return method.lower()


def _loaders(registry: Registry) -> str:
    loaders = sorted(
        f"{spec.name} ({', '.join(spec.quant_methods)})"
        for spec in registry.quantizers
        if spec.quant_methods
    )
    return ", ".join(loaders) or "none installed"


def select_quantizer(
    checkpoint: Checkpoint, registry: Registry, requested: str | None
) -> QuantizerSpec | None:
    """The quantizer that serves ``checkpoint`` with ``--quantize requested`` (or None).

    Raises :class:`CheckpointError` or :class:`ConfigError` for a combination that
    cannot be served: a quant_method no installed plugin loads, ``--quantize`` on a
    checkpoint quantized otherwise, a pre-quantized-only method on a float checkpoint.
    """
    method = quant_method_of(checkpoint)
    spec = registry.quantizers[requested] if requested is not None else None
    if method is None:
        if spec is None or spec.quantizes_at_load:
            return spec
        at_load = sorted(s.name for s in registry.quantizers if s.quantizes_at_load)
        raise ConfigError(
            f"--quantize {spec.name} loads checkpoints already quantized with "
            f"{', '.join(spec.quant_methods) or spec.name}, but {checkpoint.path}/config.json "
            "has no quantization_config; to quantize a float checkpoint while loading use "
            f"one of: {', '.join(at_load) or 'none installed'}"
        )
    loaders = [s for s in registry.quantizers if method in s.quant_methods]
    if spec is not None:
        if spec.name in {s.name for s in loaders}:
            return spec
        instead = f"; leave --quantize unset to load it with {loaders[0].name}" if loaders else ""
        raise ConfigError(
            f"--quantize {spec.name} cannot apply to {checkpoint.path}: its weights are "
            f"already quantized with {method!r} (config.json quantization_config){instead}"
        )
    if not loaders:
        hint = f"; {HINTS[method]}" if method in HINTS else ""
        raise CheckpointError(
            f"{checkpoint.path} is quantized with {method!r} (config.json "
            f"quantization_config.quant_method), which no installed quantizer loads{hint}. "
            f"Quantizers that load checkpoints: {_loaders(registry)}"
        )
    return loaders[0]


def make_quantizer(
    checkpoint: Checkpoint,
    registry: Registry,
    requested: str | None,
    *,
    dtype: torch.dtype,
    device: torch.device,
    tp: ParallelContext,
    plugin_sections: Mapping[str, msgspec.Struct] | None = None,
) -> ActiveQuantizer | None:
    """Select the quantizer for ``checkpoint`` and build it (None: no quantization)."""
    spec = select_quantizer(checkpoint, registry, requested)
    if spec is None:
        return None
    ctx = QuantizerContext(
        name=spec.name,
        quantization_config=checkpoint.quantization_config,
        dtype=dtype,
        device=device,
        tp=tp,
        plugin_sections=plugin_sections or {},
    )
    try:
        quantizer = spec.load()(ctx)
    except (ValueError, ImportError, RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"quantizer {spec.name!r} cannot serve {checkpoint.path}: {exc}"
        ) from None
    return ActiveQuantizer(spec, quantizer)


def quantize_vocabularies(model: nn.Module, active: ActiveQuantizer) -> int:
    """Quantize the embedding and LM head tables, if the quantizer does.

    A quantizer may have ``vocabulary_method(weight, prefix) -> VocabularyMethod | None``
    (``weight``: the loaded table's local rows; ``prefix``: the module's name); a table
    shared by a tied embedding and LM head gets one method for both. Returns how many
    modules were quantized.
    """
    make = getattr(active.quantizer, "vocabulary_method", None)
    if make is None:
        return 0
    methods: dict[int, VocabularyMethod | None] = {}
    quantized = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, VocabParallelEmbedding) or module.method is not None:
            continue
        key = id(module.weight)
        if key not in methods:
            try:
                methods[key] = make(module.weight.data, name)
            except ValueError as exc:
                raise CheckpointError(
                    f"quantizer {active.spec.name!r} cannot take table {name}: {exc}"
                ) from None
        method = methods[key]
        if method is not None:
            module.quantize(method)
            quantized += 1
    return quantized


def bind_linear_methods(model: nn.Module, active: ActiveQuantizer) -> int:
    """Give every linear layer still waiting for a method the quantizer's choice.

    Returns how many layers got a quantized method. A layer the method refuses is a
    :class:`CheckpointError` naming the layer.
    """
    quantized = 0
    for name, module in model.named_modules():
        if not (isinstance(module, LinearBase) and module.method_pending):
            continue
        try:
            method = active.quantizer.linear_method(module, name)
            module.bind_method(method or UnquantizedLinearMethod())
        except ValueError as exc:
            raise CheckpointError(
                f"quantizer {active.spec.name!r} cannot take layer {name}: {exc}"
            ) from None
        quantized += method is not None
    return quantized
