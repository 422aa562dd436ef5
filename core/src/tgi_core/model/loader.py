"""Build a model from a checkpoint folder and fill its weights, one tensor at a time.

Peak memory while loading is the model's weights plus the largest single tensor being
read (safetensors slices are read lazily, converted into the parameter, and freed).
Every tensor the checkpoint has must find a parameter, and every parameter must be
filled: the error names a few of either when they don't. With a quantizer
(``tgi_core.model.quantization``), linear layers get the quantizer's methods before any
tensor is read, and each layer is quantized or repacked as soon as it is complete.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
from torch import nn

from tgi_core.model.base import ModelContext, default_torch_dtype
from tgi_core.model.checkpoint import Checkpoint, CheckpointError
from tgi_core.model.layers.linear import deferred_linear_methods
from tgi_core.model.layers.norm import load_whole
from tgi_core.model.quantization import (
    bind_linear_methods,
    make_quantizer,
    quantize_vocabularies,
)
from tgi_core.model.weights import SafetensorsWeights
from tgi_core.registry import Registry
from tgi_core.specs import ModelSpec

#: Tensors that old checkpoints carry but no model needs.
ALWAYS_IGNORED = (r"\.rotary_emb\.inv_freq$", r"\.attn\.masked_bias$", r"\.attn\.bias$")
#: First-party plugins, for the "install this" hint.
KNOWN_PLUGINS = {
    "tgi-llama": ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
    "tgi-bloom": ("BloomForCausalLM",),
    "tgi-t5": ("T5ForConditionalGeneration",),
}


def _few(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def select_model_spec(checkpoint: Checkpoint, registry: Registry) -> ModelSpec:
    """The registered model serving the checkpoint's architecture (then model_type)."""
    for architecture in checkpoint.architectures:
        spec = registry.models.for_architecture(architecture)
        if spec is not None:
            return spec
    if not checkpoint.architectures and checkpoint.model_type:
        spec = registry.models.for_model_type(checkpoint.model_type)
        if spec is not None:
            return spec
    wanted = checkpoint.architectures or [f"model_type {checkpoint.model_type!r}"]
    served = ", ".join(registry.models.architectures()) or "none (no model plugin installed)"
    hint = next(
        (
            f"; install {package} (pip install {package})"
            for package, architectures in KNOWN_PLUGINS.items()
            if set(architectures) & set(checkpoint.architectures)
        ),
        "",
    )
    raise CheckpointError(
        f"no installed plugin serves {', '.join(wanted)} (from {checkpoint.path}/config.json)"
        f"{hint}. Architectures served: {served}"
    )


def _target_name(model: nn.Module, name: str) -> tuple[str, Any] | None:
    """The parameter a checkpoint tensor loads into, and its shard id; None to skip."""
    mapper = getattr(model, "map_checkpoint_name", None)
    if mapper is not None:
        mapped = mapper(name)
        if mapped is None:
            return None
        name = mapped
    for pattern in (*ALWAYS_IGNORED, *getattr(model, "ignored_checkpoint_tensors", ())):
        if re.search(pattern, name):
            return None
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    for source, (target, shard_id) in packed.items():
        if f".{source}." in name:
            return name.replace(f".{source}.", f".{target}."), shard_id
    return name, None


def _expected_loads(model: nn.Module, params: dict[str, nn.Parameter]) -> set[tuple[str, Any]]:
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    shards: dict[str, list[Any]] = {}
    for target, shard_id in packed.values():
        shards.setdefault(target, []).append(shard_id)
    expected = set()
    for name in params:
        parts = name.split(".")
        module = parts[-2] if len(parts) > 1 else ""
        for shard_id in shards.get(module, [None]):
            expected.add((name, shard_id))
    return expected


def _untie_differing_aliases(model: nn.Module, weights: SafetensorsWeights) -> None:
    """A checkpoint may store a tied head (``lm_head.weight``) that differs from the
    embedding; like transformers, give the head its own parameter then."""
    for alias, first in _canonical_names(model).items():
        if alias not in weights or first not in weights:
            continue
        if torch.equal(weights.get(alias).load(), weights.get(first).load()):
            continue
        module_name, _, param_name = alias.rpartition(".")
        module = model.get_submodule(module_name)
        shared = getattr(module, param_name)
        own = nn.Parameter(torch.empty_like(shared), requires_grad=False)
        loader = getattr(shared, "weight_loader", None)
        if loader is not None:
            own.weight_loader = loader  # type: ignore[attr-defined]
        setattr(module, param_name, own)


