"""tgi-int4: group-wise quantization, nibble packing, the CPU kernel's layout and when
a layer can use it, and the int4 quantizer's refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.linear import (
    ReplicatedLinear,
    RowParallelLinear,
    deferred_linear_methods,
)
from tgi_core.model.loader import load_model
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor
from tgi_int4 import Int4Settings
from tgi_int4.method import Int4AtLoadMethod, Int4Quantizer, quantize_groupwise
from tgi_int4.runtime import (
    GroupwiseInt4,
    Int4LinearMethod,
    KernelPlan,
    kernel_plan,
    pack_nibbles,
    unpack_nibbles,
)

GENERATOR = torch.Generator().manual_seed(0)


def random_int4(out: int, inputs: int, groups: int, index: torch.Tensor) -> GroupwiseInt4:
    return GroupwiseInt4(
        torch.randint(0, 16, (out, inputs), generator=GENERATOR, dtype=torch.uint8),
        torch.rand(out, groups, generator=GENERATOR).bfloat16().float() + 0.01,
        torch.randn(out, groups, generator=GENERATOR).bfloat16().float(),
        index,
    )


def test_registered_with_its_config_section(tgi_registry: Any) -> None:
    assert tgi_registry.quantizers["int4"].quantizes_at_load
    assert tgi_registry.config_sections["int4"].schema is Int4Settings


@pytest.mark.parametrize("cols", [1, 6, 7, 64])
def test_nibble_packing_round_trips(cols: int) -> None:
    q = torch.randint(0, 16, (5, cols), generator=GENERATOR, dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (5, (cols + 1) // 2)
    assert torch.equal(unpack_nibbles(packed, cols), q)
    assert int(pack_nibbles(torch.tensor([[3, 12]], dtype=torch.uint8))) == 0xC3


def test_groupwise_quantization_round_trips_within_half_a_step(formats: Any) -> None:
    weight = torch.randn(32, 128, generator=GENERATOR)
    weight[0, :32] = 0.5  # a constant group
    quantized = quantize_groupwise(weight, 32)
    assert quantized.q.dtype == torch.uint8 and int(quantized.q.max()) <= 15
    step = quantized.scale.repeat_interleave(32, dim=1)
    error = (quantized.dequantize() - weight).abs()
    # half a step, plus what rounding the offset to bfloat16 shifts it by
    slack = quantized.offset.abs().repeat_interleave(32, dim=1) * 2**-8
    assert bool((error <= step / 2 + slack + 1e-6).all())
    assert torch.equal(quantized.dequantize()[0, :32], weight[0, :32])
    assert torch.equal(quantized.dequantize(), formats.int4_reference(weight, 32))


def test_the_kernel_layout_round_trips() -> None:
    """torch's packed layout is opaque: multiplying by the identity reads it back. With
    power-of-two scales and no offsets every step is exact in bfloat16, so any value in
    the wrong place shows."""
    weights = random_int4(32, 128, 4, torch.arange(128) // 32)
    weights.scale = 2.0 ** torch.randint(-4, 2, weights.scale.shape, generator=GENERATOR)
    weights.offset = torch.zeros_like(weights.scale)
    method = Int4LinearMethod(use_kernel=True)
    layer = ReplicatedLinear(128, 32, method=_Installed(method, weights))
    assert method.kernel_group_size == 128 // 4
    assert torch.equal(layer(torch.eye(128)), weights.dequantize().T)


class _Installed(Int4LinearMethod):
    """Installs given weights as the layer is built (no checkpoint)."""

    def __init__(self, method: Int4LinearMethod, weights: GroupwiseInt4) -> None:
        self.inner, self.weights = method, weights

    def create_weights(self, layer: Any, dtype: torch.dtype) -> None:
        self.inner.install(layer, self.weights)

    def apply(self, layer: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.inner.apply(layer, x, bias)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("grouping", ["contiguous", "act-order", "uneven"], ids=lambda g: g)
def test_layer_equals_matmul_with_dequantized_weights(kernel: bool, grouping: str) -> None:
    """Portable: exact in float32 (1e-5). Kernel: bfloat16 activations and output, within
    1% of the output's magnitude; act-order features are permuted into contiguous groups;
    groups of uneven sizes fall back to the portable path."""
    inputs = 128
    if grouping == "contiguous":
        index = torch.arange(inputs) // 32
    elif grouping == "act-order":
        index = torch.randperm(inputs, generator=GENERATOR) // 32
    else:  # sizes 48, 16, 64: a rank's share of act-order groups
        index = torch.tensor([0] * 48 + [1] * 16 + [2] * 64)[
            torch.randperm(inputs, generator=GENERATOR)
        ]
    weights = random_int4(48, inputs, 4, index)
    method = Int4LinearMethod(use_kernel=kernel)
    layer = ReplicatedLinear(inputs, 48, method=_Installed(method, weights))
    expect_kernel = kernel and grouping != "uneven"
    assert (method.kernel_group_size is not None) == expect_kernel
    if expect_kernel:
        assert method.kernel_group_size == (32 if grouping != "uneven" else None)
        assert method.permuted == (grouping == "act-order")
    x = torch.randn(4, inputs, generator=GENERATOR)
    inputs_used = x.bfloat16().float() if expect_kernel else x
    expected = inputs_used @ weights.dequantize().T
    tolerance = 1e-2 * float(expected.abs().max()) if expect_kernel else 1e-5
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=tolerance)


def test_kernel_plan_needs_16_outputs_and_fitting_groups() -> None:
    assert kernel_plan(random_int4(24, 64, 2, torch.arange(64) // 32)) is None
    per_channel = random_int4(16, 96, 1, torch.zeros(96, dtype=torch.long))
    assert kernel_plan(per_channel) == KernelPlan(None, 32, 0)  # one group of 96
    # one group of 40: the least padding (24), then the larger kernel group (64)
    assert kernel_plan(random_int4(16, 40, 1, torch.zeros(40, dtype=torch.long))) == KernelPlan(
        None, 64, 24
    )
    # groups of 64 and a last one of 48: kernel groups of 64, the last padded by 16
    ragged = random_int4(16, 688, 11, torch.arange(688) // 64)
    assert kernel_plan(ragged) == KernelPlan(None, 64, 16)
    # a rank holding every group's scales uses only its own: the rest are dropped
    used = random_int4(16, 64, 6, torch.arange(64) // 32 + 2).compacted()
    assert used.scale.shape == (16, 2) and torch.equal(used.group_index, torch.arange(64) // 32)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
def test_a_short_last_group(kernel: bool, formats: Any) -> None:
    """688 inputs in groups of 64 (the demo model's down_proj): ten groups and one of
    48, which the kernel pads with zero inputs; any group size and any layer size load."""
    weight = torch.randn(32, 688, generator=GENERATOR)
    quantized = quantize_groupwise(weight, 64)
    assert quantized.scale.shape == (32, 11)
    assert torch.equal(quantized.dequantize(), formats.int4_reference(weight, 64))
    quantizer = Int4Quantizer(
        QuantizerContext(name="int4", plugin_sections={"int4": Int4Settings(group_size=64)})
    )
    with deferred_linear_methods():  # as the loader builds layers for a quantizer
        row = RowParallelLinear(1376, 32, tp=ParallelContext(rank=1, world_size=2))
    method = quantizer.linear_method(row, "row")
    method.use_kernel = kernel
    row.bind_method(method)
    row.weight_loader(row.weight, LazyTensor.of(torch.cat([weight, weight], dim=1), "w"))
    method.process_weights_after_loading(row)
    assert method.pad == (16 if kernel else 0)
    x = torch.randn(3, 688, generator=GENERATOR)
    expected = (x.bfloat16().float() if kernel else x) @ quantized.dequantize().T
    if kernel:
        atol = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(row(x), expected, rtol=0, atol=atol)
    else:
        torch.testing.assert_close(row(x), expected, rtol=1e-5, atol=1e-5)


def test_int4_is_refused_on_a_prequantized_checkpoint(
    tmp_path: Any, tiny_llama: Any, tgi_registry: Any, awq_checkpoint: Any
) -> None:
    quantized, _ = awq_checkpoint(tiny_llama, group_size=32)
    with pytest.raises(
        ConfigError,
        match=r"--quantize int4 cannot apply to .*: its weights are "
        r"already quantized with 'awq' \(config.json quantization_config\); "
        r"leave --quantize unset to load it with awq",
    ):
        load_model(str(quantized), tgi_registry, ctx=ModelContext(), quantize="int4")


def test_at_load_method_quantizes_what_it_loaded() -> None:
    weight = torch.randn(32, 64, generator=GENERATOR)
    method = Int4AtLoadMethod(32, use_kernel=False)
    layer = ReplicatedLinear(64, 32, method=method)
    layer.weight_loader(layer.weight, LazyTensor.of(weight, "w"))
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight")
    x = torch.randn(3, 64, generator=GENERATOR)
    expected = x @ quantize_groupwise(weight, 32).dequantize().T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
