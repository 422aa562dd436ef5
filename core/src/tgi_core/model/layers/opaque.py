"""Custom ops that a compiled model calls but inductor does not trace (``compiled.py``);
eager steps call two of them too, for their C++ kernels: ``tgi::attention`` in decode
steps and the packed-weight GEMMs.

- ``tgi::attention``: the step's backend reads the paged cache with per-step Python
  plans (``ForwardBatch.state``) that a graph cannot capture. The op finds its layer by
  the key :func:`register_layer` gave it and the step's ``ForwardBatch`` in
  :func:`current_batch`, set around each compiled call. It writes the KV cache as a side
  effect, which is safe because each layer's attention depends on the previous layer's
  output, so inductor cannot reorder them;
- ``tgi::packed_linear``: a oneDNN-packed bf16 weight is an opaque tensor that
  inductor's own lowering of ``_linear_pointwise`` cannot read;
- ``tgi::amx_linear`` / ``tgi::amx_linear_int8``: this project's packed-weight GEMM kernel
  (``amx_gemm``: AMX, or AVX-512 BF16; bf16 or int8 weights), a ctypes call;
- ``tgi::rotary_cos_sin``: a step's rotary ``cos``/``sin``, computed once. Traced, inductor
  inlines the ``cos``/``sin`` of every position into each layer's rotation kernel,
  evaluating them again in all 30 layers of a SmolLM-shaped step.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from tgi_core.model.layers import amx_gemm

_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_keys = itertools.count()
_step = threading.local()


def register_layer(layer: nn.Module) -> int:
    """A process-wide key for a layer the ops call back (``tgi::attention``,
    ``tgi::rotary_cos_sin``)."""
    key = next(_keys)
    _layers[key] = layer
    return key


@contextmanager
def current_batch(batch: Any) -> Iterator[None]:
    """Make ``batch`` the ``ForwardBatch`` that ``tgi::attention`` computes over, in this
    thread."""
    previous = getattr(_step, "batch", None)
    _step.batch = batch
    try:
        # a decode step the C++ attention kernel can run by itself (attention/native.py)
        with getattr(batch, "native_decode", None) or nullcontext():
            yield
    finally:
        _step.batch = previous


def is_current(batch: Any) -> bool:
    """Whether ``batch`` is this thread's current one (:func:`current_batch`)."""
    return getattr(_step, "batch", None) is batch


# Defined through torch.library.Library rather than torch.library.custom_op: the same
# opaque ops to inductor, but ~2 us of dispatch a call instead of ~13 (a decode step
# calls them ~150 times).
_library = torch.library.Library("tgi", "DEF")
_library.define("attention(Tensor q, Tensor? k, Tensor? v, int layer_key) -> Tensor")
_library.define("attention_general(Tensor q, Tensor? k, Tensor? v, int layer_key) -> Tensor")
_library.define("packed_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor")
_library.define("amx_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor")
_library.define("rotary_cos_sin(Tensor positions, Tensor? seq_lens, int key) -> (Tensor, Tensor)")
_library.define(
    "amx_linear_int8(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int out_features)"
    " -> Tensor"
)


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_key: int
) -> torch.Tensor:
    batch = getattr(_step, "batch", None)
    if batch is None:
        raise RuntimeError("tgi::attention called outside current_batch()")
    out: torch.Tensor = batch.backend.forward(_layers[layer_key], q, k, v, batch)
    return out


def _packed_linear_impl(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


_library.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_library.impl("attention_general", _attention_impl, "CompositeExplicitAutograd")


def _rotary_cos_sin_impl(
    positions: torch.Tensor, seq_lens: torch.Tensor | None, key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary: Any = _layers[key]
    cos, sin = rotary.cos_sin(positions, seq_lens)
    return cos, sin


def _rotary_cos_sin_fake(
    positions: torch.Tensor, seq_lens: torch.Tensor | None, key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    rotary: Any = _layers[key]
    shape = (positions.shape[0], int(rotary.rotary_dim))
    return (
        positions.new_empty(shape, dtype=torch.float32),
        positions.new_empty(shape, dtype=torch.float32),
    )


_library.impl("rotary_cos_sin", _rotary_cos_sin_impl, "CompositeExplicitAutograd")
torch.library.register_fake("tgi::rotary_cos_sin", _rotary_cos_sin_fake)


def _amx_linear_impl(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return amx_gemm.linear(x, packed, bias, out_features)


def _amx_linear_int8_impl(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    return amx_gemm.linear_int8(x, packed, scales, bias, out_features)


_library.impl("packed_linear", _packed_linear_impl, "CompositeExplicitAutograd")
_library.impl("amx_linear_int8", _amx_linear_int8_impl, "CompositeExplicitAutograd")
_library.impl("amx_linear", _amx_linear_impl, "CompositeExplicitAutograd")


def _attention_fake(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_key: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


def _packed_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


torch.library.register_fake("tgi::attention", _attention_fake)
torch.library.register_fake("tgi::attention_general", _attention_fake)


def _amx_linear_fake(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


torch.library.register_fake("tgi::packed_linear", _packed_linear_fake)


def _amx_linear_int8_fake(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


torch.library.register_fake("tgi::amx_linear", _amx_linear_fake)
torch.library.register_fake("tgi::amx_linear_int8", _amx_linear_int8_fake)


def attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_key: int
) -> torch.Tensor:
    """The attention layer ``layer_key``: ``q`` ``[T, H, D]`` -> ``[T, H * D]``."""
    out: torch.Tensor = torch.ops.tgi.attention(q, k, v, layer_key)
    return out


def rotary_cos_sin(
    positions: torch.Tensor, seq_lens: torch.Tensor | None, key: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary embedding ``key``'s ``cos_sin(positions, seq_lens)``, as one op."""
    cos, sin = torch.ops.tgi.rotary_cos_sin(positions, seq_lens, key)
    return cos, sin


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A bf16 ``x`` times a oneDNN-packed weight (``cpu_gemm.pack``)."""
    out: torch.Tensor = torch.ops.tgi.packed_linear(x, packed, bias)
    return out


def amx_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """A bf16 ``x`` times an AMX-packed weight (``amx_gemm.pack``)."""
    out: torch.Tensor = torch.ops.tgi.amx_linear(x, packed, bias, out_features)
    return out


def amx_linear_int8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """A bf16 ``x`` times AMX-packed int8 weights with per-output scales
    (``amx_gemm.linear_int8``)."""
    out: torch.Tensor = torch.ops.tgi.amx_linear_int8(x, packed, scales, bias, out_features)
    return out