def load_weights(model: nn.Module, weights: SafetensorsWeights, *, progress: bool = False) -> None:
    """Fill every parameter of ``model`` from ``weights``; raise CheckpointError on mismatch.

    Each module's linear method gets ``process_weights_after_loading`` as soon as the
    module's last tensor is in (a quantizer then holds few float layers at a time).
    """
    _untie_differing_aliases(model, weights)
    canonical = _canonical_names(model)
    params = dict(model.named_parameters())
    expected = _expected_loads(model, params)
    waiting: dict[str, set[tuple[str, Any]]] = {}
    for key in expected:
        waiting.setdefault(key[0].rpartition(".")[0], set()).add(key)
    processed: set[str] = set()
    loaded: set[tuple[str, Any]] = set()
    unexpected = []
    names = list(weights.names())
    for name in _progress(names, progress):
        target = _target_name(model, name)
        if target is None:
            continue
        param_name, shard_id = target
        param_name = canonical.get(param_name, param_name)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
            continue
        if (param_name, shard_id) in loaded:  # a tied tensor saved twice
            continue
        loader = getattr(param, "weight_loader", load_whole)
        try:
            loader(param, weights.get(name), shard_id)
        except Exception as exc:  # shape mismatches, unreadable data
            detail = str(exc).removeprefix(f"{name}: ")
            raise CheckpointError(f"cannot load tensor {name}: {detail}") from None
        loaded.add((param_name, shard_id))
        module_name = param_name.rpartition(".")[0]
        module_waits = waiting.get(module_name)
        if module_waits is not None:
            module_waits.discard((param_name, shard_id))
            if not module_waits:
                _process(module_name, model.get_submodule(module_name))
                processed.add(module_name)
    if unexpected:
        raise CheckpointError(f"the checkpoint has tensors the model does not: {_few(unexpected)}")
    missing = expected - loaded
    if missing:
        raise CheckpointError(
            "the checkpoint lacks tensors the model needs: "
            + _few(name if shard is None else f"{name} ({shard})" for name, shard in missing)
        )
    for name, module in model.named_modules():
        if name not in processed:
            _process(name, module)


def _process(name: str, module: nn.Module) -> None:
    """Run a module's ``process_weights_after_loading`` (repacking, quantizing), if any."""
    method = getattr(module, "method", None)
    if method is None or not hasattr(method, "process_weights_after_loading"):
        return
    try:
        method.process_weights_after_loading(module)
    except ValueError as exc:  # e.g. a quantized checkpoint's tensors disagree
        raise CheckpointError(f"cannot prepare layer {name}: {exc}") from None


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Alias -> canonical name for parameters shared under several names (tied heads)."""
    by_identity: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = by_identity.setdefault(id(param), name)
        if first != name:
            aliases[name] = first
    return aliases


def _progress(names: list[str], enabled: bool) -> Iterable[str]:
    if not (enabled and sys.stderr.isatty()):
        return names
    from rich.progress import track

    return track(names, description="loading weights", console=None, transient=True)


@dataclass
class LoadedModel:
    """A model ready to run, with what it was built from."""

    model: nn.Module
    spec: ModelSpec
    hf_config: Any
    checkpoint: Checkpoint
    dtype: torch.dtype
    #: bytes read from the checkpoint's files while loading
    bytes_read: int = 0
    #: the quantizer's name, or None for a float model
    quantizer: str | None = None
    #: how many linear layers the quantizer took
    quantized_layers: int = 0

    @property
    def weight_bytes(self) -> int:
        """Memory of the model's parameters and buffers (quantized weights live in
        buffers; shared tensors counted once)."""
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def load_model(
    path: str,
    registry: Registry,
    *,
    ctx: ModelContext,
    progress: bool = False,
    quantize: str | None = None,
    plugin_sections: Mapping[str, msgspec.Struct] | None = None,
) -> LoadedModel:
    """Open the checkpoint at ``path``, build its model and load its weights.

    ``quantize`` names a registered quantizer (``--quantize``); a checkpoint that is
    already quantized gets the quantizer that loads its ``quant_method`` without it.
    """
    checkpoint = Checkpoint.open(path)
    spec = select_model_spec(checkpoint, registry)
    active = make_quantizer(
        checkpoint,
        registry,
        quantize,
        dtype=ctx.dtype,
        device=torch.device(ctx.device),
        tp=ctx.tp,
        plugin_sections=plugin_sections,
    )
    hf_config = checkpoint.hf_config()
    try:
        weights = SafetensorsWeights.from_files(list(checkpoint.weight_files))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read the weights of {checkpoint.path}: {exc}") from None
    deferred = deferred_linear_methods() if active is not None else nullcontext()
    try:
        with default_torch_dtype(ctx.dtype), torch.device(ctx.device), deferred:
            model = spec.load()(hf_config, ctx)
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise CheckpointError(
            f"model {spec.name!r} cannot be built for {checkpoint.path}/config.json: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    quantized = 0
    if active is not None:
        with default_torch_dtype(ctx.dtype), torch.device(ctx.device):
            quantized = bind_linear_methods(model, active)
    load_weights(model, weights, progress=progress)
    if active is not None:
        quantize_vocabularies(model, active)
    model.eval()
    name = active.spec.name if active is not None else None
    return LoadedModel(
        model, spec, hf_config, checkpoint, ctx.dtype, weights.bytes_read, name, quantized
    )
