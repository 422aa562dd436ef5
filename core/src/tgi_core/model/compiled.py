"""``torch.compile`` of a model's forward (``--compile``), attention kept opaque.

``compile_forward(model)`` returns a callable with the model's ``forward`` signature
``(input_ids, positions, batch)``. Inductor fuses what lies between the GEMMs and the
attention calls (norms, residual adds, rotary, the gated activation, dtype casts) into a
few C++ kernels per layer and runs the step as one graph, instead of ~30 eager ops per
layer each paying PyTorch's dispatch overhead. Attention and oneDNN-packed GEMMs run as
custom ops the graph calls (``layers/opaque.py``).

Shapes are dynamic: one graph serves every number of tokens (dynamo specializes a
one-token step apart, so the first step of one token compiles a second graph).

A step at one or a few sequences is short (~10 ms on the SmolLM shape), so what the
compiled call costs around the kernels counts: inductor's size and stride asserts on
every buffer (~450 a step, ~0.4 ms) are turned off. Each :func:`compile_forward` keeps
its own compiled entries (``isolate_recompiles``), so the models of one process do not
share dynamo's recompile limit. dynamo's guards on the model's modules stay: skipping
them saved another ~0.5 ms a step, but a forward hook registered after the first
compile then no longer runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tgi_core.model.layers.attention import Attention
from tgi_core.model.layers.opaque import current_batch, register_layer
from tgi_core.model.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from tgi_core.attention.batch import ForwardBatch

ModelForward = Callable[[torch.Tensor, torch.Tensor, "ForwardBatch"], torch.Tensor]


def compile_forward(model: nn.Module) -> ModelForward:
    """``model.forward`` compiled by inductor; call it only through the returned
    function, which makes the step's batch current for the attention op."""
    for layer in model.modules():
        if isinstance(layer, Attention | RotaryEmbedding) and layer.compile_key < 0:
            # once per layer: the graph holds the key as a constant, a new one would
            # make every later compile_forward of the model recompile
            layer.compile_key = register_layer(layer)
    # torch.compile's typed overloads lack isolate_recompiles, which its signature has
    compiled = torch.compile(  # type: ignore[call-overload]
        model.forward,
        dynamic=True,
        isolate_recompiles=True,
        options={"size_asserts": False},
    )

    def forward(
        input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        with current_batch(batch):
            out: torch.Tensor = compiled(input_ids, positions, batch)
        return out

    return forward
