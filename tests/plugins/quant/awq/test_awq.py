"""tgi-awq: AutoAWQ's interleaved packing (checked on a known value), unpacking round
trips, layers, skipped modules, and the checkpoints it refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tgi_awq.format import AWQConfig, unpack
from tgi_awq.method import AWQLinearMethod, AWQQuantizer
from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.layers.linear import LinearBase, ReplicatedLinear, UnquantizedLinearMethod
from tgi_core.model.loader import load_model
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor

GENERATOR = torch.Generator().manual_seed(0)


def test_registered_for_awq_checkpoints(tgi_registry: Any) -> None:
    spec = tgi_registry.quantizers["awq"]
    assert spec.quant_methods == ("awq",) and not spec.quantizes_at_load


def test_the_writer_interleaves_as_autoawq_does(formats: Any) -> None:
    """Output features 0..7 land in nibbles 0, 4, 1, 5, 2, 6, 3, 7 (AutoAWQ's order
    0, 2, 4, 6, 1, 3, 5, 7 says which feature each nibble holds)."""
    packed = formats.awq_pack(torch.arange(8).view(1, 8))
    assert packed.tolist() == [[0x75316420]]


def test_unpacking_round_trips(formats: Any) -> None:
    values = torch.randint(0, 16, (12, 64), generator=GENERATOR)
    assert torch.equal(unpack(formats.awq_pack(values)).long(), values)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
def test_layer_equals_matmul_with_dequantized_weights(kernel: bool, formats: Any) -> None:
    """Portable: exact in float32. Kernel: bfloat16 activations, scales and output,
    within 1% of the output's magnitude."""
    weight = torch.randn(32, 128, generator=GENERATOR)
    tensors, dequantized = formats.awq_layer(weight, 64)
    method = AWQLinearMethod(AWQConfig(64, ()), use_kernel=kernel)
    layer = ReplicatedLinear(128, 32, method=method)
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, LazyTensor.of(tensor, name))
    method.process_weights_after_loading(layer)
    assert (method.kernel_group_size == 64) == kernel
    x = torch.randn(3, 128, generator=GENERATOR)
    expected = (x.bfloat16().float() if kernel else x) @ dequantized.T
    if kernel:
        atol = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=atol)
    else:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_modules_to_not_convert_stay_float() -> None:
    qconfig = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 32,
        "modules_to_not_convert": ["mlp.down_proj"],
    }
    quantizer = AWQQuantizer(QuantizerContext(name="awq", quantization_config=qconfig))
    layer: LinearBase = ReplicatedLinear(64, 16, method=UnquantizedLinearMethod())
    assert quantizer.linear_method(layer, "model.layers.0.mlp.down_proj") is None
    assert isinstance(
        quantizer.linear_method(layer, "model.layers.0.mlp.gate_up_proj"), AWQLinearMethod
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bits": 3}, r"only 4-bit AWQ checkpoints are supported, not bits=3"),
        ({"version": "GEMV"}, r"AWQ version 'gemv' is not supported \(only 'gemm'\)"),
        ({"zero_point": False}, r"AWQ checkpoints without zero points are not supported"),
    ],
)
def test_unsupported_checkpoints_are_refused_at_startup(
    changes: dict[str, Any], message: str, tiny_llama: Path, tgi_registry: Any, awq_checkpoint: Any
) -> None:
    quantized, _ = awq_checkpoint(tiny_llama, group_size=32)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"].update(changes)
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=rf"^quantizer 'awq' cannot serve {quantized}: {message}$"
    ):
        load_model(str(quantized), tgi_registry, ctx=ModelContext())


def test_awq_detected_without_quantize(
    tiny_llama: Path, tgi_registry: Any, awq_checkpoint: Any
) -> None:
    quantized, _ = awq_checkpoint(tiny_llama, group_size=32)
    loaded = load_model(str(quantized), tgi_registry, ctx=ModelContext())
    assert loaded.quantizer == "awq" and loaded.quantized_layers == 4 * 2
    assert (
        load_model(str(quantized), tgi_registry, ctx=ModelContext(), quantize="awq").quantizer
        == "awq"
    )
