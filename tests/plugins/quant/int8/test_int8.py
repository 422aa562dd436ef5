"""tgi-int8: per-channel quantization, the layer on the CPU kernel and the portable path."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tgi_core.model.layers import amx_gemm
from tgi_core.model.layers.linear import ReplicatedLinear
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor
from tgi_int8 import Int8Settings
from tgi_int8.method import (
    KERNEL_MAX_ROWS,
    Int8LinearMethod,
    Int8Quantizer,
    dequantize,
    quantize_per_channel,
)

GENERATOR = torch.Generator().manual_seed(0)


def test_registered_with_its_config_section(tgi_registry: Any) -> None:
    spec = tgi_registry.quantizers["int8"]
    assert spec.quantizes_at_load and spec.quant_methods == ()
    assert tgi_registry.quantizers.owner("int8").distribution == "tgi-int8"
    assert tgi_registry.config_sections["int8"].schema is Int8Settings


def test_quantization_round_trips_within_half_a_step(formats: Any) -> None:
    weight = torch.randn(48, 80, generator=GENERATOR)
    weight[3] = 0  # an all-zero channel gets scale 1, not a division by zero
    q, scale = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert int(q.abs().max()) <= 127
    error = (dequantize(q, scale) - weight).abs()
    assert bool((error <= scale.float()[:, None] / 2 + 1e-6).all())
    assert float(scale[3]) == 1.0 and not q[3].any()
    # the tests' independent formula gives the same weights
    assert torch.equal(dequantize(q, scale), formats.int8_reference(weight))


def layer_with(
    method: Int8LinearMethod,
    weight: torch.Tensor,
    bias: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> ReplicatedLinear:
    out, inputs = weight.shape
    layer = ReplicatedLinear(inputs, out, bias=True, method=method, dtype=dtype)
    layer.weight_loader(layer.weight, LazyTensor.of(weight, "w"))
    layer.weight_loader(layer.bias, LazyTensor.of(bias, "b"))
    method.process_weights_after_loading(layer)
    return layer


def needs_amx(path: str) -> None:
    if path == "amx" and not amx_gemm.available():
        pytest.skip("no AMX or AVX-512 BF16 kernel on this CPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["portable", "kernel", "amx"])
def test_layer_equals_matmul_with_dequantized_weights(path: str, dtype: torch.dtype) -> None:
    """Portable in float32: exact (1e-5). The kernels (torch's, or the AMX one) multiply
    bfloat16 activations and round the output to bfloat16: within 1% of its magnitude."""
    needs_amx(path)
    kernel = path != "portable"
    weight, bias = torch.randn(48, 64, generator=GENERATOR), torch.randn(48, generator=GENERATOR)
    layer = layer_with(Int8LinearMethod(kernel, use_amx=path == "amx"), weight, bias, dtype)
    assert not hasattr(layer, "weight")  # the float weight is gone
    assert layer.tensor("qweight").dtype == torch.int8
    assert amx_gemm.is_packed(layer.tensor("qweight")) == (path == "amx")
    x = torch.randn(2, 3, 64, generator=GENERATOR).to(dtype)  # any leading shape
    q, scale = quantize_per_channel(weight)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 3, 48)
    inputs = x.to(torch.bfloat16) if kernel else x
    expected = inputs.float() @ dequantize(q, scale).T + bias.to(dtype).float()
    exact = dtype == torch.float32 and not kernel
    tolerance = 1e-5 if exact else 1e-2 * float(expected.abs().max())
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_take_a_gemm_over_the_int8_values(monkeypatch, dtype: torch.dtype) -> None:
    """Past KERNEL_MAX_ROWS tokens (prefill, large batches), the kernel's per-row loop
    is slower than a GEMM over the int8 values: the layer takes the portable path, exact
    in float32 and within 1% in bfloat16 (one more rounding of the output)."""
    weight, bias = torch.randn(48, 64, generator=GENERATOR), torch.randn(48, generator=GENERATOR)
    layer = layer_with(Int8LinearMethod(True), weight, bias, dtype)
    calls = []
    kernel = torch.ops.aten._weight_int8pack_mm

    class CountingOps:
        @staticmethod
        def _weight_int8pack_mm(*args: Any) -> torch.Tensor:
            calls.append(args[0].shape[0])
            return kernel(*args)

    monkeypatch.setattr(torch.ops, "aten", CountingOps)
    few = torch.randn(KERNEL_MAX_ROWS, 64, generator=GENERATOR).to(dtype)
    many = torch.randn(KERNEL_MAX_ROWS + 1, 64, generator=GENERATOR).to(dtype)
    layer(few)
    out = layer(many)
    assert calls == [KERNEL_MAX_ROWS]  # the few rows only
    q, scale = quantize_per_channel(weight)
    expected = many.float() @ dequantize(q, scale).T + bias.to(dtype).float()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2 * float(expected.abs().max())
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=tolerance)


def test_layers_the_kernel_cannot_take_run_portable() -> None:
    """The CPU kernel reads input features 16 at a time (other sizes crash or compute
    garbage in torch 2.13), so a layer with 24 inputs takes the portable path."""
    quantizer = Int8Quantizer(QuantizerContext(name="int8"))
    assert quantizer.use_kernel
    odd, even = ReplicatedLinear(24, 8), ReplicatedLinear(32, 8)
    assert not quantizer.linear_method(odd, "odd").use_kernel
    assert quantizer.linear_method(even, "even").use_kernel
    weight = torch.randn(8, 24, generator=GENERATOR)
    layer = layer_with(quantizer.linear_method(odd, "odd"), weight, torch.zeros(8))
    x = torch.randn(3, 24, generator=GENERATOR)
    q, scale = quantize_per_channel(weight)
    torch.testing.assert_close(layer(x), x @ dequantize(q, scale).T, rtol=1e-5, atol=1e-5)


def test_portable_setting_and_other_devices_skip_the_kernel() -> None:
    portable = QuantizerContext(
        name="int8", plugin_sections={"int8": Int8Settings(kernel="portable")}
    )
    assert not Int8Quantizer(portable).use_kernel
    meta = QuantizerContext(name="int8", device=torch.device("meta"))
    assert not Int8Quantizer(meta).use_kernel


@pytest.mark.parametrize("path", ["portable", "kernel", "amx"])
def test_vocabulary_table_lookup_and_logits(path: str) -> None:
    """One int8 table serves a tied embedding and LM head: lookups are the dequantized
    rows, logits the matmul with them; the float weight is gone and the int8 table is
    stored once (in the AMX kernel's layout where that runs the head)."""
    needs_amx(path)
    kernel = path != "portable"
    from torch import nn

    from tgi_core.model.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from tgi_core.model.loader import LoadedModel
    from tgi_int8.method import Int8Vocabulary

    weight = torch.randn(40, 64, generator=GENERATOR).bfloat16()
    embedding = VocabParallelEmbedding(40, 64, dtype=torch.bfloat16)
    embedding.weight.data.copy_(weight)
    head = ParallelLMHead(40, 64, dtype=torch.bfloat16)
    head.tie_to(embedding)
    table = Int8Vocabulary(weight, use_kernel=kernel, use_amx=path == "amx")
    assert amx_gemm.is_packed(table.qweight) == (path == "amx")
    embedding.quantize(table)
    head.quantize(table)
    exact = dequantize(table.values(), table.scales)
    assert torch.equal(table.values(), quantize_per_channel(weight)[0])
    ids = torch.tensor([[0, 7], [39, 7]])  # any shape of ids
    torch.testing.assert_close(embedding(ids), exact[ids].bfloat16(), rtol=0, atol=0)
    hidden = torch.randn(3, 64, generator=GENERATOR).bfloat16()
    expected = hidden.float() @ exact.T
    torch.testing.assert_close(head(hidden).float(), expected, atol=0.05, rtol=0.02)
    assert not hasattr(embedding, "weight") and not hasattr(head, "weight")
    model = nn.ModuleDict({"embed": embedding, "head": head})
    loaded = LoadedModel.__new__(LoadedModel)
    loaded.model = model
    padded = 64 if path == "amx" else 40  # the kernel's layout pads rows to 32
    assert loaded.weight_bytes == padded * 64 + 40 * 2  # int8 values and bf16 scales, once


def test_vocabulary_setting_keeps_tables_float() -> None:
    ctx = QuantizerContext(name="int8", plugin_sections={"int8": Int8Settings(vocabulary=False)})
    assert Int8Quantizer(ctx).vocabulary_method(torch.zeros(4, 16), "lm_head") is None
    assert (
        Int8Quantizer(QuantizerContext(name="int8")).vocabulary_method(
            torch.zeros(4, 16), "lm_head"
        )
        is not None
    )
