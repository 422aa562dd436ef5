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
share dynamo's recompile limit.

The graph's wrapper (the code that allocates its buffers and calls its kernels and
ops in order) is C++ (inductor's ``cpp_wrapper``): a one-token SmolLM-shaped step's ~250
calls cost ~0.4-0.7 ms less than from the generated Python, and the C++ wrapper compiles
no slower. ``TGI_COMPILE_CPP_WRAPPER=0`` keeps the Python wrapper.

The model's modules are frozen once compiled (:func:`frozen_module_guards`): dynamo's
~4,000 guards on their attributes' types and values, their parameters' metadata and their
empty hook dicts cost ~0.6-1 ms a call on the SmolLM shape, and are dropped. Replace a
module's attributes or parameters, or register hooks (which dynamo does not guard
anyway), before :func:`compile_forward`, not after. The step's inputs, the globals, and
the Python containers a forward mutates keep their guards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tgi_core.model.layers.attention import Attention
from tgi_core.model.layers.opaque import current_batch, register_layer
from tgi_core.model.layers.rotary import RotaryEmbedding

if TYPE_CHECKING:
    from tgi_core.attention.batch import ForwardBatch

#: Set to ``0`` to run a compiled graph from inductor's generated Python, not C++.
CPP_WRAPPER_SWITCH = "TGI_COMPILE_CPP_WRAPPER"

ModelForward = Callable[[torch.Tensor, torch.Tensor, "ForwardBatch"], torch.Tensor]

# Guards on a module's state that a serving model never changes once compiled (its
# attributes' types and values, parameters' metadata, which attributes exist, its hook
# dicts): dropped. Others on module state stay, among them the length and contents
# guards of Python containers that the forward mutates, which dynamo replays from what
# it traced (a hook that appends to a list: each call recompiles, as without a filter).
_STATIC_MODULE_GUARDS = frozenset(
    {
        "CONSTANT_MATCH",
        "DUPLICATE_INPUT",
        "EMPTY_NN_MODULE_HOOKS_DICT",
        "EQUALS_MATCH",
        "FALSE_MATCH",
        "ID_MATCH",
        "NONE_MATCH",
        "NOT_PRESENT_IN_GENERIC_DICT",
        "TENSOR_MATCH",
        "TRUE_MATCH",
        "TYPE_MATCH",
    }
)


def frozen_module_guards(entries: Sequence[Any]) -> list[bool]:
    """dynamo's ``guard_filter_fn``: which guards to keep. The guards of
    ``_STATIC_MODULE_GUARDS``' kinds on the state of an ``nn.Module`` are dropped; guards
    on the inputs, globals and grad mode, and the other kinds on modules, are kept."""
    return [
        entry.guard_type not in _STATIC_MODULE_GUARDS
        or not entry.orig_guard.source.is_unspecialized_nn_module()
        for entry in entries
    ]


def register_op_layers(model: nn.Module) -> None:
    """Give ``model``'s attention and rotary layers their keys for the custom ops
    (``op_key``), once per layer: a compiled graph holds the key as a constant, a new
    one would make every later :func:`compile_forward` of the model recompile."""
    for layer in model.modules():
        if isinstance(layer, Attention | RotaryEmbedding) and layer.op_key < 0:
            layer.op_key = register_layer(layer)


def eager_forward(model: nn.Module) -> ModelForward:
    """``model.forward`` uncompiled, with the step's batch current (``current_batch``):
    in a decode step the attention layers then call ``tgi::attention`` themselves, whose
    C++ kernel runs a plain self-attention layer without the Python backend
    (``Attention.forward``)."""
    register_op_layers(model)
    return _with_current_batch(model)


def _with_current_batch(call: ModelForward) -> ModelForward:
    """``call`` run with the step's batch current, for the attention op."""

    def forward(
        input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        with current_batch(batch):
            out: torch.Tensor = call(input_ids, positions, batch)
        return out

    return forward


def compile_forward(model: nn.Module) -> ModelForward:
    """``model.forward`` compiled by inductor; call it only through the returned
    function, which makes the step's batch current for the attention op."""
    register_op_layers(model)
    # torch.compile's typed overloads lack isolate_recompiles, which its signature has
    compiled = torch.compile(  # type: ignore[call-overload]
        model.forward,
        dynamic=True,
        isolate_recompiles=True,
        options={
            "size_asserts": False,
            "guard_filter_fn": frozen_module_guards,
            "cpp_wrapper": os.environ.get(CPP_WRAPPER_SWITCH, "1") != "0",
        },
    )
    return _with_current_batch(compiled)
