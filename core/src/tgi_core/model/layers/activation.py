"""Activations, including the gated ones that take a packed ``[gate | up]`` input."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation transformers calls ``name`` (``hidden_act``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def gated(activation: Callable[[torch.Tensor], torch.Tensor], packed: torch.Tensor) -> torch.Tensor:
    """``activation(gate) * up`` for ``packed = [gate | up]`` along the last dimension."""
    gate, up = packed.chunk(2, dim=-1)
    return activation(gate) * up
