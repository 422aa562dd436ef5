"""Custom ops that a compiled model calls but inductor does not trace (``compiled.py``).

- ``tgi::attention``: the step's backend reads the paged cache with per-step Python
  plans (``ForwardBatch.state``) that a graph cannot capture. The op finds its layer by
  the key :func:`register_layer` gave it and the step's ``ForwardBatch`` in
  :func:`current_batch`, set around each compiled call. It writes the KV cache as a side
  effect, which is safe because each layer's attention depends on the previous layer's
  output, so inductor cannot reorder them;
- ``tgi::packed_linear``: a oneDNN-packed bf16 weight is an opaque tensor that
  inductor's own lowering of ``_linear_pointwise`` cannot read.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_layers: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()
_keys = itertools.count()
_step = threading.local()


def register_layer(layer: nn.Module) -> int:
    """A process-wide key for an attention layer, for ``tgi::attention``."""
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
        yield
    finally:
        _step.batch = previous


@torch.library.custom_op("tgi::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_key: int
) -> torch.Tensor:
    """The attention layer ``layer_key``: ``q`` ``[T, H, D]`` -> ``[T, H * D]``."""
    batch = getattr(_step, "batch", None)
    if batch is None:
        raise RuntimeError("tgi::attention called outside current_batch()")
    out: torch.Tensor = batch.backend.forward(_layers[layer_key], q, k, v, batch)
    return out


@attention.register_fake
def _(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_key: int
) -> torch.Tensor:
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


@torch.library.custom_op("tgi::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A bf16 ``x`` times a oneDNN-packed weight (``cpu_gemm.pack``)."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


@packed_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])
